"""flatcli: relative flatness and friends for PyTorch models.

The public API, grouped. Names load lazily so that ``flatcli --help`` stays instant.

Measures (each returns an :class:`Estimate`):
    relative_flatness, layer_hessian_trace, layerwise_flatness, weight_norm, layer_measures

Loading:
    load_checkpoint, save_checkpoint, load_data, as_batches, prepare

Building blocks:
    LayerSplit, Estimate, FlatcliError
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    # measures
    "relative_flatness": "flatcli.measures.relative_flatness",
    "layer_hessian_trace": "flatcli.measures.relative_flatness",
    "layerwise_flatness": "flatcli.measures.relative_flatness",
    "weight_norm": "flatcli.measures.relative_flatness",
    "layer_measures": "flatcli.measures.relative_flatness",
    # loading
    "load_checkpoint": "flatcli.checkpoints",
    "save_checkpoint": "flatcli.checkpoints",
    "load_data": "flatcli.data",
    "as_batches": "flatcli.data",
    "prepare": "flatcli.prepare",
    # building blocks
    "LayerSplit": "flatcli.features",
    "Estimate": "flatcli.measures.estimate",
    "FlatcliError": "flatcli.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'flatcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
