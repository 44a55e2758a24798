"""The named measures ``flatcli measure --measures`` chooses from.

Each measure belongs to a *group*: one function that computes several related measures
in shared passes over the data (all layer-wise quantities come from one set of passes).
:func:`run_measures` runs each needed group once and returns the requested names in
order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .data import Batches
from .errors import FlatcliError, UsageError
from .measures.estimate import Estimate
from .options import MeasureOptions


@dataclass(frozen=True, kw_only=True)
class MeasureConfig(MeasureOptions):
    """Every option a measure may read. Part of the cache key of ``correlate``.

    Attributes:
        layer: Feature layer name.
        loss: ``cross_entropy`` or ``mse``.
        init: sha256 of the initial checkpoint (``--init``), or None.
        Others: see :class:`MeasureOptions`.
    """

    layer: str
    loss: str = "cross_entropy"
    init: str | None = None

    @classmethod
    def of(
        cls, options: MeasureOptions, *, layer: str, loss: str, init: str | None = None
    ) -> MeasureConfig:
        """``options`` for one model's ``layer`` and ``loss``."""
        return cls(layer=layer, loss=loss, init=init, **asdict(options))


@dataclass(frozen=True)
class Inputs:
    """What some measures need besides the model and the data.

    Attributes:
        input_shape: Shape of one input sample (``path_norm``).
        init_model: The network at initialization (``distance_from_init``, and the
            distance form of ``pacbayes_bound``).
        clock: The run's time budget, shared by its iterative measures (set by
            :func:`run_measures` from ``time_budget`` when None).
    """

    input_shape: tuple[int, ...] | None = None
    init_model: nn.Module | None = None
    clock: Any = None

    @classmethod
    def of(cls, batches: Batches, init_model: nn.Module | None = None) -> Inputs:
        """The input shape read off the data's first batch, and ``init_model``.

        Named inputs (a dict batch: token ids, masks) have no single input shape.
        """
        x = batches.first()[0]
        shape = None if isinstance(x, Mapping) else tuple(x.shape[1:])
        return cls(input_shape=shape, init_model=init_model)


Note = Callable[[str], None]
Group = Callable[
    [nn.Module, Batches, MeasureConfig, Sequence[str], Note, Inputs], Mapping[str, Estimate]
]


def _layer_group(
    model: nn.Module,
    batches: Batches,
    config: MeasureConfig,
    names: Sequence[str],
    note: Note,
    inputs: Inputs,
) -> Mapping[str, Estimate]:
    from .measures.relative_flatness import layer_measures

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
        l2=config.l2,
        progress=note,
        max_memory=config.max_memory,
        trace_method=config.trace_method,
    )


def _hessian_group(
    model: nn.Module,
    batches: Batches,
    config: MeasureConfig,
    names: Sequence[str],
    note: Note,
    inputs: Inputs,
) -> Mapping[str, Estimate]:
    from .measures.hessian import hessian_top_eigenvalue, hessian_trace

    params = _trace_spec(config)
    out = {}
    if "hessian_trace" in names:
        note(f"Hessian trace over {params} parameters")
        out["hessian_trace"] = hessian_trace(
            model,
            batches,
            loss=config.loss,
            params=params,
            method=config.method,
            trace_method=config.trace_method,
            rtol=config.rtol,
            max_probes=config.max_probes,
            probe_batch=config.probe_batch,
            max_memory=config.max_memory,
            time_budget=inputs.clock or config.time_budget,
            seed=config.seed,
            progress=note,
        )
    if "hessian_top_eigenvalue" in names:
        note(f"top Hessian eigenvalue over {params} parameters")
        out["hessian_top_eigenvalue"] = hessian_top_eigenvalue(
            model,
            batches,
            loss=config.loss,
            params=params,
            probe_batch=config.probe_batch,
            max_memory=config.max_memory,
            time_budget=inputs.clock or config.time_budget,
            seed=config.seed,
            progress=note,
        )
    return out


def _fisher_rao_group(
    model: nn.Module,
    batches: Batches,
    config: MeasureConfig,
    names: Sequence[str],
    note: Note,
    inputs: Inputs,
) -> Mapping[str, Estimate]:
    from .measures.fisher_rao import fisher_rao

    note("Fisher-Rao norm (forward-mode JVP)")
    return {
        "fisher_rao": fisher_rao(
            model,
            batches,
            loss=config.loss,
            include_bias=config.fr_include_bias,
            max_memory=config.max_memory,
            labels=config.fr_labels,
        )
    }


def _pacbayes_group(
    model: nn.Module,
    batches: Batches,
    config: MeasureConfig,
    names: Sequence[str],
    note: Note,
    inputs: Inputs,
) -> Mapping[str, Estimate]:
    from .measures.pac_bayes import bound_estimate, flatness_estimate, pacbayes_sigma

    def search(magnitude_aware: bool) -> Any:
        return pacbayes_sigma(
            model,
            batches,
            loss=config.loss,
            magnitude_aware=magnitude_aware,
            target=config.pacbayes_target,  # type: ignore[arg-type]
            threshold=config.pacbayes_threshold,
            mc_samples=config.mc_samples,
            search_depth=config.search_depth,
            seed=config.seed,
            max_memory=config.max_memory,
            progress=note,
            time_budget=inputs.clock or config.time_budget,
        )

    mc, depth = config.mc_samples, config.search_depth
    out = {}
    if "pacbayes_flatness" in names or "pacbayes_bound" in names:
        isotropic = search(False)  # one search serves the flatness and the bound
        if "pacbayes_flatness" in names:
            out["pacbayes_flatness"] = flatness_estimate(isotropic, mc, depth)
        if "pacbayes_bound" in names:
            out["pacbayes_bound"] = bound_estimate(isotropic, model, inputs.init_model, mc, depth)
    if "pacbayes_mag_flatness" in names:
        out["pacbayes_mag_flatness"] = flatness_estimate(search(True), mc, depth)
    return out


def _sharpness_group(
    model: nn.Module,
    batches: Batches,
    config: MeasureConfig,
    names: Sequence[str],
    note: Note,
    inputs: Inputs,
) -> Mapping[str, Estimate]:
    from .measures.sharpness import sharpness

    out = {}
    for name, magnitude_aware in (("sharpness", False), ("mag_sharpness", True)):
        if name in names:
            out[name] = sharpness(
                model,
                batches,
                loss=config.loss,
                magnitude_aware=magnitude_aware,
                target=config.pacbayes_target,  # type: ignore[arg-type]
                threshold=config.pacbayes_threshold,
                search_depth=config.search_depth,
                seed=config.seed,
                max_memory=config.max_memory,
                progress=note,
                time_budget=inputs.clock or config.time_budget,
            )
    return out


def _norms_group(
    model: nn.Module,
    batches: Batches,
    config: MeasureConfig,
    names: Sequence[str],
    note: Note,
    inputs: Inputs,
) -> Mapping[str, Estimate]:
    from .measures import norms

    out = {}
    if "frobenius_norms" in names:
        out["frobenius_norms"] = norms.frobenius_norms(model)
    if "spectral_norms" in names:
        out["spectral_norms"] = norms.spectral_norms(model)
    if "path_norm" in names:  # check() made sure the inputs are there
        out["path_norm"] = norms.path_norm(model, inputs.input_shape)  # type: ignore[arg-type]
    if "distance_from_init" in names:
        out["distance_from_init"] = norms.distance_from_init(model, inputs.init_model)  # type: ignore[arg-type]
    return out


def _bound_group(
    model: nn.Module,
    batches: Batches,
    config: MeasureConfig,
    names: Sequence[str],
    note: Note,
    inputs: Inputs,
) -> Mapping[str, Estimate]:
    from .bound import bound_terms

    note("Theorem 6 terms (KDE representativeness + κ)")
    terms = bound_terms(
        model, config.layer, batches, loss=config.loss, seed=config.seed, progress=note
    )
    return {"bound_estimate": terms.as_estimate()}


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
    "hessian": (_hessian_group, ("hessian_trace", "hessian_top_eigenvalue")),
    "fisher_rao": (_fisher_rao_group, ("fisher_rao",)),
    "pacbayes": (
        _pacbayes_group,
        ("pacbayes_flatness", "pacbayes_mag_flatness", "pacbayes_bound"),
    ),
    "sharpness": (_sharpness_group, ("sharpness", "mag_sharpness")),
    "norms": (
        _norms_group,
        ("frobenius_norms", "spectral_norms", "path_norm", "distance_from_init"),
    ),
    "bound": (_bound_group, ("bound_estimate",)),
}
"""Group name -> (function, the measure names it produces)."""

DEFAULT = (
    "relative_flatness",
    "layerwise_flatness",
    "layer_hessian_trace",
    "weight_norm",
    "hessian_trace",
    "fisher_rao",
    "pacbayes_flatness",
    "frobenius_norms",
    "train_loss",
    "train_accuracy",
)
"""What ``flatcli measure`` computes without ``--measures`` (seconds on the sample model)."""

AUDIT_DEFAULT = (
    "relative_flatness",
    "layerwise_flatness",
    "layer_hessian_trace",
    "weight_norm",
    "hessian_top_eigenvalue",
    "fisher_rao",
    "frobenius_norms",
    "path_norm",
)
"""What ``flatcli audit`` compares without ``--measures``: the invariance table's rows, exact,
so that "invariant" is decided by the arithmetic and not by an estimate's noise."""

NEEDS_INIT = ("distance_from_init",)
"""Measures that exist only with an initial checkpoint; ``all`` leaves them out without one."""

OPTIONAL = ("bound_estimate",)
"""Measures only computed when named: ``all`` leaves them out (an approximation, not a
measure of the model alone, and defined for ``nn.Linear`` feature layers only)."""


def available() -> list[str]:
    """Every measure name, in display order."""
    return [name for _, names in GROUPS.values() for name in names]


def select(
    spec: str | None,
    *,
    normalize: bool = False,
    has_init: bool = False,
    default: Sequence[str] = DEFAULT,
) -> list[str]:
    """Measure names from ``--measures`` (comma list, ``all`` or None for the default).

    ``all`` leaves out the :data:`OPTIONAL` measures, and includes ``distance_from_init``
    only when ``has_init`` (an ``--init``
    checkpoint was given); naming it without one is an error when it is computed.
    """
    names = available()
    if spec is None or spec == "default":
        chosen = list(default)
    elif spec == "all":
        chosen = [
            n for n in names if (has_init or n not in NEEDS_INIT) and n not in OPTIONAL
        ]
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
    inputs: Inputs | None = None,
    done: Callable[[str], None] | None = None,
    keep_going: bool = False,
) -> dict[str, Estimate]:
    """Compute ``names`` on ``model`` over ``batches``, each group once.

    Args:
        model: The network.
        batches: The data.
        names: Measure names (from :func:`select`).
        config: The options.
        note: Called with a line of text saying what is being computed.
        inputs: Input shape and initial model, for the measures that need them.
        done: Called with a group's name when it has finished (for a progress bar).
        keep_going: When a group fails, record its measures as failed rows (see
            :func:`failed`) and go on with the others; on KeyboardInterrupt, record the
            unfinished ones as interrupted and return what was computed. Otherwise an
            error propagates. A :class:`~flatcli.errors.UsageError` (a bad option or
            name) always propagates.

    Curvature measures of a cross-entropy model whose softmax is saturated on every
    sample get a warning (see :func:`flatcli.measures.params.saturation_warning`).
    """
    from dataclasses import replace

    from .measures.budget import Stopwatch

    note = note or (lambda _msg: None)
    inputs = inputs or Inputs()
    if inputs.clock is None:  # one budget for the whole run, not one per measure
        inputs = replace(inputs, clock=Stopwatch(config.time_budget))
    check(model, names, config, inputs)
    out: dict[str, Estimate] = {}
    interrupted = False
    for group, (fn, produces) in GROUPS.items():
        wanted = [n for n in names if n in produces]
        if not wanted:
            continue
        if interrupted:
            out.update({n: failure("interrupted", interrupted=True) for n in wanted})
            continue
        try:
            results = fn(model, batches, config, wanted, note, inputs)
        except KeyboardInterrupt:
            if not keep_going:
                raise
            interrupted = True
            out.update({n: failure("interrupted", interrupted=True) for n in wanted})
            continue
        except UsageError:
            raise  # a bad option or name: the user's to fix, not a measure's failure
        except Exception as e:  # noqa: BLE001 - reported as the measure's row
            if not keep_going:
                raise
            line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            kind = "" if isinstance(e, FlatcliError) else f"{type(e).__name__}: "
            out.update({n: failure(kind + line) for n in wanted})
        else:
            out.update({k: v for k, v in results.items() if k in wanted})
        if done is not None:
            done(group)
    _flag_saturation(model, batches, config, out)
    return {n: out[n] for n in names if n in out}


def failure(error: str, *, interrupted: bool = False) -> Estimate:
    """The row of a measure that failed (value NaN, ``details["error"]`` its one line)."""
    return Estimate(
        math.nan, None, f"failed: {error}", {"error": error, "interrupted": interrupted}
    )


def failed(est: Estimate) -> bool:
    """Whether ``est`` is a failed (or interrupted) measure's row."""
    return "error" in est.details


def interrupted(results: Mapping[str, Estimate]) -> bool:
    """Whether a run with ``keep_going`` was interrupted."""
    return any(e.details.get("interrupted") for e in results.values())


CURVATURE = (*_LAYER[:4], "fisher_rao")
"""Measures made of loss curvature or gradients (rounding noise under a saturated softmax);
the Hessian group flags itself."""


def _flag_saturation(
    model: nn.Module, batches: Batches, config: MeasureConfig, out: dict[str, Estimate]
) -> None:
    names = [n for n in CURVATURE if n in out and not failed(out[n])]
    if not names:
        return
    import torch

    from .measures.estimate import with_warnings
    from .measures.params import evaluating, saturation_warning

    with evaluating(model), torch.no_grad():
        warning = saturation_warning(model, batches, config.loss)
    if warning is not None:
        for n in names:
            out[n] = with_warnings(out[n], warning)


def check(model: nn.Module, names: Sequence[str], config: MeasureConfig, inputs: Inputs) -> None:
    """Fail before any work when an option cannot apply to ``model``.

    Raises:
        UsageError: An unknown ``trace_params`` name (with close matches), or a measure
            that needs an input shape or initial model that was not given.
    """
    if any(n in names for n in GROUPS["hessian"][1]) and config.trace_params not in ("all",):
        from .measures.params import select_params

        select_params(model, _trace_spec(config))
    if "distance_from_init" in names and inputs.init_model is None:
        raise UsageError("distance_from_init needs --init CHECKPOINT (the initial weights)")
    if "path_norm" in names and inputs.input_shape is None:
        raise UsageError(
            "path_norm needs one input tensor of known shape (flatcli checkpoints record "
            "it); it is not defined for named inputs such as token ids"
        )


def _trace_spec(config: MeasureConfig) -> str:
    """``--trace-params`` as a parameter spec: ``layer`` means the feature layer."""
    return config.layer if config.trace_params == "layer" else config.trace_params


def groups_of(names: Sequence[str]) -> list[str]:
    """The groups that computing ``names`` runs, in order."""
    return [g for g, (_, produces) in GROUPS.items() if any(n in produces for n in names)]
