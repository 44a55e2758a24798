r"""Fine-tune a model with FAM: :math:`E_{\text{batch}} + \lambda\,\kappa(W^l)`, resumably, with
a guard against divergence.

:func:`finetune` is the library side of ``flatcli finetune``. Each step minimizes the
mini-batch loss plus λ times the relative flatness κ of one layer on the same mini-batch.
κ comes from :class:`~flatcli.fam.FAMRegularizer`, which gives the exact gradient of
FAM's Lemma 1 (or, with ``fam_gradient="detached"``, the published code's term (I) only).
The step runs one forward pass, and the penalty reuses it.

The work is split in four:

* the training loop, in :mod:`flatcli.training` (steps, clipping, SAM, epoch averages);
* the divergence guard, in :mod:`flatcli.guard` (:class:`DivergenceGuard`, fed one
  epoch at a time);
* the bookkeeping, here: options, λ (absolute, relative or ``auto``), and the resumable
  state (``_save_state``, ``_load_state``, ``_check_resumable``);
* the reporting, in :mod:`flatcli.finetune_report` (log, plot, test metrics, the
  temperature-matched baseline).

What a run writes, each file atomically:

* ``log_path``: a CSV of the epochs so far, rewritten after every epoch.
* ``state_path``: a ``torch.save`` file with the model, optimizer, scheduler, every RNG
  state and the history, rewritten after every completed epoch. RNG states are stored as
  tensors, so it loads with ``weights_only=True``. ``resume=True`` continues from it.
  On the CPU, the resumed run ends bit-identical to an uninterrupted one.
* ``out_path``: a flatcli safetensors checkpoint. Its metadata gives the architecture, the
  data, the hyperparameters including λ, and the parent checkpoint's sha256. When the run
  diverges, it holds the last good epoch's weights.
* ``plot_path``: a PNG of the curves from epoch 0, drawn at the end.

The result holds a before/after comparison of the layer's measures
(:func:`~flatcli.measures.relative_flatness.layer_measures`) and of the test loss and
accuracy, and the same measures for the starting model at the fine-tuned model's train
loss (its logits rescaled: a temperature).

References:
    Adilova et al. *FAM: Relative Flatness Aware Minimization.* 2023.
    https://arxiv.org/abs/2307.02337
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .checkpoints import Checkpoint, check_finite, load_checkpoint, save_checkpoint
from .data import (
    Dataset,
    MissingSplit,
    as_batches,
    as_inputs,
    check_fits,
    check_labels,
    check_same_length,
    fit_inputs,
    inputs_to,
    load_data,
    metadata_data,
    split_labels,
)
from .errors import FlatcliError, UsageError
from .fam import GRADIENTS as FAM_GRADIENTS
from .fam import METHODS as FAM_METHODS
from .fam import VARIANTS as FAM_VARIANTS
from .fam import FAMRegularizer
from .features import default_layer
from .finetune_report import (
    LOG_COLUMNS,
    EpochRecord,
    epoch_line,
    heldout_metrics,
    plot_history,
    temperature_scale,
    write_log,
    write_log_manifest,
)
from .guard import DivergenceGuard, chance_level, snapshot
from .io import (
    atomic_write,
    check_archive_size,
    check_distinct,
    check_output,
    is_stream,
    sha256_file,
    sidecar,
)
from .losses import check_loss
from .measures.estimate import Estimate
from .measures.relative_flatness import layer_measures
from .runtime import resolve_device, resolve_dtype
from .training import (
    batch_slices,
    kappa_gradient,
    load_optimizer_state,
    make_optimizer,
    train_epoch,
)
from .untrusted import check_tensors, parse_json

__all__ = [
    "LOG_COLUMNS",
    "DivergenceGuard",
    "Diverged",
    "EpochRecord",
    "FinetuneResult",
    "finetune",
    "plot_history",
    "write_log",
]

OptimizerName = Literal["sgd", "adam", "sam"]
Schedule = Literal["cosine", "constant"]
OPTIMIZERS = ("sgd", "adam", "sam")
SCHEDULES = ("cosine", "constant")
SCALES = ("absolute", "relative", "paper")
STATE_FORMAT = "flatcli.finetune-state/1"
#: ``fam_lambda="auto"`` picks λ so that the relative step R at step 0 equals this.
SAFE_STEP_RATIO = 0.003
#: A step-0 R above this is reported as a warning (the stability study's mixed range).
WARN_STEP_RATIO = 0.01
#: Gradient clipping when ``clip_grad_norm`` is not given, for λ = 0 and λ > 0 alike, so that
#: plain training and FAM are compared under the same step.
DEFAULT_CLIP = 1.0
#: A penalty λκ₀ below this share of the starting train loss E₀ is reported as negligible.
NEGLIGIBLE_PENALTY = 1e-3


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: The fine-tuned model, in eval mode.
        history: One record per epoch, including epochs restored from a state file.
        before: Layer measures and test metrics of the starting model.
        after: The same measures and metrics after fine-tuning.
        layer: The FAM layer.
        fam_method: How κ was computed, in words.
        hparams: Every hyperparameter of the run, as recorded in the checkpoint metadata.
            ``fam_lambda_used`` is the λ the run used (``fam_lambda`` is the request:
            a number, a fraction with ``fam_scale="relative"``, or ``"auto"``), and
            ``fam_step_ratio`` the relative step R at step 0 (None for Adam or λ = 0).
        resumed_from: Completed epochs found in the state file (0 for a fresh run).
        out_path: The written checkpoint, or None.
        out_sha256: Its sha256, or None.
        log_path: The CSV log, or None.
        plot_path: The PNG of the curves, or None.
        state_path: The resumable state file, or None.
        parent_sha256: The starting checkpoint's sha256 (empty for an in-memory module).
        temperature_matched: The same measures as ``before`` and ``after`` for the starting
            model with its logits layer scaled by ``temperature_c``, so that its train loss
            equals the fine-tuned model's; None when there is no such model.
        temperature_c: That scale ``c`` (a softmax temperature ``1/c``), or None.
        temperature_note: Why there is no temperature-matched baseline, or None.
        warnings: Warnings of the run, one line each (a large step ratio R).
    """

    model: nn.Module
    history: tuple[EpochRecord, ...]
    before: Mapping[str, Estimate]
    after: Mapping[str, Estimate]
    layer: str
    fam_method: str
    hparams: Mapping[str, Any]
    resumed_from: int = 0
    out_path: Path | None = None
    out_sha256: str | None = None
    log_path: Path | None = None
    plot_path: Path | None = None
    state_path: Path | None = None
    parent_sha256: str | None = None
    temperature_matched: Mapping[str, Estimate] | None = None
    temperature_c: float | None = None
    temperature_note: str | None = None
    warnings: tuple[str, ...] = ()


class Diverged(FlatcliError):
    """The run diverged or saturated; the last good epoch's weights were written.

    Attributes:
        epoch: The epoch in which the guard fired.
        good_epoch: The epoch whose weights were restored (0: the starting model).
        reason: What the guard saw, in words.
    """

    def __init__(self, message: str, *, epoch: int, good_epoch: int, reason: str) -> None:
        super().__init__(message)
        self.epoch, self.good_epoch, self.reason = epoch, good_epoch, reason


DataLike = str | Dataset | tuple[torch.Tensor, torch.Tensor]


def finetune(
    model: str | Path | Checkpoint | nn.Module,
    data: DataLike | None = None,
    *,
    fam_lambda: float | Literal["auto"],
    test_data: DataLike | None = None,
    layer: str | None = None,
    epochs: int = 5,
    optimizer: OptimizerName = "sgd",
    sam_rho: float = 0.05,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    schedule: Schedule = "cosine",
    fam_variant: str = "neuronwise",
    fam_method: str = "auto",
    fam_probes: int = 1,
    fam_gradient: str = "full",
    fam_scale: str = "absolute",
    clip_grad_norm: float | None = None,
    loss: str | None = None,
    target: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    out_path: str | Path | None = None,
    log_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    overwrite_input: bool = False,
    progress: Callable[[str], None] | None = None,
) -> FinetuneResult:
    r"""Fine-tune with FAM: minimize :math:`E_{\text{batch}} + \lambda\,\kappa(W^l)` (FAM Eq. 1).

    Args:
        model: A checkpoint path, a loaded :class:`~flatcli.checkpoints.Checkpoint`, or a
            module. A copy is trained; the argument is left untouched.
        data: Training data: a bundled name or file (its ``test`` split, when present,
            is used for evaluation), a :class:`~flatcli.data.Dataset`, or an ``(x, y)``
            pair. Default: the checkpoint's ``data`` metadata.
        fam_lambda: λ ≥ 0. With λ = 0 the run is plain training, and κ is still logged.
            With ``fam_scale="relative"`` it is the fraction ``λκ₀/E₀`` instead. ``"auto"``
            picks λ so that the relative step R (below) at step 0 is
            :data:`SAFE_STEP_RATIO` (SGD and SAM only).
        test_data: Evaluation data, if it is not the ``test`` split of ``data``.
        layer: The FAM layer. Default: the last ``nn.Linear``.
        epochs: Total number of epochs, including those restored by ``resume``.
        optimizer: ``sgd`` (with ``momentum``), ``adam``, or ``sam``: sharpness-aware
            minimization (Foret et al. 2021) over SGD with ``momentum``, radius
            ``sam_rho``. SAM's second forward pass leaves BatchNorm running statistics
            alone.
        sam_rho: SAM's neighbourhood radius ρ.
        lr: Learning rate (the peak, for ``cosine``).
        momentum: SGD momentum (``sgd`` and ``sam``).
        weight_decay: L2 weight decay of the optimizer.
        batch_size: Mini-batch size. κ is computed on the same mini-batch. A last batch
            of one sample is merged into the batch before it, because BatchNorm needs two.
        schedule: ``cosine`` anneals the learning rate to 0 over all steps of all
            ``epochs``; ``constant`` keeps it fixed.
        fam_variant: ``neuronwise`` (κ) or ``layerwise`` (‖W‖²_F · Tr H), see
            :class:`~flatcli.fam.FAMRegularizer`.
        fam_method: ``auto``, ``exact`` or ``hutchinson``, see
            :class:`~flatcli.fam.FAMRegularizer`.
        fam_probes: Hutchinson probes per step.
        fam_gradient: ``full`` (the exact Lemma 1 gradient) or ``detached`` (the published
            code's: Hessian held constant, term (I) only), see
            :class:`~flatcli.fam.FAMRegularizer`.
        fam_scale: ``absolute`` (λ as given), ``paper`` (λ in the units of the FAM paper's
            experiments and code, whose neuron-wise regularizer is κ/m: the run uses
            λ/m, ``m`` the layer's ``in_features``; nn.Linear, neuron-wise only) or
            ``relative``: λ = ``fam_lambda`` · E₀/κ₀,
            with E₀ and κ₀ the starting model's full-data train loss and κ, so that λκ₀ is
            that fraction of E₀.
        clip_grad_norm: Clip the global gradient norm of each step to this. None: 1.0
            (:data:`DEFAULT_CLIP`), for plain training (λ = 0) as for FAM, so that the
            two are compared under the same step; 0 turns it off. The threshold is in the
            units of the gradient, so it is not scale-free.
        loss: ``cross_entropy`` or ``mse``. Default: the checkpoint's metadata, else
            cross-entropy.
        target: The label column, when ``data`` is a CSV file.
        max_samples: Use only the first N samples of each split.
        seed: Seeds the shuffling, the Hutchinson probes and dropout, and the measures'
            probes. The caller's global RNG state is restored afterwards.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``float32`` or ``float64``.
        out_path: Write the fine-tuned checkpoint here (``.safetensors`` or ``.pt``; for a
            Hugging Face model, a ``save_pretrained`` folder with a ``flatcli.json``).
        log_path: Write the per-epoch CSV log here.
        plot_path: Write a PNG of the curves here.
        state_path: The resumable state file. Default: next to ``out_path``, with suffix
            ``.state.pt``.
        resume: Continue from ``state_path`` if it exists. The recorded hyperparameters
            must match, except ``epochs`` under a ``constant`` schedule.
        overwrite_input: Allow ``out_path`` to be the input checkpoint (refused by
            default). No other output may be an input, or another output.
        progress: Called with one line of text per stage and per epoch.

    The relative step at step 0 is :math:`R = \frac{lr}{1-\beta}\,\lambda\,
    \|\nabla\kappa_0\|^2/\kappa_0` (β the momentum), on up to
    :data:`~flatcli.training.GRADIENT_SAMPLES` training samples in eval mode. It is
    recorded as ``hparams["fam_step_ratio"]``, and a warning is added above
    :data:`WARN_STEP_RATIO`.

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        UsageError: A bad option, or an unknown layer.
        Diverged: The guard (:class:`DivergenceGuard`) fired. The last good epoch's
            weights are in ``out_path``, and the log and plot show the diverged epoch.
        FlatcliError: Unreadable data or checkpoint, or a state file from another run.
    """
    note = progress or (lambda _msg: None)
    _check_options(
        fam_lambda=fam_lambda,
        epochs=epochs,
        optimizer=optimizer,
        sam_rho=sam_rho,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        schedule=schedule,
        fam_variant=fam_variant,
        fam_method=fam_method,
        fam_probes=fam_probes,
        fam_gradient=fam_gradient,
        fam_scale=fam_scale,
        clip_grad_norm=clip_grad_norm,
    )
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    ck = _as_checkpoint(model)
    from .hf import is_pretrained_model

    _check_outputs(
        out_path, log_path, plot_path, state_path, folder=is_pretrained_model(ck.model)
    )
    outputs = (out_path, log_path, plot_path, state_path)
    _check_not_inputs(ck, [data, test_data], outputs, overwrite_input=overwrite_input)
    net = copy.deepcopy(ck.model).to(device=dev, dtype=dt)
    check_finite(net)
    loss_name = check_loss(loss or ck.metadata.get("loss") or "cross_entropy")
    data_spec, train, test = _resolve_data(
        ck, net, data, test_data, target=target, max_samples=max_samples
    )
    x, y = inputs_to(train.x, dev, dt), train.y.to(dev, dt if train.y.is_floating_point() else None)
    classes = check_fits(net, as_batches((x, y), batch_size=batch_size), loss=loss_name)
    if test is not None:
        check_labels(test.y, classes)
    data_sha = _data_sha256(train)
    layer = layer or default_layer(net)
    fam_options = {
        "loss": loss_name,
        "variant": fam_variant,
        "method": fam_method,
        "probes": fam_probes,
        "gradient": fam_gradient,
    }
    reg = FAMRegularizer(net, layer, **fam_options)  # type: ignore[arg-type]
    if fam_scale == "paper" and reg.split.kind != "linear":
        raise UsageError(
            f"--fam-scale paper is for an nn.Linear FAM layer ({layer!r} is "
            f"{type(reg.split.layer).__name__}: the published code's m is another one)"
        )
    out = Path(out_path) if out_path is not None else None
    state_file = Path(state_path) if state_path is not None else _default_state(out)
    if resume and state_file is None:
        raise UsageError("--resume needs a state file: pass --out (the state sits beside it)")
    clip = _resolve_clip(clip_grad_norm)
    hparams: dict[str, Any] = {
        "fam_lambda": fam_lambda if fam_lambda == "auto" else float(fam_lambda),
        "fam_scale": fam_scale,
        "layer": layer,
        "epochs": epochs,
        "optimizer": optimizer,
        "sam_rho": float(sam_rho),
        "lr": float(lr),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "batch_size": batch_size,
        "schedule": schedule,
        "fam_variant": fam_variant,
        "fam_method": fam_method,
        "fam_probes": fam_probes,
        "fam_gradient": fam_gradient,
        "clip_grad_norm": clip,
        "loss": loss_name,
        "seed": seed,
        "dtype": str(dt).removeprefix("torch."),
        "data": data_spec,
        "max_samples": max_samples,
        "n_train": len(train),
    }
    test_xy = None
    if test is not None:
        test_xy = (
            inputs_to(test.x, dev, dt),
            test.y.to(dev, dt if test.y.is_floating_point() else None),
        )
    steps_per_epoch = len(batch_slices(len(train), batch_size))
    opt = make_optimizer(
        net,
        optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        sam_rho=sam_rho,
    )
    sched = (  # on SAM's base optimizer, whose step() is the one that runs
        torch.optim.lr_scheduler.CosineAnnealingLR(
            getattr(opt, "base_optimizer", opt), T_max=epochs * steps_per_epoch
        )
        if schedule == "cosine"
        else None
    )
    master = torch.Generator().manual_seed(seed)
    shuffle_seed, probe_seed, torch_seed = torch.randint(0, 2**62, (3,), generator=master).tolist()
    shuffle = torch.Generator().manual_seed(shuffle_seed)
    reg.generator.manual_seed(probe_seed)
    measure_method = "exact" if fam_method == "exact" else "auto"
    kappa_key = "relative_flatness" if fam_variant == "neuronwise" else "layerwise_flatness"

    def measures(model: nn.Module = net) -> dict[str, Estimate]:
        found = layer_measures(
            model, layer, (x, y), loss=loss_name, method=measure_method, seed=seed, batch_size=256
        )
        if test_xy is not None:
            found.update(heldout_metrics(model, test_xy, loss_name))
        return found

    start_net = copy.deepcopy(net)  # the starting weights, for the temperature baseline
    start_snapshot = snapshot(reg, x, y)  # for the guard; eval mode, no randomness used
    cuda = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(torch_seed)
        if dev.type == "cuda":
            torch.cuda.manual_seed(torch_seed)
        history: list[EpochRecord] = []
        start = 0
        state = _load_state(state_file, dev) if resume and state_file is not None else None
        if state is not None:
            _check_state(state, state_file, schedule)  # type: ignore[arg-type]
            _check_resumable(state, hparams, ck.sha256, epochs)
            if state["data_sha256"] != data_sha:
                raise FlatcliError(
                    "cannot resume: the training data differs from the data the state file "
                    "was trained on (a changed file?); start again without --resume"
                )
            start = state["epoch"]
            try:
                net.load_state_dict(state["model"])
                load_optimizer_state(opt, state["optimizer"])
                if sched is not None:
                    sched.load_state_dict(state["scheduler"])
                shuffle.set_state(state["rng"]["shuffle"])
                reg.generator.set_state(state["rng"]["probes"])
                torch.set_rng_state(state["rng"]["torch"])
                if dev.type == "cuda" and state["rng"].get("cuda") is not None:
                    torch.cuda.set_rng_state(state["rng"]["cuda"], dev)
                history = [EpochRecord(**row) for row in state["history"]]
                before = {k: Estimate(**v) for k, v in state["before"].items()}
                hparams["fam_lambda_used"] = state["hparams"]["fam_lambda_used"]
                hparams["fam_step_ratio"] = state["hparams"]["fam_step_ratio"]
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise FlatcliError(f"the state file {state_file} is damaged: {first}") from None
            note(f"resuming after epoch {start} of {epochs} from {state_file}")
        else:
            if resume:
                note(f"no state file at {state_file}; starting from epoch 0")
            note("measuring the starting model")
            before = measures()
            step0 = FAMRegularizer(net, layer, seed=seed, **fam_options)  # type: ignore[arg-type]
            hparams.update(
                _resolve_lambda(
                    fam_lambda,
                    fam_scale,
                    before=before,
                    kappa_key=kappa_key,
                    reg=step0,
                    x=x,
                    y=y,
                    lr=lr,
                    beta=None if optimizer == "adam" else momentum,
                )
            )
        lam = float(hparams["fam_lambda_used"])
        warnings = _announce_lambda(hparams, note) + _penalty_share(lam, before, kappa_key)
        guard = DivergenceGuard(
            start=start_snapshot,
            chance=chance_level(y, loss_name, classes),
            kappa0=before[kappa_key].value,
            weight0=before["weight_norm"].value,
            fam=lam > 0,
            kappa_exact=not reg.describe().startswith("hutchinson"),
        )
        good_weights = copy.deepcopy(net.state_dict())
        for epoch in range(start + 1, epochs + 1):
            record, reason = _epoch(
                epoch,
                net,
                reg,
                opt,
                sched,
                (x, y),
                test_xy,
                guard,
                fam_lambda=lam,
                batch_size=batch_size,
                shuffle=shuffle,
                sam=optimizer == "sam",
                clip_grad_norm=clip,
            )
            history.append(record)
            if reason is not None:
                note(epoch_line(record, epochs))
                net.load_state_dict(good_weights)
                _report_divergence(
                    net,
                    ck,
                    hparams,
                    history,
                    before,
                    reason=reason,
                    epoch=epoch,
                    out=out,
                    log_path=log_path,
                    plot_path=plot_path,
                    kappa_key=kappa_key,
                    data_spec=data_spec,
                    device=dev,
                    dtype=dt,
                )
            good_weights = copy.deepcopy(net.state_dict())
            if state_file is not None:
                _save_state(
                    state_file,
                    epoch=epoch,
                    data_sha256=data_sha,
                    hparams=hparams,
                    parent_sha256=ck.sha256,
                    model=net,
                    opt=opt,
                    sched=sched,
                    shuffle=shuffle,
                    probes=reg.generator,
                    device=dev,
                    history=history,
                    before=before,
                )
            if log_path is not None:
                write_log(log_path, history)
            note(epoch_line(record, epochs))

    net.eval()
    note("measuring the fine-tuned model")
    after = measures()
    matched, c, why = _temperature_baseline(start_net, x, y, after, loss_name, measures)
    out_sha = None
    if out is not None:
        out_sha = _save_output(net, out, ck, hparams, data_spec, loss_name)
    if log_path is not None:
        write_log(log_path, history)
        measured = {"before": _estimates(before), "after": _estimates(after)}
        if matched is not None:
            measured["temperature_matched"] = {"c": c, **_estimates(matched)}
        write_log_manifest(log_path, hparams, ck.sha256, out_sha, dev, dt, seed, measured)
    plot = Path(plot_path) if plot_path is not None else None
    if plot is not None:
        plot_history(history, plot, title=_title(layer, lam), start=before, kappa_key=kappa_key)
    return FinetuneResult(
        model=net,
        history=tuple(history),
        before=before,
        after=after,
        layer=layer,
        fam_method=reg.describe(),
        hparams=hparams,
        resumed_from=start,
        out_path=out,
        out_sha256=out_sha,
        log_path=Path(log_path) if log_path is not None else None,
        plot_path=plot,
        state_path=state_file,
        parent_sha256=ck.sha256,
        temperature_matched=matched,
        temperature_c=c,
        temperature_note=why,
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------- bookkeeping


def _epoch(
    epoch: int,
    net: nn.Module,
    reg: FAMRegularizer,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    guard: DivergenceGuard,
    **step: Any,
) -> tuple[EpochRecord, str | None]:
    """One epoch (:func:`~flatcli.training.train_epoch` with ``step``), its test metrics
    and its record, and the guard's verdict (None: fine)."""
    t0 = time.perf_counter()
    stats = train_epoch(net, reg, opt, sched, *train, **step)
    weight_sq = float(reg.split.weight.detach().double().pow(2).sum())
    now = snapshot(reg, *train, kappa=True)  # eval mode, the whole set: as at epoch 0
    reason = guard.check(now, stats, weight_sq)
    finite = reason is None or "NaN" not in reason
    tm = heldout_metrics(net, test, reg.loss) if test is not None and finite else {}
    record = EpochRecord(
        epoch=epoch,
        lr=float(opt.param_groups[0]["lr"]),
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


def _announce_lambda(hparams: Mapping[str, Any], note: Callable[[str], None]) -> list[str]:
    """Say which λ the run uses and its step ratio R; the warnings, if R is large."""
    lam, ratio = hparams["fam_lambda_used"], hparams["fam_step_ratio"]
    if hparams["fam_lambda"] != lam:
        how = "auto" if hparams["fam_lambda"] == "auto" else hparams["fam_scale"]
        note(f"λ = {lam:.4g} ({how})")
    if ratio is None:
        return []
    note(f"relative step at step 0: R = {ratio:.3g}")
    if ratio <= WARN_STEP_RATIO:
        return []
    return [
        f"the relative step at step 0 is R = {ratio:.3g}, above {WARN_STEP_RATIO:g}: FAM "
        "may be unstable; lower --lr or --fam-lambda, or use --fam-lambda auto "
        f"(R = {SAFE_STEP_RATIO:g})"
    ]


def _title(layer: str, lam: float) -> str:
    return f"FAM on {layer}, λ = {lam:.4g}"


def _resolve_clip(clip_grad_norm: float | None) -> float | None:
    """The clipping threshold of the run, the same for λ = 0 and λ > 0: None turns it off."""
    if clip_grad_norm is None:
        return DEFAULT_CLIP
    return float(clip_grad_norm) if clip_grad_norm > 0 else None


def _penalty_share(lam: float, before: Mapping[str, Estimate], kappa_key: str) -> list[str]:
    """A warning when the penalty λκ₀ is negligible against the starting train loss E₀."""
    kappa0, loss0 = before[kappa_key].value, before["train_loss"].value
    penalty = lam * kappa0
    if not (lam > 0 and loss0 > 0 and math.isfinite(penalty)):
        return []
    share = penalty / loss0
    if share >= NEGLIGIBLE_PENALTY:
        return []
    return [
        f"the penalty is negligible against the loss: λκ₀ = {penalty:.2g} (λ = {lam:.2g}, "
        f"κ₀ = {kappa0:.3g}) is {share:.2g} of the train loss E₀ = {loss0:.3g}, below "
        f"{NEGLIGIBLE_PENALTY:g}; this run is close to plain training. For a penalty that "
        "is a fraction f of the loss, pass --fam-scale relative --fam-lambda f"
    ]


def _resolve_lambda(
    fam_lambda: float | str,
    fam_scale: str,
    *,
    before: Mapping[str, Estimate],
    kappa_key: str,
    reg: FAMRegularizer,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    beta: float | None,
) -> dict[str, Any]:
    """λ for the run, and the relative step R at step 0 (None for Adam or λ = 0)."""
    if fam_lambda == "auto":
        lam = None
    elif fam_scale == "paper":  # the published regularizer is κ/m: λ_paper·κ/m = (λ_paper/m)·κ
        lam = float(fam_lambda) / reg.split.weight_matrix().shape[1]
    elif fam_scale == "relative":
        kappa0, loss0 = before[kappa_key].value, before["train_loss"].value
        if not kappa0 > 0:
            raise FlatcliError(
                f"κ of the starting model is {kappa0:g}: --fam-scale relative needs κ > 0"
            )
        lam = float(fam_lambda) * loss0 / kappa0
    else:
        lam = float(fam_lambda)
    if beta is None or lam == 0:
        return {"fam_lambda_used": lam, "fam_step_ratio": None}
    kappa0, grad_sq = kappa_gradient(reg, x, y)
    if not (kappa0 > 0 and grad_sq > 0):
        if lam is None:
            raise FlatcliError(
                f"--fam-lambda auto needs κ > 0 and a non-zero gradient of κ at the start "
                f"(κ = {kappa0:g}, ‖∇κ‖² = {grad_sq:g})"
            )
        return {"fam_lambda_used": lam, "fam_step_ratio": None}
    per_lambda = lr / (1 - beta) * grad_sq / kappa0
    if lam is None:
        lam = SAFE_STEP_RATIO / per_lambda
    return {"fam_lambda_used": lam, "fam_step_ratio": lam * per_lambda}


def _temperature_baseline(
    start_net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    after: Mapping[str, Estimate],
    loss: str,
    measures: Callable[[nn.Module], dict[str, Estimate]],
) -> tuple[dict[str, Estimate] | None, float | None, str | None]:
    """The starting model at the fine-tuned model's train loss, by a temperature alone."""
    found = temperature_scale(start_net, x, y, after["train_loss"].value, loss=loss)
    if isinstance(found, str):
        return None, None, found
    scaled, c = found
    scaled.eval()
    return measures(scaled), c, None


def _report_divergence(
    net: nn.Module,
    ck: Checkpoint,
    hparams: Mapping[str, Any],
    history: list[EpochRecord],
    before: Mapping[str, Estimate],
    *,
    reason: str,
    epoch: int,
    out: Path | None,
    log_path: str | Path | None,
    plot_path: str | Path | None,
    kappa_key: str,
    data_spec: str | None,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Write what a diverged run leaves (the last good weights, the log, the plot), then
    raise :class:`Diverged`. ``net`` already holds the last good weights."""
    good = epoch - 1
    lam = float(hparams["fam_lambda_used"])
    written = ""
    out_sha = None
    if out is not None:
        meta = {**hparams, "diverged_in_epoch": epoch, "weights_of_epoch": good}
        out_sha = _save_output(net, out, ck, meta, data_spec, hparams["loss"])
        which = "the starting model" if good == 0 else f"epoch {good}, the last good one"
        written = f"; wrote the weights of {which} to {out}"
    diverged = {"diverged": {"epoch": epoch, "reason": reason, "weights_of_epoch": good}}
    if log_path is not None:
        write_log(log_path, history)
        seed = int(hparams["seed"])
        write_log_manifest(log_path, hparams, ck.sha256, out_sha, device, dtype, seed, diverged)
    if plot_path is not None:
        title = _title(str(hparams["layer"]), lam) + f": diverged in epoch {epoch}"
        plot_history(history, plot_path, title=title, start=before, kappa_key=kappa_key)
    lower = f"--lr (now {hparams['lr']:g})"
    if lam > 0:
        lower += f" or --fam-lambda (λ now {lam:.3g}; --fam-lambda auto picks a safe one)"
    raise Diverged(
        f"the run diverged in epoch {epoch}: {reason}{written}. Lower {lower}",
        epoch=epoch,
        good_epoch=good,
        reason=reason,
    )


# --------------------------------------------------------------------------- inputs


def _check_options(
    *,
    fam_lambda: float | str,
    epochs: int,
    optimizer: str,
    sam_rho: float,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    schedule: str,
    fam_variant: str,
    fam_method: str,
    fam_probes: int,
    fam_gradient: str = "full",
    fam_scale: str = "absolute",
    clip_grad_norm: float | None = None,
) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    if fam_lambda == "auto":
        need(
            optimizer != "adam",
            "--fam-lambda auto needs --optimizer sgd or sam (R assumes an SGD step); "
            "with adam, pass a number",
        )
        need(
            fam_scale == "absolute",
            f"--fam-lambda auto picks λ itself: drop --fam-scale {fam_scale}",
        )
    else:
        need(
            isinstance(fam_lambda, (int, float)) and math.isfinite(fam_lambda) and fam_lambda >= 0,
            f"--fam-lambda must be a finite number ≥ 0 or auto, got {fam_lambda}",
        )
    need(fam_scale in SCALES, f"--fam-scale must be one of {', '.join(SCALES)}")
    need(
        fam_scale != "paper" or fam_variant == "neuronwise",
        "--fam-scale paper converts λ of the published neuron-wise regularizer (κ/m); the "
        "published layer-wise one (‖W‖·Tr H, norm unsquared) is no rescaling of ‖W‖²·Tr H",
    )
    need(
        fam_gradient in FAM_GRADIENTS,
        f"--fam-gradient must be one of {', '.join(FAM_GRADIENTS)}",
    )
    need(
        clip_grad_norm is None or (math.isfinite(clip_grad_norm) and clip_grad_norm >= 0),
        f"--clip-grad-norm must be a number ≥ 0 (0: off), got {clip_grad_norm}",
    )
    need(epochs >= 1, f"--epochs must be at least 1, got {epochs}")
    need(optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    need(math.isfinite(sam_rho) and sam_rho > 0, f"--sam-rho must be > 0, got {sam_rho}")
    need(math.isfinite(lr) and lr > 0, f"--lr must be > 0, got {lr}")
    need(0 <= momentum < 1, f"--momentum must be in [0, 1), got {momentum}")
    need(
        math.isfinite(weight_decay) and weight_decay >= 0,
        f"--weight-decay must be ≥ 0, got {weight_decay}",
    )
    need(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")
    need(schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}")
    need(fam_variant in FAM_VARIANTS, f"--fam-variant must be one of {', '.join(FAM_VARIANTS)}")
    need(fam_method in FAM_METHODS, f"--fam-method must be one of {', '.join(FAM_METHODS)}")
    need(fam_probes >= 1, f"--fam-probes must be at least 1, got {fam_probes}")


def _as_checkpoint(model: str | Path | Checkpoint | nn.Module) -> Checkpoint:
    if isinstance(model, Checkpoint):
        return model
    if isinstance(model, nn.Module):
        return Checkpoint(model=model, path=Path("<memory>"), sha256="", format="module")
    return load_checkpoint(model)


def _resolve_data(
    ck: Checkpoint,
    net: nn.Module,
    data: DataLike | None,
    test_data: DataLike | None,
    *,
    target: str | None,
    max_samples: int | None,
) -> tuple[str | None, Dataset, Dataset | None]:
    """The training and test sets, with inputs shaped for the model."""
    spec: str | None = None
    base = ck.path.parent if ck.sha256 else None
    named = None  # the metadata's own name is what the output records
    if data is None:
        named = data = ck.metadata.get("data")
        if data is not None and ck.sha256:
            data = metadata_data(data, ck.path)
        if data is None:
            raise UsageError(
                "the model does not name its training data: pass --data FILE (.npz, .pt, "
                ".csv) or a bundled dataset name (digits)"
            )
    test: Dataset | None = None
    if isinstance(data, str):
        spec = named or data
        train = load_data(data, target=target, max_samples=max_samples, base_dir=base)
        if test_data is None:
            try:
                test = load_data(
                    data, split="test", target=target, max_samples=max_samples, base_dir=base
                )
            except MissingSplit:
                pass
    else:
        train = _as_dataset(data, "train")
    if test_data is not None:
        test = (
            load_data(test_data, split="test", target=target, base_dir=base)
            if isinstance(test_data, str)
            else _as_dataset(test_data, "test")
        )
    shape = ck.input_shape
    train = Dataset(fit_inputs(train.x, net, shape), train.y, train.source, train.split)
    if test is not None:
        test = Dataset(fit_inputs(test.x, net, shape), test.y, test.source, test.split)
    return spec, train, test


def _as_dataset(data: Any, split: str) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Mapping):
        x, y = split_labels(data)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = as_inputs(data[0]), torch.as_tensor(data[1])
    else:
        x = None
    if x is not None:
        check_same_length(x, y)
        return Dataset(x=x, y=y, source="<memory>", split=split)
    raise UsageError(f"cannot use {type(data).__name__} as data; pass a name, a file or (x, y)")


# --------------------------------------------------------------------------- files


def _check_outputs(
    out_path: str | Path | None,
    log_path: str | Path | None,
    plot_path: str | Path | None,
    state_path: str | Path | None,
    *,
    folder: bool,
) -> None:
    """Check every output can be written before any training (not after it). ``folder``:
    the model is saved as a Hugging Face folder, not a file."""
    if out_path is not None and folder:
        out = Path(out_path)
        if out.suffix in (".safetensors", ".pt", ".pth"):
            raise UsageError(
                f"a Hugging Face model is saved as a folder: pass --out DIR, not {out.name}"
            )
        if out.exists() and not out.is_dir():
            raise FlatcliError(f"cannot write --out {out}: it exists and is not a folder")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise FlatcliError(f"cannot write --out {out}: directory {parent} does not exist")
    elif out_path is not None:
        check_output(out_path, suffixes=(".safetensors", ".pt", ".pth"), option="--out")
    if log_path is not None:
        check_output(log_path, option="--log")
    if plot_path is not None:
        check_output(plot_path, suffixes=(".png",), option="--plot")
    state = state_path if state_path is not None else _default_state(
        Path(out_path) if out_path is not None else None
    )
    if state is not None:
        check_output(state, option="the state file")


def _check_not_inputs(
    ck: Checkpoint,
    data: list[Any],
    outputs: tuple[str | Path | None, ...],
    *,
    overwrite_input: bool,
) -> None:
    """Refuse an output (``out, log, plot, state``) that is an input (the checkpoint, unless
    ``overwrite_input`` and it is ``--out``; a data file) or another output
    (:func:`flatcli.io.check_distinct`)."""
    from .data import BUNDLED

    out_path, log_path, plot_path, state_path = outputs
    if data[0] is None and ck.sha256 and ck.metadata.get("data") is not None:
        with contextlib.suppress(FlatcliError):  # loading the data reports why
            data = [metadata_data(ck.metadata["data"], ck.path), *data[1:]]
    files = [("a data file", Path(d)) for d in data if isinstance(d, str) and d not in BUNDLED]
    checkpoint = [("the input checkpoint", ck.path)] if ck.sha256 else []
    if state_path is None and out_path is not None:
        state_path = _default_state(Path(out_path))
    named = [("--out", out_path), ("--log", log_path), ("--plot", plot_path)]
    named.append(("the state file", state_path))
    if not overwrite_input:
        try:
            check_distinct(named[:1], checkpoint)
        except UsageError:
            raise UsageError(
                f"--out {named[0][1]} is the input checkpoint: pass --overwrite-input to "
                "replace it, or name another file"
            ) from None
    check_distinct(named, files)
    check_distinct(named[1:], checkpoint)  # only --out may replace the checkpoint


def _data_sha256(ds: Dataset) -> str:
    """sha256 of the training tensors (dtype, shape and values): what a resume must match."""
    h = hashlib.sha256()
    xs = [ds.x[k] for k in sorted(ds.x)] if isinstance(ds.x, Mapping) else [ds.x]
    for t in (*xs, ds.y):
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _default_state(out: Path | None) -> Path | None:
    return None if out is None else sidecar(out, ".state.pt")  # none beside /dev/null


def _estimates(found: Mapping[str, Estimate]) -> dict[str, dict[str, Any]]:
    """Estimates as plain JSON-able dicts (the state file and the manifest)."""
    return {
        k: {"value": e.value, "stderr": e.stderr, "method": e.method, "details": dict(e.details)}
        for k, e in found.items()
    }


def _save_state(
    path: Path,
    *,
    epoch: int,
    data_sha256: str,
    hparams: Mapping[str, Any],
    parent_sha256: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    shuffle: torch.Generator,
    probes: torch.Generator,
    device: torch.device,
    history: list[EpochRecord],
    before: Mapping[str, Estimate],
) -> None:
    state = {
        "format": STATE_FORMAT,
        "epoch": epoch,
        "data_sha256": data_sha256,
        "hparams": dict(hparams),
        "parent_sha256": parent_sha256,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "rng": {
            "shuffle": shuffle.get_state(),
            "probes": probes.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        },
        "history": [r.to_row() for r in history],
        "before": _estimates(before),
    }
    atomic_write(path, lambda p: torch.save(state, p))


def _load_state(path: Path, device: torch.device) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    check_archive_size(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FlatcliError(f"cannot read the state file {path}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FlatcliError(f"{path} is not a flatcli finetune state file")
    check_tensors(state, f"the state file {path}")
    if isinstance(state.get("rng"), dict):
        state["rng"] = {
            k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state["rng"].items()
        }
    return state


def _check_state(state: Mapping[str, Any], path: Path, schedule: str) -> None:
    """Check a state file's schema, types and ranges before anything of it is used.

    Raises:
        FlatcliError: A missing key, a wrong type, or a value out of range.
    """

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise FlatcliError(f"the state file {path} is damaged: {what}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any, optional: bool = False) -> bool:
        return (v is None and optional) or (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        )

    keys = ("epoch", "data_sha256", "hparams", "parent_sha256", "model", "optimizer")
    missing = [k for k in (*keys, "scheduler", "rng", "history", "before") if k not in state]
    need(not missing, f"missing {', '.join(missing)}")
    epoch = state["epoch"]
    need(is_int(epoch) and epoch >= 1, f"epoch must be a positive integer, got {epoch!r}")
    need(isinstance(state["data_sha256"], str), "data_sha256 is not a string")
    need(isinstance(state["parent_sha256"], str), "parent_sha256 is not a string")
    need(isinstance(state["hparams"], dict), "hparams is not a dict")
    model = state["model"]
    need(
        isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values()),
        "model is not a state dict",
    )
    need(_all_finite(model.values()), "model weights contain NaN or Inf")
    opt = state["optimizer"]
    need(
        isinstance(opt, dict)
        and isinstance(opt.get("state"), dict)
        and isinstance(opt.get("param_groups"), list)
        and all(isinstance(g, dict) for g in opt["param_groups"]),
        "optimizer is not an optimizer state",
    )
    moments = [v for per in opt["state"].values() if isinstance(per, dict) for v in per.values()]
    need(_all_finite(moments), "optimizer state contains NaN or Inf")
    need(
        isinstance(state["scheduler"], dict) if schedule == "cosine" else True,
        "scheduler is not a scheduler state",
    )
    rng = state["rng"]
    need(isinstance(rng, dict), "rng is not a dict")
    for k in ("shuffle", "probes", "torch"):
        t = rng.get(k)
        need(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1,
            f"rng {k} is not a generator state",
        )
    history = state["history"]
    need(
        isinstance(history, list) and len(history) == epoch,
        f"history must list {epoch} epochs",
    )
    for i, row in enumerate(history, start=1):
        need(isinstance(row, dict) and set(row) == set(LOG_COLUMNS), f"history row {i} malformed")
        need(is_int(row["epoch"]) and row["epoch"] == i, f"history row {i}: epoch {row['epoch']!r}")
        for k in ("lr", "train_loss", "kappa", "seconds"):
            need(is_num(row[k]), f"history row {i}: {k} is not a finite number")
        for k in set(LOG_COLUMNS) - {"epoch", "lr", "train_loss", "kappa", "seconds"}:
            need(is_num(row[k], optional=True), f"history row {i}: {k} is not a number")
    before = state["before"]
    need(isinstance(before, dict), "before is not a dict")
    for k, v in before.items():
        need(
            isinstance(v, dict)
            and set(v) == {"value", "stderr", "method", "details"}
            and is_num(v["value"], optional=True)
            and is_num(v["stderr"], optional=True)
            and isinstance(v["method"], str)
            and isinstance(v["details"], dict),
            f"before {k!r} is not a measure result",
        )


def _all_finite(values: Any) -> bool:
    """No floating-point tensor among ``values`` holds NaN or Inf."""
    return all(
        bool(torch.isfinite(v).all())
        for v in values
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


def _check_resumable(
    state: Mapping[str, Any], hparams: Mapping[str, Any], parent_sha256: str, epochs: int
) -> None:
    if state.get("parent_sha256") != parent_sha256:
        raise FlatcliError("the state file belongs to a run from another checkpoint")
    saved = state["hparams"]
    ignore = {"epochs"} if hparams["schedule"] == "constant" else set()
    differ = [k for k in hparams if k not in ignore and saved.get(k) != hparams[k]]
    if differ:
        listed = ", ".join(f"{k} {saved.get(k)!r} → {hparams[k]!r}" for k in differ)
        raise UsageError(
            f"cannot resume: the state file was written with other settings ({listed})"
        )
    if state["epoch"] > epochs:
        raise UsageError(
            f"cannot resume: the state file has {state['epoch']} completed epochs, "
            f"more than --epochs {epochs}"
        )


def _save_output(
    net: nn.Module,
    out: Path,
    ck: Checkpoint,
    hparams: Mapping[str, Any],
    data_spec: str | None,
    loss: str,
) -> str | None:
    """Write the fine-tuned model; returns the sha256 a later load reports for it (None
    for a stream such as ``/dev/null``)."""
    meta = ck.metadata
    model = net if next(net.parameters()).device.type == "cpu" else copy.deepcopy(net).cpu()
    from .hf import is_pretrained_model

    if is_pretrained_model(model):
        from .hf import folder_sha256, save_pretrained

        if out.suffix in (".safetensors", ".pt", ".pth"):
            raise UsageError(
                f"a Hugging Face model is saved as a folder: pass --out DIR, not {out.name}"
            )
        flat_meta = {
            "data": data_spec or meta.get("data"),
            "loss": loss,
            "hparams": json.dumps({**hparams, "finetuned_from": ck.path.name}, sort_keys=True),
            "parent_sha256": ck.sha256 or None,
        }
        save_pretrained(model, out, {k: v for k, v in flat_meta.items() if v is not None})
        return folder_sha256(out)
    arch = meta.get("arch") or f"{type(ck.model).__module__}:{type(ck.model).__qualname__}"
    kwargs_text = meta.get("arch_kwargs")
    arch_kwargs = parse_json(kwargs_text, "flatcli.arch_kwargs") if kwargs_text else {}
    save_checkpoint(
        model,
        out,
        arch=arch,
        arch_kwargs=arch_kwargs,
        data=data_spec or meta.get("data"),
        loss=loss,
        input_shape=ck.input_shape,
        hparams={**hparams, "finetuned_from": ck.path.name},
        parent_sha256=ck.sha256 or None,
    )
    return None if is_stream(out) else sha256_file(out)  # a FIFO cannot be read back
