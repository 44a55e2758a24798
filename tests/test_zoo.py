"""The bundled checkpoint zoo: loads without flags, matches its grid, retrains deterministically."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from flatcli.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sample_models" / "make_zoo.py"


@pytest.fixture(scope="module")
def make_zoo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_zoo", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_zoo", module)
    spec.loader.exec_module(module)
    return module


def test_zoo_is_exactly_the_grid(make_zoo: ModuleType) -> None:
    points = make_zoo.grid()
    files = sorted(make_zoo.ZOO.glob("*.safetensors"))
    assert len(points) >= 40
    assert {p.stem for p in files} == {make_zoo.name_of(p) for p in points}
    assert (make_zoo.ZOO / "README.md").is_file()
    assert sum(p.stat().st_size for p in files) < 20e6


def test_every_checkpoint_loads_without_flags_and_records_its_grid_point(
    make_zoo: ModuleType,
) -> None:
    for point in make_zoo.grid():
        ckpt = load_checkpoint(make_zoo.ZOO / f"{make_zoo.name_of(point)}.safetensors")
        assert ckpt.hparams == make_zoo.hparams_of(point)
        assert {k: ckpt.hparams[k] for k in make_zoo.GRID} == point
        assert ckpt.metadata["data"] == "digits" and ckpt.metadata["loss"] == "cross_entropy"
        assert ckpt.input_shape == (64,)
        hidden = [m.out_features for n, m in ckpt.model.named_children() if n.startswith("fc")]
        assert hidden[:-1] == [point["width"]] * point["depth"]


def test_every_stored_network_meets_the_stopping_criterion(make_zoo: ModuleType) -> None:
    target = make_zoo.TARGET_LOSS
    for point in make_zoo.grid():
        ckpt = load_checkpoint(make_zoo.ZOO / f"{make_zoo.name_of(point)}.safetensors")
        assert make_zoo.evaluate(ckpt.model)["train_loss"] < target, make_zoo.name_of(point)


def test_the_script_is_deterministic(make_zoo: ModuleType, tmp_path: Path) -> None:
    # PyTorch does not promise bitwise equality across CPUs (vectorized kernels may sum in
    # another order, and training amplifies the last bit), so the guarantee tested here is
    # the one the script makes: two runs on one machine write byte-identical files.
    # The quickest network of the grid (14 epochs); any entry would do.
    point = {"width": 64, "depth": 2, "lr": 0.1, "batch_size": 32, "weight_decay": 1e-4}
    assert point in make_zoo.grid()
    threads = torch.get_num_threads()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_zoo.make_one(point, tmp_path / "a")
    assert torch.get_num_threads() == threads  # train() restores the process settings
    second = make_zoo.make_one(point, tmp_path / "b")
    name = f"{make_zoo.name_of(point)}.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["epochs"] == second["epochs"] and first["train_loss"] < make_zoo.TARGET_LOSS
    retrained = load_checkpoint(tmp_path / "a" / name)
    assert retrained.hparams == make_zoo.hparams_of(point)
