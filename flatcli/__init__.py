"""flatcli: relative flatness and friends for PyTorch models.

The public API, grouped. Names load lazily so that ``flatcli --help`` stays instant.

Measures (each returns an :class:`Estimate`):
    relative_flatness, layer_hessian_trace, layerwise_flatness, weight_norm, layer_measures,
    hessian_trace, hessian_top_eigenvalue, fisher_rao, pacbayes_flatness, pacbayes_bound,
    sharpness, frobenius_norms, spectral_norms, path_norm, distance_from_init

Commands (each returns a typed result with to_dict() = the CLI's JSON and to_frame()):
    measure, audit_checkpoint, correlate_checkpoints, check_robustness, estimate_bound,
    MeasureOptions, MeasureResult, AuditResult, CorrelateResult, RobustnessResult,
    BoundResult

Experiments:
    audit, measure_checkpoints (correlate), FAMRegularizer, finetune (FinetuneConfig,
    FinetuneResult)

Loading:
    load_checkpoint, save_checkpoint, load_data, as_batches, prepare

Building blocks:
    LayerSplit, Estimate, FlatcliError
"""

from __future__ import annotations

import os as _os
import sys as _sys


def _run_as_module(argv: list[str]) -> bool:
    """Whether this process is ``python [options] -m flatcli`` (``torchrun -m flatcli``
    starts its ranks that way): while the package is imported, ``sys.argv[0]`` is ``-m``."""
    if _sys.argv[:1] != ["-m"]:
        return False
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "-m":
            return argv[i + 1 : i + 2] == ["flatcli"]
        if arg.startswith("-m"):
            return arg == "-mflatcli"
    return False


# ``python -m`` puts the working directory first on sys.path, so a ``rich.py`` (or any
# module flatcli imports) there would run. Drop it, as ``python -P`` does, before anything
# else is imported. (``import flatcli`` from a program, and the ``flatcli`` command, are
# left alone: neither puts the working directory there.)
if (
    _run_as_module(getattr(_sys, "orig_argv", []))
    and not getattr(_sys.flags, "safe_path", False)
    and _sys.path[:1] in ([""], [_os.getcwd()])
):
    del _sys.path[0]

import importlib  # noqa: E402 - after the sys.path fix above
from typing import Any  # noqa: E402

__version__ = "0.1.0"

_PUBLIC = {
    # measures
    "relative_flatness": "flatcli.measures.relative_flatness",
    "layer_hessian_trace": "flatcli.measures.relative_flatness",
    "layerwise_flatness": "flatcli.measures.relative_flatness",
    "weight_norm": "flatcli.measures.relative_flatness",
    "layer_measures": "flatcli.measures.relative_flatness",
    "hessian_trace": "flatcli.measures.hessian",
    "hessian_top_eigenvalue": "flatcli.measures.hessian",
    "fisher_rao": "flatcli.measures.fisher_rao",
    "pacbayes_flatness": "flatcli.measures.pac_bayes",
    "pacbayes_bound": "flatcli.measures.pac_bayes",
    "sharpness": "flatcli.measures.sharpness",
    "frobenius_norms": "flatcli.measures.norms",
    "spectral_norms": "flatcli.measures.norms",
    "path_norm": "flatcli.measures.norms",
    "distance_from_init": "flatcli.measures.norms",
    # commands (each returns a typed result: flatcli.results)
    "measure": "flatcli.commands",
    "audit_checkpoint": "flatcli.commands",
    "correlate_checkpoints": "flatcli.commands",
    "check_robustness": "flatcli.commands",
    "estimate_bound": "flatcli.commands",
    "MeasureOptions": "flatcli.registry",
    "MeasureResult": "flatcli.results",
    "AuditResult": "flatcli.results",
    "CorrelateResult": "flatcli.results",
    "RobustnessResult": "flatcli.results",
    "BoundResult": "flatcli.results",
    # experiments
    "audit": "flatcli.audit",
    "measure_checkpoints": "flatcli.correlate",
    "FAMRegularizer": "flatcli.fam",
    "finetune": "flatcli.finetune",
    "FinetuneConfig": "flatcli.finetune",
    "FinetuneResult": "flatcli.finetune",
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
