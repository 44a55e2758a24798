"""``flatcli measure``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

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
    quiet,
    setup,
    start_distributed,
    stderr,
    write_page,
)
from .options import (
    ArchKwargsOpt,
    ArchOpt,
    BackendOpt,
    BatchOpt,
    Checkpoint,
    DataOpt,
    DeadUnitsOpt,
    DepthOpt,
    DeviceOpt,
    DtypeOpt,
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
    ProbeBatchOpt,
    ProbesOpt,
    ReportOpt,
    RtolOpt,
    SeedOpt,
    SplitOpt,
    TargetOpt,
    ThreadsOpt,
    TimeBudgetOpt,
    TraceMethodOpt,
    TraceParamsOpt,
    TrustOpt,
)


@app.command()
@friendly
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
    method: MethodOpt = "auto",
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize",
            help="Add relative_flatness_normalized (Theorem 4, std with ddof=0).",
            metavar="",
        ),
    ] = False,
    probes: ProbesOpt = 64,
    dead_units: DeadUnitsOpt = "drop",
    trace_params: TraceParamsOpt = "all",
    rtol: RtolOpt = 0.01,
    max_probes: MaxProbesOpt = 2000,
    trace_method: TraceMethodOpt = "hutchinson",
    max_memory: MaxMemoryOpt = None,
    probe_batch: ProbeBatchOpt = None,
    time_budget: TimeBudgetOpt = 300.0,
    fr_include_bias: FrBiasOpt = False,
    fr_labels: FrLabelsOpt = "true",
    l2: L2Opt = 0.0,
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
    threads: ThreadsOpt = None,
    backend: BackendOpt = "auto",
    seed: SeedOpt = 0,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    report_page: ReportOpt = None,
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
    from .. import distributed, registry
    from ..report import measure_report, measures_csv, to_json
    from ..runtime import manifest, set_threads

    fmt = check_format(fmt)
    check_outputs(
        output,
        *((".manifest.json",) if fmt == "csv" else ()),
        report=report_page,
        inputs=input_files([checkpoint], data, ("the --init checkpoint", init)),
    )
    check_report_path(report_page)
    names = registry.select(measures, normalize=normalize, has_init=init is not None)
    options = options_from(ctx)
    device = start_distributed(device, backend)
    prep, layer_name, module, config, inputs = setup(
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
    n_params = sum(p.numel() for p in prep.model.parameters())
    set_threads(threads, processes=distributed.local_world_size(), params=n_params)
    batches = distributed.shard(prep.batches)
    show = progress(len(registry.groups_of(names))) if distributed.is_main() else quiet()
    with show as status:
        results = registry.run_measures(
            prep.model,
            batches,
            names,
            config,
            note=status,
            inputs=inputs,
            done=status.advance,
            # under torchrun a rank's failure stops the job (the ranks must stay in step)
            keep_going=not distributed.active(),
        )
    if not distributed.is_main():
        return  # rank 0 alone writes
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
        manifest=manifest(
            device=prep.device,
            dtype=prep.dtype,
            seed=seed,
            argv=command_argv(ctx),
            **distributed.info(),
        ),
        config=config.as_dict(),
    )
    write_page(report_page, report)
    if fmt == "json":
        emit(to_json(report), output)
    elif fmt == "csv":
        text = measures_csv(results)
        if output is not None:
            from ..report import write_csv_output

            write_csv_output(output, text, {k: v for k, v in report.items() if k != "measures"})
        sys.stdout.write(text)
    else:
        if output is not None:
            from ..report import write_output

            write_output(output, to_json(report))
        from .render import measures_table

        title = (
            f"{prep.checkpoint.path.name} · layer {layer_name} · {prep.batches.source} "
            f"{split} (n={prep.batches.n_samples}) · {prep.loss}"
        )
        measures_table(results, title=title)
    exit_for_failures(results)


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
