"""torchrun with 2 CPU processes (gloo) gives the single-process results.

Each test launches ``python -m torch.distributed.run --nproc-per-node 2 -m flatcli ...``
in a subprocess; the single-process reference runs in this process through the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flatcli import distributed
from flatcli.cli import app
from flatcli.data import Batches, as_batches, load_data
from flatcli.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "sample_models" / "digits_mlp.safetensors"
ZOO = sorted((ROOT / "sample_models" / "zoo").glob("*.safetensors"))[:3]
RUNS = {  # one launch each: every reduction path, few probes and draws
    "hutchinson": "relative_flatness,relative_flatness_normalized,layer_hessian_trace,"
    "hessian_trace,train_loss",
    "exact": "relative_flatness,relative_flatness_normalized,layer_hessian_trace,fisher_rao,"
    "pacbayes_flatness,sharpness,train_accuracy",
}
COMMON = ["--max-samples", "240", "--batch-size", "50", "--dtype", "float64", "--normalize"]
OPTIONS = ["--max-probes", "16", "--rtol", "1e-9", "--mc-samples", "2", "--search-depth", "3"]


def torchrun(args: list[str], tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "FLATCLI_DIST_TIMEOUT": "300",  # generous: a loaded CI machine must not time out
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--standalone", "-m", "flatcli", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout
    )


def single(args: list[str]) -> dict:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_measure_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    for method, names in RUNS.items():
        args = ["measure", str(MLP), "--measures", names, *COMMON, *OPTIONS]
        extra = ["--method", method, "--probes", "16", "--format", "json"]
        want = single([*args, *extra])
        out = tmp_path / f"{method}.json"
        done = torchrun([*args, *extra, "--output", str(out)], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        got = json.loads(out.read_text())
        assert got["manifest"]["world_size"] == 2 and got["manifest"]["backend"] == "gloo"
        assert want["manifest"]["world_size"] == 1
        assert got["data"]["n_samples"] == want["data"]["n_samples"] == 240
        assert set(got["measures"]) == set(want["measures"])
        for name, w in want["measures"].items():
            g = got["measures"][name]
            for key in ("value", "stderr"):
                if w[key] is None:
                    assert g[key] is None, (method, name)
                else:  # float64 sums, added in another order: equal to rounding
                    assert g[key] == pytest.approx(w[key], rel=1e-12, abs=1e-300), (method, name)
        assert done.stdout.count('"measures"') == 1  # rank 0 alone writes


@pytest.mark.slow
def test_two_ranks_share_120_samples_at_the_default_batch_size(tmp_path: Path) -> None:
    """Fewer samples than one default batch (256): each rank takes 60 and batches them."""
    args = ["measure", str(MLP), "--max-samples", "120", "--dtype", "float64"]
    args += ["--measures", "relative_flatness,hessian_trace,hessian_top_eigenvalue,train_loss"]
    args += ["--max-probes", "32", "--rtol", "1e-9", "--format", "json"]
    want = single(args)
    out = tmp_path / "two.json"
    done = torchrun([*args, "--output", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["manifest"]["world_size"] == 2 and got["data"]["n_samples"] == 120
    for name, w in want["measures"].items():
        g = got["measures"][name]
        assert g["method"] == w["method"], name  # the same route on every rank
        for key in ("value", "stderr"):
            if w[key] is None:
                assert g[key] is None, name
            else:  # seeded probes, float64 sums added in another order
                assert g[key] == pytest.approx(w[key], rel=1e-12, abs=1e-300), name


@pytest.mark.slow
def test_correlate_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    args = ["correlate", *map(str, ZOO), "--measures", "relative_flatness,fisher_rao"]
    args += ["--max-samples", "100", "--dtype", "float64", "--format", "json", "--bootstrap", "50"]
    want = single([*args, "--cache-dir", str(tmp_path / "one")])
    done = torchrun([*args, "--cache-dir", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert got["manifest"]["world_size"] == 2
    assert got["computed"] == want["computed"] == len(ZOO)
    for g, w in zip(got["checkpoints"], want["checkpoints"], strict=True):
        assert g["checkpoint"] == w["checkpoint"]
        for key in ("relative_flatness", "fisher_rao", "train_loss", "test_acc"):
            assert g[key] == w[key]  # each checkpoint measured whole by one rank
    assert len(list((tmp_path / "two").glob("*.json"))) == len(ZOO)


@pytest.mark.slow
def test_a_failing_rank_stops_the_job_with_a_clear_message(tmp_path: Path) -> None:
    digits = load_data("digits")
    x = digits.x[:100].numpy().copy()
    x[50:] = 1e38  # the second batch (rank 1's) overflows to an infinite loss
    np.savez(tmp_path / "bad.npz", x=x, y=digits.y[:100].numpy())
    args = ["measure", str(MLP), "--data", str(tmp_path / "bad.npz"), "--batch-size", "50"]
    done = torchrun([*args, "--measures", "relative_flatness"], tmp_path, timeout=300)
    assert done.returncode != 0
    assert "rank 1: error: the loss is NaN or Inf on this data" in done.stderr


def test_library_calls_on_ordinary_data_never_communicate() -> None:
    batches = as_batches((torch.randn(10, 3), torch.zeros(10, dtype=torch.long)), batch_size=4)
    value = torch.tensor([1.0, 2.0])
    assert distributed.sum_over_shards(batches, value) is value
    assert distributed.shard(batches) is batches
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    assert distributed.info() == {"world_size": 1, "backend": None}


def test_sharded_stream_splits_the_samples_evenly_then_batches_within_each_rank() -> None:
    x = torch.arange(10.0)[:, None]
    y = torch.arange(10)
    memory = as_batches((x, y), batch_size=3)
    pairs = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 10, 3)]
    stream = Batches(lambda: pairs, n_samples=None)  # a DataLoader-like stream
    want = {
        2: [[[0, 1, 2], [3, 4]], [[5, 6, 7], [8, 9]]],
        3: [[[0, 1, 2]], [[3, 4, 5]], [[6, 7, 8], [9]]],
        4: [[[0, 1]], [[2, 3, 4]], [[5, 6]], [[7, 8, 9]]],
    }
    for data in (memory, stream):  # sliced in memory, or cut out of a stream of batches
        for world, per_rank in want.items():
            shards = [distributed.ShardedBatches(data, r, world) for r in range(world)]
            got = [[yb.tolist() for _, yb in s] for s in shards]
            assert got == per_rank, (world, got)
            assert [s.local_samples for s in shards] == [len(sum(b, [])) for b in per_rank]
            assert all(s.n_samples == 10 for s in shards)
    shard = distributed.ShardedBatches(memory, 1, 2)
    assert shard.first()[0][0, 0] == 0  # the whole stream's first batch
    assert shard.to(dtype=torch.float64).rank == 1
    assert [yb.tolist() for _, yb in shard.rebatched(2)] == [[5, 6], [7, 8], [9]]


def test_more_ranks_than_samples_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    monkeypatch.setattr(distributed, "rank", lambda: 3)
    batches = as_batches((torch.randn(3, 2), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(UsageError, match="4 ranks but only 3 sample"):
        distributed.shard(batches)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 2)
    assert [len(yb) for _, yb in distributed.shard(batches)] == [1]
