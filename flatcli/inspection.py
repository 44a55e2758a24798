"""What ``flatcli inspect`` reports: the layers and which measures apply to each."""

from __future__ import annotations

from typing import Any

from torch import nn

from .checkpoints import Checkpoint
from .errors import FlatcliError
from .features import LayerSplit, default_layer

MODEL_MEASURES = "hessian_trace, hessian_top_eigenvalue, fisher_rao, pacbayes_*, sharpness, norms"


def layer_methods(model: nn.Module, name: str) -> str:
    """Which relative-flatness methods apply to layer ``name``, in words."""
    module = dict(model.named_modules())[name]
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return ""
    try:
        split = LayerSplit(model, name)
    except FlatcliError as e:
        return f"none ({e})"
    if split.kind == "conv2d":
        return "κ hutchinson (Identity 1), exact if small; Tr(H)"
    if split.tied:
        return "κ hutchinson/exact (Identity 1, tied weight); Tr(H)"
    if split.produces_output:
        return "κ exact closed form (Identity 3), κ̃ (--normalize); Tr(H); ‖W‖²·Tr(H)"
    return f"κ exact (Identity 2, {split.mechanism} split), κ̃ (--normalize); Tr(H); ‖W‖²·Tr(H)"


def describe(ck: Checkpoint) -> dict[str, Any]:
    """Modules with weight shapes and parameter counts, default layer, metadata, sha256."""
    model = ck.model
    layers = []
    for name, module in model.named_modules():
        if not name or any(True for _ in module.children()):
            continue
        weight = getattr(module, "weight", None)
        layers.append(
            {
                "name": name,
                "type": type(module).__name__,
                "weight_shape": list(weight.shape) if weight is not None else None,
                "parameters": sum(p.numel() for p in module.parameters(recurse=False)),
                "measures": layer_methods(model, name),
            }
        )
    try:
        default = default_layer(model)
    except FlatcliError:
        default = None
    return {
        "schema": "flatcli.inspect/1",
        "checkpoint": {"path": str(ck.path), "sha256": ck.sha256, "format": ck.format},
        "parameters": sum(p.numel() for p in model.parameters()),
        "default_layer": default,
        "layers": layers,
        "model_measures": MODEL_MEASURES,
        "metadata": dict(ck.metadata),
    }
