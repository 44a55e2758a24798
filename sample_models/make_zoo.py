"""Make the bundled checkpoint zoo for ``flatcli correlate`` deterministically.

    python sample_models/make_zoo.py

Trains one small ReLU MLP (:func:`flatcli.archs.mlp`) per point of a full factorial
grid over width, depth, learning rate, batch size and weight decay on the bundled
UCI digits (the full train split, 1,297 images, never subsampled: the measures are
computed on that split), and writes ``sample_models/zoo/<name>.safetensors`` with
every hyperparameter in the checkpoint's ``flatcli.hparams`` metadata, plus
``sample_models/zoo/README.md``.

Following Jiang et al. (2020, §4), every network is trained with the same stopping
criterion, until the cross-entropy on the whole training set falls below
:data:`TARGET_LOSS`, so that the networks differ in how they generalize rather than in
how well they fit. A full factorial grid means that every hyperparameter has groups of
networks that differ in it alone, which the granulated Kendall coefficient Ψ needs
(:func:`flatcli.stats.granulated_kendall`).

Determinism: each network has its own seeded ``torch.manual_seed`` (initialization)
and ``torch.Generator`` (shuffling), runs on one thread with
``torch.use_deterministic_algorithms(True)``, and is independent of the others, so the
worker count does not change any result. ``save_checkpoint`` writes safetensors
headers with sorted metadata keys; two runs
on the same machine give byte-identical files. Bitwise equality across different CPUs
is not promised by PyTorch (vectorized kernels may sum in another order).

References:
    Jiang, Neyshabur, Mobahi, Krishnan, Bengio (2020). Fantastic generalization
    measures and where to find them. ICLR. https://arxiv.org/abs/1912.02178

    Dziugaite, Drouin, Neal, Rajkumar, Caballero, Wang, Mitliagkas, Roy (2020).
    In search of robust measures of generalization. NeurIPS.
    https://arxiv.org/abs/2010.11924
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flatcli import archs
from flatcli.checkpoints import save_checkpoint
from flatcli.data import load_data
from flatcli.io import atomic_write_text

HERE = Path(__file__).resolve().parent
ZOO = HERE / "zoo"

GRID: dict[str, tuple[Any, ...]] = {
    "width": (16, 32, 64),
    "depth": (1, 2),
    "lr": (0.01, 0.1),
    "batch_size": (32, 256),
    "weight_decay": (0.0, 1e-4),
}
"""The varied hyperparameters; the zoo is their full product (3·2·2·2·2 = 48 networks)."""

FIXED: dict[str, Any] = {
    "optimizer": "sgd",
    "momentum": 0.9,
    "seed": 0,
    "target_loss": 0.01,
    "max_epochs": 3000,
}
"""Settings shared by every network, recorded in each checkpoint's hparams too."""

TARGET_LOSS = FIXED["target_loss"]


def grid() -> list[dict[str, Any]]:
    """Every grid point as ``{hyperparameter: value}``, in a fixed order."""
    return [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]


def name_of(point: Mapping[str, Any]) -> str:
    """File stem of a grid point, e.g. ``w64-d2-lr0.1-bs32-wd0.0001``."""
    return (
        f"w{point['width']}-d{point['depth']}-lr{point['lr']:g}"
        f"-bs{point['batch_size']}-wd{point['weight_decay']:g}"
    )


def hparams_of(point: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records as ``flatcli.hparams``: the grid point plus :data:`FIXED`."""
    return {**point, **FIXED}


def arch_kwargs_of(point: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`flatcli.archs.mlp` for a grid point."""
    return {"in_features": 64, "hidden": [point["width"]] * point["depth"], "num_classes": 10}


@contextlib.contextmanager
def _deterministic_single_thread() -> Iterator[None]:
    # One thread, so no reduction is split differently between runs; the thread count,
    # the flag and the global RNG (which nn.Linear's initialization draws from) are
    # restored afterwards, so calling train() leaves the process as it found it.
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train(point: Mapping[str, Any]) -> tuple[torch.nn.Module, int]:
    """Train the network of one grid point until the train cross-entropy < target.

    SGD with momentum and (coupled) weight decay on mini-batches drawn by a seeded
    permutation each epoch; the whole training set is evaluated after every epoch.

    Returns:
        The trained model (eval mode) and the number of epochs it took.
    """
    hp = hparams_of(point)
    data = load_data("digits", split="train")
    x, y = data.x, data.y
    with _deterministic_single_thread():
        torch.manual_seed(hp["seed"])
        model = archs.mlp(**arch_kwargs_of(point))
        shuffle = torch.Generator().manual_seed(hp["seed"])
        opt = torch.optim.SGD(
            model.parameters(),
            lr=hp["lr"],
            momentum=hp["momentum"],
            weight_decay=hp["weight_decay"],
        )
        epochs = 0
        while epochs < hp["max_epochs"]:
            epochs += 1
            model.train()
            perm = torch.randperm(len(x), generator=shuffle)
            for i in range(0, len(x), hp["batch_size"]):
                idx = perm[i : i + hp["batch_size"]]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                if F.cross_entropy(model(x), y).item() < hp["target_loss"]:
                    break
    return model, epochs


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    """Mean cross-entropy and accuracy on the bundled digits train and test splits."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for split in ("train", "test"):
            data = load_data("digits", split=split)
            logits = model(data.x)
            out[f"{split}_loss"] = F.cross_entropy(logits, data.y).item()
            out[f"{split}_acc"] = (logits.argmax(1) == data.y).double().mean().item()
    return out


def make_one(point: Mapping[str, Any], out_dir: Path = ZOO) -> dict[str, Any]:
    """Train, save and evaluate one grid point; returns its row for the README."""
    start = time.perf_counter()
    model, epochs = train(point)
    path = out_dir / f"{name_of(point)}.safetensors"
    save_checkpoint(
        model,
        path,
        arch="flatcli.archs:mlp",
        arch_kwargs=arch_kwargs_of(point),
        data="digits",
        loss="cross_entropy",
        input_shape=(64,),
        hparams=hparams_of(point),
    )
    row = {"name": name_of(point), **point, "epochs": epochs, **evaluate(model)}
    row["seconds"] = time.perf_counter() - start
    return row


def readme(rows: list[dict[str, Any]], total_bytes: int) -> str:
    """The zoo's README: how it was made, the grid, and each network's fit."""
    grid_lines = "\n".join(
        f"| `{k}` | {', '.join(f'{v:g}' for v in vs)} |" for k, vs in GRID.items()
    )
    fixed_lines = "\n".join(f"| `{k}` | {v} |" for k, v in FIXED.items())
    table = "\n".join(
        f"| `{r['name']}` | {r['epochs']} | {r['train_loss']:.4f} | {r['test_loss']:.4f} "
        f"| {r['train_acc']:.4f} | {r['test_acc']:.4f} |"
        for r in rows
    )

    def span(key: str) -> str:
        values = [r[key] for r in rows]
        return f"{min(values):.4f} – {max(values):.4f}"

    gap_loss = [r["test_loss"] - r["train_loss"] for r in rows]
    gap_acc = [r["train_acc"] - r["test_acc"] for r in rows]
    return f"""# The checkpoint zoo

{len(rows)} small ReLU MLPs (`flatcli.archs:mlp`) trained on the bundled UCI digits
(full train split, 1,297 images; test split, 500 images) with cross-entropy, one per
point of a full factorial grid, for `flatcli correlate`. Made by

    python sample_models/make_zoo.py

which is deterministic (same machine: byte-identical files). Every network is trained
until its cross-entropy on the whole training set falls below {TARGET_LOSS} (the
stopping criterion of Jiang et al. 2020, arXiv:1912.02178), so the networks differ in
generalization, not in fit. Each checkpoint records its hyperparameters under
`flatcli.hparams` and loads with no flags. Total size: {total_bytes / 1e6:.2f} MB.

## Grid (full product)

| hyperparameter | values |
|---|---|
{grid_lines}

Depth is the number of hidden layers, each `width` wide. Fixed for every network:

| setting | value |
|---|---|
{fixed_lines}

## Fit and generalization

- train loss {span("train_loss")}, test loss {span("test_loss")}
- train accuracy {span("train_acc")}, test accuracy {span("test_acc")}
- gap `test_loss − train_loss`: {min(gap_loss):.4f} – {max(gap_loss):.4f}
- gap `train_acc − test_acc`: {min(gap_acc):.4f} – {max(gap_acc):.4f}

| network | epochs | train loss | test loss | train acc | test acc |
|---|---|---|---|---|---|
{table}
"""


def main() -> None:
    """Build the whole zoo in parallel processes (the results do not depend on how many)."""
    ZOO.mkdir(exist_ok=True)
    points = grid()
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rows = []
        for row in pool.map(make_one, points):
            rows.append(row)
            reached = "" if row["train_loss"] < TARGET_LOSS else "  (did NOT reach target)"
            print(
                f"{row['name']:28s} {row['epochs']:5d} epochs  train {row['train_loss']:.4f}"
                f"  test {row['test_loss']:.4f} / acc {row['test_acc']:.3f}"
                f"  {row['seconds']:.1f}s{reached}",
                flush=True,
            )
    total = sum((ZOO / f"{r['name']}.safetensors").stat().st_size for r in rows)
    atomic_write_text(ZOO / "README.md", readme(rows, total))
    elapsed = time.perf_counter() - start
    print(f"{len(rows)} networks, {total / 1e6:.2f} MB, {elapsed:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
