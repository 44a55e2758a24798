"""Function-preserving reparameterizations (docs/measures.md) for the invariance audit.

* **Layer-wise**: multiply layer ``k``'s weight and bias by ``α > 0`` and divide layer
  ``k+1``'s weight by ``α``.
* **Neuron-wise**: multiply row ``s`` of layer ``k`` (and ``b_k[s]``) by ``α_s`` and divide
  column ``s`` of layer ``k+1`` by ``α_s``.

Both preserve the function only when everything between the two layers is positively
homogeneous (ReLU, LeakyReLU, identity, dropout in eval; for the layer-wise scalar also
max/avg pooling and reshapes). The pairs are found on the ``torch.fx`` graph; anything else
between two layers (tanh, GELU, BatchNorm, a branch) is named as the reason for refusing.

* **Channels into the feature layer** (:func:`feature_channels`): the neuron-wise rescaling
  of the feature layer's input, followed back through per-channel positively homogeneous
  operations (ReLU, pooling, flatten, residual additions) to the layers that make those
  channels (rows of a Linear/Conv, or a BatchNorm's affine gain and shift), and forward to
  every layer that reads them (its input columns divided). On a ResNet this rescales the
  last stage's residual stream; on an MLP it is the neuron-wise rescaling above.

Structure-only reparameterizations (attention heads, norm folding, BatchNorm) need no
trace: :mod:`flatcli.structural`.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any

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
    gm = trace(model)
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


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``.

    Raises:
        FlatcliError: The model cannot be traced (the message names the exception).
    """
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure
        raise FlatcliError(
            f"the reparameterization audit needs a torch.fx-traceable model ({type(e).__name__})"
        ) from None


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


# --------------------------------------------------------------------------- channels


_CHANNEL_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_CHANNEL_FUNCTIONS = {
    torch.relu,
    F.relu,
    F.leaky_relu,
    F.dropout,
    torch.flatten,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
}
_ADDITIONS = {operator.add, operator.iadd, torch.add}
_CHANNEL_METHODS = {"relu", "relu_", "flatten", "view", "reshape"}
_METADATA_METHODS = {"size", "dim"}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CHANNEL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class ChannelScaling:
    """A per-channel rescaling of the tensor entering the feature layer.

    Attributes:
        producers: Layers whose output channel ``c`` is multiplied by ``α_c``: the rows
            (and bias) of a Linear/Conv, or the gain and shift of a BatchNorm.
        consumers: Layers whose input channel ``c`` is divided by ``α_c`` (the feature
            layer among them); a Linear after a flatten divides each channel's block of
            columns.
        channels: Number of channels (factors).
    """

    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    channels: int


def feature_channels(model: nn.Module, layer: str) -> tuple[ChannelScaling | None, str]:
    """The neuron-wise rescaling into ``layer`` on the fx graph, or None and why not.

    Starting at the feature layer's input, every node whose output must carry the factors
    is followed back through per-channel positively homogeneous operations (ReLU,
    LeakyReLU, pooling, flatten, additions of two rescaled tensors) to the layers that
    make the channels; every other reader of a rescaled tensor must be a Linear/Conv
    (which divides its input channels) or another such operation.

    Raises:
        FlatcliError: The model cannot be traced by ``torch.fx``.
    """
    gm = trace(model)
    modules = dict(gm.named_modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        return None, f"{layer} is called {len(calls)} times in the traced graph"
    first = calls[0].args[0]
    if not isinstance(first, torch.fx.Node):
        return None, f"{layer}'s input is not a traced tensor"
    producers: list[str] = []
    consumers: list[str] = []
    seen: set[torch.fx.Node] = set()
    stack = [first]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        why = _make_rescaled(node, modules, producers, stack)
        for user in node.users:
            why = why or _read_rescaled(user, node, modules, consumers, stack)
        if why:
            return None, why
    return _channel_plan(producers, consumers, modules, layer)


def _make_rescaled(
    node: torch.fx.Node, modules: dict[str, nn.Module], producers: list[str], stack: list
) -> str | None:
    """Arrange for ``node``'s output to carry the factors; None, or why it cannot."""
    mod = modules.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]
    if isinstance(mod, CHANNEL_LAYERS):
        producers.append(str(node.target))
        return None
    if isinstance(mod, BATCHNORMS):
        if mod.weight is None or mod.bias is None:
            return f"{type(mod).__name__} ({node.target}) has no affine gain and shift to rescale"
        producers.append(str(node.target))
        return None
    if _is_addition(node):
        if not all(isinstance(a, torch.fx.Node) for a in node.args):
            return f"{node.name} adds a constant to the rescaled channels"
        stack.extend(node.args)
        return None
    if _channelwise(node, modules):
        stack.append(node.args[0])
        return None
    if node.op == "placeholder":
        return "the rescaled channels reach the model's input"
    return f"{_describe(node, modules)} before {node.name} is not positively homogeneous"


def _read_rescaled(
    user: torch.fx.Node,
    node: torch.fx.Node,
    modules: dict[str, nn.Module],
    consumers: list[str],
    stack: list,
) -> str | None:
    """Account for one reader of a rescaled tensor; None, or why it breaks the function."""
    mod = modules.get(user.target) if user.op == "call_module" else None  # type: ignore[arg-type]
    if isinstance(mod, CHANNEL_LAYERS) and user.args[0] is node:
        if getattr(mod, "groups", 1) != 1:
            return f"{user.target} is a grouped convolution"
        consumers.append(str(user.target))
        return None
    if _is_addition(user) or _channelwise(user, modules):
        stack.append(user)
        return None
    if user.op == "call_method" and user.target in _METADATA_METHODS:
        return None
    if user.op == "call_function" and user.target is getattr:
        return None
    if user.op == "output":
        return f"the rescaled output of {node.name} is an output of the model"
    return f"{_describe(user, modules)} reads the rescaled output of {node.name}"


def _is_addition(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and (
        node.target in _ADDITIONS or node.target in ("add", "add_")
    )


def _channelwise(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _CHANNEL_MODULES)  # type: ignore[arg-type]
    if node.op == "call_function":
        return node.target in _CHANNEL_FUNCTIONS
    return node.op == "call_method" and node.target in _CHANNEL_METHODS


def _channel_plan(
    producers: list[str], consumers: list[str], modules: dict[str, nn.Module], layer: str
) -> tuple[ChannelScaling | None, str]:
    sizes = {out_channels(modules[p]) for p in producers}
    if len(sizes) != 1:
        return None, f"the layers making {layer}'s input have different widths {sorted(sizes)}"
    (c,) = sizes
    for name in consumers:
        width = in_channels(modules[name])
        if width % c or (not isinstance(modules[name], nn.Linear) and width != c):
            return None, f"{name} reads {width} input channels, not a multiple of {c}"
    return ChannelScaling(tuple(producers), tuple(consumers), c), ""


def out_channels(mod: nn.Module) -> int:
    """Output channels of a Linear/Conv (rows) or a BatchNorm (features)."""
    if isinstance(mod, nn.Linear):
        return mod.out_features
    if isinstance(mod, BATCHNORMS):
        return mod.num_features
    return int(mod.out_channels)  # type: ignore[arg-type]


def in_channels(mod: nn.Module) -> int:
    """Input channels of a Linear/Conv (columns)."""
    return mod.in_features if isinstance(mod, nn.Linear) else int(mod.in_channels)  # type: ignore[arg-type]


def scale_channels(model: nn.Module, plan: ChannelScaling, alphas: torch.Tensor) -> nn.Module:
    """A copy with ``plan``'s producers' channel ``c`` times ``α_c`` and its consumers'
    input channel ``c`` divided by ``α_c``."""
    new = copy.deepcopy(model)
    mods = dict(new.named_modules())
    with torch.no_grad():
        for name in plan.producers:
            scale_outputs(mods[name], alphas)
        for name in plan.consumers:
            scale_inputs(mods[name], 1 / alphas)
    return new


def scale_outputs(mod: nn.Module, factors: torch.Tensor) -> None:
    """Multiply output channel ``c`` of a Linear/Conv (weight row and bias) or of a
    BatchNorm/LayerNorm (gain and shift) by ``factors[c]``, in place."""
    weight: Any = mod.weight
    f = factors.to(weight)
    weight.mul_(f.reshape(-1, *([1] * (weight.dim() - 1))))
    bias = getattr(mod, "bias", None)
    if bias is not None:
        bias.mul_(f)


def scale_inputs(mod: nn.Module, factors: torch.Tensor) -> None:
    """Multiply input channel ``c`` of a Linear/Conv by ``factors[c]`` in place; a Linear
    wider than ``len(factors)`` (after a flatten) multiplies channel ``c``'s block of
    ``in_features / len(factors)`` columns."""
    weight: Any = mod.weight
    f = factors.to(weight)
    if isinstance(mod, nn.Linear):
        f = f.repeat_interleave(weight.shape[1] // f.numel())
    weight.mul_(f.reshape(1, -1, *([1] * (weight.dim() - 2))))
