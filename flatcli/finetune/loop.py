"""The epoch loop of a fine-tuning run: train an epoch (:func:`flatcli.training.train_epoch`),
ask the guard (:class:`flatcli.guard.DivergenceGuard`), record the epoch, save the state and
the log; on divergence, write the last good epoch's weights and raise
:class:`~flatcli.finetune.result.Diverged`."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..finetune_report import EpochRecord, epoch_line, heldout_metrics, write_log
from ..guard import DivergenceGuard, snapshot
from ..measures.estimate import Estimate
from ..training import train_epoch
from .outputs import write_outputs
from .result import Diverged
from .setup import Training
from .state import save_state


def train_epochs(
    tr: Training,
    guard: DivergenceGuard,
    history: list[EpochRecord],
    before: Mapping[str, Estimate],
    note: Callable[[str], None],
) -> None:
    """Run the epochs after ``len(history)`` up to ``epochs``, appending to ``history``.

    Raises:
        Diverged: The guard fired; the outputs hold the last good epoch's weights.
    """
    cfg = tr.config
    good_weights = copy.deepcopy(tr.net.state_dict())
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        record, reason = run_epoch(epoch, tr, guard)
        history.append(record)
        if reason is not None:
            note(epoch_line(record, cfg.epochs))
            tr.net.load_state_dict(good_weights)
            diverge(tr, history, before, reason=reason, epoch=epoch)
        good_weights = copy.deepcopy(tr.net.state_dict())
        if tr.state_file is not None:
            save_state(tr, epoch=epoch, history=history, before=before)
        if cfg.log_path is not None:
            write_log(cfg.log_path, history)
        note(epoch_line(record, cfg.epochs))


def run_epoch(epoch: int, tr: Training, guard: DivergenceGuard) -> tuple[EpochRecord, str | None]:
    """One epoch, its test metrics and its record, and the guard's verdict (None: fine)."""
    cfg = tr.config
    t0 = time.perf_counter()
    stats = train_epoch(
        tr.net,
        tr.reg,
        tr.opt,
        tr.sched,
        tr.x,
        tr.y,
        fam_lambda=float(tr.hparams["fam_lambda_used"]),
        batch_size=cfg.batch_size,
        shuffle=tr.shuffle,
        sam=cfg.optimizer == "sam",
        clip_grad_norm=cfg.clip,
    )
    weight_sq = float(tr.reg.split.weight.detach().double().pow(2).sum())
    now = snapshot(tr.reg, tr.x, tr.y, kappa=True)  # eval mode, the whole set: as at epoch 0
    reason = guard.check(now, stats, weight_sq)
    finite = reason is None or "NaN" not in reason
    test = tr.test
    tm = heldout_metrics(tr.net, test, tr.reg.loss) if test is not None and finite else {}
    record = EpochRecord(
        epoch=epoch,
        lr=float(tr.opt.param_groups[0]["lr"]),
        train_loss=stats.train_loss,
        kappa=stats.kappa,
        test_loss=tm["test_loss"].value if "test_loss" in tm else None,
        test_accuracy=tm["test_accuracy"].value if "test_accuracy" in tm else None,
        weight_sq_norm=weight_sq,
        phi_sq_mean=stats.phi_sq_mean,
        max_softmax=stats.max_softmax,
        seconds=time.perf_counter() - t0,
        full_train_loss=now.loss,
        full_train_accuracy=now.accuracy,
        full_kappa=now.kappa,
    )
    return record, reason


def diverge(
    tr: Training,
    history: list[EpochRecord],
    before: Mapping[str, Estimate],
    *,
    reason: str,
    epoch: int,
) -> None:
    """Write what a diverged run leaves (the last good weights, the log, the plot), then
    raise :class:`Diverged`. ``tr.net`` already holds the last good weights."""
    cfg, hparams = tr.config, tr.hparams
    good = epoch - 1
    lam = float(hparams["fam_lambda_used"])
    saved: dict[str, Any] = {**hparams, "diverged_in_epoch": epoch, "weights_of_epoch": good}
    write_outputs(
        tr.net,
        tr.checkpoint,
        hparams=hparams,
        history=history,
        measured={"diverged": {"epoch": epoch, "reason": reason, "weights_of_epoch": good}},
        before=before,
        paths=(tr.out, cfg.log_path, cfg.plot_path),
        kappa_key=cfg.kappa_key,
        data_spec=tr.data_spec,
        device=tr.device,
        dtype=tr.dtype,
        checkpoint_hparams=saved,
    )
    written = ""
    if tr.out is not None:
        which = "the starting model" if good == 0 else f"epoch {good}, the last good one"
        written = f"; wrote the weights of {which} to {tr.out}"
    lower = f"--lr (now {hparams['lr']:g})"
    if lam > 0:
        lower += f" or --fam-lambda (λ now {lam:.3g}; --fam-lambda auto picks a safe one)"
    raise Diverged(
        f"the run diverged in epoch {epoch}: {reason}{written}. Lower {lower}",
        epoch=epoch,
        good_epoch=good,
        reason=reason,
    )
