"""Every input is hostile (issue 9): metadata, outputs, cache, labels, archives, resume state.

Each test here failed before its fix. The command-line side (markup, Ctrl-C, exit codes)
is in test_security_cli.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flatcli import archs
from flatcli.checkpoints import load_checkpoint, save_checkpoint
from flatcli.errors import FlatcliError, FlatcliWarning, UsageError
from flatcli.io import atomic_write_text, check_output

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "sample_models" / "digits_mlp.safetensors"
KW = {"in_features": 4, "hidden": [5], "num_classes": 3}


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return archs.mlp(4, [5], 3)


def save_tiny(path: Path, **meta: object) -> Path:
    kwargs = {"arch": "flatcli.archs:mlp", "arch_kwargs": KW}
    kwargs.update(meta)
    return save_checkpoint(tiny_mlp(), path, **kwargs)  # type: ignore[arg-type]


def write_npz(path: Path, n: int = 40, *, seed: int = 0, **override: np.ndarray) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.normal(size=(n, 4)).astype(np.float32),
        "y": rng.integers(0, 3, n),
        "x_test": rng.normal(size=(n, 4)).astype(np.float32),
        "y_test": rng.integers(0, 3, n),
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------- 1. code


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("trust", [False, True])
def test_metadata_arch_naming_a_file_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, trust: bool
) -> None:
    # A downloaded model repo holding a folder named "flatcli.archs:" with a Python file.
    marker = tmp_path / "pwned"
    evil = tmp_path / "flatcli.archs:"
    evil.mkdir()
    (evil / "x.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "import flatcli.archs\n\ndef fn(**kw):\n    return flatcli.archs.mlp(4, [5], 3)\n"
    )
    ck = save_tiny(tmp_path / f"m{suffix}", arch="flatcli.archs:/x.py:fn")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FlatcliError, match="never imports a file"):
        load_checkpoint(ck, trust_code=trust)
    assert not marker.exists()


@pytest.mark.parametrize("spec", ["flatcli.archs:OrderedDict", "flatcli.archs:BasicBlock"])
def test_only_listed_builders_of_flatcli_archs_are_followed(tmp_path: Path, spec: str) -> None:
    ck = save_tiny(tmp_path / "m.safetensors", arch=spec)
    with pytest.raises(FlatcliError, match="--trust-code"):
        load_checkpoint(ck)


def test_the_builder_list_names_real_builders() -> None:
    assert archs.BUILDERS == ("mlp", "cnn", "resnet18")
    for name in archs.BUILDERS:
        assert isinstance(getattr(archs, name)(), torch.nn.Module)


def test_a_user_arch_file_still_works(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "import flatcli.archs\n\ndef make(**kw):\n    return flatcli.archs.mlp(4, [5], 3)\n"
    )
    ck = save_tiny(tmp_path / "m.safetensors", arch="somewhere.else:make")
    model = load_checkpoint(ck, arch=f"{tmp_path / 'net.py'}:make").model
    assert isinstance(model, torch.nn.Sequential)


@pytest.mark.parametrize("spec", ["../secret.npz", "/etc/passwd", "sub/d.npz", "..", "~x.npz"])
def test_metadata_data_may_not_name_a_path(tmp_path: Path, spec: str) -> None:
    from flatcli.prepare import prepare

    (tmp_path / "sub").mkdir()
    write_npz(tmp_path / "sub" / "d.npz")
    write_npz(tmp_path / "secret.npz")
    ck = save_tiny(tmp_path / "sub" / "m.safetensors", data=spec)
    with pytest.raises(FlatcliError, match="pass --data"):
        prepare(ck, device="cpu")
    prep = prepare(ck, device="cpu", data=str(tmp_path / "secret.npz"))  # the user's own choice
    assert prep.batches.n_samples == 40


def test_metadata_data_is_the_file_beside_the_checkpoint_not_in_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flatcli.prepare import prepare

    (tmp_path / "repo").mkdir()
    write_npz(tmp_path / "repo" / "d.npz", n=30)
    write_npz(tmp_path / "d.npz", n=17)  # a same-named file where the user stands
    ck = save_tiny(tmp_path / "repo" / "m.safetensors", data="d.npz")
    monkeypatch.chdir(tmp_path)
    assert prepare(ck, device="cpu").batches.n_samples == 30


@pytest.mark.parametrize(
    "key,value", [("input_shape", '["a"]'), ("input_shape", "5"), ("hparams", "[1]")]
)
def test_malformed_metadata_is_a_one_line_error(tmp_path: Path, key: str, value: str) -> None:
    from safetensors.torch import save_file

    md = {
        "flatcli.arch": "flatcli.archs:mlp",
        "flatcli.arch_kwargs": json.dumps(KW),
        f"flatcli.{key}": value,
    }
    path = tmp_path / "m.safetensors"
    save_file(tiny_mlp().state_dict(), str(path), metadata=md)
    ck = load_checkpoint(path)
    with pytest.raises(FlatcliError, match=f"flatcli.{key}"):
        ck.input_shape if key == "input_shape" else ck.hparams  # noqa: B018


# --------------------------------------------------------------------------- 2. outputs


def test_replacing_a_file_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret.json"
    target.write_text("old")
    target.chmod(0o600)
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_symlink_is_replaced_not_written_through(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert not link.is_symlink() and link.read_text() == "new"
    assert real.read_text() == "old"


def test_a_fifo_is_written_as_a_stream_and_stays_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_write_text(fifo, "hello\n")
    reader.join(timeout=10)
    assert got == [b"hello\n"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_directory_target_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FlatcliError, match="a directory, not a regular file"):
        atomic_write_text(tmp_path, "x")
    with pytest.raises(FlatcliError, match="a directory"):
        check_output(tmp_path)


def test_check_output_before_computing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"\.safetensors or \.pt"):
        check_output(tmp_path / "x.onnx", suffixes=(".safetensors", ".pt"), option="--out")
    with pytest.raises(FlatcliError, match="does not exist"):
        check_output(tmp_path / "missing" / "x.json")
    assert check_output(tmp_path / "x.json") == tmp_path / "x.json"


def test_finetune_checks_its_outputs_before_training(tmp_path: Path) -> None:
    from flatcli.finetune import finetune

    out = tmp_path / "x.onnx"
    with pytest.raises(UsageError, match="--out x.onnx"):
        finetune(
            MLP, fam_lambda=0.0, epochs=1, max_samples=64, out_path=out, log_path=tmp_path / "x.csv"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 3. cache


def _correlate(ck: Path, cache: Path):  # noqa: ANN202
    from flatcli.correlate import CorrelateConfig, measure_checkpoints

    config = CorrelateConfig(measures=("weight_norm",))
    return measure_checkpoints([ck], config, cache_dir=cache)


def test_cache_key_covers_the_data_content(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "d.npz", n=30)
    ck = save_tiny(tmp_path / "m.safetensors", data="d.npz")
    first = _correlate(ck, tmp_path / "cache")
    assert first.computed == 1 and first.rows[0]["n_train"] == 30
    assert _correlate(ck, tmp_path / "cache").computed == 0  # unchanged data: cached
    write_npz(data, n=25, seed=1)  # replaced in place
    again = _correlate(ck, tmp_path / "cache")
    assert again.computed == 1 and again.rows[0]["n_train"] == 25
    assert list(again.data_sha256.values()) != list(first.data_sha256.values())
    from flatcli.io import sha256_file

    assert again.data_sha256 == {str(tmp_path / "d.npz"): sha256_file(data)}


@pytest.mark.parametrize(
    "content",
    [b"null", b"[1, 2]", b'{"sha256": 1}', b"\xff\xfe{", b"{}", b'{"a": 1}'],
    ids=["null", "list", "wrong-type", "not-utf8", "empty", "foreign"],
)
def test_damaged_cache_entries_are_measured_again(tmp_path: Path, content: bytes) -> None:
    write_npz(tmp_path / "d.npz")
    ck = save_tiny(tmp_path / "m.safetensors", data="d.npz")
    cache = tmp_path / "cache"
    good = _correlate(ck, cache).rows[0]
    [entry] = cache.glob("*.json")
    entry.write_bytes(content)
    with pytest.warns(FlatcliWarning, match="damaged"):
        run = _correlate(ck, cache)
    assert run.computed == 1 and run.rows[0] == good
    assert json.loads(entry.read_text())["n_train"] == 40  # the repaired entry


def test_a_cache_entry_of_another_checkpoint_is_not_served(tmp_path: Path) -> None:
    write_npz(tmp_path / "d.npz")
    ck = save_tiny(tmp_path / "m.safetensors", data="d.npz")
    cache = tmp_path / "cache"
    _correlate(ck, cache)
    [entry] = cache.glob("*.json")
    row = json.loads(entry.read_text())
    entry.write_text(json.dumps({**row, "sha256": "0" * 64}))
    with pytest.warns(FlatcliWarning, match="another checkpoint"):
        assert _correlate(ck, cache).computed == 1


# --------------------------------------------------------------------------- 6. labels


@pytest.mark.parametrize("bad", [-100, 3, 99])
def test_every_label_is_checked_not_only_the_first_batch(tmp_path: Path, bad: int) -> None:
    from flatcli.prepare import prepare

    y = np.random.default_rng(0).integers(0, 3, 600)
    y[500] = bad
    data = write_npz(tmp_path / "d.npz", n=600, y=y)
    ck = save_tiny(tmp_path / "m.safetensors")
    with pytest.raises(FlatcliError, match=f"label {bad} of sample 500 is outside \\[0, 3\\)"):
        prepare(ck, data=str(data), device="cpu", batch_size=256)


def test_test_split_labels_are_checked(tmp_path: Path) -> None:
    from flatcli.prepare import prepare

    y_test = np.random.default_rng(0).integers(0, 3, 40)
    y_test[33] = -100
    data = write_npz(tmp_path / "d.npz", y_test=y_test)
    ck = save_tiny(tmp_path / "m.safetensors")
    prep = prepare(ck, data=str(data), device="cpu", batch_size=8)
    with pytest.raises(FlatcliError, match="label -100 of sample 33"):
        prep.split("test")


@pytest.mark.parametrize("split", ["y", "y_test"])
def test_finetune_checks_every_label(tmp_path: Path, split: str) -> None:
    from flatcli.finetune import finetune

    y = np.random.default_rng(0).integers(0, 3, 40)
    y[37] = -100
    data = write_npz(tmp_path / "d.npz", **{split: y})
    with pytest.raises(FlatcliError, match="label -100 of sample 37"):
        finetune(save_tiny(tmp_path / "m.safetensors"), str(data), fam_lambda=0.0, epochs=1)


# --------------------------------------------------------------------------- 7. denial of service


def zip_bomb(path: Path, mib: int = 200) -> Path:
    """A torch-style zip whose data.pkl expands to ``mib`` MiB of zeros."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("archive/version", "3\n")
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(mib):
                f.write(chunk)
    assert path.stat().st_size < 1 << 20
    return path


def test_a_zip_bomb_checkpoint_is_refused_before_loading(tmp_path: Path) -> None:
    bomb = zip_bomb(tmp_path / "bomb.pt")
    with pytest.raises(FlatcliError, match="declares 200.0 MiB of data in a .* file"):
        load_checkpoint(bomb, arch="flatcli.archs:mlp")


def test_a_zip_bomb_data_file_is_refused(tmp_path: Path) -> None:
    from flatcli.data import load_data

    with pytest.raises(FlatcliError, match="decompression bomb"):
        load_data(str(zip_bomb(tmp_path / "bomb.pt")))


def test_a_fifo_data_file_is_refused_without_blocking(tmp_path: Path) -> None:
    from flatcli.data import load_data

    fifo = tmp_path / "d.npz"
    os.mkfifo(fifo)

    def feed() -> None:  # without the check, the reader would get these bytes, not block
        with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as f:
            f.write(b"garbage")

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        with pytest.raises(FlatcliError, match="is a FIFO, not a regular file"):
            load_data(str(fifo))
    finally:  # release the writer: open a reader, let it write and finish, then close
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(timeout=10)
        os.close(fd)
    assert not writer.is_alive()


# --------------------------------------------------------------------------- 8. resume


@pytest.fixture
def finetuned(tmp_path: Path) -> tuple[Path, Path, dict]:
    from flatcli.finetune import finetune

    data = write_npz(tmp_path / "d.npz", n=48)
    out = tmp_path / "o.safetensors"
    ck = save_tiny(tmp_path / "m.safetensors")
    kwargs = {
        "fam_lambda": 0.0,
        "epochs": 3,
        "batch_size": 16,
        "out_path": out,
        "device": "cpu",
        "schedule": "constant",
    }
    finetune(ck, str(data), **{**kwargs, "epochs": 2})
    state = tmp_path / "o.state.pt"
    assert state.is_file()
    return ck, data, kwargs


def _tamper(state: Path, change) -> None:  # noqa: ANN001
    obj = torch.load(state, weights_only=True)
    change(obj)
    torch.save(obj, state)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.update(epoch=-5), "epoch must be a positive integer"),
        (lambda s: s.update(epoch="7"), "epoch must be a positive integer"),
        (lambda s: s.update(epoch=True), "epoch must be a positive integer"),
        (lambda s: s.pop("rng"), "missing rng"),
        (lambda s: s.pop("history"), "missing history"),
        (lambda s: s.update(history=[s["history"][0], "x"]), "history row 2"),
        (lambda s: s.update(history=s["history"][:1]), "history must list 2 epochs"),
        (lambda s: s["history"][0].update(train_loss="1"), "train_loss"),
        (lambda s: s.update(optimizer={"state": {}}), "optimizer"),
        (lambda s: s["optimizer"]["param_groups"][0].pop("params"), "damaged"),
        (lambda s: s["rng"].update(shuffle=torch.zeros(3)), "rng shuffle"),
        (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "damaged"),
        (lambda s: s.update(model={"fc.weight": torch.zeros(1)}), "damaged"),
        (lambda s: s.update(before={"x": {"value": "a"}}), "before 'x'"),
    ],
)
def test_a_tampered_state_file_is_a_one_line_error(finetuned, change, message: str) -> None:  # noqa: ANN001
    from flatcli.finetune import finetune

    ck, data, kwargs = finetuned
    _tamper(kwargs["out_path"].with_name("o.state.pt"), change)
    with pytest.raises(FlatcliError, match=message):
        finetune(ck, str(data), resume=True, **kwargs)


def test_resume_notices_changed_data(finetuned) -> None:  # noqa: ANN001
    from flatcli.finetune import finetune

    ck, data, kwargs = finetuned
    write_npz(data, n=48, seed=5)
    with pytest.raises(FlatcliError, match="training data differs"):
        finetune(ck, str(data), resume=True, **kwargs)
    state = torch.load(kwargs["out_path"].with_name("o.state.pt"), weights_only=True)
    assert isinstance(state["data_sha256"], str) and len(state["data_sha256"]) == 64


def test_an_untampered_state_resumes(finetuned) -> None:  # noqa: ANN001
    from flatcli.finetune import finetune

    ck, data, kwargs = finetuned
    result = finetune(ck, str(data), resume=True, **kwargs)
    assert result.resumed_from == 2 and [r.epoch for r in result.history] == [1, 2, 3]


# --------------------------------------------------------------------------- 9. small checks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_cast_with_a_warning(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "m.pt"
    torch.save({k: v.to(dtype) for k, v in tiny_mlp().state_dict().items()}, path)
    with pytest.warns(FlatcliWarning, match=f"{str(dtype)[6:]} weights; they are cast to float32"):
        model = load_checkpoint(path, arch="flatcli.archs:mlp", arch_kwargs=KW).model
    assert model.fc.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_weights_are_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "m.pt"
    torch.save({k: v.to(dtype) for k, v in tiny_mlp().state_dict().items()}, path)
    with pytest.raises(FlatcliError, match="non-float values for floating-point weights"):
        load_checkpoint(path, arch="flatcli.archs:mlp", arch_kwargs=KW)


def test_string_csv_columns_are_named(tmp_path: Path) -> None:
    from flatcli.data import load_data

    csv = tmp_path / "d.csv"
    csv.write_text("a,colour,label\n1.0,red,0\n2.0,blue,1\n")
    with pytest.raises(FlatcliError, match="non-numeric input column\\(s\\) colour;"):
        load_data(str(csv), target="label")


def test_integer_inputs_are_cast_with_a_note(tmp_path: Path) -> None:
    from flatcli.prepare import prepare

    x = np.random.default_rng(0).integers(0, 255, (40, 4)).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", x=x, x_test=x)
    ck = save_tiny(tmp_path / "m.safetensors")
    with pytest.warns(FlatcliWarning, match="the inputs x are uint8 numbers; they are cast"):
        prep = prepare(ck, data=str(data), device="cpu")
    xb, _ = prep.batches.first()
    assert xb.dtype == torch.float32
    assert torch.equal(xb, torch.from_numpy(x[: len(xb)]).float())


def test_negative_audit_tolerance_is_refused() -> None:
    from flatcli.audit import audit
    from flatcli.data import as_batches
    from flatcli.registry import MeasureConfig, MeasureOptions

    model = tiny_mlp()
    batches = as_batches((torch.randn(8, 4), torch.randint(0, 3, (8,))))
    config = MeasureConfig.of(MeasureOptions(), layer="fc", loss="cross_entropy")
    with pytest.raises(UsageError, match="--tolerance"):
        audit(model, batches, ["weight_norm"], config, rtol=-1.0)


# --------------------------------------------------------------------------- Hugging Face folders


def test_a_shard_index_cannot_name_a_file_outside_the_folder(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tests.test_hf import tiny_bert

    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(str(folder))
    (tmp_path / "outside.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    index = {"metadata": {}, "weight_map": {"classifier.weight": "../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FlatcliError, match="is not a file name in the folder"):
        load_checkpoint(folder)


def test_hf_folder_cache_key_covers_its_metadata_data(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from flatcli.correlate import CorrelateConfig, measure_checkpoints
    from tests.test_hf import tiny_bert, write_tokens

    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(str(folder))
    (folder / "flatcli.json").write_text(json.dumps({"data": "tokens.npz"}))
    write_tokens(tmp_path / "tokens.npz")  # beside the folder, as Checkpoint.path resolves it
    config = CorrelateConfig(measures=("weight_norm",))
    first = measure_checkpoints([folder], config, cache_dir=tmp_path / "cache")
    assert first.computed == 1 and len(first.data_sha256) == 1
    n = first.rows[0]["n_train"]
    tokens = dict(np.load(tmp_path / "tokens.npz"))
    np.savez(tmp_path / "tokens.npz", **{k: v[: n // 2] for k, v in tokens.items()})
    again = measure_checkpoints([folder], config, cache_dir=tmp_path / "cache")
    assert again.computed == 1 and again.rows[0]["n_train"] == n // 2
