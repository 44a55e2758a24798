"""The pieces of a fine-tuning run, built from its options before the first step: the
data on the device, the FAM regularizer, the optimizer and schedule, the generators, and
the hyperparameters recorded everywhere (:class:`Training`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import Checkpoint
from ..data import Dataset, as_batches, check_fits, check_labels, inputs_to
from ..fam import FAMRegularizer
from ..features import default_layer
from ..finetune_report import heldout_metrics
from ..measures.estimate import Estimate
from ..measures.relative_flatness import layer_measures
from ..training import batch_slices, make_optimizer
from .config import ConfigError, FinetuneConfig
from .state import data_sha256


@dataclass
class Training:
    """One run's working state: what the loop steps and what the outputs record.

    Attributes:
        config: The run's options.
        checkpoint: The starting checkpoint (its path and sha256 are recorded).
        net: The model being trained (a copy of the checkpoint's).
        reg: The FAM regularizer on ``layer``.
        opt: The optimizer.
        sched: The learning-rate schedule (None for ``constant``).
        shuffle: The generator of the batch order.
        torch_seed: The seed of torch's global generator during the run (dropout).
        x: Training inputs on the device.
        y: Training targets on the device.
        test: Test inputs and targets on the device, or None.
        classes: The number of classes the model outputs.
        layer: The FAM layer.
        loss: The loss name.
        data_spec: The recorded data name (None for tensors).
        data_sha256: sha256 of the training set (a resume must match it).
        hparams: Every hyperparameter, as recorded in the checkpoint, the log's manifest
            and the state file; the loop adds ``fam_lambda_used`` and ``fam_step_ratio``.
        device: Where everything runs.
        dtype: The floating dtype.
        out: The output checkpoint, or None.
        state_file: The state file, or None.
    """

    config: FinetuneConfig
    checkpoint: Checkpoint
    net: nn.Module
    reg: FAMRegularizer
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None
    shuffle: torch.Generator
    torch_seed: int
    x: Any
    y: torch.Tensor
    test: tuple[Any, torch.Tensor] | None
    classes: int
    layer: str
    loss: str
    data_spec: str | None
    data_sha256: str
    hparams: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    out: Path | None
    state_file: Path | None

    @property
    def fam_options(self) -> dict[str, Any]:
        """The regularizer's options (a fresh one for step 0 is built from them)."""
        cfg = self.config
        return {
            "loss": self.loss,
            "variant": cfg.fam_variant,
            "method": cfg.fam_method,
            "probes": cfg.fam_probes,
            "gradient": cfg.fam_gradient,
        }

    def measures(self, model: nn.Module | None = None) -> dict[str, Estimate]:
        """The layer's measures on the whole training set, and the test metrics."""
        model = self.net if model is None else model
        cfg = self.config
        found = layer_measures(
            model,
            self.layer,
            (self.x, self.y),
            loss=self.loss,
            method="exact" if cfg.fam_method == "exact" else "auto",
            seed=cfg.seed,
            batch_size=256,
        )
        if self.test is not None:
            found.update(heldout_metrics(model, self.test, self.loss))
        return found


def setup_training(
    cfg: FinetuneConfig,
    ck: Checkpoint,
    net: nn.Module,
    train: Dataset,
    test: Dataset | None,
    *,
    loss: str,
    data_spec: str | None,
    device: torch.device,
    dtype: torch.dtype,
    out: Path | None,
    state_file: Path | None,
) -> Training:
    """Check the data fits the model, and build the run's pieces.

    Raises:
        ConfigError: An unknown layer, ``fam_scale="paper"`` on a layer that is not an
            ``nn.Linear``, or ``resume`` without a state file.
    """
    x = inputs_to(train.x, device, dtype)
    y = train.y.to(device, dtype if train.y.is_floating_point() else None)
    classes = check_fits(net, as_batches((x, y), batch_size=cfg.batch_size), loss=loss)
    if test is not None:
        check_labels(test.y, classes)
    data_sha = data_sha256(train)
    layer = cfg.layer or default_layer(net)
    reg = FAMRegularizer(
        net,
        layer,
        loss=loss,
        variant=cfg.fam_variant,  # type: ignore[arg-type]
        method=cfg.fam_method,  # type: ignore[arg-type]
        probes=cfg.fam_probes,
        gradient=cfg.fam_gradient,  # type: ignore[arg-type]
    )
    if cfg.fam_scale == "paper" and reg.split.kind != "linear":
        raise ConfigError(
            f"fam_scale paper is for an nn.Linear FAM layer ({layer!r} is "
            f"{type(reg.split.layer).__name__}: the published code's m is another one)",
            "fam_scale",
        )
    if cfg.resume and state_file is None:
        raise ConfigError(
            "resume needs a state file: pass out_path (the state sits beside it)",
            "resume",
            "out_path",
        )
    test_xy = None
    if test is not None:
        test_xy = (
            inputs_to(test.x, device, dtype),
            test.y.to(device, dtype if test.y.is_floating_point() else None),
        )
    opt = make_optimizer(
        net,
        cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        sam_rho=cfg.sam_rho,
    )
    steps = cfg.epochs * len(batch_slices(len(train), cfg.batch_size))
    sched = (  # on SAM's base optimizer, whose step() is the one that runs
        torch.optim.lr_scheduler.CosineAnnealingLR(getattr(opt, "base_optimizer", opt), T_max=steps)
        if cfg.schedule == "cosine"
        else None
    )
    master = torch.Generator().manual_seed(cfg.seed)
    shuffle_seed, probe_seed, torch_seed = torch.randint(0, 2**62, (3,), generator=master).tolist()
    reg.generator.manual_seed(probe_seed)
    return Training(
        config=cfg,
        checkpoint=ck,
        net=net,
        reg=reg,
        opt=opt,
        sched=sched,
        shuffle=torch.Generator().manual_seed(shuffle_seed),
        torch_seed=torch_seed,
        x=x,
        y=y,
        test=test_xy,
        classes=classes,
        layer=layer,
        loss=loss,
        data_spec=data_spec,
        data_sha256=data_sha,
        hparams=hyperparameters(
            cfg, layer=layer, loss=loss, dtype=dtype, data=data_spec, n=len(train)
        ),
        device=device,
        dtype=dtype,
        out=out,
        state_file=state_file,
    )


def hyperparameters(
    cfg: FinetuneConfig, *, layer: str, loss: str, dtype: torch.dtype, data: str | None, n: int
) -> dict[str, Any]:
    """The hyperparameters a run records, in a fixed order (a resume compares them)."""
    return {
        "fam_lambda": cfg.fam_lambda if cfg.fam_lambda == "auto" else float(cfg.fam_lambda),
        "fam_scale": cfg.fam_scale,
        "layer": layer,
        "epochs": cfg.epochs,
        "optimizer": cfg.optimizer,
        "sam_rho": float(cfg.sam_rho),
        "lr": float(cfg.lr),
        "momentum": float(cfg.momentum),
        "weight_decay": float(cfg.weight_decay),
        "batch_size": cfg.batch_size,
        "schedule": cfg.schedule,
        "fam_variant": cfg.fam_variant,
        "fam_method": cfg.fam_method,
        "fam_probes": cfg.fam_probes,
        "fam_gradient": cfg.fam_gradient,
        "clip_grad_norm": cfg.clip,
        "loss": loss,
        "seed": cfg.seed,
        "dtype": str(dtype).removeprefix("torch."),
        "data": data,
        "max_samples": cfg.max_samples,
        "n_train": n,
    }
