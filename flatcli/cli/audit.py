"""``flatcli audit``."""

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
)
from .options import (
    BUDGET_OPTIONS,
    ArchKwargsOpt,
    ArchOpt,
    BatchOpt,
    Checkpoint,
    DataOpt,
    DeviceOpt,
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
    TrustOpt,
    with_measure_options,
)


@app.command()
@friendly
@with_measure_options(after="normalize", skip=BUDGET_OPTIONS)
def audit(
    ctx: typer.Context,
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
            metavar="",
        ),
    ] = False,
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
    report_page: ReportOpt = None,
    **options: Any,
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
    from ..commands import audit_checkpoint

    fmt = check_format(fmt)
    check_outputs(
        output,
        *((".manifest.json",) if fmt == "csv" else ()),
        report=report_page,
        inputs=input_files([checkpoint], data, ("the --init checkpoint", init)),
    )
    result = audit_checkpoint(
        checkpoint,
        layer=layer,
        measures=measures,
        normalize=normalize,
        init=init,
        alpha_low=alpha_low,
        alpha_high=alpha_high,
        tolerance=tolerance,
        options=options_from(ctx),
        argv=command_argv(ctx),
        progress=progress,
        **loading_from(ctx),
    )
    emit(result, fmt, output, report_page)
