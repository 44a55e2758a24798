"""The invariance audit: recompute measures after function-preserving reparameterizations.

A measure that is meant to describe the *function* (relative flatness) must not move when
the parameters are rescaled in a way that leaves the function unchanged; Hessian trace
and weight norms do move (docs/measures.md, "Invariances"). The audit shows which is
which on the user's own model, with the function change verified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import Batches
from .errors import FlatcliError, UsageError
from .features import call_model
from .measures.estimate import Estimate
from .registry import Inputs, MeasureConfig, run_measures
from .reparam import Pair, find_pairs, layerwise, log_uniform, neuronwise


@dataclass(frozen=True)
class Row:
    """One measure before and after a reparameterization."""

    measure: str
    original: float
    reparameterized: float
    relative_change: float
    invariant: bool


@dataclass(frozen=True)
class Reparameterization:
    """The outcome of one kind of reparameterization.

    Attributes:
        kind: ``layerwise`` or ``neuronwise``.
        refused: Why it was not applied (None when it was).
        pairs: The layer pairs rescaled.
        alphas: The factors used (per pair, or per neuron).
        max_output_change: ``max |f'(x) − f(x)|`` over the data (the function check).
        rows: The measures before and after.
    """

    kind: str
    refused: str | None = None
    pairs: list[tuple[str, str]] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    max_output_change: float | None = None
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "kind": self.kind,
            "refused": self.refused,
            "pairs": [list(p) for p in self.pairs],
            "alphas": self.alphas,
            "max_output_change": self.max_output_change,
            "rows": [r.__dict__ for r in self.rows],
        }


def audit(
    model: nn.Module,
    batches: Batches,
    names: Sequence[str],
    config: MeasureConfig,
    *,
    seed: int = 0,
    alpha_range: tuple[float, float] = (1 / 25, 25.0),
    rtol: float = 1e-6,
    note: Callable[[str], None] | None = None,
    inputs: Inputs | None = None,
) -> tuple[dict[str, Estimate], list[Reparameterization]]:
    """Measure, reparameterize (layer-wise, then neuron-wise into the feature layer), re-measure.

    Args:
        model: The network (eval mode; use float64 for a meaningful invariance check).
        batches: The data.
        names: Measures to compare.
        config: Measure options (its ``layer`` is the feature layer).
        seed: Seed of the random factors (log-uniform in ``alpha_range``).
        alpha_range: Range of the factors.
        rtol: A measure is invariant when its relative change is at most ``rtol``, or, for a
            random estimate, within 3 combined standard errors.
        note: Progress callback.
        inputs: Input shape and initial model, for the measures that need them.

    Returns:
        The original measures and one :class:`Reparameterization` per kind.
    """
    if not (math.isfinite(rtol) and rtol >= 0):
        raise UsageError(f"--tolerance must be a finite number ≥ 0, got {rtol}")
    note = note or (lambda _msg: None)
    pairs, reasons = find_pairs(model)
    note("measures of the original model")
    original = run_measures(model, batches, names, config, note=note, inputs=inputs)
    gen = torch.Generator().manual_seed(seed)
    out = []
    if pairs:
        alphas = log_uniform(gen, len(pairs), low=alpha_range[0], high=alpha_range[1])
        out.append(
            _apply(
                "layerwise",
                model,
                layerwise(model, pairs, alphas),
                pairs,
                alphas,
                batches,
                names,
                config,
                original,
                rtol,
                note,
                inputs,
            )
        )
    else:
        out.append(Reparameterization("layerwise", refused=_no_pairs(reasons)))
    feeding = [p for p in pairs if p.second == config.layer]
    if feeding and feeding[0].neuronwise:
        pair = feeding[0]
        width = dict(model.named_modules())[pair.first].weight.shape[0]
        alphas = log_uniform(gen, width, low=alpha_range[0], high=alpha_range[1])
        out.append(
            _apply(
                "neuronwise",
                model,
                neuronwise(model, pair, alphas),
                [pair],
                alphas,
                batches,
                names,
                config,
                original,
                rtol,
                note,
                inputs,
            )
        )
    elif feeding:
        out.append(
            Reparameterization(
                "neuronwise",
                refused=(
                    "only non-elementwise operations (pooling, reshapes) lie between "
                    f"{feeding[0].first} and {config.layer}, or one is not nn.Linear: "
                    "neuron-wise scaling is not function-preserving there"
                ),
            )
        )
    else:
        out.append(
            Reparameterization(
                "neuronwise",
                refused=(
                    f"no layer feeds {config.layer!r} through positively homogeneous "
                    "operations only" + (f" ({'; '.join(reasons)})" if reasons else "")
                ),
            )
        )
    return original, out


def _no_pairs(reasons: list[str]) -> str:
    why = "; ".join(reasons) if reasons else "fewer than two weight layers"
    return f"no pair of layers with only positively homogeneous operations between them ({why})"


def _apply(
    kind: str,
    model: nn.Module,
    new: nn.Module,
    pairs: list[Pair],
    alphas: torch.Tensor,
    batches: Batches,
    names: Sequence[str],
    config: MeasureConfig,
    original: dict[str, Estimate],
    rtol: float,
    note: Callable[[str], None],
    inputs: Inputs | None,
) -> Reparameterization:
    change = max_output_change(model, new, batches)
    scale = max_output_scale(model, batches)
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 1e-9
    if change > tol * max(1.0, scale):
        raise FlatcliError(
            f"{kind} reparameterization changed the function by {change:.3g}; "
            "the model has a non-homogeneous operation flatcli did not detect"
        )
    note(f"measures after the {kind} reparameterization")
    after = run_measures(new, batches, names, config, note=note, inputs=inputs)
    rows = [_row(name, original[name], after[name], rtol) for name in original if name in after]
    return Reparameterization(
        kind,
        pairs=[(p.first, p.second) for p in pairs],
        alphas=[float(a) for a in alphas],
        max_output_change=change,
        rows=rows,
    )


def _row(name: str, a: Estimate, b: Estimate, rtol: float) -> Row:
    diff = abs(b.value - a.value)
    rel = diff / abs(a.value) if a.value != 0 else (0.0 if diff == 0 else math.inf)
    noise = math.hypot(a.stderr or 0.0, b.stderr or 0.0)
    invariant = rel <= rtol or (noise > 0 and diff <= 3 * noise)
    return Row(name, a.value, b.value, rel, invariant)


@torch.no_grad()
def max_output_change(model: nn.Module, new: nn.Module, batches: Batches) -> float:
    """``max |new(x) − model(x)|`` over all batches."""
    return max(float((call_model(new, x) - call_model(model, x)).abs().max()) for x, _ in batches)


@torch.no_grad()
def max_output_scale(model: nn.Module, batches: Batches) -> float:
    """``max |model(x)|`` over all batches."""
    return max(float(call_model(model, x).abs().max()) for x, _ in batches)


def dead_unit_note(original: dict[str, Estimate], reps: list[Reparameterization]) -> str | None:
    """Why κ̃ moved, when dead units left unscaled (``--dead-units unscaled``) are the reason."""
    est = original.get("relative_flatness_normalized")
    if est is None or not est.details.get("dead_units"):
        return None
    if est.details.get("dead_unit_handling") != "unscaled":
        return None
    moved = [
        r.kind
        for r in reps
        for row in r.rows
        if row.measure == "relative_flatness_normalized" and not row.invariant
    ]
    if not moved:
        return None
    n = est.details["dead_units"]
    return (
        f"note: {n} feature unit(s) are dead (zero std over the data) and are left "
        "unscaled by Theorem 4's normalization (--dead-units unscaled), so rescaling their "
        f"outgoing weights moves relative_flatness_normalized ({', '.join(moved)}). "
        "--dead-units drop (the default) removes them and makes it exactly invariant."
    )
