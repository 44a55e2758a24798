"""Function-preserving reparameterizations (docs/measures.md) for the invariance audit.

* **Layer-wise**: multiply layer ``k``'s weight and bias by ``α > 0`` and divide layer
  ``k+1``'s weight by ``α``.
* **Neuron-wise**: multiply row ``s`` of layer ``k`` (and ``b_k[s]``) by ``α_s`` and divide
  column ``s`` of layer ``k+1`` by ``α_s``.

Both preserve the function only when everything between the two layers is positively
homogeneous (ReLU, LeakyReLU, identity, dropout in eval; for the layer-wise scalar also
max/avg pooling and reshapes). The pairs are found on the ``torch.fx`` graph; anything else
between two layers (tanh, GELU, BatchNorm, a branch) is named as the reason for refusing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import FlatcliError

_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)
_SCALAR_ONLY_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.AdaptiveAvgPool2d)
_ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, F.leaky_relu, F.dropout}
_SCALAR_ONLY_FUNCTIONS = {torch.flatten, F.max_pool2d, F.avg_pool2d}
_ELEMENTWISE_METHODS = {"relu"}
_SCALAR_ONLY_METHODS = {"flatten", "view", "reshape"}
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Pair:
    """Two weight layers with only positively homogeneous operations between them.

    Attributes:
        first: Name of layer ``k``.
        second: Name of layer ``k+1``.
        neuronwise: Whether per-neuron scaling also preserves the function (elementwise
            operations only, Linear → Linear).
    """

    first: str
    second: str
    neuronwise: bool


def find_pairs(model: nn.Module) -> tuple[list[Pair], list[str]]:
    """Consecutive weight-layer pairs, and the reasons other layers could not be paired.

    Raises:
        FlatcliError: The model cannot be traced by ``torch.fx``.
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure
        raise FlatcliError(
            f"the reparameterization audit needs a torch.fx-traceable model ({type(e).__name__})"
        ) from None
    modules = dict(gm.named_modules())
    pairs, reasons = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), WEIGHT_LAYERS):
            continue
        elementwise_only = True
        current = node
        while True:
            users = list(current.users)
            if len(users) != 1:
                if users:
                    reasons.append(f"{node.target}: its output branches")
                break
            nxt = users[0]
            if nxt.op == "call_module" and isinstance(modules.get(nxt.target), WEIGHT_LAYERS):
                both_linear = all(
                    isinstance(modules[t], nn.Linear) for t in (node.target, nxt.target)
                )
                pairs.append(
                    Pair(str(node.target), str(nxt.target), elementwise_only and both_linear)
                )
                break
            kind = _homogeneity(nxt, modules)
            if kind is None:
                if nxt.op != "output":
                    reasons.append(
                        f"{node.target}: {_describe(nxt, modules)} after it is not "
                        "positively homogeneous"
                    )
                break
            elementwise_only = elementwise_only and kind == "elementwise"
            current = nxt
    return pairs, reasons


def _homogeneity(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        mod = modules.get(node.target)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return "elementwise"
        if isinstance(mod, _SCALAR_ONLY_MODULES):
            return "scalar"
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return "elementwise"
        if node.target in _SCALAR_ONLY_FUNCTIONS:
            return "scalar"
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return "elementwise"
        if node.target in _SCALAR_ONLY_METHODS:
            return "scalar"
    return None


def _describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    return getattr(node.target, "__name__", str(node.target))


def log_uniform(
    gen: torch.Generator, size: int, *, low: float = 1 / 25, high: float = 25.0
) -> torch.Tensor:
    """``size`` factors drawn log-uniformly from ``[low, high]``."""
    u = torch.rand(size, generator=gen, dtype=torch.float64)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def layerwise(model: nn.Module, pairs: list[Pair], alphas: torch.Tensor) -> nn.Module:
    """A copy with each pair ``(k, k+1)`` rescaled by its ``α`` (applied in order)."""
    new = copy.deepcopy(model)
    mods = dict(new.named_modules())
    with torch.no_grad():
        for pair, alpha in zip(pairs, alphas.tolist(), strict=True):
            first, second = mods[pair.first], mods[pair.second]
            first.weight.mul_(alpha)
            if first.bias is not None:
                first.bias.mul_(alpha)
            second.weight.div_(alpha)
    return new


def neuronwise(model: nn.Module, pair: Pair, alphas: torch.Tensor) -> nn.Module:
    """A copy with row ``s`` of ``pair.first`` times ``α_s`` and column ``s`` of ``pair.second``
    divided by ``α_s``."""
    if not pair.neuronwise:
        raise FlatcliError(
            f"neuron-wise scaling between {pair.first} and {pair.second} does "
            "not preserve the function"
        )
    new = copy.deepcopy(model)
    mods = dict(new.named_modules())
    first, second = mods[pair.first], mods[pair.second]
    a = alphas.to(first.weight)
    with torch.no_grad():
        first.weight.mul_(a[:, None])
        if first.bias is not None:
            first.bias.mul_(a)
        second.weight.div_(a[None, :])
    return new
