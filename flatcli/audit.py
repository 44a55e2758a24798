"""The invariance audit: recompute measures after function-preserving reparameterizations.

A measure that is meant to describe the *function* (relative flatness) must not move when
the parameters are rescaled in a way that leaves the function unchanged; Hessian trace
and weight norms do move (docs/measures.md, "Invariances"). The audit shows which is
which on the user's own model, with the function change verified.

The reparameterizations come from the ``torch.fx`` graph when the model traces
(:mod:`flatcli.reparam`: layer-wise, and neuron-wise into the feature layer) and from the
module structure otherwise or besides (:mod:`flatcli.structural`: attention heads, norm
folding, ReLU blocks, BatchNorm). Each is applied to a copy, checked on every sample to
change no output by more than a tolerance (refused otherwise), and only then measured.
The measures run within a time budget: those estimated not to fit are skipped unless asked
for (:func:`plan_measures`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .data import Batches
from .errors import FlatcliError, UsageError
from .features import call_model
from .measures.budget import format_seconds, rows_of, slice_rows
from .measures.estimate import Estimate
from .registry import GROUPS, Inputs, MeasureConfig, run_measures
from .reparam import (
    feature_channels,
    find_pairs,
    layerwise,
    log_uniform,
    scale_channels,
)
from .structural import (
    DESCRIPTIONS,
    KINDS,
    Site,
    Structure,
    apply_site,
    copy_model,
    find_sites,
    restore,
    snapshot,
)

SCREEN_ROWS = 16
"""Samples of the first batch on which each structural site is screened on its own."""


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
        kind: ``layerwise``, ``neuronwise`` or one of :data:`flatcli.structural.KINDS`.
        refused: Why it was not applied (None when it was).
        pairs: The layers rescaled, as (first, second) pairs.
        alphas: The factors used (per pair, neuron, channel or head).
        max_output_change: ``max |f'(x) − f(x)|`` over the data (the function check).
        rows: The measures before and after.
        description: What the reparameterization does, in one line.
        sites: Where it was applied, one line each.
        refused_sites: Candidate sites left out, each with why.
        tolerance: The function check's bound on ``max |f'(x) − f(x)|``.
        feature_inputs: Whether it rescales the feature layer's input neuron-wise (the
            reparameterization of Theorem 4).
        unmeasured: Why an applied reparameterization was not measured (the time budget
            ran out before its run), or None.
    """

    kind: str
    refused: str | None = None
    pairs: list[tuple[str, str]] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    max_output_change: float | None = None
    rows: list[Row] = field(default_factory=list)
    description: str = ""
    sites: list[str] = field(default_factory=list)
    refused_sites: list[str] = field(default_factory=list)
    tolerance: float | None = None
    feature_inputs: bool = False
    unmeasured: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "kind": self.kind,
            "refused": self.refused,
            "description": self.description,
            "pairs": [list(p) for p in self.pairs],
            "alphas": self.alphas,
            "sites": self.sites,
            "refused_sites": self.refused_sites,
            "max_output_change": self.max_output_change,
            "tolerance": self.tolerance,
            "feature_inputs": self.feature_inputs,
            "unmeasured": self.unmeasured,
            "rows": [r.__dict__ for r in self.rows],
        }


@dataclass(frozen=True)
class AuditResult:
    """What :func:`audit` found.

    Attributes:
        measures: The original model's measures (empty when every reparameterization was
            refused: nothing would be compared).
        reparameterizations: One per kind found (applied or refused).
        skipped: Measures not computed, each with why (the time budget).
        theorem4: Lines on Theorem 4's normalized κ̃: where it was shown invariant, and
            where the theorem's conditions fail here.
        seconds: Wall time of the audit.
    """

    measures: dict[str, Estimate]
    reparameterizations: list[Reparameterization]
    skipped: dict[str, str] = field(default_factory=dict)
    theorem4: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Candidate:
    """A reparameterization that passed its function check, ready to be measured."""

    rep: Reparameterization
    build: Callable[[], nn.Module]


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
    time_budget: float | None = None,
    optional: Sequence[str] = (),
) -> AuditResult:
    """Reparameterize (every kind found), check the function, measure, re-measure.

    Args:
        model: The network (eval mode; use float64 for a meaningful invariance check).
        batches: The data.
        names: Measures to compare.
        config: Measure options (its ``layer`` is the feature layer).
        seed: Seed of the random factors (log-uniform in ``alpha_range``).
        alpha_range: Range of the factors.
        rtol: A measure is invariant when its relative change is at most ``rtol``, or, for a
            random estimate, within 3 combined standard errors.
        note: Progress callback (lines end with an ETA once one is known).
        inputs: Input shape and initial model, for the measures that need them.
        time_budget: Seconds for the whole audit (None: no limit). Measures of
            ``optional`` estimated not to fit are skipped; an iterative estimator (Hutchinson,
            Lanczos) gets an equal share of what is left per run.
        optional: Names among ``names`` that may be skipped to keep within the budget
            (the command's defaults); the others are always computed.

    Returns:
        An :class:`AuditResult`.

    Raises:
        FlatcliError: The model neither traces with ``torch.fx`` nor has any module the
            structural reparameterizations recognize.
    """
    if not (math.isfinite(rtol) and rtol >= 0):
        raise UsageError(f"--tolerance must be a finite number ≥ 0, got {rtol}")
    start = time.monotonic()
    note = note or (lambda _msg: None)
    gen = torch.Generator().manual_seed(seed)
    note("finding function-preserving reparameterizations")
    found, forward = _reparameterizations(model, batches, config.layer, gen, alpha_range, note)
    applied = [c for c in found if c.rep.refused is None]
    reps = [c.rep for c in found]
    if not applied:  # nothing to compare: measure nothing
        return AuditResult({}, reps, {}, _theorem4(reps, {}, config, model), _since(start))
    runs = 1 + len(applied)
    plan = plan_measures(
        model, batches, names, config, runs=runs, optional=optional,
        time_budget=None if time_budget is None else time_budget - _since(start),
        forward=forward,
    )  # fmt: skip
    clock = _Eta(plan.per_run, runs)
    measured: dict[str, dict[str, Estimate]] = {}
    unmeasured: dict[str, str] = {}
    for run, cand in enumerate([None, *applied]):
        label = "original model" if cand is None else f"{cand.rep.kind} reparameterization"
        left = math.inf if time_budget is None else time_budget - _since(start)
        if cand is not None and clock.per_run > left:
            unmeasured[cand.rep.kind] = (
                f"not measured: a run takes about {format_seconds(clock.per_run)} and "
                f"{format_seconds(max(left, 0.0))} of the time budget is left"
            )
            continue
        clock.begin(run)
        note(f"run {run + 1}/{runs}, {label}: measuring · ETA {format_seconds(clock.eta())}")
        target = model if cand is None else cand.build()
        measured[label] = run_measures(
            target, batches, plan.names, plan.config, note=clock.wrap(note, run, label),
            inputs=inputs,
        )  # fmt: skip
        del target
        clock.end()
    original = measured["original model"]
    out = []
    for cand in found:
        after = measured.get(f"{cand.rep.kind} reparameterization")
        if after is None:
            out.append(_with(cand.rep, unmeasured=unmeasured.get(cand.rep.kind)))
            continue
        rows = [_row(n, original[n], after[n], rtol) for n in original if n in after]
        out.append(_with(cand.rep, rows=rows))
    return AuditResult(
        original, out, plan.skipped, _theorem4(out, original, config, model), _since(start)
    )


def _since(start: float) -> float:
    return time.monotonic() - start


def _with(rep: Reparameterization, **changes: Any) -> Reparameterization:
    return replace(rep, **changes)


# --------------------------------------------------------------------------- finding them


def _reparameterizations(
    model: nn.Module,
    batches: Batches,
    layer: str,
    gen: torch.Generator,
    alpha_range: tuple[float, float],
    note: Callable[[str], None],
) -> tuple[list[_Candidate], float]:
    """Every kind found, in order: fx layer-wise and neuron-wise, then the structural ones;
    and the seconds of the original model's forward pass over the data (for the plan)."""
    low, high = alpha_range
    check = _Check(model, batches)
    try:
        pairs, reasons = find_pairs(model)
        fx_error = None
    except FlatcliError as e:  # say why in the refusals, and look at the structure only
        cause = str(e).rsplit("(", 1)[-1].rstrip(")")
        pairs, reasons, fx_error = [], [], f"the model does not trace with torch.fx ({cause})"
    x0 = slice_rows(batches.first()[0], 0, min(SCREEN_ROWS, rows_of(batches.first()[0])))
    structure = find_sites(model, x0, feature_layer=layer)
    if fx_error is not None and not any(structure.sites.values()):
        raise FlatcliError(_nothing_found(model, fx_error))
    out = []
    if pairs:
        alphas = log_uniform(gen, len(pairs), low=low, high=high)
        rep = Reparameterization(
            "layerwise",
            pairs=[(p.first, p.second) for p in pairs],
            alphas=[float(a) for a in alphas],
            description="consecutive layers k, k+1: layer k's weight and bias × α, "
            "layer k+1's weight ÷ α",
            feature_inputs=any(p.second == layer for p in pairs),
        )
        out.append(check.candidate(rep, lambda: layerwise(model, pairs, alphas)))
    else:
        why = f"{fx_error}, which finding layer pairs needs" if fx_error else _no_pairs(reasons)
        out.append(_Candidate(Reparameterization("layerwise", refused=why), _unbuilt))
    out.append(_neuronwise(model, layer, fx_error, structure, gen, alpha_range, check))
    for kind in KINDS:
        if kind == "relu_neurons" and fx_error is None:
            continue  # the fx kinds cover ReLU blocks of a traced model
        sites, skipped = structure.sites[kind], structure.skipped[kind]
        if not sites and not skipped:
            continue
        note(f"checking the {kind} reparameterization ({len(sites)} candidate sites)")
        out.append(_structural(model, kind, sites, skipped, layer, gen, alpha_range, check))
    return out, check.seconds


def _unbuilt() -> nn.Module:
    raise AssertionError("a refused reparameterization is never built")


def _nothing_found(model: nn.Module, fx_error: str) -> str:
    return (
        f"the reparameterization audit found nothing to rescale in {type(model).__name__}: "
        f"{fx_error.removeprefix('the model ')}, and it has no attention module with "
        "query/key/value (or q_proj/k_proj/v_proj) nn.Linear children, no LayerNorm/RMSNorm "
        "feeding an nn.Linear, no Linear/Conv → ReLU → Linear/Conv block and no BatchNorm "
        "after a Linear/Conv"
    )


def _no_pairs(reasons: list[str]) -> str:
    why = "; ".join(reasons[:3]) if reasons else "fewer than two weight layers"
    if len(reasons) > 3:
        why += f"; and {len(reasons) - 3} more"
    return f"no pair of layers with only positively homogeneous operations between them ({why})"


def _neuronwise(
    model: nn.Module,
    layer: str,
    fx_error: str | None,
    structure: Structure,
    gen: torch.Generator,
    alpha_range: tuple[float, float],
    check: _Check,
) -> _Candidate:
    """Neuron-wise (per channel) rescaling of the feature layer's input, on the fx graph."""
    if fx_error is not None:
        source = structure.feature_source
        where = ""
        if source is not None:
            kind = type(dict(model.named_modules())[source]).__name__
            where = f"; {layer} reads the output of {source} ({kind})"
            if kind not in ("ReLU", "LeakyReLU"):
                where += ", which is not positively homogeneous: no neuron-wise rescaling exists"
        refused = Reparameterization("neuronwise", refused=fx_error + where)
        return _Candidate(refused, _unbuilt)
    plan, why = feature_channels(model, layer)
    if plan is None:
        refused = f"no neuron-wise rescaling of {layer}'s input preserves the function: {why}"
        return _Candidate(Reparameterization("neuronwise", refused=refused), _unbuilt)
    alphas = log_uniform(gen, plan.channels, low=alpha_range[0], high=alpha_range[1])
    consumers = " + ".join(plan.consumers)
    rep = Reparameterization(
        "neuronwise",
        pairs=[(p, consumers) for p in plan.producers],
        alphas=[float(a) for a in alphas],
        description=f"input channel s of the feature layer {layer} ÷ α_s, the layers making "
        "it × α_s",
        feature_inputs=True,
    )
    return check.candidate(rep, lambda: scale_channels(model, plan, alphas))


def _structural(
    model: nn.Module,
    kind: str,
    sites: list[Site],
    skipped: list[str],
    layer: str,
    gen: torch.Generator,
    alpha_range: tuple[float, float],
    check: _Check,
) -> _Candidate:
    """Draw the factors, screen each site, keep those that preserve the function."""
    if not sites:
        why = (
            f"no exact rescaling exists: the activation of each of the {len(skipped)} "
            "candidate block(s) is not positively homogeneous (see the sites left out)"
        )
        return _Candidate(Reparameterization(kind, refused=why, refused_sites=skipped), _unbuilt)
    low, high = alpha_range
    factors = [log_uniform(gen, s.size, low=low, high=high) if s.size else None for s in sites]
    keep, refused_sites = check.screen(sites, factors)
    refused_sites = skipped + refused_sites
    if not keep:
        why = f"no candidate site preserves the function ({len(sites)} tried)"
        return _Candidate(
            Reparameterization(kind, refused=why, refused_sites=refused_sites), _unbuilt
        )
    chosen = [(sites[i], factors[i]) for i in keep]

    def build() -> nn.Module:
        new, mods = copy_model(model)
        for site, f in chosen:
            apply_site(mods, site, f)
        return new

    rep = Reparameterization(
        kind,
        pairs=[(" + ".join(s.producers), " + ".join(s.consumers)) for s, _ in chosen],
        alphas=[float(a) for _, f in chosen if f is not None for a in f],
        description=DESCRIPTIONS[kind],
        sites=[s.describe() for s, _ in chosen],
        refused_sites=refused_sites,
        feature_inputs=kind in ("relu_neurons", "batchnorm_channels")
        and any(layer in s.consumers for s, _ in chosen),
    )
    return check.candidate(rep, build)


class _Check:
    """The function check: the original outputs, computed once, against a copy's."""

    def __init__(self, model: nn.Module, batches: Batches) -> None:
        self.model, self.batches = model, batches
        t0 = time.perf_counter()
        with torch.no_grad():
            self.outputs = [call_model(model, x) for x, _ in batches]
        self.seconds = time.perf_counter() - t0
        scale = max(float(o.abs().max()) for o in self.outputs)
        dtype = next(model.parameters()).dtype
        self.tolerance = (1e-4 if dtype != torch.float64 else 1e-9) * max(1.0, scale)
        x = batches.first()[0]
        self.x0 = slice_rows(x, 0, min(SCREEN_ROWS, rows_of(x)))
        self.y0 = self.outputs[0][: rows_of(self.x0)]

    @torch.no_grad()
    def change(self, new: nn.Module) -> float:
        """``max |new(x) − model(x)|`` over all batches."""
        return max(
            float((call_model(new, x) - ref).abs().max())
            for (x, _), ref in zip(self.batches, self.outputs, strict=True)
        )

    @torch.no_grad()
    def screen_change(self, new: nn.Module) -> float:
        return float((call_model(new, self.x0) - self.y0).abs().max())

    def candidate(self, rep: Reparameterization, build: Callable[[], nn.Module]) -> _Candidate:
        """``rep`` with its measured function change, refused above the tolerance."""
        change = self.change(build())
        rep = _with(rep, max_output_change=change, tolerance=self.tolerance)
        if not change <= self.tolerance:
            rep = _with(
                rep,
                refused=f"it changed the outputs by {change:.3g} (tolerance "
                f"{self.tolerance:.3g}): the model has an operation that is not rescaling-"
                "invariant where flatcli expected none",
            )
        return _Candidate(rep, build)

    def screen(
        self, sites: list[Site], factors: list[torch.Tensor | None]
    ) -> tuple[list[int], list[str]]:
        """Indices of the sites that keep the first samples' outputs (all at once when they
        do together; else one by one), and one line per site refused."""
        new, mods = copy_model(self.model)
        for site, f in zip(sites, factors, strict=True):
            apply_site(mods, site, f)
        if self.screen_change(new) <= self.tolerance:
            return list(range(len(sites))), []
        new, mods = copy_model(self.model)
        keep, refused = [], []
        for i, (site, f) in enumerate(zip(sites, factors, strict=True)):
            touched = tuple(dict.fromkeys((site.where, *site.producers, *site.consumers)))
            saved = snapshot(mods, tuple(n for n in touched if n in mods))
            apply_site(mods, site, f)
            change = self.screen_change(new)
            if change <= self.tolerance:
                keep.append(i)
                continue
            restore(mods, saved)
            refused.append(f"{site.describe()}: changed the outputs by {change:.3g}{_hint(site)}")
        return keep, refused


def _hint(site: Site) -> str:
    if site.kind.startswith("attention"):
        return " (the projections are also used outside the attention scores)"
    return (
        f" ({site.where}'s output is also read by an operation that is not a module, "
        "e.g. a residual addition)"
    )


# --------------------------------------------------------------------------- measures


def _row(name: str, a: Estimate, b: Estimate, rtol: float) -> Row:
    diff = abs(b.value - a.value)
    rel = diff / abs(a.value) if a.value != 0 else (0.0 if diff == 0 else math.inf)
    noise = math.hypot(a.stderr or 0.0, b.stderr or 0.0)
    invariant = rel <= rtol or (noise > 0 and diff <= 3 * noise)
    return Row(name, a.value, b.value, rel, invariant)


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


# --------------------------------------------------------------------------- the budget

LANCZOS_ITERATIONS = 40
"""Hessian-vector products a top-eigenvalue run is assumed to take (for the estimate)."""
HUTCHINSON_PROBES = 100
"""Probes a Hutchinson Hessian trace is assumed to take (for the estimate)."""
HVP_PASSES, JVP_PASSES = 2.5, 3.0
"""Cost of a Hessian-vector product and of a forward-mode JVP, in gradient passes."""
GRADIENT_PASSES = 3.0
"""Cost of a forward + backward pass, in forward passes."""


@dataclass(frozen=True)
class MeasurePlan:
    """Which measures an audit computes in each run, and what they are estimated to cost.

    Attributes:
        names: The measures computed in every run.
        skipped: Measures left out, each with why.
        config: The measure options, with ``time_budget`` set to the share of an
            iterative estimator (Hutchinson, Lanczos) per run.
        per_run: Estimated seconds of one run (all ``names`` on one model).
        costs: Estimated seconds per run of each measure beyond the layer measures' pass.
    """

    names: list[str]
    skipped: dict[str, str]
    config: MeasureConfig
    per_run: float
    costs: dict[str, float]


def plan_measures(
    model: nn.Module,
    batches: Batches,
    names: Sequence[str],
    config: MeasureConfig,
    *,
    runs: int,
    optional: Sequence[str] = (),
    time_budget: float | None = None,
    forward: float | None = None,
) -> MeasurePlan:
    """Estimate each measure's seconds per run from the time of a forward pass over the
    data (``forward``, measured when None; a gradient pass counts as
    :data:`GRADIENT_PASSES` of them), and keep the ``optional`` measures that fit
    ``time_budget`` over ``runs`` runs (cheapest first). Measures that cost nothing of their
    own (norms, the layer measures' shared pass) are always kept.

    The layer measures (κ, κ̃, Tr H of the layer, ‖W‖²) are always kept: they are what
    the audit is about. An iterative estimator that is kept gets an equal share of what
    the others leave, per run, as its own time budget (it stops there with the standard
    error or residual it reached).
    """
    forward = forward_seconds(model, batches) if forward is None else forward
    gradient = GRADIENT_PASSES * forward
    costs = {n: _cost(n, forward, gradient, config) for n in names}
    layer_cost = 2 * forward if any(n in GROUPS["layer"][1] for n in names) else 0.0
    kept = [n for n in names if n not in optional or n in GROUPS["layer"][1]]
    skipped: dict[str, str] = {}
    left = math.inf if time_budget is None else time_budget
    left -= runs * (layer_cost + sum(costs[n] for n in kept))
    for name in sorted((n for n in names if n not in kept), key=lambda n: costs[n]):
        need = runs * costs[name]
        if need == 0 or need <= left:
            kept.append(name)
            left -= need
        else:
            skipped[name] = (
                f"estimated {format_seconds(costs[name])} per run × {runs} runs "
                f"({format_seconds(need)}) does not fit the time budget "
                f"({format_seconds(max(left, 0.0))} left); name it in --measures to compute "
                "it anyway"
            )
    kept = [n for n in names if n in kept]
    iterative = [n for n in kept if n in GROUPS["hessian"][1]]
    share = None
    if time_budget is not None and iterative:
        fixed = layer_cost + sum(costs[n] for n in kept if n not in iterative)
        share = max(1.0, (time_budget / runs - fixed) / len(iterative))
    per_run = layer_cost + sum(
        min(costs[n], share) if share and n in iterative else costs[n] for n in kept
    )
    return MeasurePlan(kept, skipped, replace(config, time_budget=share), per_run, costs)


@torch.no_grad()
def forward_seconds(model: nn.Module, batches: Batches) -> float:
    """Seconds of one forward pass over all the data (no grad)."""
    from .measures.params import evaluating

    with evaluating(model):
        t0 = time.perf_counter()
        for x, _ in batches:
            call_model(model, x)
        return time.perf_counter() - t0


def _cost(name: str, forward: float, gradient: float, config: MeasureConfig) -> float:
    """Estimated seconds per run of one measure beyond the shared layer pass."""
    if name == "fisher_rao":
        return JVP_PASSES * gradient
    if name == "hessian_trace":
        return HVP_PASSES * gradient * min(config.max_probes, HUTCHINSON_PROBES)
    if name == "hessian_top_eigenvalue":
        return HVP_PASSES * gradient * LANCZOS_ITERATIONS
    if name in ("pacbayes_flatness", "pacbayes_bound", "pacbayes_mag_flatness"):
        return forward * config.mc_samples * config.search_depth
    if name in ("sharpness", "mag_sharpness"):
        return gradient * config.search_depth * 20
    if name == "bound_estimate":
        return 2 * forward
    return 0.0


class _Eta:
    """Time left: the estimate per run until the original model's run has been timed."""

    def __init__(self, per_run: float, runs: int) -> None:
        self.per_run, self.runs = per_run, runs
        self.run, self.started = 0, time.monotonic()

    def begin(self, run: int) -> None:
        self.run, self.started = run, time.monotonic()

    def end(self) -> None:
        if self.run == 0:
            self.per_run = time.monotonic() - self.started

    def eta(self) -> float:
        inside = time.monotonic() - self.started
        return max(0.0, self.per_run - inside) + self.per_run * (self.runs - self.run - 1)

    def wrap(self, note: Callable[[str], None], run: int, label: str) -> Callable[[str], None]:
        prefix = f"run {run + 1}/{self.runs}, {label}"
        return lambda msg: note(f"{prefix}: {msg} · ETA {format_seconds(self.eta())}")


# --------------------------------------------------------------------------- Theorem 4

KAPPA_TILDE = "relative_flatness_normalized"


def _theorem4(
    reps: list[Reparameterization],
    original: dict[str, Estimate],
    config: MeasureConfig,
    model: nn.Module,
) -> list[str]:
    """Where κ̃'s invariance (Theorem 4) was shown, and where its conditions fail here."""
    layer = config.layer
    lines = []
    module = dict(model.named_modules()).get(layer)
    if module is not None and not isinstance(module, nn.Linear):
        lines.append(
            f"the feature layer {layer} is a {type(module).__name__}, not nn.Linear: the theorem "
            "is stated for a fully connected layer's input features"
        )
    applied = [r for r in reps if r.refused is None]
    feature = [r for r in applied if r.feature_inputs]
    est = original.get(KAPPA_TILDE)
    unscaled_dead = bool(
        est is not None
        and est.details.get("dead_units")
        and est.details.get("dead_unit_handling") == "unscaled"
    )
    if not feature:
        why = next((r.refused for r in reps if r.kind == "neuronwise" and r.refused), None)
        lines.append(
            f"its reparameterization (a neuron-wise rescaling of {layer}'s input) was not "
            f"applied{': ' + why if why else ''}. κ̃ is only checked against "
            f"reparameterizations that leave {layer} and its input unchanged"
        )
    elif original and KAPPA_TILDE not in original:
        lines.append(f"add --normalize to see {KAPPA_TILDE} (κ̃) beside κ")
    for rep in applied:
        rows = {row.measure: row for row in rep.rows}
        row, kappa = rows.get(KAPPA_TILDE), rows.get("relative_flatness")
        if row is None:
            continue
        moved = "" if kappa is None else f"κ changed by {kappa.relative_change:.2g}, "
        if rep.feature_inputs and row.invariant:
            lines.append(
                f"holds under {rep.kind}: {moved}κ̃ by {row.relative_change:.2g} (invariant)"
            )
        elif not row.invariant:
            lines.append(
                f"κ̃ moved under {rep.kind} (relative change {row.relative_change:.2g}): "
                + (
                    "dead feature units are left unscaled (--dead-units unscaled)"
                    if unscaled_dead
                    else f"it changes {layer}'s input by more than a per-neuron scale "
                    "(Theorem 4's normalization divides by σ; it does not remove shifts)"
                    if not rep.feature_inputs
                    else "the feature statistics are too close to rounding to normalize by"
                )
            )
    if next(model.parameters()).dtype != torch.float64 and applied:
        lines.append(
            "not float64: relative changes near the float rounding (about 1e-6 for float32) "
            "are not the measure's"
        )
    return lines
