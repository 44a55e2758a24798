"""``flatcli bound``: the computable terms of Theorem 6 and the actual gap."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import app
from .common import check_format, check_outputs, emit, friendly, input_files, loading_from, progress
from .options import (
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
    TargetOpt,
    TrustOpt,
)

SCHEMA = "flatcli.bound/1"


@app.command()
@friendly
def bound(
    ctx: typer.Context,
    checkpoint: Checkpoint,
    layer: LayerOpt = None,
    splits: Annotated[
        int, typer.Option("--splits", help="Random half splits of the KDE estimate.")
    ] = 10,
    draws: Annotated[
        int, typer.Option("--draws", help="Kernel samples per training point and split.")
    ] = 8,
    bandwidth: Annotated[
        float | None,
        typer.Option(
            "--bandwidth",
            help="KDE bandwidth factor (kernel covariance = factor² × data covariance); "
            "default: Scott's rule.",
        ),
    ] = None,
    probes: Annotated[
        int,
        typer.Option(
            "--probes", help="Antithetic Haar pairs for the measured E_F at δ = |S|^(−1/(4+m))."
        ),
    ] = 32,
    data: DataOpt = None,
    target: TargetOpt = None,
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
    """Theorem 6's terms on the training split, their combination and the actual gap.

    Prints |S|^(−2/(4+m)), κ/(2m), a kernel-density estimate of representativeness in
    feature space (Petzka et al. 2021, §6) and their combination, which is an
    approximation, not a bound; with a test split, the actual gap beside it. Beside the
    robustness term δ²κ/(2m) at δ = |S|^(−1/(4+m)), the measured E_F at that δ shows how
    far Theorem 5's small-δ expansion is off there.

    Examples:

        flatcli bound sample_models/digits_mlp.safetensors --layer fc2

        flatcli bound sample_models/digits_mlp.safetensors --splits 20 --format json
    """
    from ..commands import estimate_bound

    fmt = check_format(fmt)
    check_outputs(
        output,
        *((".manifest.json",) if fmt == "csv" else ()),
        inputs=input_files([checkpoint], data),
    )
    result = estimate_bound(
        checkpoint,
        layer=layer,
        splits=splits,
        draws=draws,
        bandwidth=bandwidth,
        probes=probes,
        seed=seed,
        progress=progress,
        **loading_from(ctx),
    )
    emit(result, fmt, output)
