"""Dense float64 oracles: the independent references the fast measures are tested against.

Everything here is deliberately naive: a full ``torch.autograd.functional.hessian`` of
the mean loss with respect to one layer's weight, and Definition 3 of Petzka et al.
read off it entry by entry.
"""

from __future__ import annotations

import torch
from torch import nn

from flatcli.losses import per_sample_loss


def weight_aliases(model: nn.Module, layer: str) -> list[str]:
    """Every parameter name under which ``layer.weight`` is used (tied weights)."""
    weight = dict(model.named_modules())[layer].weight
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]


def mean_loss_of_weight(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, loss: str):
    """``W ↦ E(W)``, the mean loss as a function of the layer's weight."""
    names = weight_aliases(model, layer)

    def f(w: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, dict.fromkeys(names, w), (x,))
        return per_sample_loss(out, y, loss).mean()

    return f


def dense_layer_hessian(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "cross_entropy",
    *,
    create_graph: bool = False,
) -> torch.Tensor:
    """``H = ∇²_W E`` as a ``(d, m, d, m)`` tensor (conv kernels flattened to ``m = c·k·k``)."""
    w = dict(model.named_modules())[layer].weight
    d, m = w.shape[0], w[0].numel()
    h = torch.autograd.functional.hessian(
        mean_loss_of_weight(model, layer, x, y, loss),
        w if create_graph else w.detach(),
        create_graph=create_graph,
    )
    return h.reshape(d, m, d, m)


def dense_kappa(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "cross_entropy",
    *,
    create_graph: bool = False,
) -> torch.Tensor:
    """Definition 3: ``κ = Σ_{s,s'} ⟨w_s, w_s'⟩ Tr(H_{s,s'})``, entry by entry."""
    w = dict(model.named_modules())[layer].weight
    w2 = (w if create_graph else w.detach()).reshape(w.shape[0], -1)
    h = dense_layer_hessian(model, layer, x, y, loss, create_graph=create_graph)
    d = w2.shape[0]
    total = torch.zeros((), dtype=w.dtype)
    for s in range(d):
        for s2 in range(d):
            total = total + (w2[s] @ w2[s2]) * torch.diagonal(h[s, :, s2, :]).sum()
    return total


def dense_trace(
    model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, loss: str = "cross_entropy"
) -> float:
    """``Tr ∇²_W E`` from the dense layer Hessian."""
    h = dense_layer_hessian(model, layer, x, y, loss)
    d, m = h.shape[:2]
    return float(torch.diagonal(h.reshape(d * m, d * m)).sum())


class Scale(nn.Module):
    """Multiply inputs by a fixed vector (Theorem 4's ``V⁻¹``)."""

    def __init__(self, factor: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("factor", factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def normalized_copy(model: nn.Module, layer: str, sigma: torch.Tensor) -> nn.Module:
    """The function-preserving reparameterization of Theorem 4, built explicitly.

    The layer becomes ``Sequential(Scale(1/σ), Linear(W·diag(σ)))``; its ``κ`` is the
    normalized relative flatness. Coordinates with ``σ = 0`` stay unscaled.
    """
    import copy

    new = copy.deepcopy(model)
    parent_name, _, child = layer.rpartition(".")
    parent = dict(new.named_modules())[parent_name] if parent_name else new
    old = getattr(parent, child)
    s = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).to(old.weight.dtype)
    lin = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    lin = lin.to(old.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(old.weight * s)
        if old.bias is not None:
            lin.bias.copy_(old.bias)
    setattr(parent, child, nn.Sequential(Scale(1 / s), lin))
    return new
