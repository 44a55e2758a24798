"""Golden JSON: what ``measure``, ``audit``, ``correlate``, ``robustness`` and ``bound`` write
with ``--format json`` on the bundled samples stays what it was.

The files in ``tests/golden/`` were written by the code before the results became typed
library objects; any change to a number, a key or its order fails here. Regenerate them
(``FLATCLI_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py``) only in a commit that
says why the output legitimately changed.

Floats are compared exactly: every run is seeded, single-threaded (``--threads 1`` where the
command has it, ``torch.set_num_threads(1)`` for all) and on the CPU, so the same machine
gives the same bits. Only these fields may differ, because they describe the machine or the
clock, not the result:

- :data:`HOST_FIELDS` of the manifest (interpreter, torch build, OS);
- :data:`WALL_TIME_FIELDS` anywhere (wall-clock seconds of a computation);
- :data:`FREE_MEMORY_FIELDS` anywhere (a budget taken from the machine's free memory).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from flatcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = bool(os.environ.get("FLATCLI_UPDATE_GOLDEN"))

HOST_FIELDS = ("python", "torch", "platform")
"""Manifest keys that name the machine's software, not the result."""
WALL_TIME_FIELDS = ("seconds",)
"""Keys that hold wall-clock time (e.g. a Hutchinson trace's ``seconds``)."""
FREE_MEMORY_FIELDS = ("max_memory",)
"""Keys that hold a memory budget; without ``--max-memory`` (audit has none) it is half of
the machine's free memory at the time."""

ZOO = [
    "w16-d1-lr0.01-bs256-wd0.safetensors",
    "w16-d1-lr0.1-bs32-wd0.safetensors",
    "w32-d1-lr0.01-bs256-wd0.safetensors",
    "w32-d2-lr0.1-bs32-wd0.0001.safetensors",
]
"""Four checkpoints of the bundled zoo for correlate."""

MLP = "digits_mlp.safetensors"
CNN = "digits_cnn.safetensors"

COMMANDS: dict[str, list[str]] = {
    "measure_mlp": [
        "measure",
        MLP,
        "--measures",
        "all",
        "--normalize",
        "--max-samples",
        "60",
        "--probes",
        "8",
        "--max-probes",
        "40",
        "--mc-samples",
        "2",
        "--search-depth",
        "4",
        "--max-memory",
        "1G",
        "--probe-batch",
        "4",
        "--threads",
        "1",
        "--seed",
        "1",
    ],
    "measure_cnn": [
        "measure",
        CNN,
        "--layer",
        "conv2",
        "--method",
        "hutchinson",
        "--probes",
        "6",
        "--measures",
        "relative_flatness,layer_hessian_trace,weight_norm,train_loss",
        "--max-samples",
        "40",
        "--threads",
        "1",
        "--max-memory",
        "1G",
        "--seed",
        "2",
    ],
    "audit": [
        "audit",
        MLP,
        "--normalize",
        "--max-samples",
        "60",
        "--seed",
        "3",
    ],
    "correlate": [
        "correlate",
        *ZOO,
        "--measures",
        "relative_flatness,weight_norm,fisher_rao",
        "--max-samples",
        "60",
        "--bootstrap",
        "50",
        "--cache-dir",
        "cache",
        "--threads",
        "1",
    ],
    "robustness": [
        "robustness",
        MLP,
        "--max-samples",
        "60",
        "--probes",
        "4",
        "--deltas",
        "0.01,0.1",
        "--label-change",
        "--seed",
        "4",
    ],
    "bound": [
        "bound",
        MLP,
        "--max-samples",
        "60",
        "--splits",
        "3",
        "--draws",
        "2",
        "--probes",
        "3",
        "--seed",
        "5",
    ],
}


def comparable(report: Any) -> Any:
    """``report`` without :data:`HOST_FIELDS` of its manifest, :data:`WALL_TIME_FIELDS`
    and :data:`FREE_MEMORY_FIELDS`."""
    dropped = (*WALL_TIME_FIELDS, *FREE_MEMORY_FIELDS)

    def strip(obj: Any, in_manifest: bool = False) -> Any:
        if isinstance(obj, dict):
            return {
                k: strip(v, k == "manifest")
                for k, v in obj.items()
                if k not in dropped and not (in_manifest and k in HOST_FIELDS)
            }
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(report)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding copies of the samples, so paths in the output are the same anywhere."""
    for name in (MLP, CNN):
        shutil.copy(ROOT / "sample_models" / name, tmp_path / name)
    for name in ZOO:
        shutil.copy(ROOT / "sample_models" / "zoo" / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def run_json(args: list[str]) -> dict[str, Any]:
    result = CliRunner().invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def first_difference(got: Any, want: Any, path: str = "") -> str | None:
    """Where ``got`` and ``want`` first differ, for a readable failure."""
    if type(got) is not type(want):
        return f"{path}: {got!r} != {want!r}"
    if isinstance(want, dict):
        if list(got) != list(want):
            return f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            d = first_difference(got[k], want[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(want, list):
        if len(got) != len(want):
            return f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            d = first_difference(g, w, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if got == want else f"{path}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_json_matches_the_golden_file(name: str, workdir: Path) -> None:
    got = comparable(run_json(COMMANDS[name]))
    golden = GOLDEN / f"{name}.json"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n")
    want = json.loads(golden.read_text())
    assert first_difference(got, want) is None, first_difference(got, want)


def test_comparable_drops_only_the_listed_fields() -> None:
    report = {
        "a": {"seconds": 1.0, "value": 2.0, "max_memory": 3},
        "manifest": {"python": "3", "torch": "2", "platform": "linux", "seed": 0, "device": "cpu"},
    }
    assert comparable(report) == {"a": {"value": 2.0}, "manifest": {"seed": 0, "device": "cpu"}}
