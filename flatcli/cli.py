"""The ``flatcli`` command line: parse, call the library, render. Nothing else lives here.

Errors a user causes are :class:`~flatcli.errors.FlatcliError`; every command turns them
into one line on stderr and exit code 1 (runtime) or 2 (usage). Data goes to stdout,
progress and logs to stderr.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from .errors import FlatcliError, UsageError

app = typer.Typer(
    name="flatcli",
    help="How flat is a trained PyTorch model's minimum? Relative flatness (Petzka et al. 2021),"
    " the classic alternatives, their correlation with generalization, and FAM fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)

F = TypeVar("F", bound=Callable[..., Any])

# --------------------------------------------------------------------------- shared options

Checkpoint = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: .safetensors, .pt/.pth/.bin "
        "state dict (or, with --trust-code, a pickled "
        "module, TorchScript, .pt2).",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Builds the model: package.module:callable or path/file.py:callable "
        "(default: the checkpoint's metadata).",
    ),
]
ArchKwargsOpt = Annotated[
    str | None, typer.Option("--arch-kwargs", help="JSON object of keyword arguments for --arch.")
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Allow formats whose loading runs code from the file (pickled modules,"
        " TorchScript, .pt2) and architectures named by the file. Only for files you trust.",
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Data: .npz/.pt with x, y (x_test, y_test), .csv with --target, or a bundled"
        " name (digits). Default: the checkpoint's metadata.",
    ),
]
TargetOpt = Annotated[str | None, typer.Option("--target", help="Label column of a CSV file.")]
SplitOpt = Annotated[str, typer.Option("--split", help="train or test.")]
MaxSamplesOpt = Annotated[
    int | None, typer.Option("--max-samples", help="Use only the first N samples.")
]
BatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size", help="Samples per batch (memory only; results do not depend on it)."
    ),
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help="Feature layer, a name from model.named_modules() (default: the last nn.Linear).",
    ),
]
LossOpt = Annotated[
    str | None,
    typer.Option(
        "--loss",
        help="cross_entropy or mse (default: the checkpoint's metadata, else cross_entropy).",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 or float64.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random estimate.")]
DeadUnitsOpt = Annotated[
    str,
    typer.Option(
        "--dead-units",
        help="Theorem 4 normalization of units with zero std: unscaled (MATH.md §4) "
        "or drop (pseudo-inverse: exactly invariant to rescaling dead units).",
    ),
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="auto, exact or hutchinson: relative flatness (auto: exact for nn.Linear; "
        "hutchinson: Identity 1, any layer incl. Conv2d) and the Hessian trace (auto: exact "
        "up to 2,000 parameters).",
    ),
]
ProbesOpt = Annotated[
    int, typer.Option("--probes", help="Hutchinson probes of the layer-wise measures.")
]
TraceParamsOpt = Annotated[
    str,
    typer.Option(
        "--trace-params",
        help="Parameters of hessian_trace and hessian_top_eigenvalue: all, layer (the "
        "feature layer) or a module/parameter name.",
    ),
]
RtolOpt = Annotated[
    float,
    typer.Option("--rtol", help="Hutchinson Hessian trace: stop at this relative stderr."),
]
MaxProbesOpt = Annotated[
    int, typer.Option("--max-probes", help="Hutchinson Hessian trace: most probes.")
]
FrBiasOpt = Annotated[
    bool, typer.Option("--fr-include-bias", help="Count biases in the Fisher-Rao norm.")
]
PacTargetOpt = Annotated[
    str,
    typer.Option(
        "--pacbayes-target",
        help="PAC-Bayes and sharpness search on the training error or loss increase.",
    ),
]
PacThresholdOpt = Annotated[
    float,
    typer.Option("--pacbayes-threshold", help="Allowed increase τ of PAC-Bayes and sharpness."),
]
McOpt = Annotated[
    int, typer.Option("--mc-samples", help="PAC-Bayes: Monte Carlo draws per bisection step.")
]
DepthOpt = Annotated[
    int, typer.Option("--search-depth", help="PAC-Bayes and sharpness: bisection steps.")
]
InitOpt = Annotated[
    Path | None,
    typer.Option(
        "--init",
        help="Checkpoint at initialization: enables distance_from_init and the "
        "distance form of pacbayes_bound.",
    ),
]
FormatOpt = Annotated[str, typer.Option("--format", help="table, json or csv.")]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Also write the result to this file (atomically)."),
]


def _stderr():  # noqa: ANN202 - rich Console, imported lazily
    from rich.console import Console

    return Console(stderr=True)


def _friendly(fn: F) -> F:
    """Turn user errors into one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import warnings

        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
        try:
            return fn(*args, **kwargs)
        except FlatcliError as e:
            _stderr().print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _stderr().print("interrupted")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as e:  # noqa: BLE001 - last resort: one line, traceback on request
            if os.environ.get("FLATCLI_DEBUG"):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _stderr().print(
                f"[bold red]internal error:[/] {type(e).__name__}: {first} "
                "(set FLATCLI_DEBUG=1 for the traceback)",
                highlight=False,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class _Status:
    """What a long computation is doing, on stderr.

    In a terminal: a rich progress bar over ``total`` steps (or a spinner without one)
    whose description is the latest message. Otherwise (a log file, a pipe): a plain
    ``flatcli: message`` line when the kind of work changes (the text before the first
    colon) or every :attr:`LOG_EVERY` seconds, so logs stay short.
    """

    LOG_EVERY = 10.0

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self.progress, self.task = progress, task
        self.last_kind: str | None = None
        self.last_time = 0.0

    def __call__(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=msg)
            return
        import time

        kind, now = msg.split(":", 1)[0], time.monotonic()
        if kind != self.last_kind or now - self.last_time >= self.LOG_EVERY:
            print(f"flatcli: {msg}", file=sys.stderr)
            self.last_kind, self.last_time = kind, now

    def advance(self, *_: Any) -> None:
        """One step done."""
        if self.progress is not None:
            self.progress.advance(self.task)


@contextmanager
def _progress(total: int | None = None) -> Iterator[_Status]:
    """A :class:`_Status` for the duration of a computation of ``total`` steps."""
    console = _stderr()
    if not console.is_terminal:
        yield _Status()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield _Status(progress, progress.add_task("working", total=total))


def _measure_options(
    *,
    method: str,
    probes: int,
    seed: int,
    dead_units: str,
    trace_params: str,
    rtol: float,
    max_probes: int,
    fr_include_bias: bool,
    pacbayes_target: str,
    pacbayes_threshold: float,
    mc_samples: int,
    search_depth: int,
):  # noqa: ANN202 - a registry.MeasureOptions, imported lazily
    """The measures' options, checked before anything is loaded."""
    from .registry import MeasureOptions

    checks = [
        (
            method in ("auto", "exact", "hutchinson"),
            f"--method must be auto, exact or hutchinson, got {method!r}",
        ),
        (probes >= 1, f"--probes must be at least 1, got {probes}"),
        (
            dead_units in ("unscaled", "drop"),
            f"--dead-units must be unscaled or drop, got {dead_units!r}",
        ),
        (rtol > 0, f"--rtol must be positive, got {rtol}"),
        (max_probes >= 2, f"--max-probes must be at least 2, got {max_probes}"),
        (
            pacbayes_target in ("error", "loss"),
            f"--pacbayes-target must be error or loss, got {pacbayes_target!r}",
        ),
        (
            pacbayes_threshold > 0,
            f"--pacbayes-threshold must be positive, got {pacbayes_threshold}",
        ),
        (mc_samples >= 2, f"--mc-samples must be at least 2, got {mc_samples}"),
        (search_depth >= 1, f"--search-depth must be at least 1, got {search_depth}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return MeasureOptions(
        method=method,
        probes=probes,
        seed=seed,
        dead_units=dead_units,
        trace_params=trace_params,
        rtol=rtol,
        max_probes=max_probes,
        fr_include_bias=fr_include_bias,
        pacbayes_target=pacbayes_target,
        pacbayes_threshold=pacbayes_threshold,
        mc_samples=mc_samples,
        search_depth=search_depth,
    )


def _setup(
    checkpoint: Path,
    options: Any,
    *,
    layer: str | None,
    init: Path | None,
    arch: str | None,
    arch_kwargs: str | None,
    trust_code: bool,
    **prepare_kwargs: Any,
):  # noqa: ANN202
    """Load the checkpoint and data, and resolve the layer, the ``--init`` model and the config.

    Returns:
        ``(prep, layer_name, layer_module, config, inputs)`` for
        :func:`flatcli.registry.run_measures`.
    """
    from . import registry
    from .checkpoints import load_checkpoint
    from .features import default_layer, find_layer
    from .prepare import parse_json_object, prepare

    kwargs = parse_json_object(arch_kwargs, "--arch-kwargs")
    prep = prepare(
        checkpoint, arch=arch, trust_code=trust_code, arch_kwargs=kwargs, **prepare_kwargs
    )
    layer_name = layer or default_layer(prep.model)
    module = find_layer(prep.model, layer_name)
    init_model, init_sha = None, None
    if init is not None:
        ck = load_checkpoint(init, arch=arch, arch_kwargs=kwargs, trust_code=trust_code)
        p = next(prep.model.parameters())
        init_model, init_sha = ck.model.to(device=p.device, dtype=p.dtype), ck.sha256
    config = registry.MeasureConfig.of(options, layer=layer_name, loss=prep.loss, init=init_sha)
    return prep, layer_name, module, config, registry.Inputs.of(prep.batches, init_model)


def _check_format(fmt: str) -> str:
    from .report import FORMATS

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def _emit(text: str, output: Path | None) -> None:
    from .report import write_output

    if output is not None:
        write_output(output, text)
    sys.stdout.write(text)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"flatcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """How flat is a trained PyTorch model's minimum?"""


# --------------------------------------------------------------------------- inspect


@app.command()
@_friendly
def inspect(
    checkpoint: Checkpoint,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_code: TrustOpt = False,
    fmt: FormatOpt = "table",
) -> None:
    """Layers, shapes and parameter counts, and which measures apply to each layer.

    Examples:

        flatcli inspect sample_models/digits_mlp.safetensors

        flatcli inspect model.pt --arch mypkg.nets:make_net --arch-kwargs '{"width": 64}'
    """
    from .checkpoints import load_checkpoint
    from .inspection import describe
    from .prepare import parse_json_object
    from .report import to_json

    fmt = _check_format(fmt)
    ck = load_checkpoint(
        checkpoint,
        arch=arch,
        trust_code=trust_code,
        arch_kwargs=parse_json_object(arch_kwargs, "--arch-kwargs"),
    )
    info = describe(ck)
    if fmt == "json":
        sys.stdout.write(to_json(info))
        return
    if fmt == "csv":
        import pandas as pd

        sys.stdout.write(pd.DataFrame(info["layers"]).to_csv(index=False))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"{ck.path.name} ({info['checkpoint']['format']}, {info['parameters']:,} parameters)",
        title_justify="left",
    )
    for col in ("layer", "type", "weight shape", "parameters", "measures"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for row in info["layers"]:
        name = row["name"] + (" *" if row["name"] == info["default_layer"] else "")
        table.add_row(
            name,
            row["type"],
            str(row["weight_shape"] or ""),
            f"{row['parameters']:,}",
            row["measures"],
        )
    console.print(table)
    console.print(f"* default feature layer: {info['default_layer']}")
    console.print(f"model-wide measures: {info['model_measures']}")
    console.print(f"sha256: {info['checkpoint']['sha256']}")
    for key, value in info["metadata"].items():
        console.print(f"metadata {key}: {value}", highlight=False)


# --------------------------------------------------------------------------- measure


@app.command()
@_friendly
def measure(
    checkpoint: Checkpoint,
    layer: LayerOpt = None,
    measures: Annotated[
        str | None,
        typer.Option(
            "--measures",
            help="Comma-separated measure names, or 'all' (default: relative flatness, "
            "layer-wise flatness, layer Hessian trace, weight norm, Hessian trace, "
            "Fisher-Rao, PAC-Bayes flatness, Frobenius norms, train loss/accuracy).",
        ),
    ] = None,
    method: MethodOpt = "auto",
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize", help="Add relative_flatness_normalized (Theorem 4, std with ddof=0)."
        ),
    ] = False,
    probes: ProbesOpt = 64,
    dead_units: DeadUnitsOpt = "unscaled",
    trace_params: TraceParamsOpt = "all",
    rtol: RtolOpt = 0.01,
    max_probes: MaxProbesOpt = 2000,
    fr_include_bias: FrBiasOpt = False,
    pacbayes_target: PacTargetOpt = "error",
    pacbayes_threshold: PacThresholdOpt = 0.1,
    mc_samples: McOpt = 10,
    search_depth: DepthOpt = 15,
    init: InitOpt = None,
    data: DataOpt = None,
    target: TargetOpt = None,
    split: SplitOpt = "train",
    max_samples: MaxSamplesOpt = None,
    batch_size: BatchOpt = 256,
    loss: LossOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_code: TrustOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
) -> None:
    """Relative flatness and the other measures of one checkpoint, on its training data.

    Examples:

        flatcli measure sample_models/digits_mlp.safetensors

        flatcli measure sample_models/digits_cnn.safetensors --layer conv2 --method hutchinson

        flatcli measure sample_models/digits_mlp.safetensors --measures all

        flatcli measure model.pt --arch mypkg.nets:make_net --layer fc --data data.npz
        --format json --output result.json
    """
    from . import registry
    from .report import measure_report, measures_csv, measures_table, to_json
    from .runtime import manifest

    fmt = _check_format(fmt)
    names = registry.select(measures, normalize=normalize, has_init=init is not None)
    options = _measure_options(
        method=method,
        probes=probes,
        seed=seed,
        dead_units=dead_units,
        trace_params=trace_params,
        rtol=rtol,
        max_probes=max_probes,
        fr_include_bias=fr_include_bias,
        pacbayes_target=pacbayes_target,
        pacbayes_threshold=pacbayes_threshold,
        mc_samples=mc_samples,
        search_depth=search_depth,
    )
    prep, layer_name, module, config, inputs = _setup(
        checkpoint,
        options,
        layer=layer,
        init=init,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_code=trust_code,
        data=data,
        split=split,
        target=target,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        loss=loss,
    )
    with _progress(len(registry.groups_of(names))) as status:
        results = registry.run_measures(
            prep.model, prep.batches, names, config, note=status, inputs=inputs, done=status.advance
        )
    weight = getattr(module, "weight", None)
    report = measure_report(
        checkpoint={"path": str(prep.checkpoint.path), "sha256": prep.checkpoint.sha256},
        layer={
            "name": layer_name,
            "type": type(module).__name__,
            "shape": list(weight.shape) if weight is not None else None,
        },
        data={"source": prep.batches.source, "split": split, "n_samples": prep.batches.n_samples},
        measures=results,
        manifest=manifest(device=prep.device, dtype=prep.dtype, seed=seed),
        config=config.as_dict(),
    )
    if fmt == "json":
        _emit(to_json(report), output)
    elif fmt == "csv":
        text = measures_csv(results)
        if output is not None:
            from .report import write_csv_output

            write_csv_output(output, text, {k: v for k, v in report.items() if k != "measures"})
        sys.stdout.write(text)
    else:
        if output is not None:
            from .report import write_output

            write_output(output, to_json(report))
        from rich.console import Console

        title = (
            f"{prep.checkpoint.path.name} · layer {layer_name} · {prep.batches.source} "
            f"{split} (n={prep.batches.n_samples}) · {prep.loss}"
        )
        Console().print(measures_table(results, title=title))


# --------------------------------------------------------------------------- audit


@app.command()
@_friendly
def audit(
    checkpoint: Checkpoint,
    layer: LayerOpt = None,
    measures: Annotated[
        str | None,
        typer.Option(
            "--measures",
            help="Comma-separated measure names, or 'all' (default: the exact ones: "
            "relative flatness, layer-wise flatness, layer Hessian trace, weight norm, top "
            "Hessian eigenvalue, Fisher-Rao, Frobenius norms, path norm).",
        ),
    ] = None,
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize",
            help="Include relative_flatness_normalized (its neuron-wise row must read invariant).",
        ),
    ] = False,
    method: MethodOpt = "auto",
    probes: ProbesOpt = 64,
    dead_units: DeadUnitsOpt = "unscaled",
    trace_params: TraceParamsOpt = "all",
    rtol: RtolOpt = 0.01,
    max_probes: MaxProbesOpt = 2000,
    fr_include_bias: FrBiasOpt = False,
    pacbayes_target: PacTargetOpt = "error",
    pacbayes_threshold: PacThresholdOpt = 0.1,
    mc_samples: McOpt = 10,
    search_depth: DepthOpt = 15,
    init: InitOpt = None,
    alpha_low: Annotated[
        float, typer.Option("--alpha-low", help="Smallest rescaling factor (log-uniform draws).")
    ] = 1 / 25,
    alpha_high: Annotated[float, typer.Option("--alpha-high", help="Largest factor.")] = 25.0,
    tolerance: Annotated[
        float,
        typer.Option("--tolerance", help="Relative change below which a measure reads invariant."),
    ] = 1e-6,
    data: DataOpt = None,
    target: TargetOpt = None,
    split: SplitOpt = "train",
    max_samples: MaxSamplesOpt = None,
    batch_size: BatchOpt = 256,
    loss: LossOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_code: TrustOpt = False,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="float64 (default, so invariance is judged above rounding) or float32."
        ),
    ] = "float64",
    seed: SeedOpt = 0,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
) -> None:
    """Which measures survive function-preserving reparameterizations?

    Rescales each pair of consecutive layers by a random α (layer-wise) and the neurons
    feeding the feature layer by random α_s (neuron-wise), checks the function is unchanged,
    and recomputes every measure. Activations that are not positively homogeneous (tanh,
    GELU, ...) make a reparameterization refused, not silently wrong.

    Examples:

        flatcli audit sample_models/digits_mlp.safetensors --normalize

        flatcli audit sample_models/digits_mlp.safetensors --layer fc2 --format json
    """
    from . import registry
    from .audit import audit as run_audit
    from .audit import dead_unit_note
    from .report import format_value, to_json
    from .runtime import manifest

    fmt = _check_format(fmt)
    if not 0 < alpha_low <= alpha_high:
        raise UsageError("--alpha-low and --alpha-high must satisfy 0 < low <= high")
    names = registry.select(
        measures, normalize=normalize, has_init=init is not None, default=registry.AUDIT_DEFAULT
    )
    options = _measure_options(
        method=method,
        probes=probes,
        seed=seed,
        dead_units=dead_units,
        trace_params=trace_params,
        rtol=rtol,
        max_probes=max_probes,
        fr_include_bias=fr_include_bias,
        pacbayes_target=pacbayes_target,
        pacbayes_threshold=pacbayes_threshold,
        mc_samples=mc_samples,
        search_depth=search_depth,
    )
    prep, layer_name, _, config, inputs = _setup(
        checkpoint,
        options,
        layer=layer,
        init=init,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_code=trust_code,
        data=data,
        split=split,
        target=target,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        loss=loss,
    )
    with _progress() as note:
        original, reps = run_audit(
            prep.model,
            prep.batches,
            names,
            config,
            seed=seed,
            alpha_range=(alpha_low, alpha_high),
            rtol=tolerance,
            note=note,
            inputs=inputs,
        )
    report = {
        "schema": "flatcli.audit/1",
        "checkpoint": {"path": str(prep.checkpoint.path), "sha256": prep.checkpoint.sha256},
        "layer": {"name": layer_name},
        "data": {
            "source": prep.batches.source,
            "split": split,
            "n_samples": prep.batches.n_samples,
        },
        "measures": {k: v.to_dict() for k, v in original.items()},
        "reparameterizations": [r.to_dict() for r in reps],
        "manifest": manifest(device=prep.device, dtype=prep.dtype, seed=seed),
        "config": config.as_dict(),
    }
    if fmt == "json":
        _emit(to_json(report), output)
        return
    if fmt == "csv":
        import pandas as pd

        rows = [{"reparameterization": r.kind, **row.__dict__} for r in reps for row in r.rows]
        text = pd.DataFrame(rows).to_csv(index=False)
        if output is not None:
            from .report import write_csv_output

            keep = ("schema", "checkpoint", "layer", "data", "manifest", "config")
            write_csv_output(output, text, {k: report[k] for k in keep})
        sys.stdout.write(text)
        return
    if output is not None:
        from .report import write_output

        write_output(output, to_json(report))
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for rep in reps:
        if rep.refused:
            console.print(f"[bold]{rep.kind}[/]: refused: {rep.refused}", highlight=False)
            continue
        pairs = ", ".join(f"{a}→{b}" for a, b in rep.pairs)
        table = Table(
            title=f"{rep.kind} reparameterization ({pairs}; max |Δ output| = "
            f"{rep.max_output_change:.2e})",
            title_justify="left",
        )
        for col in ("measure", "original", "reparameterized", "relative change", "invariant"):
            table.add_column(
                col, justify="left" if col == "measure" else "right", no_wrap=col == "measure"
            )
        for row in rep.rows:
            mark = "[green]yes[/]" if row.invariant else "[red]no[/]"
            table.add_row(
                row.measure,
                format_value(row.original),
                format_value(row.reparameterized),
                f"{row.relative_change:.1e}",
                mark,
            )
        console.print(table)
    explain = dead_unit_note(original, reps)
    if explain:
        console.print(explain, highlight=False)


# --------------------------------------------------------------------------- correlate

PlotsOpt = Annotated[
    Path | None,
    typer.Option(
        "--plots", help="Directory for the figures (PNG and SVG): scatter grids and τ bar charts."
    ),
]
ColorByOpt = Annotated[
    str | None,
    typer.Option("--color-by", help="Hyperparameter that colors the scatter points (e.g. width)."),
]
LogXOpt = Annotated[bool, typer.Option("--log-x", help="Logarithmic measure axes.")]
BootstrapOpt = Annotated[
    int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% confidence intervals.")
]


@app.command()
@_friendly
def correlate(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoints to compare (e.g. runs/*.safetensors).", show_default=False
        ),
    ],
    measures: Annotated[
        str | None,
        typer.Option(
            "--measures",
            help="Comma-separated measures (default: relative_flatness, "
            "relative_flatness_normalized, layer_hessian_trace, fisher_rao, pacbayes_flatness, "
            "weight_norm).",
        ),
    ] = None,
    layer: LayerOpt = None,
    data: DataOpt = None,
    target: TargetOpt = None,
    max_samples: MaxSamplesOpt = None,
    batch_size: BatchOpt = 256,
    loss: LossOpt = None,
    method: MethodOpt = "auto",
    probes: ProbesOpt = 64,
    dead_units: DeadUnitsOpt = "unscaled",
    trace_params: TraceParamsOpt = "all",
    rtol: RtolOpt = 0.01,
    max_probes: MaxProbesOpt = 2000,
    fr_include_bias: FrBiasOpt = False,
    pacbayes_target: PacTargetOpt = "error",
    pacbayes_threshold: PacThresholdOpt = 0.1,
    mc_samples: McOpt = 10,
    search_depth: DepthOpt = 15,
    hparams: Annotated[
        Path | None,
        typer.Option(
            "--hparams",
            help="CSV of hyperparameters with a 'checkpoint' column of file names "
            "(default: each checkpoint's flatcli.hparams metadata).",
        ),
    ] = None,
    plots: PlotsOpt = None,
    color_by: ColorByOpt = None,
    log_x: LogXOpt = False,
    bootstrap: BootstrapOpt = 1000,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Worker processes.")] = 1,
    cache_dir: Annotated[
        Path,
        typer.Option(
            "--cache-dir",
            help="Per-checkpoint results, keyed by sha256 and configuration; a "
            "rerun after an interruption recomputes only what is missing.",
        ),
    ] = Path(".flatcli-cache"),
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_code: TrustOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
    fmt: FormatOpt = "table",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Per-checkpoint table as CSV (the correlations go to "
            "STEM.correlations.csv), or the whole result as JSON with --format json.",
        ),
    ] = None,
) -> None:
    """Which measure predicts the generalization gap, across many checkpoints?

    Measures every checkpoint on its training data, evaluates it on train and test, and
    reports Kendall τ-b and τ-a, Spearman ρ and Pearson r of each measure with the gaps
    test_loss − train_loss and train_acc − test_acc, each with a bootstrap 95% CI, plus
    Jiang et al.'s granulated Kendall Ψ when checkpoints carry hyperparameters.

    Examples:

        flatcli correlate sample_models/zoo/*.safetensors --plots figs/

        flatcli correlate runs/*.safetensors --data data.npz --layer fc --plots figs/
        --output results.csv
    """
    from .correlate import CorrelateConfig, results_table
    from .prepare import parse_json_object
    from .registry import select
    from .runtime import manifest, resolve_device, resolve_dtype

    fmt = _check_format(fmt)
    chosen = select(measures) if measures else list(DEFAULT_CORRELATE())
    if "distance_from_init" in chosen:
        raise UsageError("correlate cannot compute distance_from_init (no --init per checkpoint)")
    options = _measure_options(
        method=method,
        probes=probes,
        seed=seed,
        dead_units=dead_units,
        trace_params=trace_params,
        rtol=rtol,
        max_probes=max_probes,
        fr_include_bias=fr_include_bias,
        pacbayes_target=pacbayes_target,
        pacbayes_threshold=pacbayes_threshold,
        mc_samples=mc_samples,
        search_depth=search_depth,
    )
    resolve_device(device)
    resolve_dtype(dtype)
    config = CorrelateConfig(
        measures=tuple(chosen),
        layer=layer,
        data=data,
        target=target,
        max_samples=max_samples,
        batch_size=batch_size,
        loss=loss,
        device=device,
        dtype=dtype,
        options=options,
        arch=arch,
        arch_kwargs=parse_json_object(arch_kwargs, "--arch-kwargs"),
        trust_code=trust_code,
    )
    run = _measure_with_progress(checkpoints, config, cache_dir, jobs)
    df = results_table(run, hparams_csv=hparams)
    for item in run.skipped:
        _stderr().print(
            f"skipped {item['checkpoint']}: {item['reason']}", highlight=False, soft_wrap=True
        )
    if df.empty:
        raise FlatcliError("no checkpoint could be measured")
    _report_correlations(
        df,
        chosen,
        run,
        fmt=fmt,
        output=output,
        plots=plots,
        color_by=color_by,
        log_x=log_x,
        bootstrap=bootstrap,
        seed=seed,
        manifest=manifest(device=device, dtype=dtype, seed=seed, config_key=config.key()),
    )


def DEFAULT_CORRELATE() -> tuple[str, ...]:  # noqa: N802 - reads as the constant it returns
    from .correlate import DEFAULT_MEASURES
    from .registry import available

    names = set(available())
    return tuple(m for m in DEFAULT_MEASURES if m in names)


def _measure_with_progress(checkpoints, config, cache_dir, jobs):  # noqa: ANN001, ANN202
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .correlate import measure_checkpoints

    console = _stderr()
    if not console.is_terminal:
        return measure_checkpoints(
            checkpoints,
            config,
            cache_dir=cache_dir,
            jobs=jobs,
            on_result=lambda c, s: print(f"flatcli: {Path(c).name}: {s}", file=sys.stderr),
        )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("measuring checkpoints", total=len(checkpoints))
        return measure_checkpoints(
            checkpoints,
            config,
            cache_dir=cache_dir,
            jobs=jobs,
            on_result=lambda c, s: progress.advance(task),
        )


def _report_correlations(
    df,
    measures,
    run,
    *,
    fmt,
    output,
    plots,
    color_by,
    log_x,  # noqa: ANN001, ANN202, PLR0913
    bootstrap,
    seed,
    manifest,
    recomputed_from=None,
):
    from .correlate import analyse
    from .report import to_json

    present = [m for m in measures if m in df.columns]
    result = analyse(df, measures=present, bootstrap=bootstrap, seed=seed)
    table = result["correlations"]
    if plots is not None:
        _plot(df, table, present, plots, color_by=color_by, log_x=log_x)
    report = {
        "schema": "flatcli.correlate/1",
        "checkpoints": df.to_dict(orient="records"),
        "correlations": table.to_dict(orient="records"),
        "granulated_kendall": result["granulated"],
        "hparams": result["hparams"],
        "skipped": run.skipped if run is not None else [],
        "computed": run.computed if run is not None else 0,
        "source": recomputed_from,
        "manifest": manifest,
    }
    if fmt == "json":
        _emit(to_json(report), output)
        return
    if output is not None:
        from .report import write_csv_output, write_output

        provenance = {k: v for k, v in report.items() if k not in ("checkpoints", "correlations")}
        if {"checkpoint", "sha256"} <= set(df.columns):
            provenance["sha256"] = df[["checkpoint", "sha256"]].to_dict(orient="records")
        write_csv_output(output, df.to_csv(index=False), provenance)
        corr_path = output.with_name(f"{output.stem}.correlations.csv")
        write_output(corr_path, table.to_csv(index=False))
    if fmt == "csv":
        sys.stdout.write(table.to_csv(index=False))
        return
    _render_correlations(table, result, len(df), run)


def _render_correlations(table, result, n, run) -> None:  # noqa: ANN001
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a file or pipe: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 120))
    for gap, label in (("gap_loss", "test_loss − train_loss"), ("gap_acc", "train_acc − test_acc")):
        t = Table(
            title=f"correlation with the generalization gap {label} ({n} checkpoints, "
            "95% bootstrap CIs)",
            title_justify="left",
        )
        for col in ("measure", "Kendall τ-b", "τ-a", "Spearman ρ", "Pearson r", "Ψ"):
            t.add_column(col, justify="left" if col == "measure" else "right", no_wrap=True)
        rows = table[table["gap"] == gap].sort_values("kendall_tau_b", ascending=False)
        for _, r in rows.iterrows():
            psi = result["granulated"].get(gap, {}).get(r["measure"], {}).get("Psi")
            t.add_row(
                r["measure"],
                _ci(r, "kendall_tau_b"),
                _num(r["kendall_tau_a"]),
                _ci(r, "spearman_rho"),
                _ci(r, "pearson_r"),
                _num(psi),
            )
        console.print(t)
    if result["hparams"]:
        console.print(f"Ψ: granulated Kendall over {', '.join(result['hparams'])}")
    if run is not None:
        console.print(
            f"{run.computed} checkpoint(s) measured now, "
            f"{n - run.computed} from the cache, {len(run.skipped)} skipped"
        )


def _num(x) -> str:  # noqa: ANN001
    import math

    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def _ci(r, stat: str) -> str:  # noqa: ANN001
    lo, hi = r[f"{stat}_lo"], r[f"{stat}_hi"]
    bounds = "" if lo != lo or hi != hi else f" [{lo:+.2f},{hi:+.2f}]"  # NaN-safe
    return f"{_num(r[stat])}{bounds}"


def _plot(df, table, measures, plots: Path, *, color_by, log_x) -> None:  # noqa: ANN001
    from .plots import scatter_grid, tau_bar_chart
    from .stats import GAPS

    try:
        plots.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatcliError(f"cannot create {plots}: {e.strerror}") from None
    color = None
    if color_by is not None:
        color = color_by if color_by in df.columns else f"hp_{color_by}"
        if color not in df.columns:
            hps = [c.removeprefix("hp_") for c in df.columns if c.startswith("hp_")]
            raise UsageError(
                f"--color-by {color_by!r} is not a column; hyperparameters: "
                f"{', '.join(hps) or 'none'}"
            )
    written = []
    for gap in GAPS:
        written += scatter_grid(
            df,
            measures,
            gap,
            color_by=color,
            log_x=log_x,
            stats=table,
            path_stem=plots / f"scatter_{gap}",
        )
        written += tau_bar_chart(table, gap, path_stem=plots / f"tau_{gap}")
    _stderr().print(f"wrote {len(written)} figures to {plots}", highlight=False)


@app.command()
@_friendly
def plot(
    results: Annotated[
        Path,
        typer.Argument(
            help="Per-checkpoint CSV written by correlate --output.", show_default=False
        ),
    ],
    plots: Annotated[Path, typer.Option("--plots", help="Directory for the figures.")] = Path(
        "figs"
    ),
    color_by: ColorByOpt = None,
    log_x: LogXOpt = False,
    bootstrap: BootstrapOpt = 1000,
    seed: SeedOpt = 0,
    fmt: FormatOpt = "table",
) -> None:
    """Re-plot (and re-tabulate) a correlate result without measuring again.

    Examples:

        flatcli plot results.csv --plots figs/ --color-by width
    """
    import pandas as pd

    from .correlate import measure_columns
    from .runtime import manifest

    fmt = _check_format(fmt)
    if not results.is_file():
        raise FlatcliError(f"results file not found: {results}")
    try:
        df = pd.read_csv(results)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file to the user
        raise FlatcliError(f"cannot read {results} as CSV: {type(e).__name__}") from None
    missing = [c for c in ("gap_loss", "gap_acc") if c not in df.columns]
    if missing:
        raise FlatcliError(
            f"{results} lacks the column(s) {', '.join(missing)}: it is not a "
            "table written by flatcli correlate --output"
        )
    measures = measure_columns(df)
    if not measures:
        raise FlatcliError(f"{results} has no measure columns")
    _report_correlations(
        df,
        measures,
        None,
        fmt=fmt,
        output=None,
        plots=plots,
        color_by=color_by,
        log_x=log_x,
        bootstrap=bootstrap,
        seed=seed,
        manifest=manifest(device="cpu", dtype="float64", seed=seed),
        recomputed_from=str(results),
    )


# --------------------------------------------------------------------------- finetune


@app.command()
@_friendly
def finetune(
    checkpoint: Checkpoint,
    fam_lambda: Annotated[
        float,
        typer.Option(
            "--fam-lambda", help="λ ≥ 0, the weight of κ in the objective E + λκ (0: plain)."
        ),
    ] = 0.1,
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            help="FAM layer, a name from model.named_modules() (default: the last nn.Linear).",
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option("--epochs", help="Total epochs (including resumed ones).")
    ] = 5,
    optimizer: Annotated[
        str, typer.Option("--optimizer", help="sgd, adam or sam (SAM over SGD).")
    ] = "sgd",
    sam_rho: Annotated[float, typer.Option("--sam-rho", help="SAM's radius ρ.")] = 0.05,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (peak, for cosine).")] = 1e-3,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum (sgd, sam).")] = 0.9,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 weight decay.")] = 0.0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Mini-batch size; κ uses the same batch.")
    ] = 32,
    schedule: Annotated[
        str, typer.Option("--schedule", help="cosine (to 0 over all steps) or constant.")
    ] = "cosine",
    fam_variant: Annotated[
        str,
        typer.Option(
            "--fam-variant", help="neuronwise (κ) or layerwise (‖W‖²_F · Tr H, FAM §3.2)."
        ),
    ] = "neuronwise",
    fam_method: Annotated[
        str,
        typer.Option(
            "--fam-method",
            help="auto (exact for nn.Linear, Hutchinson otherwise), exact, or hutchinson.",
        ),
    ] = "auto",
    fam_probes: Annotated[
        int, typer.Option("--fam-probes", help="Hutchinson probes per step.")
    ] = 1,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Fine-tuned checkpoint (default: CHECKPOINT-NAME-fam.safetensors here). "
            "Its state file (OUT.state.pt) sits beside it.",
        ),
    ] = None,
    log: Annotated[
        Path | None, typer.Option("--log", help="Per-epoch CSV log (default: OUT with .csv).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="PNG of the curves (default: OUT with .png).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from OUT's state file after an interruption."),
    ] = False,
    data: DataOpt = None,
    target: TargetOpt = None,
    max_samples: MaxSamplesOpt = None,
    loss: LossOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_code: TrustOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of shuffling, Hutchinson probes and dropout.")
    ] = 0,
) -> None:
    """Fine-tune with FAM: minimize E + λ κ(W) with the exact gradient (Adilova et al. 2023).

    Writes the checkpoint, a CSV log, a PNG of the curves and a resumable state file, and
    prints the layer's measures and the test accuracy before and after.

    Examples:

        flatcli finetune sample_models/digits_mlp.safetensors --fam-lambda 0.1

        flatcli finetune model.safetensors --data data.npz --fam-lambda 0.1 --layer fc
        --epochs 5 --out tuned.safetensors
    """
    from .checkpoints import load_checkpoint
    from .finetune import finetune as run_finetune
    from .prepare import parse_json_object

    ck = load_checkpoint(
        checkpoint,
        arch=arch,
        arch_kwargs=parse_json_object(arch_kwargs, "--arch-kwargs"),
        trust_code=trust_code,
    )
    out = out or Path(f"{checkpoint.stem}-fam.safetensors")
    with _progress() as note:
        result = run_finetune(
            ck,
            data,
            fam_lambda=fam_lambda,
            layer=layer,
            epochs=epochs,
            optimizer=optimizer,  # type: ignore[arg-type]
            sam_rho=sam_rho,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            batch_size=batch_size,
            schedule=schedule,  # type: ignore[arg-type]
            fam_variant=fam_variant,
            fam_method=fam_method,
            fam_probes=fam_probes,
            loss=loss,
            target=target,
            max_samples=max_samples,
            seed=seed,
            device=device,
            dtype=dtype,
            out_path=out,
            log_path=log or out.with_suffix(".csv"),
            plot_path=plot or out.with_suffix(".png"),
            resume=resume,
            progress=note,
        )
    _render_finetune(result)


def _render_finetune(result) -> None:  # noqa: ANN001 - a FinetuneResult, imported lazily
    from rich.console import Console
    from rich.table import Table

    from .report import format_value

    console = Console()
    h = result.hparams
    epochs = Table(
        title=f"FAM on {result.layer} · λ = {h['fam_lambda']:g} · {h['optimizer']} "
        f"lr {h['lr']:g} ({h['schedule']}) · {result.fam_method}",
        title_justify="left",
    )
    for col in ("epoch", "lr", "train loss", "κ (batches)", "test loss", "test acc", "s"):
        epochs.add_column(col, justify="right")
    for r in result.history:
        epochs.add_row(
            str(r.epoch),
            f"{r.lr:.3g}",
            format_value(r.train_loss),
            format_value(r.kappa),
            format_value(r.test_loss),
            format_value(r.test_accuracy),
            f"{r.seconds:.1f}",
        )
    console.print(epochs)
    compare = Table(title="before → after (κ etc. on the training data)", title_justify="left")
    for col in ("measure", "before", "after", "change"):
        compare.add_column(col, justify="left" if col == "measure" else "right")
    for name, after in result.after.items():
        before = result.before.get(name)
        b = before.value if before is not None else None
        change = f"{after.value / b - 1:+.1%}" if b not in (None, 0) else ""
        compare.add_row(name, format_value(b), format_value(after.value), change)
    console.print(compare)
    if result.resumed_from:
        console.print(f"resumed after epoch {result.resumed_from}", highlight=False)
    for what, path in (
        ("checkpoint", result.out_path),
        ("log", result.log_path),
        ("plot", result.plot_path),
        ("state", result.state_path),
    ):
        if path is not None:
            console.print(f"{what}: {path}", highlight=False)
    console.print(f"sha256: {result.out_sha256}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()
