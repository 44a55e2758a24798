"""The options of the measures, declared once: their defaults and their checks.

Light on purpose (no torch): the CLI builds its shared ``--probes``, ``--method``, …
options from these fields (:func:`flatcli.cli.options.with_measure_options`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import ParameterError

MEASURE_TIME_BUDGET = 60.0
"""Seconds for the iterative measures of one :func:`flatcli.measure` run together (and
of each checkpoint of :func:`flatcli.correlate_checkpoints`): ``--time-budget``'s default."""

AUDIT_TIME_BUDGET = 300.0
"""Seconds for a whole :func:`flatcli.audit_checkpoint` (``flatcli audit --time-budget``)."""


@dataclass(frozen=True)
class MeasureOptions:
    """The options of the measures themselves (not of the model, layer or data).

    Attributes:
        method: ``auto``, ``exact`` or ``hutchinson``, for the layer-wise measures and
            the Hessian trace.
        probes: Hutchinson probes for the layer-wise measures.
        seed: Seed of every random estimate.
        dead_units: Theorem 4's treatment of dead units, ``drop`` (default) or ``unscaled``.
        trace_params: Parameters of ``hessian_trace`` and ``hessian_top_eigenvalue``:
            ``all``, ``layer`` (the feature layer) or a module/parameter name.
        rtol: Relative standard error target of the Hutchinson Hessian trace.
        max_probes: Most probes of the Hutchinson Hessian trace.
        fr_include_bias: Count biases in the Fisher-Rao norm.
        fr_labels: Fisher-Rao labels: ``true`` (empirical) or ``model`` (softmax expectation).
        l2: Weight decay α whose penalty Hessian ``α·I`` the layer-wise measures add to H.
        pacbayes_target: ``error`` or ``loss``, for PAC-Bayes and sharpness.
        pacbayes_threshold: The allowed increase τ of PAC-Bayes and sharpness.
        mc_samples: Monte Carlo draws per PAC-Bayes bisection step.
        search_depth: Bisection steps of PAC-Bayes and sharpness.
        trace_method: ``hutchinson`` or ``hutch++``, the estimator of a Hutchinson
            Hessian trace.
        probe_batch: Probes per vmapped Hessian-vector product call (1: double
            backward, one at a time); None chooses from ``max_memory``.
        max_memory: Bytes the whole-network measures may use, or a size such as ``4G``
            (None: half the free memory); data batches and probe batches are split to fit.
        time_budget: Seconds for the iterative measures of a run together (Hutchinson
            trace, Lanczos, PAC-Bayes and sharpness searches); each stops at probe (HVP,
            bisection step, Monte Carlo draw) granularity once it is spent, reporting the
            standard error (residual, bracket) reached; None or 0 for no limit.

    :meth:`checked` checks them (the library's commands call it).
    """

    method: str = "auto"
    probes: int = 64
    seed: int = 0
    dead_units: str = "drop"
    trace_params: str = "all"
    rtol: float = 0.01
    max_probes: int = 2000
    fr_include_bias: bool = False
    fr_labels: str = "true"
    l2: float = 0.0
    pacbayes_target: str = "error"
    pacbayes_threshold: float = 0.1
    mc_samples: int = 10
    search_depth: int = 15
    trace_method: str = "hutchinson"
    probe_batch: int | None = None
    max_memory: int | str | None = None
    time_budget: float | None = None

    def checked(self) -> MeasureOptions:
        """These options with ``max_memory`` in bytes and a ``time_budget`` of 0 as None,
        after checking each (every library entry point calls it).

        Raises:
            ParameterError: An option out of its range (the error names it).
        """
        from .measures.budget import parse_memory

        out = replace(
            self, max_memory=parse_memory(self.max_memory), time_budget=self.time_budget or None
        )
        for ok, name, message in out._checks():
            if not ok:
                raise ParameterError(name, f"{message}, got {getattr(out, name)!r}")
        return out

    def _checks(self) -> list[tuple[bool, str, str]]:
        """``(ok, parameter, what it must be)`` of each option."""
        finite = math.isfinite
        return [
            (
                self.method in ("auto", "exact", "hutchinson"),
                "method",
                "must be auto, exact or hutchinson",
            ),
            (self.probes >= 1, "probes", "must be at least 1"),
            (self.dead_units in ("unscaled", "drop"), "dead_units", "must be unscaled or drop"),
            (self.fr_labels in ("true", "model"), "fr_labels", "must be true or model"),
            (0 <= self.l2 < math.inf, "l2", "must be a finite number >= 0"),
            (finite(self.rtol) and self.rtol > 0, "rtol", "must be positive and finite"),
            (self.max_probes >= 2, "max_probes", "must be at least 2"),
            (
                self.pacbayes_target in ("error", "loss"),
                "pacbayes_target",
                "must be error or loss",
            ),
            (
                finite(self.pacbayes_threshold) and self.pacbayes_threshold > 0,
                "pacbayes_threshold",
                "must be positive and finite",
            ),
            (self.mc_samples >= 2, "mc_samples", "must be at least 2"),
            (self.search_depth >= 1, "search_depth", "must be at least 1"),
            (
                self.trace_method in ("hutchinson", "hutch++"),
                "trace_method",
                "must be hutchinson or hutch++",
            ),
            (
                self.probe_batch is None or self.probe_batch >= 1,
                "probe_batch",
                "must be at least 1",
            ),
            (
                self.time_budget is None or self.time_budget >= 0,
                "time_budget",
                "must be at least 0 seconds",
            ),
        ]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready options."""
        return asdict(self)
