"""``flatcli correlate`` and ``flatcli plot``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

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
    loading_from,
    options_from,
    start_distributed,
    stderr,
)
from .options import (
    DEFAULT_TIME_BUDGET,
    ArchKwargsOpt,
    ArchOpt,
    BackendOpt,
    BatchOpt,
    BootstrapOpt,
    ColorByOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    LayerOpt,
    LogXOpt,
    LossOpt,
    MaxSamplesOpt,
    PlotsOpt,
    ReportOpt,
    SeedOpt,
    TargetOpt,
    ThreadsOpt,
    TrustOpt,
    with_measure_options,
)


@app.command()
@friendly
@with_measure_options(
    after="loss", skip=("trace_method", "probe_batch"), time_budget=DEFAULT_TIME_BUDGET
)
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
    **options: Any,
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
    from ..commands import NothingMeasured, correlate_checkpoints

    fmt = check_format(fmt)
    check_report_path(report_page)
    options = options_from(ctx)
    device = start_distributed(device, backend)
    _make_plots_dir(plots)  # first: --output may go into it
    check_outputs(
        output,
        *((".manifest.json", ".correlations.csv") if fmt != "json" else ()),
        report=report_page,
        inputs=input_files(list(checkpoints), data, ("the --hparams table", hparams)),
    )
    try:
        with _checkpoint_progress(len(checkpoints)) as on_result:
            result = correlate_checkpoints(
                checkpoints,
                measures=measures,
                layer=layer,
                hparams=hparams,
                bootstrap=bootstrap,
                jobs=jobs,
                cache_dir=cache_dir,
                threads=threads,
                options=options,
                argv=command_argv(ctx),
                on_result=on_result,
                **loading_from(ctx, device=device),
            )
    except NothingMeasured as e:
        _print_skipped(e.skipped)
        raise
    if result is None or not distributed.is_main():
        return  # rank 0 gathered every row and writes the outputs
    _print_skipped(result.skipped)
    result = replace(result, color_by=color_by, log_x=log_x)
    if plots is not None:
        _plot(result, plots)
    emit(result, fmt, output, report_page)


def _print_skipped(skipped: list) -> None:  # type: ignore[type-arg]
    for item in skipped:
        stderr().print(
            f"skipped {markup_safe(item['checkpoint'])}: {markup_safe(item['reason'])}",
            highlight=False,
            soft_wrap=True,
        )


def checkpoint_line(checkpoint: str, status: str, done: int, total: int, elapsed: float) -> str:
    """The per-checkpoint progress line on a pipe: ``k/N``, the status and an ETA (the
    mean time per checkpoint so far times the checkpoints left)."""
    from ..measures.budget import format_seconds

    eta = elapsed / done * (total - done) if done else float("inf")
    return (
        f"flatcli: [{done}/{total}] {plain(Path(checkpoint).name)}: {plain(status)}, "
        f"{format_seconds(elapsed)} so far, ETA {format_seconds(eta)}"
    )


@contextmanager
def _checkpoint_progress(total: int) -> Iterator[Callable[[str, str], None]]:
    """A bar over the checkpoints in a terminal, with elapsed time and ETA, else one
    line per checkpoint (:func:`checkpoint_line`)."""
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = stderr()
    if not console.is_terminal:
        start, seen = time.monotonic(), {"done": 0}

        def tell(c: str, s: str) -> None:
            seen["done"] += 1
            line = checkpoint_line(c, s, seen["done"], total, time.monotonic() - start)
            print(line, file=sys.stderr)

        yield tell
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("measuring checkpoints", total=total)
        yield lambda c, s: progress.advance(task)


def _plot(result: Any, plots: Path) -> None:
    """The scatter grids and τ bar charts of a :class:`flatcli.results.CorrelateResult`."""
    from ..plots import scatter_grid, tau_bar_chart
    from ..stats import GAPS

    df, table, measures = result.checkpoints, result.correlations, list(result.measures)
    color_by, log_x = result.color_by, result.log_x

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

    from ..commands import correlation_result
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
    result = correlation_result(
        df,
        measures,
        bootstrap=bootstrap,
        seed=seed,
        manifest=manifest(device="cpu", dtype="float64", seed=seed, argv=command_argv(ctx)),
        source=str(results),
        color_by=color_by,
        log_x=log_x,
    )
    _plot(result, plots)
    emit(result, fmt, None, report_page)
