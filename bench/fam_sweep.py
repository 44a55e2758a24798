"""λ sweep for docs/finetune.md: FAM fine-tuning of the bundled digits MLP, with SAM beside it.

    python bench/fam_sweep.py [--epochs 20] [--lr 1e-3] [--out docs]

Every run starts from ``sample_models/digits_mlp.safetensors`` (1,297 training and 500
test digits) and uses SGD with momentum 0.9, peak learning rate ``--lr``, a cosine
schedule, batch 32 and the given number of epochs. FAM is on the logits layer ``fc``,
with the exact closed form. The grid is λ ∈ {0, 0.01, 0.1, 1}. The SAM baseline (Foret
et al. 2021, ρ = 0.05, over the same SGD) runs with λ = 0. Each setting runs with seeds
0, 1 and 2; the seed only changes the order of the mini-batches. At the end the script
records the test accuracy, the test loss, and κ and the loss on the full training set.
It writes ``finetune_sweep.csv`` (one row per run) and ``finetune_sweep.png``, and prints
a mean ± std table in Markdown. A run that diverges is recorded as such, not dropped.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

import torch

from flatcli.errors import FlatcliError
from flatcli.finetune import finetune

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "sample_models" / "digits_mlp.safetensors"
LAMBDAS = (0.0, 0.01, 0.1, 1.0)
SEEDS = (0, 1, 2)
COMMON = {"momentum": 0.9, "batch_size": 32, "schedule": "cosine", "device": "cpu"}


def settings() -> list[tuple[str, dict]]:
    grid = [(f"FAM λ={lam:g}", {"fam_lambda": lam, "optimizer": "sgd"}) for lam in LAMBDAS]
    grid.append(("SAM ρ=0.05", {"fam_lambda": 0.0, "optimizer": "sam", "sam_rho": 0.05}))
    return grid


def run(epochs: int, lr: float) -> list[dict]:
    rows = []
    for label, kwargs in settings():
        for seed in SEEDS:
            start = time.perf_counter()
            row = {"setting": label, "seed": seed, "epochs": epochs, "lr": lr, **kwargs}
            try:
                r = finetune(CHECKPOINT, epochs=epochs, lr=lr, seed=seed, **COMMON, **kwargs)
            except FlatcliError as e:
                row.update(diverged=True, note=str(e))
            else:
                row.update(
                    diverged=False,
                    test_accuracy=r.after["test_accuracy"].value,
                    test_loss=r.after["test_loss"].value,
                    kappa=r.after["relative_flatness"].value,
                    train_loss=r.after["train_loss"].value,
                    kappa_start=r.before["relative_flatness"].value,
                    test_accuracy_start=r.before["test_accuracy"].value,
                    test_loss_start=r.before["test_loss"].value,
                    train_loss_start=r.before["train_loss"].value,
                )
            row["seconds"] = round(time.perf_counter() - start, 2)
            print(row, flush=True)
            rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for label, _ in settings():
        runs = [r for r in rows if r["setting"] == label]
        ok = [r for r in runs if not r["diverged"]]
        entry = {"setting": label, "runs": len(runs), "diverged": len(runs) - len(ok)}
        for key in ("test_accuracy", "test_loss", "kappa", "train_loss"):
            vals = [r[key] for r in ok]
            entry[key] = statistics.fmean(vals) if vals else math.nan
            entry[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else math.nan
        out.append(entry)
    return out


def markdown(summary: list[dict], start: dict) -> str:
    lines = [
        "| setting | test accuracy | test loss | κ (train, end) | train loss | diverged |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| start (digits_mlp) | {start['test_accuracy']:.4f} | {start['test_loss']:.4f} | "
        f"{start['kappa']:.4f} | {start['train_loss']:.2e} | |",
    ]
    for s in summary:
        if s["diverged"] == s["runs"]:
            lines.append(f"| {s['setting']} | – | – | – | – | {s['diverged']}/{s['runs']} |")
            continue
        lines.append(
            f"| {s['setting']} | {s['test_accuracy']:.4f} ± {s['test_accuracy_std']:.4f} | "
            f"{s['test_loss']:.4f} ± {s['test_loss_std']:.4f} | "
            f"{s['kappa']:.4f} ± {s['kappa_std']:.4f} | "
            f"{s['train_loss']:.2e} ± {s['train_loss_std']:.1e} | {s['diverged']}/{s['runs']} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], rows: list[dict], path: Path, *, epochs: int, lr: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_kappa = fig.subplots(1, 2)
    labels = [s["setting"] for s in summary]
    for i, s in enumerate(summary):
        ok = [r for r in rows if r["setting"] == s["setting"] and not r["diverged"]]
        color = "C1" if s["setting"].startswith("SAM") else "C0"
        for ax, key in ((ax_acc, "test_accuracy"), (ax_kappa, "kappa")):
            vals = [r[key] for r in ok]
            if vals:
                ax.plot([i] * len(vals), vals, "o", color=color, alpha=0.35)
                ax.errorbar(
                    i,
                    statistics.fmean(vals),
                    yerr=statistics.stdev(vals) if len(vals) > 1 else 0,
                    fmt="_",
                    color=color,
                    markersize=18,
                    capsize=4,
                )
            if s["diverged"]:  # NaN runs have no point to plot: say so where they would be
                ax.annotate(
                    f"{s['diverged']}/{s['runs']} NaN",
                    (i, 0.5),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    color="C3",
                )
    start = next(r for r in rows if not r["diverged"])
    ax_acc.axhline(start["test_accuracy_start"], ls="--", color="gray", lw=1, label="start")
    ax_kappa.axhline(start["kappa_start"], ls="--", color="gray", lw=1, label="start")
    for ax, ylabel in ((ax_acc, "test accuracy"), (ax_kappa, "κ of fc on the training set")):
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=-0.03 * ax.get_ylim()[1])  # linear, so that κ = 0 stays visible
        ax.legend(loc="lower left")
    fig.suptitle(
        f"Fine-tuning the digits MLP for {epochs} epochs "
        f"(SGD lr {lr:g}, cosine; 3 seeds each; dots: runs, bars: mean ± std)"
    )
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    # The MLP is far too small to gain from threads, and on a busy machine OpenMP barriers
    # waiting for a descheduled thread made single runs 25x slower.
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = run(args.epochs, args.lr)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
    with open(args.out / "finetune_sweep.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    first = next(r for r in rows if not r["diverged"])
    start = {
        key: first[f"{key}_start"] for key in ("test_accuracy", "test_loss", "kappa", "train_loss")
    }
    plot(summary, rows, args.out / "finetune_sweep.png", epochs=args.epochs, lr=args.lr)
    print()
    print(markdown(summary, start))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
