"""What ``flatcli inspect`` reports: the layers and which measures apply to each."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoints import Checkpoint
from .errors import FlatcliError
from .features import LayerSplit, default_layer

MAX_SAMPLE_VALUES = 1 << 24
"""Largest sample (values) built from metadata ``input_shape`` to probe a model."""
MODEL_MEASURES = "hessian_trace, hessian_top_eigenvalue, fisher_rao, pacbayes_*, sharpness, norms"


def layer_methods(model: nn.Module, name: str, x: Any = None) -> str:
    """Which relative-flatness methods apply to layer ``name``, in words.

    Args:
        x: One sample of model input (see :func:`sample_input`), or None. With it, a
            forward pass tells an ``nn.Linear`` with one output row per sample from one
            applied per position (a token), and a Hugging Face head whose output is the
            logits (closed form) from a hidden layer; without it both cases are described.
    """
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
    rows = None if x is None else _one_row_per_sample(split, x)
    per_token = "κ hutchinson (Identity 1, applied per token), exact if small"
    if rows is False:
        return f"{per_token}; Tr(H); ‖W‖²·Tr(H)"
    if split.produces_output:
        exact = "κ exact closed form (Identity 3)"
    else:
        exact = f"κ exact (Identity 2, {split.mechanism} split)"
    if rows is None:
        return (
            f"{exact} and κ̃ (--normalize) if one output row per sample, else {per_token}; "
            "Tr(H); ‖W‖²·Tr(H)"
        )
    return f"{exact}, κ̃ (--normalize); Tr(H); ‖W‖²·Tr(H)"


def _one_row_per_sample(split: LayerSplit, x: Any) -> bool | None:
    """Whether the layer's output on one sample is 2-d (None: the forward pass failed)."""
    import torch

    try:
        with torch.no_grad():
            _, cut = split.run(x)
    except Exception:  # noqa: BLE001 - a probe: a model that rejects it is described both ways
        return None
    return cut.z.ndim == 2


def sample_input(ck: Checkpoint) -> Any:
    """One sample of input for the checkpoint's model, or None when none is known.

    The first sample of the data its metadata names, else zeros of its metadata's
    ``input_shape``, else, for a Hugging Face model, a four-token dummy sequence.
    """
    import torch

    from .data import inputs_to, load_data, metadata_data
    from .hf import is_pretrained_model

    param = next(ck.model.parameters(), None)
    if param is None:
        return None
    named, shape = ck.metadata.get("data"), ck.metadata.get("input_shape")
    x: Any
    try:
        if named:
            x = load_data(metadata_data(named, Path(ck.path)), max_samples=1).x
        elif shape:
            dims = ck.input_shape or ()
            if math.prod(dims) > MAX_SAMPLE_VALUES:  # metadata is not allowed to take the RAM
                return None
            x = torch.zeros(1, *dims)
        elif is_pretrained_model(ck.model):
            ones = torch.ones(1, 4, dtype=torch.long)
            x = {"input_ids": ones, "attention_mask": ones}
        else:
            return None
        return inputs_to(x, param.device, param.dtype)
    except (FlatcliError, OSError, ValueError, TypeError):
        return None


def describe(ck: Checkpoint) -> dict[str, Any]:
    """Modules with weight shapes and parameter counts, default layer, metadata, sha256.

    Each layer row says whether it is the default layer (``default``), so the CSV of the
    rows alone shows it too.
    """
    model = ck.model
    x = sample_input(ck)  # the model is in eval mode (Checkpoint)
    try:
        default = default_layer(model)
    except FlatcliError:
        default = None
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
                "measures": layer_methods(model, name, x),
                "default": name == default,  # the layer the commands use without --layer
            }
        )
    return {
        "schema": "flatcli.inspect/1",
        "checkpoint": {"path": str(ck.path), "sha256": ck.sha256, "format": ck.format},
        "parameters": sum(p.numel() for p in model.parameters()),
        "default_layer": default,
        "layers": layers,
        "model_measures": MODEL_MEASURES,
        "metadata": dict(ck.metadata),
    }
