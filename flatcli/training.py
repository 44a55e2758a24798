r"""The FAM training loop: one epoch of :math:`E_{\text{batch}} + \lambda\,\kappa` steps.

This is the inner part of :func:`flatcli.finetune.finetune`: the optimizer, the
mini-batches, gradient clipping, SAM's two passes, and the per-epoch averages that the log
and the divergence guard read. It knows nothing of files, resuming or reporting.

References:
    Foret, Kleiner, Mobahi, Neyshabur. *Sharpness-Aware Minimization for Efficiently
    Improving Generalization.* ICLR 2021. https://arxiv.org/abs/2010.01412 (the ``sam``
    optimizer: ``pytorch_optimizer.SAM`` over SGD)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import take
from .fam import FAMRegularizer
from .features import ModelInput, batch_len
from .losses import per_sample_loss

#: At most this many training samples enter the step-0 gradient of κ (:func:`kappa_gradient`).
GRADIENT_SAMPLES = 2048


@dataclass(frozen=True)
class EpochStats:
    """Averages over one epoch's training batches, weighted by batch size.

    Every value is taken in train mode, at each batch's forward pass before its update.

    Attributes:
        train_loss: Mean data loss (without the penalty).
        kappa: Mean FAM penalty, κ or κ̂.
        phi_sq_mean: Mean ``‖φ_i‖²`` of the FAM layer's input.
        max_softmax: Mean largest softmax probability of the model output; None for
            regression targets.
        kappa_stderr: Standard error of ``kappa`` over the batches (None for one batch).
        batches: The number of batches.
    """

    train_loss: float
    kappa: float
    phi_sq_mean: float
    max_softmax: float | None
    kappa_stderr: float | None = None
    batches: int = 1


def train_epoch(
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
    clip_grad_norm: float | None = None,
) -> EpochStats:
    """One pass over shuffled mini-batches of ``(x, y)``.

    Each step backpropagates ``E_batch + λ κ_batch`` (κ on the same batch, from the same
    forward pass), clips the global gradient norm to ``clip_grad_norm`` when it is given,
    and steps the optimizer and the scheduler. With ``sam``, the clipped gradient is that
    of SAM's second pass, the one that updates the weights.
    """
    net.train()
    n = batch_len(x)
    perm = torch.randperm(n, generator=shuffle).to(y.device)
    sums = torch.zeros(4, dtype=torch.float64, device=y.device)  # loss, κ, ‖φ‖², max softmax
    classify = not y.is_floating_point()
    params = [p for p in net.parameters() if p.requires_grad]
    slices = batch_slices(n, batch_size)
    kappas = torch.zeros(len(slices), dtype=torch.float64, device=y.device)
    for b, (lo, hi) in enumerate(slices):
        idx = perm[lo:hi]
        xb, yb = take(x, idx), y[idx]

        def objective(xb: ModelInput = xb, yb: torch.Tensor = yb) -> tuple[torch.Tensor, ...]:
            out, cut = reg.forward(xb)
            data_loss = per_sample_loss(out, yb, reg.loss).mean()
            with torch.set_grad_enabled(fam_lambda > 0):
                kappa = reg.penalty(cut, yb)
            total = data_loss + fam_lambda * kappa if fam_lambda > 0 else data_loss
            return total, data_loss, kappa, out, cut.phi

        opt.zero_grad(set_to_none=True)
        total, data_loss, kappa, out, phi = objective()
        total.backward()
        if sam:
            opt.first_step(zero_grad=True)  # type: ignore[attr-defined]
            with _frozen_batchnorm_stats(net):
                objective()[0].backward()
            _clip(params, clip_grad_norm)
            opt.second_step(zero_grad=True)  # type: ignore[attr-defined]
        else:
            _clip(params, clip_grad_norm)
            opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            kappas[b] = kappa.detach().double()
            phi_sq = phi.reshape(phi.shape[0], -1).double().pow(2).sum(1).sum()
            top = torch.softmax(out.double(), -1).amax(-1).sum() if classify else 0.0
            sums += torch.stack(
                [
                    data_loss.detach().double() * (hi - lo),
                    kappa.detach().double() * (hi - lo),
                    phi_sq,
                    torch.as_tensor(top, dtype=torch.float64, device=sums.device),
                ]
            )
    loss, kappa, phi_sq, top = (float(v) / n for v in sums)
    sizes = torch.tensor([hi - lo for lo, hi in slices], dtype=torch.float64) / n
    stderr = _weighted_stderr(kappas.cpu(), sizes)
    return EpochStats(loss, kappa, phi_sq, top if classify else None, stderr, len(slices))


def _weighted_stderr(values: torch.Tensor, weights: torch.Tensor) -> float | None:
    """Standard error of ``Σ w_b v_b`` (weights summing to 1) from the spread of the ``v_b``,
    treated as independent; None for fewer than two values."""
    k = values.numel()
    if k < 2:
        return None
    mean = float((weights * values).sum())
    spread = float((weights.pow(2) * (values - mean).pow(2)).sum()) * k / (k - 1)
    return math.sqrt(spread)


def _clip(params: list[torch.Tensor], max_norm: float | None) -> None:
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def batch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of the mini-batches; a trailing single sample joins the one before."""
    slices = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    if len(slices) > 1 and slices[-1][1] - slices[-1][0] == 1:
        slices[-2:] = [(slices[-2][0], n)]
    return slices


def make_optimizer(
    net: nn.Module,
    name: str,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    sam_rho: float,
) -> torch.optim.Optimizer:
    """``sgd`` (with momentum), ``adam``, or ``sam`` (``pytorch_optimizer.SAM`` over SGD)."""
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


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an optimizer's state. SAM's base optimizer shares its state and param groups, so
    after loading they are linked again."""
    base = getattr(opt, "base_optimizer", None)
    if base is None:
        opt.load_state_dict(state)
        return
    base.load_state_dict(state)
    opt.param_groups = base.param_groups
    opt.state = base.state


def kappa_gradient(
    reg: FAMRegularizer, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> tuple[float, float]:
    r"""κ and :math:`\|\nabla_\theta \kappa\|^2` over the parameters, at the current weights.

    κ is the mean over the first :data:`GRADIENT_SAMPLES` samples of ``(x, y)``, in eval
    mode, and the gradient is that of this mean, with ``reg``'s gradient variant. The
    parameters' ``.grad`` and the model's mode are left as they were.
    """
    net = reg.model
    params = [p for p in net.parameters() if p.requires_grad]
    n = min(batch_len(x), GRADIENT_SAMPLES)
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    value = 0.0
    was_training = net.training
    net.eval()
    try:
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            _, cut = reg.forward(take(x, slice(lo, hi)))
            kappa = reg.penalty(cut, y[lo:hi]) * ((hi - lo) / n)
            found = torch.autograd.grad(kappa, params, allow_unused=True)
            for acc, g in zip(grads, found, strict=True):
                if g is not None:
                    acc += g.double()
            value += float(kappa.detach())
    finally:
        net.train(was_training)
    return value, math.fsum(float(g.pow(2).sum()) for g in grads)


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
