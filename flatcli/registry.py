"""The named measures ``flatcli measure --measures`` chooses from.

Each measure belongs to a *group*: one function that computes several related measures
in shared passes over the data (all layer-wise quantities come from one set of passes).
:func:`run_measures` runs each needed group once and returns the requested names in
order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .data import Batches
from .errors import UsageError
from .measures.estimate import Estimate
from .measures.relative_flatness import layer_measures


@dataclass(frozen=True)
class MeasureConfig:
    """Every option a measure may read. Part of the cache key of ``correlate``.

    Attributes:
        layer: Feature layer name.
        loss: ``cross_entropy`` or ``mse``.
        method: ``auto``, ``exact`` or ``hutchinson`` for the layer-wise measures.
        probes: Hutchinson probes for the layer-wise measures.
        seed: Seed of every random estimate.
        dead_units: Theorem 4's treatment of dead units, ``unscaled`` or ``drop``.
    """

    layer: str
    loss: str = "cross_entropy"
    method: str = "auto"
    probes: int = 64
    seed: int = 0
    dead_units: str = "unscaled"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready options."""
        return asdict(self)


Note = Callable[[str], None]
Group = Callable[[nn.Module, Batches, MeasureConfig, Sequence[str], Note], Mapping[str, Estimate]]


def _layer_group(
    model: nn.Module, batches: Batches, config: MeasureConfig, names: Sequence[str], note: Note
) -> Mapping[str, Estimate]:
    return layer_measures(
        model,
        config.layer,
        batches,
        loss=config.loss,
        method=config.method,
        normalize="relative_flatness_normalized" in names,
        probes=config.probes,
        seed=config.seed,
        dead_units=config.dead_units,
        progress=note,
    )


_LAYER = (
    "relative_flatness",
    "relative_flatness_normalized",
    "layerwise_flatness",
    "layer_hessian_trace",
    "weight_norm",
    "train_loss",
    "train_accuracy",
)

GROUPS: dict[str, tuple[Group, tuple[str, ...]]] = {
    "layer": (_layer_group, _LAYER),
}
"""Group name -> (function, the measure names it produces)."""

DEFAULT = (
    "relative_flatness",
    "layerwise_flatness",
    "layer_hessian_trace",
    "weight_norm",
    "train_loss",
    "train_accuracy",
)
"""What ``flatcli measure`` computes without ``--measures`` (seconds on the sample model)."""


def available() -> list[str]:
    """Every measure name, in display order."""
    return [name for _, names in GROUPS.values() for name in names]


def select(spec: str | None, *, normalize: bool = False) -> list[str]:
    """Measure names from ``--measures`` (comma list, ``all`` or None for the default)."""
    names = available()
    if spec is None or spec == "default":
        chosen = list(DEFAULT)
    elif spec == "all":
        chosen = list(names)
    else:
        chosen = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [c for c in chosen if c not in names]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"unknown measure {unknown[0]!r}{hint} (see flatcli measure --help)")
    if normalize and "relative_flatness_normalized" not in chosen:
        at = chosen.index("relative_flatness") + 1 if "relative_flatness" in chosen else 0
        chosen.insert(at, "relative_flatness_normalized")
    return chosen


def run_measures(
    model: nn.Module,
    batches: Batches,
    names: Sequence[str],
    config: MeasureConfig,
    *,
    note: Note | None = None,
) -> dict[str, Estimate]:
    """Compute ``names`` on ``model`` over ``batches``, each group once."""
    note = note or (lambda _msg: None)
    out: dict[str, Estimate] = {}
    for fn, produces in GROUPS.values():
        wanted = [n for n in names if n in produces]
        if wanted:
            out.update(
                {k: v for k, v in fn(model, batches, config, wanted, note).items() if k in wanted}
            )
    return {n: out[n] for n in names if n in out}
