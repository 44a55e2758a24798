"""Dense float64 oracles over a whole parameter set (the comparison measures' references).

Deliberately naive and independent of :mod:`flatcli.measures.params`: parameters are
flattened here by hand, the Hessian is ``torch.autograd.functional.hessian`` of the mean
loss, and per-sample gradients come from one backward pass per sample.
"""

from __future__ import annotations

import torch
from torch import nn

from flatcli.losses import per_sample_loss


def flat_values(model: nn.Module, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names])


def mean_loss_of(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, loss: str):
    """``θ ↦ E(θ)``: the mean loss as a function of the flattened parameters ``names``."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]

    def f(theta: torch.Tensor) -> torch.Tensor:
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            values[name] = theta[offset : offset + size].reshape(shape)
            offset += size
        out = torch.func.functional_call(model, values, (x,))
        return per_sample_loss(out, y, loss).mean()

    return f


def dense_hessian(
    model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, loss: str
) -> torch.Tensor:
    """``∇²_θ E`` as a ``(p, p)`` matrix."""
    return torch.autograd.functional.hessian(
        mean_loss_of(model, names, x, y, loss), flat_values(model, names)
    )


def per_sample_gradients(
    model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, loss: str
) -> torch.Tensor:
    """``∇_θ ℓ_i`` for every sample, one backward pass each: shape ``(n, p)``."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        li = per_sample_loss(model(x[i : i + 1]), y[i : i + 1], loss).sum()
        grads = torch.autograd.grad(li, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)
