"""``flatcli measure``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .app import app
from .common import (
    check_format,
    check_outputs,
    command_argv,
    emit,
    friendly,
    input_files,
    loading_from,
    options_from,
    progress,
    quiet,
    start_distributed,
    stderr,
)
from .options import (
    DEFAULT_TIME_BUDGET,
    ArchKwargsOpt,
    ArchOpt,
    BackendOpt,
    BatchOpt,
    Checkpoint,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    InitOpt,
    LayerOpt,
    LossOpt,
    MaxSamplesOpt,
    OutputOpt,
    ReportOpt,
    SeedOpt,
    SplitOpt,
    TargetOpt,
    ThreadsOpt,
    TrustOpt,
    with_measure_options,
)


@app.command()
@friendly
@with_measure_options(after="normalize", time_budget=DEFAULT_TIME_BUDGET)
def measure(
    ctx: typer.Context,
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
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize",
            help="Add relative_flatness_normalized (Theorem 4, std with ddof=0).",
            metavar="",
        ),
    ] = False,
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
    threads: ThreadsOpt = None,
    backend: BackendOpt = "auto",
    seed: SeedOpt = 0,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    report_page: ReportOpt = None,
    **options: Any,
) -> None:
    """Relative flatness and the other measures of one checkpoint, on its training data.

    Examples:

        flatcli measure sample_models/digits_mlp.safetensors

        flatcli measure sample_models/digits_cnn.safetensors --layer conv2 --method hutchinson

        flatcli measure sample_models/digits_mlp.safetensors --measures all

        flatcli measure model.pt --arch mypkg.nets:make_net --layer fc --data data.npz
        --format json --output result.json

        torchrun --nproc-per-node 4 -m flatcli measure model.pt --data train.npz
        (the data is sharded across the ranks; rank 0 writes; see docs/scaling.md)

    When a measure fails, the others are still reported (and written with --output); the
    failed one is a row with its one-line error and the exit code is 1. Interrupted
    (Ctrl-C) during the measures: what was computed is reported and written, the rest are
    rows marked interrupted, and the exit code is 130.
    """
    from .. import distributed
    from ..commands import measure as run_measure

    fmt = check_format(fmt)
    check_outputs(
        output,
        *((".manifest.json",) if fmt == "csv" else ()),
        report=report_page,
        inputs=input_files([checkpoint], data, ("the --init checkpoint", init)),
    )
    device = start_distributed(device, backend)
    result = run_measure(
        checkpoint,
        layer=layer,
        measures=measures,
        normalize=normalize,
        init=init,
        threads=threads,
        options=options_from(ctx),
        argv=command_argv(ctx),
        progress=progress if distributed.is_main() else quiet,
        **loading_from(ctx, device=device),
    )
    if not distributed.is_main():
        return  # rank 0 alone writes
    emit(result, fmt, output, report_page)
    exit_for_failures(result.measures)


def exit_for_failures(results: dict) -> None:  # type: ignore[type-arg]
    """Exit 130 after an interrupt, 1 when a measure failed (after the output is written)."""
    from .. import registry

    if registry.interrupted(results):
        stderr().print("interrupted: the measures computed so far were reported")
        raise typer.Exit(130)
    bad = [name for name, est in results.items() if registry.failed(est)]
    if bad:
        stderr().print(
            f"[bold red]error:[/] {len(bad)} measure(s) failed: {', '.join(bad)} "
            "(see their rows)",
            highlight=False,
        )
        raise typer.Exit(1)
