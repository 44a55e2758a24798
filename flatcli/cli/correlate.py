"""``flatcli correlate`` and ``flatcli plot``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import FlatcliError, UsageError
from ..io import check_distinct, check_regular_file
from ..text import markup_safe, plain
from .app import app
from .common import (
    check_format,
    check_outputs,
    check_report_path,
    command_argv,
    emit,
    friendly,
    input_files,
    options_from,
    start_distributed,
    stderr,
    write_page,
)
from .options import (
    ArchKwargsOpt,
    ArchOpt,
    BackendOpt,
    BatchOpt,
    BootstrapOpt,
    ColorByOpt,
    DataOpt,
    DeadUnitsOpt,
    DepthOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    FrBiasOpt,
    FrLabelsOpt,
    L2Opt,
    LayerOpt,
    LogXOpt,
    LossOpt,
    MaxProbesOpt,
    MaxSamplesOpt,
    McOpt,
    MethodOpt,
    PacTargetOpt,
    PacThresholdOpt,
    PlotsOpt,
    ProbesOpt,
    ReportOpt,
    RtolOpt,
    SeedOpt,
    TargetOpt,
    ThreadsOpt,
    TraceParamsOpt,
    TrustOpt,
)


@app.command()
@friendly
def correlate(
    ctx: typer.Context,
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
    dead_units: DeadUnitsOpt = "drop",
    trace_params: TraceParamsOpt = "all",
    rtol: RtolOpt = 0.01,
    max_probes: MaxProbesOpt = 2000,
    fr_include_bias: FrBiasOpt = False,
    fr_labels: FrLabelsOpt = "true",
    l2: L2Opt = 0.0,
    pacbayes_target: PacTargetOpt = "error",
    pacbayes_threshold: PacThresholdOpt = 0.1,
    mc_samples: McOpt = 10,
    search_depth: DepthOpt = 15,
    hparams: Annotated[
        Path | None,
        typer.Option(
            "--hparams",
            help="CSV of hyperparameters with a 'checkpoint' column of file names "
            "(default: each checkpoint's flatcli.hparams metadata). Columns named "
            "arch.<kwarg> give that checkpoint's --arch-kwargs (mixed-width zoos).",
        ),
    ] = None,
    plots: PlotsOpt = None,
    color_by: ColorByOpt = None,
    log_x: LogXOpt = False,
    bootstrap: BootstrapOpt = 1000,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            help="Worker processes (per torchrun rank), each reused for many checkpoints.",
        ),
    ] = 1,
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
    threads: ThreadsOpt = None,
    backend: BackendOpt = "auto",
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
    report_page: ReportOpt = None,
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

        torchrun --nproc-per-node 2 -m flatcli correlate runs/*.safetensors
        (checkpoints are sharded across the ranks; rank 0 writes; see docs/scaling.md)
    """
    from .. import distributed
    from ..correlate import CorrelateConfig, results_table
    from ..prepare import parse_json_object
    from ..registry import select
    from ..runtime import manifest, resolve_device, resolve_dtype, set_threads

    fmt = check_format(fmt)
    check_report_path(report_page)
    chosen = select(measures) if measures else list(DEFAULT_CORRELATE())
    if "distance_from_init" in chosen:
        raise UsageError("correlate cannot compute distance_from_init (no --init per checkpoint)")
    options = options_from(ctx)
    resolve_device(device)
    resolve_dtype(dtype)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    device = start_distributed(device, backend)
    if jobs == 1:
        set_threads(threads, processes=distributed.local_world_size())
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
    _make_plots_dir(plots)  # first: --output may go into it
    check_outputs(
        output,
        *((".manifest.json", ".correlations.csv") if fmt != "json" else ()),
        report=report_page,
        inputs=input_files(list(checkpoints), data, ("the --hparams table", hparams)),
    )
    from ..correlate import arch_kwargs_table

    per_checkpoint = arch_kwargs_table(hparams) if hparams is not None else None
    run = _measure_with_progress(checkpoints, config, cache_dir, jobs, per_checkpoint, threads)
    if not distributed.is_main():
        return  # rank 0 gathered every row and writes the outputs
    df = results_table(run, hparams_csv=hparams)
    for item in run.skipped:
        stderr().print(
            f"skipped {markup_safe(item['checkpoint'])}: {markup_safe(item['reason'])}",
            highlight=False,
            soft_wrap=True,
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
        manifest=manifest(
            device=device,
            dtype=dtype,
            seed=seed,
            config_key=config.key(),
            data_sha256=run.data_sha256,
            argv=command_argv(ctx),
            **distributed.info(),
        ),
        report_page=report_page,
    )


def DEFAULT_CORRELATE() -> tuple[str, ...]:  # noqa: N802 - reads as the constant it returns
    from ..correlate import DEFAULT_MEASURES
    from ..registry import available

    names = set(available())
    return tuple(m for m in DEFAULT_MEASURES if m in names)


def _print_result(checkpoint: str, status: str) -> None:
    print(f"flatcli: {plain(Path(checkpoint).name)}: {plain(status)}", file=sys.stderr)


def _measure_with_progress(  # noqa: ANN202
    checkpoints, config, cache_dir, jobs, arch_kwargs_for=None, threads=None  # noqa: ANN001
):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..correlate import measure_checkpoints

    console = stderr()
    if not console.is_terminal:
        return measure_checkpoints(
            checkpoints,
            config,
            cache_dir=cache_dir,
            jobs=jobs,
            threads=threads,
            on_result=_print_result,
            arch_kwargs_for=arch_kwargs_for,
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
            threads=threads,
            on_result=lambda c, s: progress.advance(task),
            arch_kwargs_for=arch_kwargs_for,
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
    report_page=None,
):
    from ..correlate import analyse
    from ..report import to_json

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
        "warnings": result["warnings"],
        "gap_notes": result["gap_notes"],
        "skipped": run.skipped if run is not None else [],
        "computed": run.computed if run is not None else 0,
        "source": recomputed_from,
        "manifest": manifest,
    }
    write_page(report_page, report, color_by=color_by, log_x=log_x)
    if fmt == "json":
        emit(to_json(report), output)
        return
    if output is not None:
        from ..report import write_beside, write_csv_output

        provenance = {k: v for k, v in report.items() if k not in ("checkpoints", "correlations")}
        if {"checkpoint", "sha256"} <= set(df.columns):
            provenance["sha256"] = df[["checkpoint", "sha256"]].to_dict(orient="records")
        write_csv_output(output, df.to_csv(index=False), provenance)
        write_beside(output, ".correlations.csv", table.to_csv(index=False))
    if fmt == "csv":
        sys.stdout.write(table.to_csv(index=False))
        return
    from .render import correlations

    correlations(table, result, len(df), run)




def _plot(df, table, measures, plots: Path, *, color_by, log_x) -> None:  # noqa: ANN001
    from ..plots import scatter_grid, tau_bar_chart
    from ..stats import GAPS

    _make_plots_dir(plots)
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
    stderr().print(f"wrote {len(written)} figures to {markup_safe(plots)}", highlight=False)


def _make_plots_dir(plots: Path | None) -> None:
    """Create the figure directory up front, so a bad ``--plots`` fails before measuring."""
    if plots is None:
        return
    if plots.exists() and not plots.is_dir():
        raise FlatcliError(f"--plots {plots} is not a directory")
    try:
        plots.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatcliError(f"cannot create {plots}: {e.strerror}") from None
    if not os.access(plots, os.W_OK | os.X_OK):
        raise FlatcliError(f"cannot write figures into {plots}: not writable")


@app.command()
@friendly
def plot(
    ctx: typer.Context,
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
    report_page: ReportOpt = None,
) -> None:
    """Re-plot (and re-tabulate) a correlate result without measuring again.

    Examples:

        flatcli plot results.csv --plots figs/ --color-by width
    """
    import pandas as pd

    from ..correlate import measure_columns
    from ..runtime import manifest

    fmt = check_format(fmt)
    check_report_path(report_page)
    if not results.exists():
        raise FlatcliError(f"results file not found: {results}")
    check_regular_file(results, "results file")
    check_distinct([("--report", report_page)], [("the results file", results)])
    _make_plots_dir(plots)
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
        manifest=manifest(
            device="cpu", dtype="float64", seed=seed, argv=command_argv(ctx)
        ),
        recomputed_from=str(results),
        report_page=report_page,
    )
