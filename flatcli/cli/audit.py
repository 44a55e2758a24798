"""``flatcli audit``."""

from __future__ import annotations

import math
import sys
from typing import Annotated

import typer

from ..errors import UsageError
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
    progress,
    setup,
    write_page,
)
from .options import (
    ArchKwargsOpt,
    ArchOpt,
    BatchOpt,
    Checkpoint,
    DataOpt,
    DeadUnitsOpt,
    DepthOpt,
    DeviceOpt,
    FormatOpt,
    FrBiasOpt,
    FrLabelsOpt,
    InitOpt,
    L2Opt,
    LayerOpt,
    LossOpt,
    MaxMemoryOpt,
    MaxProbesOpt,
    MaxSamplesOpt,
    McOpt,
    MethodOpt,
    OutputOpt,
    PacTargetOpt,
    PacThresholdOpt,
    ProbesOpt,
    ReportOpt,
    RtolOpt,
    SeedOpt,
    SplitOpt,
    TargetOpt,
    ThreadsOpt,
    TimeBudgetOpt,
    TraceParamsOpt,
    TrustOpt,
)


@app.command()
@friendly
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
    method: MethodOpt = "auto",
    probes: ProbesOpt = 64,
    dead_units: DeadUnitsOpt = "drop",
    trace_params: TraceParamsOpt = "all",
    rtol: RtolOpt = 0.01,
    max_probes: MaxProbesOpt = 2000,
    max_memory: MaxMemoryOpt = None,
    time_budget: TimeBudgetOpt = 300.0,
    fr_include_bias: FrBiasOpt = False,
    fr_labels: FrLabelsOpt = "true",
    l2: L2Opt = 0.0,
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
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    report_page: ReportOpt = None,
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
    from .. import registry
    from ..audit import audit as run_audit
    from ..report import to_json
    from ..runtime import manifest, set_threads

    fmt = check_format(fmt)
    check_outputs(
        output,
        *((".manifest.json",) if fmt == "csv" else ()),
        report=report_page,
        inputs=input_files([checkpoint], data, ("the --init checkpoint", init)),
    )
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise UsageError(f"--tolerance must be a finite number ≥ 0, got {tolerance}")
    check_report_path(report_page)
    if not 0 < alpha_low <= alpha_high:
        raise UsageError("--alpha-low and --alpha-high must satisfy 0 < low <= high")
    names = registry.select(
        measures, normalize=normalize, has_init=init is not None, default=registry.AUDIT_DEFAULT
    )
    defaults = measures in (None, "default")
    options = options_from(ctx)
    prep, layer_name, _, config, inputs = setup(
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
    set_threads(threads, params=sum(p.numel() for p in prep.model.parameters()))
    if defaults and inputs.input_shape is None:
        names = [n for n in names if n != "path_norm"]  # named inputs (token ids): undefined
    with progress() as note:
        result = run_audit(
            prep.model,
            prep.batches,
            names,
            config,
            seed=seed,
            alpha_range=(alpha_low, alpha_high),
            rtol=tolerance,
            note=note,
            inputs=inputs,
            time_budget=options.time_budget,
            optional=names if defaults else (),
        )
    original, reps = result.measures, result.reparameterizations
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
        "skipped": result.skipped,
        "theorem4": result.theorem4,
        "manifest": manifest(
            device=prep.device, dtype=prep.dtype, seed=seed, argv=command_argv(ctx)
        ),
        "config": config.as_dict(),
        "audit": {
            "tolerance": tolerance,
            "alpha_range": [alpha_low, alpha_high],
            "time_budget": options.time_budget,
            "max_memory": options.max_memory,
            "seconds": round(result.seconds, 3),
        },
    }
    write_page(report_page, report)
    if fmt == "json":
        emit(to_json(report), output)
        return
    if fmt == "csv":
        import pandas as pd

        rows = [{"reparameterization": r.kind, **row.__dict__} for r in reps for row in r.rows]
        text = pd.DataFrame(rows).to_csv(index=False)
        if output is not None:
            from ..report import write_csv_output

            keep = ("schema", "checkpoint", "layer", "data", "manifest", "config")
            write_csv_output(output, text, {k: report[k] for k in keep})
        sys.stdout.write(text)
        return
    if output is not None:
        from ..report import write_output

        write_output(output, to_json(report))
    from .render import audit_tables

    audit_tables(result)
