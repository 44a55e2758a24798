"""False alarms and misses of the FAM divergence guard, over a grid, for docs/finetune.md.

    python bench/fam_guard_grid.py [--epochs 5] [--seeds 0,1] [--out docs]

Starting models: ReLU MLPs with two hidden layers of 16 on scikit-learn's wine, breast
cancer and iris (``tests/tabular.py``: standardized, 70/30 stratified split, float64),
trained by full-batch Adam until their train loss first falls to 75%, 35% or 5% of chance
(the label entropy): from badly under-fitted to nearly fitted. Every run fine-tunes the
logits layer ``fc`` for the given epochs with SGD (momentum 0.9, batch 32, cosine), over

* λ ∈ {0 (plain), 0.1, 1, 10, auto}, lr ∈ {0.01, 0.1}, clipping at 1.0 or none,
* seeds (the batch order).

Each run trains with the guard *recording* instead of stopping (a subclass of
:class:`flatcli.guard.DivergenceGuard` whose ``check`` notes the first epoch and check that
fire and returns None), so the same run gives the guard's verdict and the final model the
user would get without a guard. The old guard (before issue 21: loss > 10·loss₀ + 0.1 on
the epoch's batch average; κ > 2κ₀ for an exact κ unless the loss fell by 0.1; saturation)
is evaluated on the same epochs.

**A true collapse** is defined on the *test* split, which the guard never sees: the final
model is non-finite, or its test loss is at or above chance (the best constant
predictor's: the entropy of the training labels), or its test accuracy has lost more than
half of the start's lead over chance (the largest class's share). A false alarm is a run
the guard stops that did not collapse; a miss, a collapse it let through. A run that did
not collapse is *damaged* when its test loss rose by more than a quarter of the start's
lead over chance, or its test accuracy fell by more than a quarter of its lead, and
*unharmed* otherwise; the table says how many false alarms stopped an unharmed run.

Writes ``fam_guard_grid.csv`` and replaces the table between ``<!-- fam_guard_grid -->``
and ``<!-- /fam_guard_grid -->`` in ``docs/finetune.md``. Run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from doc_tables import publish  # noqa: E402

import flatcli.finetune as ft  # noqa: E402
from flatcli.checkpoints import load_checkpoint  # noqa: E402
from flatcli.guard import DivergenceGuard  # noqa: E402
from tests import tabular  # noqa: E402

STARTS = (0.75, 0.35, 0.05)  # train loss of the start, as a fraction of chance
LAMBDAS: tuple[float | str, ...] = (0.0, 0.1, 1.0, 10.0, "auto")
LRS = (0.01, 0.1)
CLIPS = (1.0, 0.0)


class Recording(DivergenceGuard):
    """The guard, noting what fires instead of stopping the run (plus the old guard's verdict)."""

    fired = []  # (new reason, old reason) per epoch of the current run

    def check(self, now, stats, weight_sq):  # noqa: ANN001, ANN201
        reason = super().check(now, stats, weight_sq)
        Recording.fired.append((reason, legacy(self, stats, weight_sq)))
        return None


def legacy(g: DivergenceGuard, stats, weight_sq: float) -> str | None:  # noqa: ANN001
    """The guard as it was before issue 21, on the same epoch."""
    loss0 = g.start.loss  # the start's full-data loss, as before
    loss, kappa = stats.train_loss, stats.kappa
    if not (math.isfinite(loss) and math.isfinite(kappa) and math.isfinite(weight_sq)):
        return "non-finite"
    if loss > 10 * loss0 + 0.1:
        return "loss"
    if not g.fam:
        return None
    if g.kappa_exact and kappa > 2 * g.kappa0 and not loss < loss0 - 0.1:
        return "κ rise"
    if kappa < 0.1 * g.kappa0 and weight_sq > 10 * g.weight0:
        return "saturation"
    return None


def chance(y: torch.Tensor) -> tuple[float, float]:
    freq = torch.bincount(y).double() / len(y)
    nz = freq[freq > 0]
    return float(-(nz * nz.log()).sum()), float(freq.max())


def test_metrics(model: torch.nn.Module, name: str) -> tuple[float, float]:
    _, _, xb, yb = tabular.dataset(name)
    with torch.no_grad():
        out = model.double().eval()(xb)
    loss = float(torch.nn.functional.cross_entropy(out, yb))
    return loss, float((out.argmax(1) == yb).double().mean())


def one_run(ck: Path, data: Path, name: str, setting: dict, epochs: int, seed: int) -> dict:
    Recording.fired = []
    row: dict = {}
    try:
        r = ft.finetune(
            ck,
            data=str(data),
            epochs=epochs,
            seed=seed,
            dtype="float64",
            device="cpu",
            momentum=0.9,
            batch_size=32,
            **setting,
        )
        loss, acc = test_metrics(r.model, name)
        row.update(lambda_used=r.hparams["fam_lambda_used"])
    except (ft.FlatcliError, RuntimeError, ValueError) as e:
        if not Recording.fired:  # it never trained: auto with a zero gradient of κ, say
            return {"error": str(e).splitlines()[0]}
        loss, acc = math.nan, math.nan  # a wreck the final measures cannot handle
        row["error"] = str(e).splitlines()[0]
    new = [(i + 1, r) for i, (r, _) in enumerate(Recording.fired) if r is not None]
    old = [(i + 1, r) for i, (_, r) in enumerate(Recording.fired) if r is not None]
    row.update(
        final_test_loss=loss,
        final_test_accuracy=acc,
        fired_epoch=new[0][0] if new else None,
        fired_check=new[0][1].split(":")[0] if new else None,
        old_fired_epoch=old[0][0] if old else None,
        old_fired_check=old[0][1] if old else None,
    )
    return row


def grid(epochs: int, seeds: list[int]) -> list[dict]:
    rows = []
    ft.run.DivergenceGuard = Recording  # the orchestrator builds it: record, never stop
    with tempfile.TemporaryDirectory() as tmp:
        for name in tabular.DATASETS:
            xa, ya, _, _ = tabular.dataset(name)
            chance_loss, chance_acc = chance(ya)
            for share in STARTS:
                ck, data = tabular.write_start(Path(tmp), name, share * chance_loss)
                start_loss, start_acc = test_metrics(load_checkpoint(ck).model, name)
                for lam in LAMBDAS:
                    for lr in LRS:
                        for clip in CLIPS:
                            if lam == 0 and clip > 0:
                                continue  # plain runs unclipped only, as measured
                            setting = {"fam_lambda": lam, "lr": lr, "clip_grad_norm": clip}
                            for seed in seeds:
                                t0 = time.perf_counter()
                                row = {
                                    "data": name,
                                    "start_share": share,
                                    "start_test_loss": start_loss,
                                    "start_test_accuracy": start_acc,
                                    "chance_loss": chance_loss,
                                    "chance_accuracy": chance_acc,
                                    "lambda": lam,
                                    "lr": lr,
                                    "clip": clip,
                                    "seed": seed,
                                }
                                row.update(one_run(ck, data, name, setting, epochs, seed))
                                row["collapsed"] = collapsed(row)
                                row["seconds"] = round(time.perf_counter() - t0, 2)
                                rows.append(row)
                                print(row, flush=True)
    return rows


def collapsed(row: dict) -> bool | None:
    """The definition of a true collapse (module docstring), on the test split."""
    if "final_test_loss" not in row:
        return None
    loss, acc = row["final_test_loss"], row["final_test_accuracy"]
    if not (math.isfinite(loss) and math.isfinite(acc)):
        return True
    lead0 = row["start_test_accuracy"] - row["chance_accuracy"]
    lost_accuracy = lead0 > 0 and acc - row["chance_accuracy"] < 0.5 * lead0
    return bool(loss >= row["chance_loss"] or lost_accuracy)


def damaged(row: dict) -> bool:
    """Not collapsed, but more than a quarter of the start's lead over chance lost."""
    loss_lead = row["chance_loss"] - row["start_test_loss"]
    acc_lead = row["start_test_accuracy"] - row["chance_accuracy"]
    lost_loss = row["final_test_loss"] - row["start_test_loss"] > 0.25 * loss_lead
    lost_acc = row["start_test_accuracy"] - row["final_test_accuracy"] > 0.25 * acc_lead
    return bool(lost_loss or lost_acc)


def rates(rows: list[dict], fired_key: str) -> tuple[int, int, int, int, int]:
    """(false alarms, of them on unharmed runs, healthy runs, misses, collapses)."""
    ok = [r for r in rows if r.get("collapsed") is not None]
    healthy = [r for r in ok if not r["collapsed"]]
    bad = [r for r in ok if r["collapsed"]]
    alarms = [r for r in healthy if r[fired_key] is not None]
    unharmed = sum(not damaged(r) for r in alarms)
    misses = sum(r[fired_key] is None for r in bad)
    return len(alarms), unharmed, len(healthy), misses, len(bad)


def table(rows: list[dict]) -> str:
    head = (
        "| runs | collapses | guard: false alarms | of them unharmed | guard: misses "
        "| old guard: false alarms | old guard: misses |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    groups = [("all", rows)]
    groups += [(f"lr {lr:g}", [r for r in rows if r["lr"] == lr]) for lr in LRS]
    groups += [
        (f"clip {c:g}" if c else "no clip", [r for r in rows if r["clip"] == c]) for c in CLIPS
    ]
    groups += [(f"{name}", [r for r in rows if r["data"] == name]) for name in tabular.DATASETS]
    groups += [(f"start {s:g}× chance", [r for r in rows if r["start_share"] == s]) for s in STARTS]
    groups += [(f"λ = {lam}", [r for r in rows if r["lambda"] == lam]) for lam in LAMBDAS]
    for label, group in groups:
        fa, unharmed, healthy, miss, bad = rates(group, "fired_epoch")
        ofa, _, _, omiss, _ = rates(group, "old_fired_epoch")
        cells = [
            f"{label} ({len(group)})",
            str(bad),
            f"{fa}/{healthy} ({fa / max(healthy, 1):.0%})",
            f"{unharmed}/{healthy} ({unharmed / max(healthy, 1):.0%})",
            f"{miss}/{bad} ({miss / max(bad, 1):.0%})",
            f"{ofa}/{healthy} ({ofa / max(healthy, 1):.0%})",
            f"{omiss}/{bad} ({omiss / max(bad, 1):.0%})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    rows = grid(args.epochs, seeds)
    wall = time.perf_counter() - t0
    summary = table(rows) + (
        f"\n{len(rows)} runs, {args.epochs} epochs each, seeds {args.seeds}; "
        f"{wall / 60:.1f} min on 1 thread.\n"
    )
    print(summary)
    publish(args.out, "fam_guard_grid", rows, summary)


if __name__ == "__main__":
    main()
