r"""Fine-tune a model with FAM: :math:`E_{\text{batch}} + \lambda\,\kappa(W^l)`, resumably, with
a guard against divergence.

:func:`finetune` is the library side of ``flatcli finetune``; it returns a
:class:`FinetuneResult`. One module per job, found by its name:

* :mod:`~flatcli.finetune.config`: the options, :class:`FinetuneConfig`, with their
  defaults and checks;
* :mod:`~flatcli.finetune.setup`: the run's pieces (data on the device, regularizer,
  optimizer, schedule, generators, the recorded hyperparameters);
* :mod:`~flatcli.finetune.state`: the resumable state file;
* :mod:`~flatcli.finetune.fam_lambda`: λ (absolute, relative, paper, ``auto``) and its
  warnings;
* :mod:`~flatcli.finetune.loop`: the epoch loop, with the guard of :mod:`flatcli.guard`;
* :mod:`~flatcli.finetune.temperature`: the temperature-matched baseline (the maths);
* :mod:`~flatcli.finetune.outputs`: the checkpoint, log, manifest and plot;
* :mod:`~flatcli.finetune.result`: :class:`FinetuneResult` and :class:`Diverged`;
* :mod:`~flatcli.finetune.run`: :func:`finetune`, which calls them in order.

The training step is :mod:`flatcli.training`; the log, plot and test metrics are
:mod:`flatcli.finetune_report`.

References:
    Adilova et al. *FAM: Relative Flatness Aware Minimization.* 2023.
    https://arxiv.org/abs/2307.02337
"""

from __future__ import annotations

import sys as _sys
import types as _types
from typing import Any

from ..finetune_report import LOG_COLUMNS, LOG_SCHEMA, EpochRecord, plot_history, write_log
from ..guard import DivergenceGuard
from .config import (
    DEFAULT_CLIP,
    OPTIMIZERS,
    SCALES,
    SCHEDULES,
    ConfigError,
    FinetuneConfig,
)
from .fam_lambda import NEGLIGIBLE_PENALTY, SAFE_STEP_RATIO, WARN_STEP_RATIO
from .result import SCHEMA, Diverged, FinetuneResult
from .run import finetune
from .state import STATE_FORMAT
from .temperature import temperature_scale

__all__ = [
    "DEFAULT_CLIP",
    "LOG_COLUMNS",
    "LOG_SCHEMA",
    "NEGLIGIBLE_PENALTY",
    "OPTIMIZERS",
    "SAFE_STEP_RATIO",
    "SCALES",
    "SCHEDULES",
    "SCHEMA",
    "STATE_FORMAT",
    "WARN_STEP_RATIO",
    "ConfigError",
    "DivergenceGuard",
    "Diverged",
    "EpochRecord",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "plot_history",
    "temperature_scale",
    "write_log",
]


class _CallableModule(_types.ModuleType):
    """``flatcli.finetune(...)`` calls :func:`finetune`: once imported, the package shadows
    the lazy attribute of the same name on :mod:`flatcli`."""

    def __call__(self, *args: Any, **kwargs: Any) -> FinetuneResult:
        return finetune(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
