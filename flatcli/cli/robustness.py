"""``flatcli robustness``: feature robustness beside Theorem 5's prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .common import check_format, check_outputs, emit, friendly, input_files, loading_from, progress
from .options import (
    DEFAULT_TIME_BUDGET,
    ArchKwargsOpt,
    ArchOpt,
    BatchOpt,
    Checkpoint,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    LayerOpt,
    LossOpt,
    MaxSamplesOpt,
    OutputOpt,
    SeedOpt,
    SplitOpt,
    TargetOpt,
    TimeBudgetOpt,
    TrustOpt,
)

SCHEMA = "flatcli.robustness/1"


def parse_deltas(text: str) -> list[float]:
    """``0.01,0.03,0.1`` -> floats, with a one-line error for anything else."""
    from ..errors import UsageError

    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--deltas must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError("--deltas is empty")
    return values


@app.command()
@friendly
def robustness(
    ctx: typer.Context,
    checkpoint: Checkpoint,
    layer: LayerOpt = None,
    deltas: Annotated[
        str, typer.Option("--deltas", help="Comma-separated perturbation sizes δ > 0.")
    ] = "0.01,0.03,0.1,0.3",
    probes: Annotated[
        int, typer.Option("--probes", help="Antithetic Haar pairs (A, −A) per δ.")
    ] = 64,
    label_change: Annotated[
        bool,
        typer.Option(
            "--label-change",
            help="Also the variant where a perturbed feature takes the label of its nearest "
            "feature vector in the data (integer labels; Theorem 5 does not cover it).",
            metavar="",
        ),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write the log-log plot here (.png, .svg or .pdf)."),
    ] = None,
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
    time_budget: TimeBudgetOpt = DEFAULT_TIME_BUDGET,
) -> None:
    """Does κ describe the model's robustness? E_F(δ) beside Theorem 5's δ²κ/(2m).

    Every feature vector φ_i of the layer's input is perturbed to (I + δA)φ_i, A a random
    orthogonal matrix (Haar), and the mean loss increase is estimated by Monte Carlo over
    antithetic pairs (A, −A), with its standard error. Theorem 5 of Petzka et al. (2021)
    predicts δ²κ/(2m) at a local minimum with locally constant labels.

    Examples:

        flatcli robustness sample_models/digits_mlp.safetensors --layer fc2

        flatcli robustness sample_models/digits_mlp.safetensors --deltas 0.01,0.1,1
        --label-change --plot robustness.png --format json
    """
    from ..commands import check_robustness
    from ..robustness import plot_robustness

    fmt = check_format(fmt)
    if plot is not None:
        from ..io import check_output

        check_output(plot, suffixes=(".png", ".svg", ".pdf"), option="--plot")
    check_outputs(
        output,
        *((".manifest.json",) if fmt == "csv" else ()),
        inputs=input_files([checkpoint], data),
        others=[("--plot", plot)],
    )
    result = check_robustness(
        checkpoint,
        layer=layer,
        deltas=parse_deltas(deltas),
        probes=probes,
        label_change=label_change,
        seed=seed,
        time_budget=time_budget,
        progress=progress,
        **loading_from(ctx),
    )
    if plot is not None:
        plot_robustness(result.robustness, plot)
    emit(result, fmt, output)
