"""What a FAM fine-tuning run reports: the epoch records, the CSV log and its manifest, the
plot of the curves, and the test metrics.

The library side of the reporting of :func:`flatcli.finetune.finetune`; every file is
written atomically. (The temperature-matched baseline's maths is in
:mod:`flatcli.finetune.temperature`.)
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data import take
from .features import ModelInput, batch_len, call_model
from .io import atomic_write, atomic_write_text
from .losses import per_sample_loss
from .measures.estimate import Estimate

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOG_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "kappa",
    "test_loss",
    "test_accuracy",
    "weight_sq_norm",
    "phi_sq_mean",
    "max_softmax",
    "seconds",
    "full_train_loss",
    "full_train_accuracy",
    "full_kappa",
)
EVAL_BATCH = 1024
LOG_SCHEMA = "flatcli.finetune-log/1"
"""Schema id of the CSV log's manifest (``STEM.manifest.json``): the run's provenance and
its before/after measures. The run's whole result is :data:`flatcli.finetune.SCHEMA`."""
"""Samples per forward pass when evaluating on a whole split."""


@dataclass(frozen=True)
class EpochRecord:
    """One completed epoch.

    Attributes:
        epoch: 1-based epoch number.
        lr: Learning rate at the end of the epoch.
        train_loss: Mean data loss over the epoch's training batches (train mode, before
            each step's update). This is the loss alone, without the penalty.
        kappa: The FAM penalty, κ or κ̂, averaged over the epoch's batches and weighted by
            batch size. Each batch's value is that batch's mean. It is logged for λ = 0 too.
        test_loss: Mean loss on the test split after the epoch (eval mode). None when
            there is no test split.
        test_accuracy: Test accuracy after the epoch. None without a test split or for
            regression targets.
        weight_sq_norm: ``‖W‖²_F`` of the FAM layer at the end of the epoch.
        phi_sq_mean: Mean ``‖φ_i‖²`` of the layer's input over the epoch's batches.
        max_softmax: Mean largest softmax probability over the epoch's batches (how
            confident the model is); None for regression targets.
        seconds: Wall time of the epoch, including the test evaluation.
        full_train_loss: Mean train loss on the whole training set at the end of the epoch,
            in eval mode: the quantity epoch 0 shows for the starting model. None in
            records from before it was logged.
        full_train_accuracy: Train accuracy, the same way; None for regression targets.
        full_kappa: κ on the whole training set at the end of the epoch, in eval mode.
    """

    epoch: int
    lr: float
    train_loss: float
    kappa: float
    test_loss: float | None
    test_accuracy: float | None
    weight_sq_norm: float
    phi_sq_mean: float
    max_softmax: float | None
    seconds: float
    full_train_loss: float | None = None
    full_train_accuracy: float | None = None
    full_kappa: float | None = None

    def to_row(self) -> dict[str, Any]:
        """A plain dict in :data:`LOG_COLUMNS` order."""
        return asdict(self)


def write_log(path: str | Path, history: Sequence[EpochRecord]) -> Path:
    """Atomically write the per-epoch CSV log (columns :data:`LOG_COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in history:
        writer.writerow({k: ("" if v is None else v) for k, v in r.to_row().items()})
    return atomic_write_text(path, buf.getvalue())


def write_log_manifest(
    log_path: str | Path,
    hparams: Mapping[str, Any],
    parent_sha256: str,
    out_sha256: str | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    extra: Mapping[str, Any] | None = None,
) -> Path | None:
    """The CSV log's provenance beside it, ``STEM.manifest.json``, written atomically
    (none beside a stream such as ``/dev/null``)."""
    from .report import write_manifest_beside
    from .runtime import manifest

    provenance = {
        "schema": LOG_SCHEMA,
        "checkpoint": {"parent_sha256": parent_sha256, "output_sha256": out_sha256},
        "hparams": dict(hparams),
        **dict(extra or {}),
        "manifest": manifest(device=device, dtype=dtype, seed=seed),
    }
    return write_manifest_beside(log_path, provenance)


def history_figure(
    history: Sequence[EpochRecord],
    *,
    start: Mapping[str, Estimate] | None = None,
    kappa_key: str = "relative_flatness",
    title: str = "",
) -> Figure:
    """The loss, κ and test accuracy curves as a matplotlib figure (Agg canvas).

    Each line is one quantity at every epoch. The solid train loss and κ lines are the
    model on the whole training set in eval mode: with ``start`` (the measures of the
    starting model) from epoch 0, then the weights at the end of each epoch
    (``full_train_loss``, ``full_kappa``). The dashed lines, labelled as such, are the
    epoch's train-mode batch means (dropout on, each batch before its update), which are
    not comparable with epoch 0. The test accuracy panel is left out when there is no test
    accuracy to show.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def at_start(key: str) -> list[float | None]:
        if start is None:
            return []
        found = start.get(key)
        return [None if found is None else found.value]

    lead = [0] if start is not None else []
    epochs = lead + [r.epoch for r in history]
    trained = [r.epoch for r in history]
    test_loss = at_start("test_loss") + [r.test_loss for r in history]
    test_acc = at_start("test_accuracy") + [r.test_accuracy for r in history]
    has_acc = any(a is not None for a in test_acc)
    fig = Figure(figsize=(11 if has_acc else 7.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if has_acc else 2)
    ax_loss, ax_kappa = axes[0], axes[1]
    full_loss = at_start("train_loss") + [r.full_train_loss for r in history]
    ax_loss.plot(epochs, _nan(full_loss), "o-", color="C0", label=FULL_LABEL)
    batch_loss = _nan([r.train_loss for r in history])
    ax_loss.plot(trained, batch_loss, "x--", color="C0", alpha=0.6, label=BATCH_LABEL)
    if any(t is not None for t in test_loss):
        ax_loss.plot(epochs, _nan(test_loss), "s-", color="C1", label="test (eval)")
    ax_loss.set(ylabel="loss", yscale="log")
    full_kappa = _nan(at_start(kappa_key) + [r.full_kappa for r in history])
    ax_kappa.plot(epochs, full_kappa, "o-", color="C2", label=FULL_LABEL)
    batch_kappa = _nan([r.kappa for r in history])
    ax_kappa.plot(trained, batch_kappa, "x--", color="C2", alpha=0.6, label=BATCH_LABEL)
    ax_kappa.set(ylabel="κ")
    shown = [k for k in full_kappa + batch_kappa if not math.isnan(k)]
    if shown and all(k > 0 for k in shown):
        ax_kappa.set_yscale("log")
    for ax in (ax_loss, ax_kappa):
        ax.legend(fontsize=7)
    if has_acc:
        axes[2].plot(epochs, _nan(test_acc), "o-", color="C3")
        axes[2].set(ylabel="test accuracy")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_xlabel("epoch (0: the starting model)" if start is not None else "epoch")
    if title:
        fig.suptitle(title)
    return fig


FULL_LABEL = "train, whole set (eval)"
"""The legend of the lines that show the model on the whole training set in eval mode."""
BATCH_LABEL = "train, batch mean (train mode)"
"""The legend of the lines that show an epoch's train-mode batch means."""


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def plot_history(
    history: Sequence[EpochRecord],
    path: str | Path,
    *,
    title: str = "",
    start: Mapping[str, Estimate] | None = None,
    kappa_key: str = "relative_flatness",
) -> Path:
    """Atomically write a PNG of :func:`history_figure`."""
    fig = history_figure(history, start=start, kappa_key=kappa_key, title=title)
    return atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))


def epoch_line(r: EpochRecord, epochs: int) -> str:
    """One line of progress for an epoch."""
    test = ""
    if r.test_loss is not None:
        test = f" · test loss {r.test_loss:.4g}"
    if r.test_accuracy is not None:
        test += f" · test acc {r.test_accuracy:.4f}"
    full = ""
    if r.full_train_loss is not None and r.full_kappa is not None:
        full = f" · train loss {r.full_train_loss:.4g} · κ {r.full_kappa:.4g} (whole set)"
    return (
        f"epoch {r.epoch}/{epochs}{full} · batch means: loss {r.train_loss:.4g}, "
        f"κ {r.kappa:.4g}{test} · ‖W‖² {r.weight_sq_norm:.4g} · lr {r.lr:.3g} · "
        f"{r.seconds:.1f} s"
    )


@torch.no_grad()
def heldout_metrics(
    net: nn.Module, xy: tuple[ModelInput, torch.Tensor], loss: str
) -> dict[str, Estimate]:
    """Mean test loss and accuracy, in eval mode. The caller's mode is restored."""
    was_training = net.training
    net.eval()
    x, y = xy
    n = batch_len(x)
    loss_sum, correct = 0.0, 0
    for lo in range(0, n, EVAL_BATCH):
        out = call_model(net, take(x, slice(lo, lo + EVAL_BATCH)))
        yb = y[lo : lo + EVAL_BATCH]
        loss_sum += float(per_sample_loss(out, yb, loss).double().sum())  # type: ignore[arg-type]
        if not yb.is_floating_point():
            correct += int((out.argmax(-1) == yb).sum())
    net.train(was_training)
    result = {"test_loss": Estimate(loss_sum / n, None, f"exact: mean {loss} over {n} samples")}
    if not y.is_floating_point():
        result["test_accuracy"] = Estimate(correct / n, None, f"exact: over {n} samples")
    return result
