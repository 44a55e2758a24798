"""The commands as library calls: each loads, computes and returns a typed result.

``flatcli COMMAND --format json`` writes ``result.to_dict()`` of the call of the same
options (see :mod:`flatcli.results`); only the manifest's ``argv`` (the command line, given
by the CLI) tells them apart.

The loading keywords ``**load`` of every call are those of :func:`flatcli.prepare.prepare`:
``data``, ``target``, ``split``, ``max_samples``, ``batch_size``, ``loss``, ``arch``,
``arch_kwargs`` (a mapping), ``trust_code``, ``device`` and ``dtype``.

Progress: ``progress(total)`` (``total`` steps, or None) is a context manager yielding a
callable that takes a message, with an ``advance()`` method; None shows nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from .errors import FlatcliError, ParameterError, UsageError
from .options import AUDIT_TIME_BUDGET, MEASURE_TIME_BUDGET
from .registry import MeasureOptions
from .results import (
    AuditResult,
    BoundResult,
    CorrelateResult,
    MeasureResult,
    RobustnessResult,
)

Progress = Callable[..., contextlib.AbstractContextManager[Any]]

OPTION_NAMES = frozenset(f.name for f in fields(MeasureOptions))
"""The keyword arguments that go into :class:`flatcli.registry.MeasureOptions`."""


class NothingMeasured(FlatcliError):
    """No checkpoint of a ``correlate`` run could be measured; ``skipped`` says why."""

    def __init__(self, skipped: list[dict[str, Any]]) -> None:
        super().__init__("no checkpoint could be measured")
        self.skipped = skipped


class _Silent:
    def __call__(self, msg: str) -> None:
        pass

    def advance(self, *_: Any) -> None:
        pass


@contextlib.contextmanager
def _nothing(total: int | None = None) -> Iterator[_Silent]:
    yield _Silent()


def measure_options(options: MeasureOptions | None = None, **values: Any) -> MeasureOptions:
    """``options`` (default: the defaults) with ``values`` of its fields replaced.

    Raises:
        ParameterError: An unknown option or a value out of range (the error names it).
    """
    unknown = sorted(set(values) - OPTION_NAMES)
    if unknown:
        raise ParameterError(unknown[0], "is not an option of the measures")
    return replace(options or MeasureOptions(), **values).checked()


def _split(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kwargs`` as (measure options, loading keywords)."""
    options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
    return options, {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}


def _checkpoint(prep: Any) -> dict[str, str]:
    return {"path": str(prep.checkpoint.path), "sha256": prep.checkpoint.sha256}


def _setup(
    checkpoint: str | Path,
    options: MeasureOptions,
    *,
    layer: str | None,
    init: str | Path | None,
    **load: Any,
) -> tuple[Any, ...]:
    """Load the checkpoint and data; resolve the layer, the ``init`` model and the config.

    Returns:
        ``(prep, layer_name, layer_module, config, inputs)``.
    """
    from . import registry
    from .checkpoints import load_checkpoint
    from .features import default_layer, find_layer
    from .prepare import prepare

    prep = prepare(checkpoint, layer=layer, **load)
    layer_name = layer or default_layer(prep.model)
    module = find_layer(prep.model, layer_name)
    init_model, init_sha = None, None
    if init is not None:
        ck = load_checkpoint(
            init,
            arch=load.get("arch"),
            arch_kwargs=load.get("arch_kwargs"),
            trust_code=load.get("trust_code", False),
        )
        p = next(prep.model.parameters())
        init_model, init_sha = ck.model.to(device=p.device, dtype=p.dtype), ck.sha256
    config = registry.MeasureConfig.of(options, layer=layer_name, loss=prep.loss, init=init_sha)
    return prep, layer_name, module, config, registry.Inputs.of(prep.batches, init_model)


def measure(
    checkpoint: str | Path,
    *,
    layer: str | None = None,
    measures: str | Sequence[str] | None = None,
    normalize: bool = False,
    init: str | Path | None = None,
    threads: int | None = None,
    options: MeasureOptions | None = None,
    argv: list[str] | None = None,
    progress: Progress | None = None,
    **kwargs: Any,
) -> MeasureResult:
    """Relative flatness and the other measures of one checkpoint, on its training data.

    Args:
        checkpoint: A checkpoint file or Hugging Face folder.
        layer: The feature layer (default: the last ``nn.Linear``).
        measures: Comma-separated names or a list, ``all`` or None (the default set).
        normalize: Add ``relative_flatness_normalized``.
        init: The checkpoint at initialization (``distance_from_init``).
        threads: CPU threads (default: :func:`flatcli.runtime.default_threads`).
        options: Measure options; ``kwargs`` named after its fields replace them.
        argv: The command line, for the manifest (the CLI gives it).
        progress: See the module docstring.
        **kwargs: Fields of :class:`flatcli.registry.MeasureOptions` (``probes=16``,
            ``seed=1``, ...) and the loading keywords of the module docstring.

    Returns:
        A :class:`MeasureResult`; a measure that failed is a row with its error (under
        ``torchrun`` a failure stops the job instead).
    """
    from . import distributed, registry
    from .runtime import manifest, set_threads

    values, load = _split(kwargs)
    if options is None:
        values = {"time_budget": MEASURE_TIME_BUDGET, **values}
    opts = measure_options(options, **values)
    if not isinstance(measures, str) and measures is not None:
        measures = ",".join(measures)
    names = registry.select(measures, normalize=normalize, has_init=init is not None)
    prep, layer_name, module, config, inputs = _setup(
        checkpoint, opts, layer=layer, init=init, **load
    )
    n_params = sum(p.numel() for p in prep.model.parameters())
    set_threads(threads, processes=distributed.local_world_size(), params=n_params)
    with (progress or _nothing)(len(registry.groups_of(names))) as status:
        results = registry.run_measures(
            prep.model,
            distributed.shard(prep.batches),
            names,
            config,
            note=status,
            inputs=inputs,
            done=status.advance,
            # under torchrun a rank's failure stops the job (the ranks must stay in step)
            keep_going=not distributed.active(),
        )
    weight = getattr(module, "weight", None)
    extra = {} if argv is None else {"argv": argv}
    return MeasureResult(
        checkpoint=_checkpoint(prep),
        layer={
            "name": layer_name,
            "type": type(module).__name__,
            "shape": list(weight.shape) if weight is not None else None,
        },
        data={
            "source": prep.batches.source,
            "split": load.get("split", "train"),
            "n_samples": prep.batches.n_samples,
        },
        measures=results,
        manifest=manifest(
            device=prep.device,
            dtype=prep.dtype,
            seed=opts.seed,
            **extra,
            **distributed.info(),
        ),
        config=config.as_dict(),
    )


def audit_checkpoint(
    checkpoint: str | Path,
    *,
    layer: str | None = None,
    measures: str | None = None,
    normalize: bool = True,
    init: str | Path | None = None,
    alpha_low: float = 1 / 25,
    alpha_high: float = 25.0,
    tolerance: float = 1e-6,
    threads: int | None = None,
    options: MeasureOptions | None = None,
    argv: list[str] | None = None,
    progress: Progress | None = None,
    **kwargs: Any,
) -> AuditResult:
    """Which measures survive function-preserving reparameterizations of ``checkpoint``?

    Args:
        alpha_low, alpha_high: Range of the log-uniform rescaling factors.
        tolerance: Relative change below which a measure reads invariant.
        (the rest): As for :func:`measure`; ``dtype`` defaults to float64 here, so
            invariance is judged above rounding, and ``time_budget`` (without
            ``options``) to :data:`flatcli.options.AUDIT_TIME_BUDGET` seconds for the
            whole audit: the default measures estimated not to fit it are skipped (and
            said); named ``measures`` are always computed.

    Returns:
        An :class:`AuditResult` (see :func:`flatcli.audit.audit`).
    """
    import math

    from . import registry
    from .audit import audit as run_audit
    from .runtime import manifest, set_threads

    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ParameterError("tolerance", f"must be a finite number ≥ 0, got {tolerance}")
    if not 0 < alpha_low <= alpha_high:
        raise ParameterError("alpha_low", "and alpha_high must satisfy 0 < low <= high")
    values, load = _split({"dtype": "float64", **kwargs})
    if options is None:
        values = {"time_budget": AUDIT_TIME_BUDGET, **values}
    opts = measure_options(options, **values)
    names = registry.select(
        measures, normalize=normalize, has_init=init is not None, default=registry.AUDIT_DEFAULT
    )
    defaults = measures in (None, "default")
    prep, layer_name, _, config, inputs = _setup(checkpoint, opts, layer=layer, init=init, **load)
    set_threads(threads, params=sum(p.numel() for p in prep.model.parameters()))
    if defaults and inputs.input_shape is None:
        names = [n for n in names if n != "path_norm"]  # named inputs (token ids): undefined
    with (progress or _nothing)() as note:
        run = run_audit(
            prep.model,
            prep.batches,
            names,
            config,
            seed=opts.seed,
            alpha_range=(alpha_low, alpha_high),
            rtol=tolerance,
            note=note,
            inputs=inputs,
            time_budget=opts.time_budget,
            optional=names if defaults else (),
        )
    extra = {} if argv is None else {"argv": argv}
    return AuditResult(
        checkpoint=_checkpoint(prep),
        layer={"name": layer_name},
        data={
            "source": prep.batches.source,
            "split": load.get("split", "train"),
            "n_samples": prep.batches.n_samples,
        },
        measures=run.measures,
        reparameterizations=run.reparameterizations,
        skipped=run.skipped,
        theorem4=run.theorem4,
        manifest=manifest(device=prep.device, dtype=prep.dtype, seed=opts.seed, **extra),
        config=config.as_dict(),
        tolerance=tolerance,
        alpha_range=(alpha_low, alpha_high),
        time_budget=opts.time_budget,
        max_memory=opts.max_memory,
        seconds=run.seconds,
    )


def check_robustness(
    checkpoint: str | Path,
    *,
    layer: str | None = None,
    deltas: Sequence[float] = (0.01, 0.03, 0.1, 0.3),
    probes: int = 64,
    label_change: bool = False,
    seed: int = 0,
    time_budget: float | None = None,
    progress: Progress | None = None,
    **load: Any,
) -> RobustnessResult:
    """Feature robustness E_F(δ) of ``checkpoint`` beside Theorem 5's δ²κ/(2m).

    See :func:`flatcli.robustness.feature_robustness` for ``deltas``, ``probes``,
    ``label_change``, ``seed`` and ``time_budget`` (seconds; None or 0 for no limit);
    ``load`` as in the module docstring.
    """
    from .prepare import prepare
    from .robustness import feature_robustness
    from .runtime import manifest

    prep = prepare(checkpoint, layer=layer, **load)
    with (progress or _nothing)() as status:
        result = feature_robustness(
            prep.model,
            layer,
            prep.batches,
            list(deltas),
            loss=prep.loss,
            probes=probes,
            time_budget=time_budget or None,
            seed=seed,
            label_change=label_change,
            progress=status,
        )
    split = load.get("split", "train")
    return RobustnessResult(
        checkpoint=_checkpoint(prep),
        data={"source": prep.batches.source, "split": split, "n_samples": result.n},
        loss=prep.loss,
        robustness=result,
        manifest=manifest(device=prep.device, dtype=prep.dtype, seed=seed),
    )


def estimate_bound(
    checkpoint: str | Path,
    *,
    layer: str | None = None,
    splits: int = 10,
    draws: int = 8,
    bandwidth: float | None = None,
    probes: int = 32,
    seed: int = 0,
    progress: Progress | None = None,
    **load: Any,
) -> BoundResult:
    """Theorem 6's terms of ``checkpoint`` on its training split, and the actual gap.

    See :func:`flatcli.bound.bound_terms` for ``splits``, ``draws``, ``bandwidth``, ``seed``
    and ``probes`` (its ``robustness_probes``); ``load`` as in the module docstring (the
    split is always ``train``; the test split, when the data has one, gives the gap).
    """
    from .bound import bound_terms
    from .prepare import prepare
    from .runtime import manifest

    prep = prepare(checkpoint, layer=layer, split="train", **load)
    test = prep.split("test") if prep.has_split("test") else None
    with (progress or _nothing)() as status:
        terms = bound_terms(
            prep.model,
            layer,
            prep.batches,
            test_data=test,
            loss=prep.loss,
            splits=splits,
            draws=draws,
            bandwidth=bandwidth,
            seed=seed,
            robustness_probes=probes,
            progress=status,
        )
    return BoundResult(
        checkpoint=_checkpoint(prep),
        data={"source": prep.batches.source, "n_train": terms.n, "has_test": test is not None},
        loss=prep.loss,
        terms=terms,
        manifest=manifest(device=prep.device, dtype=prep.dtype, seed=seed),
    )


def default_correlate_measures() -> tuple[str, ...]:
    """The measures ``correlate`` computes by default (those this install has)."""
    from .correlate import DEFAULT_MEASURES
    from .registry import available

    names = set(available())
    return tuple(m for m in DEFAULT_MEASURES if m in names)


def correlate_checkpoints(
    checkpoints: Sequence[str | Path],
    *,
    measures: str | None = None,
    layer: str | None = None,
    hparams: str | Path | None = None,
    bootstrap: int = 1000,
    jobs: int = 1,
    cache_dir: str | Path = ".flatcli-cache",
    threads: int | None = None,
    options: MeasureOptions | None = None,
    argv: list[str] | None = None,
    on_result: Callable[[str, str], None] | None = None,
    **kwargs: Any,
) -> CorrelateResult | None:
    """Which measure predicts the generalization gap across ``checkpoints``?

    Args:
        checkpoints: Checkpoint files or Hugging Face folders.
        measures: Comma-separated names (default: :func:`default_correlate_measures`).
        hparams: CSV of hyperparameters with a ``checkpoint`` column (default: each
            checkpoint's metadata); ``arch.<kwarg>`` columns give its ``arch_kwargs``.
        bootstrap: Resamples of the 95% confidence intervals.
        jobs: Worker processes; ``threads``: intra-op threads of each.
        cache_dir: Per-checkpoint results (a rerun recomputes only what is missing).
        on_result: Called with ``(checkpoint, status)`` as each checkpoint finishes.
        (the rest): As for :func:`measure` (``device`` defaults to ``cpu`` here).

    Returns:
        The :class:`CorrelateResult`; None on ranks other than 0 under ``torchrun``
        (rank 0 gathers every row).
    """
    from . import distributed
    from .correlate import CorrelateConfig, arch_kwargs_table, measure_checkpoints, results_table
    from .registry import select
    from .runtime import manifest, resolve_device, resolve_dtype, set_threads

    chosen = select(measures) if measures else list(default_correlate_measures())
    if "distance_from_init" in chosen:
        raise UsageError("correlate cannot compute distance_from_init (no --init per checkpoint)")
    values, load = _split({"device": "cpu", **kwargs})
    if options is None:
        values = {"time_budget": MEASURE_TIME_BUDGET, **values}
    opts = measure_options(options, **values)
    resolve_device(load["device"])
    resolve_dtype(load.get("dtype", "float32"))
    if jobs < 1:
        raise ParameterError("jobs", f"must be at least 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ParameterError("threads", f"must be at least 1, got {threads}")
    if jobs == 1:
        set_threads(threads, processes=distributed.local_world_size())
    config = CorrelateConfig(measures=tuple(chosen), layer=layer, options=opts, **load)
    per_checkpoint = arch_kwargs_table(hparams) if hparams is not None else None
    run = measure_checkpoints(
        checkpoints,
        config,
        cache_dir=cache_dir,
        jobs=jobs,
        threads=threads,
        on_result=on_result,
        arch_kwargs_for=per_checkpoint,
    )
    if not distributed.is_main():
        return None
    df = results_table(run, hparams_csv=hparams)
    if df.empty:
        raise NothingMeasured(run.skipped)
    extra = {} if argv is None else {"argv": argv}
    run_manifest = manifest(
        device=load["device"],
        dtype=load.get("dtype", "float32"),
        seed=opts.seed,
        config_key=config.key(),
        data_sha256=run.data_sha256,
        **extra,
        **distributed.info(),
    )
    return correlation_result(
        df, chosen, bootstrap=bootstrap, seed=opts.seed, manifest=run_manifest, run=run
    )


def correlation_result(
    df: Any,
    measures: Sequence[str],
    *,
    bootstrap: int,
    seed: int,
    manifest: dict[str, Any],
    run: Any = None,
    source: str | None = None,
    color_by: str | None = None,
    log_x: bool = False,
) -> CorrelateResult:
    """The correlations of the per-checkpoint table ``df`` (``correlate``'s rows, or a CSV
    that ``correlate --output`` wrote: ``source``), as a :class:`CorrelateResult`."""
    from .correlate import analyse

    present = [m for m in measures if m in df.columns]
    analysis = analyse(df, measures=present, bootstrap=bootstrap, seed=seed)
    return CorrelateResult(
        checkpoints=df,
        analysis=analysis,
        skipped=run.skipped if run is not None else [],
        computed=run.computed if run is not None else 0,
        source=source,
        manifest=manifest,
        color_by=color_by,
        log_x=log_x,
        measures=tuple(present),
    )
