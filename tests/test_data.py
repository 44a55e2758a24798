"""Data loading: every format round-trips; bad data gets one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flatcli import archs
from flatcli.data import as_batches, check_fits, fit_inputs, load_data
from flatcli.errors import FlatcliError, UsageError

RNG = np.random.default_rng(0)
X = RNG.random((30, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 30)
XT, YT = X[:10] * 2, Y[:10]


def check(ds, x: np.ndarray, y: np.ndarray) -> None:
    assert np.allclose(ds.x.numpy(), x) and np.array_equal(ds.y.numpy(), y)
    assert ds.y.dtype == torch.int64


def test_npz_round_trip(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=X, y=Y, x_test=XT, y_test=YT)
    check(load_data(str(tmp_path / "d.npz")), X, Y)
    check(load_data(str(tmp_path / "d.npz"), split="test"), XT, YT)
    check(load_data(str(tmp_path / "d.npz"), max_samples=7), X[:7], Y[:7])


def test_pt_round_trip(tmp_path: Path) -> None:
    torch.save({"x": torch.from_numpy(X), "y": torch.from_numpy(Y)}, tmp_path / "d.pt")
    check(load_data(str(tmp_path / "d.pt")), X, Y)


def test_pt_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    torch.save(
        {"x": torch.from_numpy(X), "y": torch.from_numpy(Y), "f": Path("x")}, tmp_path / "d.pt"
    )
    with pytest.raises(FlatcliError, match="cannot read data file"):
        load_data(str(tmp_path / "d.pt"))


def test_csv_round_trip(tmp_path: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(X, columns=list("abcd"))
    df["label"] = Y
    df.to_csv(tmp_path / "d.csv", index=False)
    check(load_data(str(tmp_path / "d.csv"), target="label"), X, Y)
    with pytest.raises(UsageError, match="--target"):
        load_data(str(tmp_path / "d.csv"))
    with pytest.raises(FlatcliError, match="no column 'nope'"):
        load_data(str(tmp_path / "d.csv"), target="nope")


def test_bundled_digits_are_the_real_uci_digits() -> None:
    train, test = load_data("digits"), load_data("digits", split="test")
    assert (len(train), len(test)) == (1297, 500)
    assert train.x.shape[1] == 64 and set(train.y.tolist()) == set(range(10))
    # pixel intensities are the original 0..16 counts scaled to [0, 1]
    assert torch.allclose(train.x * 16, (train.x * 16).round(), atol=1e-5)


def test_missing_split_and_bad_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=X, y=Y)
    with pytest.raises(FlatcliError, match="no test split"):
        load_data(str(tmp_path / "d.npz"), split="test")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(FlatcliError, match="cannot read data file"):
        load_data(str(tmp_path / "bad.npz"))
    with pytest.raises(FlatcliError, match="unsupported data format"):
        (tmp_path / "d.parquet").write_bytes(b"")
        load_data(str(tmp_path / "d.parquet"))
    np.savez(tmp_path / "mismatch.npz", x=X, y=Y[:5])
    with pytest.raises(FlatcliError, match="same number of samples"):
        load_data(str(tmp_path / "mismatch.npz"))


def test_fit_inputs_reshapes_only_when_unambiguous() -> None:
    x = torch.zeros(5, 1, 8, 8)
    assert fit_inputs(x, archs.mlp(64, [4], 10), None).shape == (5, 64)
    assert fit_inputs(torch.zeros(5, 64), archs.cnn(), None).shape == (5, 1, 8, 8)
    assert fit_inputs(torch.zeros(5, 60), archs.cnn(), None).shape == (5, 60)  # left alone
    with pytest.raises(FlatcliError, match="does not fit"):
        fit_inputs(torch.zeros(5, 60), archs.cnn(), (1, 8, 8))


def test_check_fits_catches_shape_and_labels() -> None:
    model = archs.mlp(4, [5], 3)
    ok = as_batches((torch.from_numpy(X), torch.from_numpy(Y)))
    assert check_fits(model, ok, loss="cross_entropy") == 3
    bad = as_batches((torch.from_numpy(X), torch.from_numpy(Y) + 3))
    with pytest.raises(FlatcliError, match="labels range"):
        check_fits(model, bad, loss="cross_entropy")
    with pytest.raises(FlatcliError, match="does not fit"):
        check_fits(archs.mlp(5, [5], 3), ok, loss="cross_entropy")


def test_as_batches_accepts_a_dataloader() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from flatcli import relative_flatness

    torch.manual_seed(0)
    model = archs.mlp(4, [5], 3).double()
    x, y = torch.from_numpy(X).double(), torch.from_numpy(Y)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    a = relative_flatness(model, "fc1", loader)
    b = relative_flatness(model, "fc1", (x, y))
    assert a.value == pytest.approx(b.value, rel=1e-12)
    assert as_batches(loader).n_samples == 30


def test_channels_last_images_name_the_shape_the_model_expects() -> None:
    """(n, H, W, 3) images: the error names (n, 3, H, W), and a checkpoint whose metadata
    gives (3, H, W) refuses them rather than reshaping them into scrambled channels."""
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 2))
    x, y = torch.rand(6, 8, 8, 3), torch.randint(0, 2, (6,))
    with pytest.raises(FlatcliError) as info:
        check_fits(model, as_batches((x, y), batch_size=6), loss="cross_entropy")
    assert "expects images of shape (n, 3, H, W)" in str(info.value)
    assert "channels-last, (n, 8, 8, 3)" in str(info.value)
    with pytest.raises(FlatcliError, match=r"\(n, 3, H, W\) = \(n, 3, 8, 8\)"):
        fit_inputs(x, model, (3, 8, 8))
    assert fit_inputs(x.permute(0, 3, 1, 2), model, (3, 8, 8)).shape == (6, 3, 8, 8)
    square = torch.rand(2, 3, 3, 3)  # H = W = C: already channels first, no false alarm
    assert fit_inputs(square, model, (3, 3, 3)).shape == (2, 3, 3, 3)
