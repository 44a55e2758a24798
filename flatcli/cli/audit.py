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
    AUDIT_TIME_BUDGET,
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
    ThreadsOpt,
    TrustOpt,
    with_measure_options,
)


@app.command()
@friendly
@with_measure_options(after="normalize", skip=BUDGET_OPTIONS, time_budget=AUDIT_TIME_BUDGET)
def audit(
    ctx: typer.Context,
    checkpoint: Checkpoint,
    layer: LayerOpt = None,
    measures: Annotated[
        str | None,
        typer.Option(
            "--measures",
            help="Comma-separated measure names, or 'all' (default: relative flatness, "
            "layer-wise flatness, layer Hessian trace, weight norm, top Hessian eigenvalue, "
            "Fisher-Rao, Frobenius norms, path norm; those estimated not to fit "
            "--time-budget are skipped, and said). Named measures are always computed.",
        ),
    ] = None,
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize/--no-normalize",
            metavar="",
            help="Include relative_flatness_normalized, Theorem 4's κ̃ (its neuron-wise row "
            "must read invariant).",
        ),
    ] = True,
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
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    report_page: ReportOpt = None,
    **options: Any,
) -> None:
    """Which measures survive function-preserving reparameterizations?

    Finds the reparameterizations the model admits (layer-wise and neuron-wise rescaling
    through ReLU on the torch.fx graph; attention heads' Q/K and V/O, LayerNorm folding,
    ReLU blocks and BatchNorm from the module structure, for transformers and ResNets),
    applies each with random factors, checks on every sample that the outputs did not move
    (refused otherwise), and recomputes the measures. Activations that are not positively
    homogeneous (tanh, GELU, ...) make a reparameterization refused, not silently wrong.

    The whole audit plans to fit --time-budget (seconds, 0: no limit): default measures
    estimated not to fit are skipped and said; --max-memory bounds each measure's memory.

    Examples:

        flatcli audit sample_models/digits_mlp.safetensors --normalize

        flatcli audit sample_models/digits_mlp.safetensors --layer fc2 --format json

        flatcli audit minilm_folder --data sentences.npz --report audit.html
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
        threads=threads,
        options=options_from(ctx),
        argv=command_argv(ctx),
        progress=progress,
        **loading_from(ctx),
    )
    emit(result, fmt, output, report_page)
