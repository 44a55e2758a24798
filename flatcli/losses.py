"""Per-sample losses with the conventions of docs/measures.md.

The empirical risk is always the **mean** over samples, ``E = (1/n) Σ_i ℓ_i``;
these functions return the unreduced ``ℓ_i`` so that every measure can
accumulate per-sample sums batch by batch.
"""

from __future__ import annotations

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

    * ``cross_entropy``: softmax cross-entropy of the logits ``out`` against class indices.
    * ``mse``: ``ℓ_i = (1/d) ‖out_i − t_i‖²``, so that ``mean_i ℓ_i`` equals
      ``F.mse_loss(out, t)`` with its default mean over all ``n·d`` elements
      (docs/measures.md, Identity 3). Integer labels become one-hot targets.

    Works for batched ``out`` of shape ``(n, d)`` and, under ``torch.func.vmap``,
    for a single sample of shape ``(d,)``.
    """
    if loss == "cross_entropy":
        return F.cross_entropy(out, y.long(), reduction="none")
    if loss == "mse":
        t = mse_targets(y, out)
        return ((out - t) ** 2).mean(dim=-1)
    raise UsageError(f"unknown loss {loss!r}")
