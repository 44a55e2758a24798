"""The bundled checkpoint zoo: loads without flags, matches its grid, retrains bit for bit."""

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


def test_retraining_one_entry_reproduces_its_weights_exactly(make_zoo: ModuleType) -> None:
    # The quickest network of the grid (14 epochs); any entry would do.
    point = {"width": 64, "depth": 2, "lr": 0.1, "batch_size": 32, "weight_decay": 1e-4}
    assert point in make_zoo.grid()
    threads = torch.get_num_threads()
    model, _ = make_zoo.train(point)
    assert torch.get_num_threads() == threads  # train() restores the process settings
    saved = load_checkpoint(make_zoo.ZOO / f"{make_zoo.name_of(point)}.safetensors").model
    fresh, stored = model.state_dict(), saved.state_dict()
    assert fresh.keys() == stored.keys()
    for key in fresh:
        assert torch.equal(fresh[key], stored[key]), key
