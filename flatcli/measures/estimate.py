"""The result record every measure returns."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """A measured value with its uncertainty.

    Attributes:
        value: The measure's value.
        stderr: Standard error of a random estimate; ``None`` when exact.
        method: How it was computed, in words a user can check against docs/measures.md.
        details: Extra numbers worth reporting (probe counts, iterations, residuals, σ', ...).
    """

    value: float
    stderr: float | None
    method: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``value``, ``stderr``, ``method`` and any details."""
        out: dict[str, Any] = {
            "value": _json_float(self.value),
            "stderr": _json_float(self.stderr),
            "method": self.method,
        }
        for k, v in self.details.items():
            out[k] = _json_value(v)
        return out


def _json_float(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return _json_float(v)
    if isinstance(v, Mapping):
        return {str(k): _json_value(u) for k, u in v.items()}
    if isinstance(v, Sequence) and not isinstance(v, str):
        return [_json_value(u) for u in v]
    return v


def with_warnings(est: Estimate, *messages: str) -> Estimate:
    """``est`` with ``messages`` appended to ``details["warnings"]`` (none: ``est`` itself).

    A warning flags a value that should not be read as a plain number: one at or below
    float resolution, a search that hit its bound, an estimate stopped before its target.
    """
    new = [m for m in messages if m and m not in warnings_of(est)]
    if not new:
        return est
    details = {**est.details, "warnings": [*warnings_of(est), *new]}
    return Estimate(est.value, est.stderr, est.method, details)


def warnings_of(est: Estimate) -> list[str]:
    """The warnings attached to ``est`` (empty when none)."""
    return list(est.details.get("warnings", ()))


def mean_and_stderr(samples: Sequence[float]) -> tuple[float, float | None]:
    """Sample mean and its standard error ``std(ddof=1)/√k`` (``None`` for k < 2)."""
    k = len(samples)
    if k == 0:
        raise ValueError("no samples")
    mean = math.fsum(samples) / k
    if k < 2:
        return mean, None
    var = math.fsum((s - mean) ** 2 for s in samples) / (k - 1)
    return mean, math.sqrt(var / k)
