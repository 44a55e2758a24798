"""Function-preserving reparameterizations found from the module structure, without torch.fx.

Hugging Face transformers do not trace with ``torch.fx``, and a CNN's BatchNorm stops the
fx walk of :mod:`flatcli.reparam`. Their rescaling symmetries can be read off the named
modules, their types, and one recorded forward pass (which module's output tensor is which
module's input, by storage):

* ``attention_qk``: per head ``h``, ``W_Q`` and ``b_Q`` times ``α_h``, ``W_K`` and ``b_K``
  divided by ``α_h``: the scores ``QKᵀ`` are unchanged. Attention modules are those with
  ``nn.Linear`` children named ``query/key/value``, ``q_proj/k_proj/v_proj``,
  ``q_lin/k_lin/v_lin`` or ``q/k/v`` and a head count (``num_attention_heads``,
  ``num_heads``, ``n_heads``, or the module's ``config``). With grouped key/value heads,
  one factor per key/value head.
* ``attention_vo``: per head, ``W_V`` and ``b_V`` times ``β_h`` and the output
  projection's input columns of that head divided by ``β_h`` (attention is linear in V).
  The output projection is a child named ``o_proj/out_proj/out_lin/o``, or the
  ``nn.Linear`` that reads the attention module's output.
* ``norm_fold``: a LayerNorm/RMSNorm's gain ``γ`` moves into the ``nn.Linear`` layers that
  read its output (``W diag γ``); its shift ``β`` moves into their biases (``b + Wβ``), or,
  when one has no bias, stays as ``β/γ``. The norm is left with gain 1.
* ``relu_neurons``: ``Linear/Conv → ReLU/LeakyReLU → Linear/Conv``: output unit ``s`` of the
  first (row and bias) times ``α_s``, input unit ``s`` of the next divided by ``α_s``.
  A GELU, SiLU or tanh in that place has no exact rescaling: the block is skipped, and said.
* ``batchnorm_fold``: an eval-mode BatchNorm after a Linear/Conv: its scale ``γ/√(var+ε)``
  moves into that layer's rows, the BatchNorm keeps only its shift.
* ``batchnorm_channels``: ``BatchNorm → ReLU → Linear/Conv``: channel ``c``'s gain and shift
  times ``α_c``, the next layer's input channel ``c`` divided by ``α_c``.

What the structure suggests is a candidate only: the recorded forward pass cannot see
operations that are not modules (a residual addition reading a LayerNorm's output, a
functional activation). :func:`flatcli.audit.audit` applies every candidate, compares the
outputs, and refuses those that change them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .features import call_model
from .reparam import (
    BATCHNORMS,
    CHANNEL_LAYERS,
    in_channels,
    out_channels,
    scale_inputs,
    scale_outputs,
)

KINDS = (
    "attention_qk",
    "attention_vo",
    "norm_fold",
    "relu_neurons",
    "batchnorm_fold",
    "batchnorm_channels",
)
"""The structural reparameterizations, in the order the audit applies them."""

DESCRIPTIONS = {
    "attention_qk": "per attention head h: W_Q, b_Q × α_h and W_K, b_K ÷ α_h",
    "attention_vo": "per attention head h: W_V, b_V × β_h and the output projection's "
    "input columns of head h ÷ β_h",
    "norm_fold": "LayerNorm/RMSNorm gain (and shift) folded into the nn.Linear layers reading it",
    "relu_neurons": "Linear/Conv → ReLU → Linear/Conv: output unit s × α_s, the next "
    "layer's input unit s ÷ α_s",
    "batchnorm_fold": "BatchNorm scale γ/√(var+ε) folded into the preceding Linear/Conv",
    "batchnorm_channels": "BatchNorm → ReLU → Linear/Conv: channel c's gain and shift × α_c, "
    "the next layer's input channel c ÷ α_c",
}

_ATTENTION_NAMES = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_lin", "k_lin", "v_lin"),
    ("q", "k", "v"),
)
_OUTPUT_NAMES = ("o_proj", "out_proj", "out_lin", "o")
_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)


@dataclass(frozen=True)
class Site:
    """One place where a structural reparameterization applies.

    Attributes:
        kind: One of :data:`KINDS`.
        where: The module that names the site (attention module, norm, activation).
        producers: Modules whose outputs carry the factors (Q and K; V; the layer before
            an activation; a BatchNorm before one; the layer a BatchNorm folds into).
        consumers: Modules that compensate (the output projection; the layers after a
            norm or an activation; the BatchNorm a fold leaves with its shift only).
        size: Number of random factors (0: a deterministic fold).
        heads: Query heads of an attention site (0 otherwise).
    """

    kind: str
    where: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...] = ()
    size: int = 0
    heads: int = 0

    def describe(self) -> str:
        """``where: producers → consumers`` for the report."""
        ends = " + ".join(self.producers)
        if self.consumers:
            ends += " → " + " + ".join(self.consumers)
        return (
            ends if self.where in (*self.producers, *self.consumers) else f"{self.where} ({ends})"
        )


@dataclass(frozen=True)
class Structure:
    """What :func:`find_sites` read off a model.

    Attributes:
        sites: The candidate sites, by kind.
        skipped: One line per block that looks rescalable but has no exact rescaling
            (a GELU feed-forward), by kind.
        feature_source: The module whose output the feature layer reads (None: unknown).
    """

    sites: Mapping[str, list[Site]]
    skipped: Mapping[str, list[str]]
    feature_source: str | None = None


# --------------------------------------------------------------------------- the data flow


@dataclass(frozen=True)
class Flow:
    """Storages of each module's first input and output tensor in one forward pass."""

    inputs: Mapping[str, int]
    outputs: Mapping[str, int]

    def readers(self, storage: int, modules: Mapping[str, nn.Module]) -> list[str]:
        """Weight layers whose input is ``storage``."""
        return [
            n
            for n, s in self.inputs.items()
            if s == storage and isinstance(modules[n], CHANNEL_LAYERS)
        ]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


@torch.no_grad()
def record_flow(model: nn.Module, x: Any) -> Flow:
    """Run ``model`` on ``x`` once and record which tensor storage each module reads and
    writes (modules called more than once are left out: their role is ambiguous)."""
    inputs: dict[str, int] = {}
    outputs: dict[str, int] = {}
    calls: dict[str, int] = {}
    keep: list[torch.Tensor] = []  # alive until the end, so no storage is reused

    def hook(name: str) -> Any:
        def record(_mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            t_in, t_out = _first_tensor((args, kwargs)), _first_tensor(out)
            for t, table in ((t_in, inputs), (t_out, outputs)):
                if t is not None:
                    keep.append(t)
                    table[name] = t.untyped_storage().data_ptr()

        return record

    handles = [
        mod.register_forward_hook(hook(name), with_kwargs=True)
        for name, mod in model.named_modules()
        if name
    ]
    try:
        call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    once = {n for n, c in calls.items() if c == 1}
    return Flow(
        {n: s for n, s in inputs.items() if n in once},
        {n: s for n, s in outputs.items() if n in once},
    )


# --------------------------------------------------------------------------- discovery


def find_sites(model: nn.Module, x: Any, *, feature_layer: str | None = None) -> Structure:
    """Every candidate site of every :data:`KINDS`, from names, types and one forward pass.

    Args:
        model: The network (eval mode).
        x: A few inputs (a tensor or a dict batch) for the recorded forward pass.
        feature_layer: The feature layer, to name the module its input comes from.
    """
    modules = dict(model.named_modules())
    flow = record_flow(model, x)
    sites: dict[str, list[Site]] = {k: [] for k in KINDS}
    skipped: dict[str, list[str]] = {k: [] for k in KINDS}
    for name, mod in modules.items():
        found = _attention_sites(name, mod, modules, flow)
        for site in found:
            sites[site.kind].append(site)
        if _is_norm(mod):
            site = _norm_site(name, mod, modules, flow)
            if site is not None:
                sites["norm_fold"].append(site)
        if isinstance(mod, BATCHNORMS) and name in flow.inputs:
            sites["batchnorm_fold"] += _bn_fold_site(name, mod, modules, flow)
    for name, mod in modules.items():
        if name in flow.inputs and _is_activation(mod):
            _activation_sites(name, mod, modules, flow, sites, skipped)
    source = None
    if feature_layer is not None and feature_layer in flow.inputs:
        source = _source_of(flow.inputs[feature_layer], flow, modules)
    return Structure(sites, skipped, source)


def _attention_sites(
    name: str, mod: nn.Module, modules: Mapping[str, nn.Module], flow: Flow
) -> list[Site]:
    children = dict(mod.named_children())
    for q, k, v in _ATTENTION_NAMES:
        if not all(isinstance(children.get(c), nn.Linear) for c in (q, k, v)):
            continue
        heads, kv_heads = _heads(mod, children[q], children[k])
        if not heads:
            return []
        head_dim = children[q].out_features // heads
        if children[v].out_features != kv_heads * head_dim:
            return []
        full = lambda c: f"{name}.{c}" if name else c  # noqa: E731
        out = _output_projection(name, mod, children, modules, flow, heads * head_dim)
        qk = Site("attention_qk", name, (full(q), full(k)), size=kv_heads, heads=heads)
        if out is None:
            return [qk]
        vo = Site("attention_vo", name, (full(v),), (out,), size=kv_heads, heads=heads)
        return [qk, vo]
    return []


def _heads(mod: nn.Module, q: nn.Linear, k: nn.Linear) -> tuple[int, int]:
    """Query heads and key/value heads, or (0, 0) when they cannot be read off."""
    config = getattr(mod, "config", None)
    heads = 0
    for attr in _HEAD_ATTRS:
        value = getattr(mod, attr, None) or getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            heads = value
            break
    if not heads or q.out_features % heads:
        return 0, 0
    kv = getattr(mod, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None)
    kv_heads = kv if isinstance(kv, int) and kv > 0 else heads
    head_dim = q.out_features // heads
    if heads % kv_heads or k.out_features != kv_heads * head_dim:
        return 0, 0
    return heads, kv_heads


def _output_projection(
    name: str,
    mod: nn.Module,
    children: Mapping[str, nn.Module],
    modules: Mapping[str, nn.Module],
    flow: Flow,
    width: int,
) -> str | None:
    for child in _OUTPUT_NAMES:
        if isinstance(children.get(child), nn.Linear) and children[child].in_features == width:
            return f"{name}.{child}"
    if name not in flow.outputs:
        return None
    readers = [
        r
        for r in flow.readers(flow.outputs[name], modules)
        if isinstance(modules[r], nn.Linear) and modules[r].in_features == width
    ]
    return readers[0] if len(readers) == 1 else None


def _is_norm(mod: nn.Module) -> bool:
    if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
        return getattr(mod, "weight", None) is not None
    kind = type(mod).__name__
    weight = getattr(mod, "weight", None)
    return (
        kind.endswith(("LayerNorm", "RMSNorm"))
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
    )


def _norm_site(
    name: str, mod: nn.Module, modules: Mapping[str, nn.Module], flow: Flow
) -> Site | None:
    if name not in flow.outputs:
        return None
    width = mod.weight.numel()  # type: ignore[union-attr]
    readers = [
        r
        for r in flow.readers(flow.outputs[name], modules)
        if isinstance(modules[r], nn.Linear) and modules[r].in_features == width
    ]
    return Site("norm_fold", name, (name,), tuple(readers)) if readers else None


def _bn_fold_site(
    name: str, mod: nn.Module, modules: Mapping[str, nn.Module], flow: Flow
) -> list[Site]:
    if not getattr(mod, "affine", False) or not getattr(mod, "track_running_stats", False):
        return []
    makers = [
        n
        for n, s in flow.outputs.items()
        if s == flow.inputs[name] and isinstance(modules[n], CHANNEL_LAYERS)
    ]
    if len(makers) != 1 or out_channels(modules[makers[0]]) != mod.num_features:  # type: ignore[attr-defined]
        return []
    return [Site("batchnorm_fold", name, (makers[0],), (name,))]


def _is_activation(mod: nn.Module) -> bool:
    kind = type(mod).__name__
    return isinstance(mod, (*_HOMOGENEOUS, nn.GELU, nn.SiLU, nn.Tanh, nn.Mish, nn.ELU)) or (
        kind.endswith("Activation") or kind in ("NewGELUActivation", "QuickGELUActivation")
    )


def _activation_sites(
    name: str,
    mod: nn.Module,
    modules: Mapping[str, nn.Module],
    flow: Flow,
    sites: dict[str, list[Site]],
    skipped: dict[str, list[str]],
) -> None:
    """A ``relu_neurons`` or ``batchnorm_channels`` site at activation ``name``, or the
    reason a block through a non-homogeneous activation is skipped."""
    makers = [
        n
        for n, s in flow.outputs.items()
        if s == flow.inputs[name]
        and n != name
        and isinstance(modules[n], (*CHANNEL_LAYERS, *BATCHNORMS))
    ]
    if len(makers) != 1 or name not in flow.outputs:
        return
    maker = makers[0]
    width = out_channels(modules[maker])
    readers = [
        r for r in flow.readers(flow.outputs[name], modules) if _in_width(modules[r]) == width
    ]
    if not readers:
        return
    is_bn = isinstance(modules[maker], BATCHNORMS)
    kind = "batchnorm_channels" if is_bn else "relu_neurons"
    if not isinstance(mod, _HOMOGENEOUS):
        skipped[kind].append(
            f"{maker} → {name} → {' + '.join(readers)}: {type(mod).__name__} is not "
            "positively homogeneous, so no exact rescaling exists; block skipped"
        )
        return
    if is_bn and not getattr(modules[maker], "affine", False):
        return
    sites[kind].append(Site(kind, name, (maker,), tuple(readers), size=width))


def _in_width(mod: nn.Module) -> int:
    if getattr(mod, "groups", 1) != 1:
        return -1  # a grouped convolution's input channels cannot be rescaled this way
    return in_channels(mod)


def _source_of(storage: int, flow: Flow, modules: Mapping[str, nn.Module]) -> str | None:
    """The innermost module that wrote ``storage`` and is not a pass-through (dropout)."""
    writers = [
        n
        for n, s in flow.outputs.items()
        if s == storage
        and not isinstance(modules[n], (nn.Dropout, nn.Identity))
        and not any(c for c, _ in modules[n].named_children())
    ]
    return writers[-1] if writers else None


# --------------------------------------------------------------------------- applying


def apply_site(modules: Mapping[str, nn.Module], site: Site, factors: torch.Tensor | None) -> None:
    """Apply one site in place to the modules of a copy of the model.

    Args:
        modules: ``dict(copy.named_modules())``.
        site: What to rescale.
        factors: ``site.size`` positive factors (None for the folds).
    """
    with torch.no_grad():
        if site.kind == "attention_qk":
            q, k = (modules[n] for n in site.producers)
            scale_outputs(q, _per_row(factors, site, out_channels(q), query_heads=True))
            scale_outputs(k, 1 / _per_row(factors, site, out_channels(k), query_heads=False))
        elif site.kind == "attention_vo":
            v, o = modules[site.producers[0]], modules[site.consumers[0]]
            scale_outputs(v, _per_row(factors, site, out_channels(v), query_heads=False))
            scale_inputs(o, 1 / _per_row(factors, site, _in_width(o), query_heads=True))
        elif site.kind == "norm_fold":
            _fold_norm(modules[site.where], [modules[c] for c in site.consumers])
        elif site.kind == "batchnorm_fold":
            _fold_batchnorm(modules[site.producers[0]], modules[site.consumers[0]])
        else:  # relu_neurons, batchnorm_channels
            assert factors is not None
            scale_outputs(modules[site.producers[0]], factors)
            for c in site.consumers:
                scale_inputs(modules[c], 1 / factors)


def _per_row(
    factors: torch.Tensor | None, site: Site, width: int, *, query_heads: bool
) -> torch.Tensor:
    """One factor per key/value head, over that head's ``width / heads`` rows or columns;
    the query heads that share a key/value head (grouped attention) share its factor."""
    assert factors is not None
    per_head = factors.repeat_interleave(site.heads // factors.numel()) if query_heads else factors
    return per_head.repeat_interleave(width // per_head.numel())


def _fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """``W diag γ`` in every reader; the shift into their biases (``b + Wβ``), or kept as
    ``β/γ`` when a reader has no bias; the norm's gain set to 1."""
    gain: Any = norm.weight
    shift: Any = getattr(norm, "bias", None)
    all_biased = all(getattr(r, "bias", None) is not None for r in readers)
    for r in readers:
        w: Any = r.weight
        if shift is not None and all_biased:
            r.bias.add_(w @ shift.to(w))  # type: ignore[union-attr, operator]
        w.mul_(gain.to(w)[None, :])
    if shift is not None:
        if all_biased:
            shift.zero_()
        else:
            shift.div_(gain)
    gain.fill_(1.0)


def _fold_batchnorm(layer: nn.Module, bn: Any) -> None:
    """The BatchNorm's scale ``γ/√(var+ε)`` into ``layer``'s rows; the BatchNorm keeps
    ``x − γμ/√(var+ε) + β`` (gain 1, variance 1 − ε)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    scale_outputs(layer, scale)
    bn.running_mean.mul_(scale)
    bn.running_var.fill_(1.0 - bn.eps)
    bn.weight.fill_(1.0)


def snapshot(
    modules: Mapping[str, nn.Module], names: tuple[str, ...]
) -> dict[tuple[str, str], torch.Tensor]:
    """Copies of the parameters and buffers of the modules ``names``."""
    return {
        (n, k): t.detach().clone()
        for n in names
        for k, t in [
            *modules[n].named_parameters(recurse=False),
            *modules[n].named_buffers(recurse=False),
        ]
    }


def restore(
    modules: Mapping[str, nn.Module], saved: Mapping[tuple[str, str], torch.Tensor]
) -> None:
    """Put back what :func:`snapshot` copied."""
    with torch.no_grad():
        for (n, k), t in saved.items():
            getattr(modules[n], k).copy_(t)


def copy_model(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A deep copy and its named modules."""
    new = copy.deepcopy(model)
    return new, dict(new.named_modules())
