r"""Fine-tune a model with FAM: :math:`E_{\text{batch}} + \lambda\,\kappa(W^l)`, resumably.

:func:`finetune` is the library side of ``flatcli finetune``. Each step minimizes the
mini-batch loss plus λ times the relative flatness κ of one layer on the same mini-batch.
κ comes from :class:`~flatcli.fam.FAMRegularizer`, which gives the exact gradient of
FAM's Lemma 1. The step runs one forward pass, and the penalty reuses it.

What a run writes, each file atomically:

* ``log_path``: a CSV of the epochs so far, rewritten after every epoch.
* ``state_path``: a ``torch.save`` file with the model, optimizer, scheduler, every RNG
  state and the history, rewritten after every completed epoch. RNG states are stored as
  tensors, so it loads with ``weights_only=True``. ``resume=True`` continues from it.
  On the CPU, the resumed run ends bit-identical to an uninterrupted one.
* ``out_path``: a flatcli safetensors checkpoint. Its metadata gives the architecture, the
  data, the hyperparameters including λ, and the parent checkpoint's sha256.
* ``plot_path``: a PNG of the curves, drawn at the end.

The result holds a before/after comparison of the layer's measures
(:func:`~flatcli.measures.relative_flatness.layer_measures`) and of the test loss and
accuracy.

References:
    Adilova et al. *FAM: Relative Flatness Aware Minimization.* 2023.
    https://arxiv.org/abs/2307.02337

    Foret, Kleiner, Mobahi, Neyshabur. *Sharpness-Aware Minimization for Efficiently
    Improving Generalization.* ICLR 2021. https://arxiv.org/abs/2010.01412 (the ``sam``
    optimizer: ``pytorch_optimizer.SAM`` over SGD)
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .checkpoints import Checkpoint, check_finite, load_checkpoint, save_checkpoint
from .data import (
    Dataset,
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
    take,
)
from .errors import FlatcliError, UsageError
from .fam import METHODS as FAM_METHODS
from .fam import VARIANTS as FAM_VARIANTS
from .fam import FAMRegularizer
from .features import ModelInput, batch_len, call_model, default_layer
from .io import atomic_write, atomic_write_text, check_output, sha256_file
from .losses import check_loss, per_sample_loss
from .measures.estimate import Estimate
from .measures.relative_flatness import layer_measures
from .runtime import resolve_device, resolve_dtype

OptimizerName = Literal["sgd", "adam", "sam"]
Schedule = Literal["cosine", "constant"]
OPTIMIZERS = ("sgd", "adam", "sam")
SCHEDULES = ("cosine", "constant")
STATE_FORMAT = "flatcli.finetune-state/1"
LOG_COLUMNS = ("epoch", "lr", "train_loss", "kappa", "test_loss", "test_accuracy", "seconds")
_EVAL_BATCH = 1024


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
        seconds: Wall time of the epoch, including the test evaluation.
    """

    epoch: int
    lr: float
    train_loss: float
    kappa: float
    test_loss: float | None
    test_accuracy: float | None
    seconds: float

    def to_row(self) -> dict[str, Any]:
        """A plain dict in :data:`LOG_COLUMNS` order."""
        return asdict(self)


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
        resumed_from: Completed epochs found in the state file (0 for a fresh run).
        out_path: The written checkpoint, or None.
        out_sha256: Its sha256, or None.
        log_path: The CSV log, or None.
        plot_path: The PNG of the curves, or None.
        state_path: The resumable state file, or None.
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


DataLike = str | Dataset | tuple[torch.Tensor, torch.Tensor]


def finetune(
    model: str | Path | Checkpoint | nn.Module,
    data: DataLike | None = None,
    *,
    fam_lambda: float,
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
        progress: Called with one line of text per stage and per epoch.

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        UsageError: A bad option, or an unknown layer.
        FlatcliError: Unreadable data or checkpoint, a state file from another run, or a
            loss that became NaN or Inf.
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
    )
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    ck = _as_checkpoint(model)
    from .hf import is_pretrained_model

    _check_outputs(
        out_path, log_path, plot_path, state_path, folder=is_pretrained_model(ck.model)
    )
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
    reg = FAMRegularizer(
        net,
        layer,
        loss=loss_name,
        variant=fam_variant,  # type: ignore[arg-type]
        method=fam_method,  # type: ignore[arg-type]
        probes=fam_probes,
    )
    out = Path(out_path) if out_path is not None else None
    state_file = Path(state_path) if state_path is not None else _default_state(out)
    if resume and state_file is None:
        raise UsageError("--resume needs a state file: pass --out (the state sits beside it)")
    hparams: dict[str, Any] = {
        "fam_lambda": float(fam_lambda),
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
    steps_per_epoch = len(_batch_slices(len(train), batch_size))
    opt = _make_optimizer(
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

    def measures() -> dict[str, Estimate]:
        found = layer_measures(
            net, layer, (x, y), loss=loss_name, method=measure_method, seed=seed, batch_size=256
        )
        if test_xy is not None:
            found.update(_test_metrics(net, test_xy, loss_name))
        return found

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
                _load_optimizer_state(opt, state["optimizer"])
                if sched is not None:
                    sched.load_state_dict(state["scheduler"])
                shuffle.set_state(state["rng"]["shuffle"])
                reg.generator.set_state(state["rng"]["probes"])
                torch.set_rng_state(state["rng"]["torch"])
                if dev.type == "cuda" and state["rng"].get("cuda") is not None:
                    torch.cuda.set_rng_state(state["rng"]["cuda"], dev)
                history = [EpochRecord(**row) for row in state["history"]]
                before = {k: Estimate(**v) for k, v in state["before"].items()}
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise FlatcliError(f"the state file {state_file} is damaged: {first}") from None
            note(f"resuming after epoch {start} of {epochs} from {state_file}")
        else:
            if resume:
                note(f"no state file at {state_file}; starting from epoch 0")
            note("measuring the starting model")
            before = measures()

        for epoch in range(start + 1, epochs + 1):
            t0 = time.perf_counter()
            train_loss, kappa = _train_epoch(
                net,
                reg,
                opt,
                sched,
                x,
                y,
                fam_lambda=fam_lambda,
                batch_size=batch_size,
                shuffle=shuffle,
                sam=optimizer == "sam",
            )
            if not (math.isfinite(train_loss) and math.isfinite(kappa)):
                raise FlatcliError(
                    f"the loss became NaN or Inf in epoch {epoch}; lower --lr or --fam-lambda"
                )
            test_loss = test_acc = None
            if test_xy is not None:
                tm = _test_metrics(net, test_xy, loss_name)
                test_loss = tm["test_loss"].value
                test_acc = tm["test_accuracy"].value if "test_accuracy" in tm else None
            record = EpochRecord(
                epoch=epoch,
                lr=float(opt.param_groups[0]["lr"]),
                train_loss=train_loss,
                kappa=kappa,
                test_loss=test_loss,
                test_accuracy=test_acc,
                seconds=time.perf_counter() - t0,
            )
            history.append(record)
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
            note(_epoch_line(record, epochs))

    net.eval()
    note("measuring the fine-tuned model")
    after = measures()
    out_sha = None
    if out is not None:
        out_sha = _save_output(net, out, ck, hparams, data_spec, loss_name)
    if log_path is not None:
        write_log(log_path, history)
        _write_log_manifest(log_path, hparams, ck.sha256, out_sha, dev, dt, seed)
    plot = Path(plot_path) if plot_path is not None else None
    if plot is not None:
        plot_history(history, plot, title=f"FAM on {layer}, λ = {fam_lambda:g}")
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
    )


# --------------------------------------------------------------------------- training


def _train_epoch(
    net: nn.Module,
    reg: FAMRegularizer,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    fam_lambda: float,
    batch_size: int,
    shuffle: torch.Generator,
    sam: bool,
) -> tuple[float, float]:
    """One pass over shuffled mini-batches. Returns the mean data loss and the mean κ."""
    net.train()
    n = batch_len(x)
    perm = torch.randperm(n, generator=shuffle).to(y.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=y.device)
    kappa_sum = torch.zeros((), dtype=torch.float64, device=y.device)
    for lo, hi in _batch_slices(n, batch_size):
        idx = perm[lo:hi]
        xb, yb = take(x, idx), y[idx]

        def objective(xb: ModelInput = xb, yb: torch.Tensor = yb) -> tuple[torch.Tensor, ...]:
            out, cut = reg.forward(xb)
            data_loss = per_sample_loss(out, yb, reg.loss).mean()
            with torch.set_grad_enabled(fam_lambda > 0):
                kappa = reg.penalty(cut, yb)
            total = data_loss + fam_lambda * kappa if fam_lambda > 0 else data_loss
            return total, data_loss, kappa

        opt.zero_grad(set_to_none=True)
        total, data_loss, kappa = objective()
        total.backward()
        if sam:
            opt.first_step(zero_grad=True)  # type: ignore[attr-defined]
            with _frozen_batchnorm_stats(net):
                objective()[0].backward()
            opt.second_step(zero_grad=True)  # type: ignore[attr-defined]
        else:
            opt.step()
        if sched is not None:
            sched.step()
        loss_sum += data_loss.detach().double() * (hi - lo)
        kappa_sum += kappa.detach().double() * (hi - lo)
    return float(loss_sum) / n, float(kappa_sum) / n


def _batch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of the mini-batches; a trailing single sample joins the one before."""
    slices = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    if len(slices) > 1 and slices[-1][1] - slices[-1][0] == 1:
        slices[-2:] = [(slices[-2][0], n)]
    return slices


def _make_optimizer(
    net: nn.Module,
    name: str,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    sam_rho: float,
) -> torch.optim.Optimizer:
    params = list(net.parameters())
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    from pytorch_optimizer import SAM

    return SAM(
        params,
        torch.optim.SGD,
        rho=sam_rho,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )


def _load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an optimizer's state. SAM's base optimizer shares its state and param groups, so
    after loading they are linked again."""
    base = getattr(opt, "base_optimizer", None)
    if base is None:
        opt.load_state_dict(state)
        return
    base.load_state_dict(state)
    opt.param_groups = base.param_groups
    opt.state = base.state


@contextmanager
def _frozen_batchnorm_stats(net: nn.Module) -> Iterator[None]:
    """SAM's second pass should not update BatchNorm running statistics a second time."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(norms, saved, strict=True):
            m.momentum = mom


@torch.no_grad()
def _test_metrics(
    net: nn.Module, xy: tuple[ModelInput, torch.Tensor], loss: str
) -> dict[str, Estimate]:
    """Mean test loss and accuracy, in eval mode. The caller's mode is restored."""
    was_training = net.training
    net.eval()
    x, y = xy
    n = batch_len(x)
    loss_sum, correct = 0.0, 0
    for lo in range(0, n, _EVAL_BATCH):
        out = call_model(net, take(x, slice(lo, lo + _EVAL_BATCH)))
        yb = y[lo : lo + _EVAL_BATCH]
        loss_sum += float(per_sample_loss(out, yb, loss).double().sum())  # type: ignore[arg-type]
        if not yb.is_floating_point():
            correct += int((out.argmax(-1) == yb).sum())
    net.train(was_training)
    result = {"test_loss": Estimate(loss_sum / n, None, f"exact: mean {loss} over {n} samples")}
    if not y.is_floating_point():
        result["test_accuracy"] = Estimate(correct / n, None, f"exact: over {n} samples")
    return result


# --------------------------------------------------------------------------- inputs


def _check_options(
    *,
    fam_lambda: float,
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
) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    need(
        math.isfinite(fam_lambda) and fam_lambda >= 0,
        f"--fam-lambda must be a finite number ≥ 0, got {fam_lambda}",
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
            except FlatcliError as e:
                if "has no test split" not in str(e):
                    raise
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
    return None if out is None else out.with_name(out.stem + ".state.pt")


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
        "before": {
            k: {
                "value": e.value,
                "stderr": e.stderr,
                "method": e.method,
                "details": dict(e.details),
            }
            for k, e in before.items()
        },
    }
    atomic_write(path, lambda p: torch.save(state, p))


def _load_state(path: Path, device: torch.device) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FlatcliError(f"cannot read the state file {path}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FlatcliError(f"{path} is not a flatcli finetune state file")
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
    opt = state["optimizer"]
    need(
        isinstance(opt, dict)
        and isinstance(opt.get("state"), dict)
        and isinstance(opt.get("param_groups"), list)
        and all(isinstance(g, dict) for g in opt["param_groups"]),
        "optimizer is not an optimizer state",
    )
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
        for k in ("test_loss", "test_accuracy"):
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
) -> str:
    """Write the fine-tuned model; returns the sha256 a later load reports for it."""
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
    arch_kwargs = json.loads(meta["arch_kwargs"]) if meta.get("arch_kwargs") else {}
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
    return sha256_file(out)


def _write_log_manifest(
    log_path: str | Path,
    hparams: Mapping[str, Any],
    parent_sha256: str,
    out_sha256: str | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> Path:
    """The CSV log's provenance beside it, ``STEM.manifest.json``, written atomically."""
    from .report import write_manifest_beside
    from .runtime import manifest

    provenance = {
        "schema": "flatcli.finetune/1",
        "checkpoint": {"parent_sha256": parent_sha256, "output_sha256": out_sha256},
        "hparams": dict(hparams),
        "manifest": manifest(device=device, dtype=dtype, seed=seed),
    }
    return write_manifest_beside(log_path, provenance)


def write_log(path: str | Path, history: list[EpochRecord] | tuple[EpochRecord, ...]) -> Path:
    """Atomically write the per-epoch CSV log (columns :data:`LOG_COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in history:
        writer.writerow({k: ("" if v is None else v) for k, v in r.to_row().items()})
    return atomic_write_text(path, buf.getvalue())


def plot_history(
    history: list[EpochRecord] | tuple[EpochRecord, ...], path: str | Path, *, title: str = ""
) -> Path:
    """Atomically write a PNG of the loss, κ and test accuracy curves (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r.epoch for r in history]
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_kappa, ax_acc = fig.subplots(1, 3)
    ax_loss.plot(epochs, [r.train_loss for r in history], "o-", label="train (batches)")
    if any(r.test_loss is not None for r in history):
        ax_loss.plot(epochs, [r.test_loss for r in history], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log")
    ax_loss.legend()
    kappas = [r.kappa for r in history]
    ax_kappa.plot(epochs, kappas, "o-", color="C2")
    ax_kappa.set(xlabel="epoch", ylabel="κ (batch average)")
    if all(k > 0 for k in kappas):
        ax_kappa.set_yscale("log")
    if any(r.test_accuracy is not None for r in history):
        ax_acc.plot(epochs, [r.test_accuracy for r in history], "o-", color="C3")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy")
    for ax in (ax_loss, ax_kappa, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    if title:
        fig.suptitle(title)
    return atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))


def _epoch_line(r: EpochRecord, epochs: int) -> str:
    test = ""
    if r.test_loss is not None:
        test = f" · test loss {r.test_loss:.4g}"
    if r.test_accuracy is not None:
        test += f" · test acc {r.test_accuracy:.4f}"
    return (
        f"epoch {r.epoch}/{epochs} · loss {r.train_loss:.4g} · κ {r.kappa:.4g}{test}"
        f" · lr {r.lr:.3g} · {r.seconds:.1f} s"
    )
