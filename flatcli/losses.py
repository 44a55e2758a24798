"""Per-sample losses with the conventions of docs/measures.md.

The empirical risk is always the **mean** over samples, ``E = (1/n) Σ_i ℓ_i``;
these functions return the unreduced ``ℓ_i`` so that every measure can
accumulate per-sample sums batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .errors import UsageError

LossName = Literal["cross_entropy", "mse"]
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")


def check_loss(name: str) -> LossName:
    """Return ``name`` if it is a known loss, else raise a usage error."""
    if name not in LOSSES:
        raise UsageError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return name  # type: ignore[return-value]


def mse_targets(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Targets for MSE: one-hot for integer labels, the labels themselves otherwise."""
    if not y.is_floating_point():
        return F.one_hot(y.long(), out.shape[-1]).to(out.dtype)
    return y.to(out.dtype).reshape(out.shape)


def per_sample_loss(out: torch.Tensor, y: torch.Tensor, loss: LossName) -> torch.Tensor:
    r"""Unreduced per-sample losses ``ℓ_i`` of shape ``(n,)``.

    * ``cross_entropy``: softmax cross-entropy of the logits ``out`` against class indices,
      in the form of :func:`cross_entropy` that keeps its derivatives exact in float32.
    * ``mse``: ``ℓ_i = (1/d) ‖out_i − t_i‖²``, so that ``mean_i ℓ_i`` equals
      ``F.mse_loss(out, t)`` with its default mean over all ``n·d`` elements
      (docs/measures.md, Identity 3). Integer labels become one-hot targets.

    Works for batched ``out`` of shape ``(n, d)`` and, under ``torch.func.vmap``,
    for a single sample of shape ``(d,)``.
    """
    if loss == "cross_entropy":
        return cross_entropy(out, y)
    if loss == "mse":
        t = mse_targets(y, out)
        return ((out - t) ** 2).mean(dim=-1)
    raise UsageError(f"unknown loss {loss!r}")


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Per-sample softmax cross-entropy, written so that it and its derivatives survive
    a saturated softmax in float32.

    With ``j`` the top class of each row and ``t_k = z_k − z_j ≤ 0``,

    .. math:: \ell = \log\Big(1 + \sum_{k \ne j} e^{t_k}\Big) + (z_j - z_y),

    the same function as ``F.cross_entropy``. ``F.cross_entropy`` goes through
    ``log_softmax``, whose derivatives hold ``p_j − 1`` and ``p_j − p_j²``: near a one-hot
    softmax (train loss 1e-6) these are differences of numbers close to 1, and float32
    keeps only a few digits of them (Hessians, HVPs and the loss itself came out 3e-3 off
    the float64 values). Here every derivative of the ``log1p`` term is built from
    ``p_k = e^{t_k}/(1 + Σ e^{t})``, ``k ≠ j``, small numbers that float32 holds to full
    relative precision, and the term ``z_j − z_y`` is linear (zero for a correct top class).
    Works on ``(n, d)`` logits and, under ``torch.func.vmap``, on one row ``(d,)``.
    """
    top = out.detach().argmax(-1, keepdim=True)
    shifted = out - out.gather(-1, top)  # t = z − z_j: 0 at the top class, ≤ 0 elsewhere
    others = shifted.exp().scatter(-1, top, 0.0).sum(-1)  # Σ_{k≠j} e^{t_k}, no 1 − p_j
    label = y.long().unsqueeze(-1)
    # −t_y, left out (not added as 0) where y is the top class: its gradient, −1 at y and
    # +1 at j, would meet the −s of the log1p term in one float32 sum and swallow it
    linear = torch.where(label == top, 0.0, -shifted.gather(-1, label)).squeeze(-1)
    return torch.log1p(others) + linear


@dataclass(frozen=True)
class SoftmaxCurvature:
    r"""``B_i = diag(p_i) − p_i p_iᵀ``, the Hessian of softmax cross-entropy in the logits,
    in a form that stays exact on a saturated softmax.

    ``vᵀB_iv`` is the variance of ``v``'s entries under ``p_i``, so shifting ``v`` by its
    entry ``v_j`` at the top class ``j`` changes nothing; then ``p_j ≈ 1`` never enters:

    .. math::

        v^\top B_i v = \sum_k \tilde p_k (v_k - v_j)^2
            - \Big(\sum_k \tilde p_k (v_k - v_j)\Big)^2, \qquad
        \mathrm{Tr}\,B_i = 2s - s^2 - \|\tilde p\|^2,

    with ``p̃`` the softmax with its top entry set to 0 and ``s = Σ_k p̃_k = 1 − p_j``. The
    textbook ``Σ_k p_k v_k² − (Σ_k p_k v_k)²`` subtracts two O(1) numbers to get an O(s)
    one: near a one-hot softmax float32 kept few of its digits (3e-3 relative error at
    train loss 1e-6). Differentiable in the logits and the directions (FAM).

    Attributes:
        rest: ``p̃``, shape ``(n, d)``.
        mass: ``s``, shape ``(n,)``.
        top: The top class of each sample, shape ``(n,)``.
    """

    rest: torch.Tensor
    mass: torch.Tensor
    top: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> SoftmaxCurvature:
        """From ``(n, d)`` logits; ``p̃`` from ``e^{z_k − z_j}``, never from ``1 − p_j``."""
        top = logits.detach().argmax(-1, keepdim=True)
        others = (logits - logits.gather(-1, top)).exp().scatter(-1, top, 0.0)
        total = others.sum(-1, keepdim=True)
        rest = others / (1 + total)
        return cls(rest, (total / (1 + total)).squeeze(-1), top.squeeze(-1))

    def forms(self, dirs: torch.Tensor, *, summed: bool = False) -> torch.Tensor:
        """``vᵀB_iv`` for each sample and each column ``v`` of ``dirs``, shape ``(n, K)``.

        ``dirs`` is ``(d, K)``, shared by the samples, or ``(n, d, K)``, one per sample.
        With ``summed``, ``Tr(UᵀB_iU)`` for ``U = dirs``, shape ``(n,)``.
        """
        rest, mass = self.rest, self.mass.unsqueeze(-1)
        if dirs.ndim == 2:
            at_top = dirs[self.top]  # v_j, (n, K)
            mean = rest @ dirs  # Σ_k p̃_k v_k
            square = rest @ (dirs * dirs).sum(1, keepdim=True) if summed else rest @ (dirs * dirs)
        else:
            at_top = dirs.gather(1, self.top[:, None, None].expand(-1, 1, dirs.shape[2]))[:, 0]
            mean = torch.einsum("nd,ndk->nk", rest, dirs)
            square = torch.einsum("nd,ndk->nk", rest, dirs * dirs)
        # Σ p̃ (v − v_j)² − (Σ p̃ (v − v_j))², expanded: every term is O(s), none O(1)
        spread = square.sum(-1) if summed else square
        cross = at_top * (mean * 2 - mass * at_top)
        shift = (mean - mass * at_top) ** 2
        if summed:
            return spread - cross.sum(-1) - shift.sum(-1)
        return spread - cross - shift

    def trace(self) -> torch.Tensor:
        """``Tr B_i = Σ_k p_k(1 − p_k)`` per sample, shape ``(n,)``."""
        return self.mass * (2 - self.mass) - (self.rest * self.rest).sum(-1)
