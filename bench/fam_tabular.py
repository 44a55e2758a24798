"""What FAM ``--fam-lambda auto`` does on models the project never saw, for docs/finetune.md.

    python bench/fam_tabular.py [--seeds 0,...,9] [--epochs 10] [--out docs]

Models: ReLU MLPs with two hidden layers of 16 on scikit-learn's wine, breast cancer and
iris (``tests/tabular.py``: standardized, 70/30 stratified split, float64), each trained
from its seed by full-batch Adam until its train loss first falls to 5% of chance (the
label entropy): fitted, but not to zero loss. Per seed (the start's initialisation and the
batch order) two runs of ``flatcli.finetune.finetune`` on the logits layer ``fc``: plain
(λ = 0) and FAM ``auto`` (R = 0.003 at step 0), both SGD with momentum 0.9, lr 0.01,
batch 32, cosine, clipped at 1.0 (FAM's default; the plain run gets the same clipping so
that only λ differs), float64.

Per setting, over the seeds: the relative change of κ (train set), and, for FAM, the
extra change beyond the temperature-matched start (the start with its logits scaled to the
fine-tuned train loss: confidence alone), in % of the starting κ; the change of the test
loss, the test accuracy and the expected calibration error (ECE, 10 equal-width bins of
the top probability) on the test split. Each as mean and 95% t-interval over seeds; the
paired FAM − plain difference the same way.

Writes ``fam_tabular.csv`` and replaces the table between ``<!-- fam_tabular -->`` and
``<!-- /fam_tabular -->`` in ``docs/finetune.md``. Run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from doc_tables import publish  # noqa: E402

from flatcli.checkpoints import load_checkpoint  # noqa: E402
from flatcli.finetune import finetune  # noqa: E402
from tests import tabular  # noqa: E402

START_SHARE = 0.05
SETTINGS = {"plain": {"fam_lambda": 0.0, "clip_grad_norm": 1.0}, "FAM auto": {"fam_lambda": "auto"}}
COMMON = {"lr": 0.01, "momentum": 0.9, "batch_size": 32, "dtype": "float64", "device": "cpu"}


def ece(logits: torch.Tensor, y: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error of the top-class probability, equal-width bins."""
    p = torch.softmax(logits, -1)
    conf, pred = p.max(-1)
    right = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += float(
                inside.double().mean() * (conf[inside].mean() - right[inside].mean()).abs()
            )
    return total


def test_logits(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, xb, yb = tabular.dataset(name)
    with torch.no_grad():
        return model.double().eval()(xb), yb


def metrics(logits: torch.Tensor, y: torch.Tensor) -> dict:
    return {
        "test_loss": float(torch.nn.functional.cross_entropy(logits, y)),
        "test_accuracy": float((logits.argmax(-1) == y).double().mean()),
        "ece": ece(logits, y),
    }


def one_seed(name: str, seed: int, epochs: int, tmp: Path) -> list[dict]:
    chance = -sum(p * math.log(p) for p in _freq(name) if p > 0)
    ck, data = tabular.write_start(tmp, name, START_SHARE * chance, seed=seed)
    start = metrics(*test_logits(load_checkpoint(ck).model, name))
    rows = []
    for label, setting in SETTINGS.items():
        r = finetune(ck, data=str(data), epochs=epochs, seed=seed, **COMMON, **setting)
        after = metrics(*test_logits(r.model, name))
        k0 = r.before["relative_flatness"].value
        row = {
            "data": name,
            "seed": seed,
            "setting": label,
            "lambda_used": r.hparams["fam_lambda_used"],
            "kappa0": k0,
            "kappa": r.after["relative_flatness"].value,
            "kappa_change_pct": 100 * (r.after["relative_flatness"].value / k0 - 1),
            **{f"start_{k}": v for k, v in start.items()},
            **after,
        }
        t = r.temperature_matched
        row["t_note"] = r.temperature_note
        if t is not None:
            logits, y = test_logits(load_checkpoint(ck).model, name)
            matched = metrics(logits * r.temperature_c, y)
            row.update(
                kappa_t=t["relative_flatness"].value,
                extra_drop_pct=100 * (t["relative_flatness"].value - row["kappa"]) / k0,
                **{f"t_{k}": v for k, v in matched.items()},
            )
        rows.append(row)
        print(row, flush=True)
    return rows


def _freq(name: str) -> list[float]:
    _, ya, _, _ = tabular.dataset(name)
    counts = torch.bincount(ya).double()
    return (counts / counts.sum()).tolist()


def interval(values: list[float]) -> str:
    """mean [95% t-interval] over seeds."""
    from scipy import stats

    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return "–"
    m = statistics.fmean(values)
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{m:+.3g} [{m - half:+.3g}, {m + half:+.3g}]"


def table(rows: list[dict]) -> str:
    head = (
        "| data | setting | κ change % | FAM's extra κ drop beyond T-matched, % of κ₀ "
        "| Δ test loss | Δ test accuracy | Δ ECE |\n|" + " --- |" * 7 + "\n"
    )
    lines = []
    for name in tabular.DATASETS:
        group = [r for r in rows if r["data"] == name]
        by = {s: [r for r in group if r["setting"] == s] for s in SETTINGS}
        for label, runs in by.items():
            cells = [
                name,
                label,
                interval([r["kappa_change_pct"] for r in runs]),
                interval([r.get("extra_drop_pct") for r in runs]) if label != "plain" else "",
                interval([r["test_loss"] - r["start_test_loss"] for r in runs]),
                interval([r["test_accuracy"] - r["start_test_accuracy"] for r in runs]),
                interval([r["ece"] - r["start_ece"] for r in runs]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        plain = {r["seed"]: r for r in by["plain"]}
        fam = [(r, plain[r["seed"]]) for r in by["FAM auto"] if r["seed"] in plain]
        cells = [
            name,
            "FAM − plain (paired)",
            interval([a["kappa_change_pct"] - b["kappa_change_pct"] for a, b in fam]),
            "",
            interval([a["test_loss"] - b["test_loss"] for a, b in fam]),
            interval([a["test_accuracy"] - b["test_accuracy"] for a, b in fam]),
            interval([a["ece"] - b["ece"] for a, b in fam]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(str(s) for s in range(10)))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in tabular.DATASETS:
            for seed in seeds:
                rows.extend(one_seed(name, seed, args.epochs, Path(tmp)))
    wall = time.perf_counter() - t0
    summary = table(rows) + (
        f"\n{len(rows)} runs ({len(seeds)} seeds), {args.epochs} epochs each; "
        f"{wall / 60:.1f} min on 1 thread.\n"
    )
    print(summary)
    publish(args.out, "fam_tabular", rows, summary)


if __name__ == "__main__":
    main()
