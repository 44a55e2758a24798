"""``flatcli finetune``."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import UsageError, warn
from .app import app
from .common import (
    check_report_path,
    command_argv,
    friendly,
    input_files,
    progress,
    write_page,
)

if TYPE_CHECKING:
    from ..finetune import FinetuneConfig

from .options import (
    ArchKwargsOpt,
    ArchOpt,
    Checkpoint,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    LossOpt,
    MaxSamplesOpt,
    ReportOpt,
    TargetOpt,
    TrustOpt,
)

FamLambdaOpt = Annotated[
    str,
    typer.Option(
        "--fam-lambda",
        help="λ ≥ 0, the weight of κ in the objective E + λκ (0: plain), or auto (the "
        "default): the λ whose relative step R at step 0 is 0.003 (sgd, sam; pass a "
        "number with adam). With --fam-scale relative: the fraction λκ₀/E₀.",
    ),
]

FamScaleOpt = Annotated[
    str,
    typer.Option(
        "--fam-scale",
        help="absolute (λ as given), relative (λ = FAM_LAMBDA · E₀/κ₀ at the start) or "
        "paper (λ as in the FAM paper and its code, whose regularizer is κ/m: the run "
        "uses FAM_LAMBDA/m, m the layer's in_features).",
    ),
]

FamGradientOpt = Annotated[
    str,
    typer.Option(
        "--fam-gradient",
        help="full (exact Lemma 1 gradient) or detached (the published code's: Hessian "
        "held constant, term (I) only, nothing into the trunk).",
    ),
]

ClipGradNormOpt = Annotated[
    str | None,
    typer.Option(
        "--clip-grad-norm",
        help="Clip each step's global gradient norm (default: 1.0 when λ > 0, else off; "
        "0 or none: off). A guard in the gradient's units, not scale-free.",
    ),
]

LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help="FAM layer, a name from model.named_modules() (default: the last nn.Linear).",
    ),
]

EpochsOpt = Annotated[int, typer.Option("--epochs", help="Total epochs (including resumed ones).")]

OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd, adam or sam (SAM over SGD).")]

SamRhoOpt = Annotated[float, typer.Option("--sam-rho", help="SAM's radius ρ.")]

LrOpt = Annotated[float, typer.Option("--lr", help="Learning rate (peak, for cosine).")]

MomentumOpt = Annotated[float, typer.Option("--momentum", help="SGD momentum (sgd, sam).")]

WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="L2 weight decay.")]

BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", help="Mini-batch size; κ uses the same batch.")
]

ScheduleOpt = Annotated[
    str, typer.Option("--schedule", help="cosine (to 0 over all steps) or constant.")
]

FamVariantOpt = Annotated[
    str,
    typer.Option("--fam-variant", help="neuronwise (κ) or layerwise (‖W‖²_F · Tr H, FAM §3.2)."),
]

FamMethodOpt = Annotated[
    str,
    typer.Option(
        "--fam-method",
        help="auto (exact for nn.Linear, Hutchinson otherwise), exact, or hutchinson.",
    ),
]

FamProbesOpt = Annotated[int, typer.Option("--fam-probes", help="Hutchinson probes per step.")]

OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Fine-tuned checkpoint (default: CHECKPOINT-NAME-fam.safetensors here). "
        "Its state file (OUT.state.pt) sits beside it.",
    ),
]

LogOpt = Annotated[
    Path | None, typer.Option("--log", help="Per-epoch CSV log (default: OUT with .csv).")
]

PlotOpt = Annotated[
    Path | None, typer.Option("--plot", help="PNG of the curves (default: OUT with .png).")
]

ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue from OUT's state file after an interruption.",
        metavar="",
    ),
]

OverwriteInputOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite-input",
        help="Allow --out to be the input checkpoint (replaced at the end). Refused by default.",
        metavar="",
    ),
]

SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed of shuffling, Hutchinson probes and dropout.")
]


@app.command()
@friendly
def finetune(
    ctx: typer.Context,
    checkpoint: Checkpoint,
    fam_lambda: FamLambdaOpt = "auto",
    fam_scale: FamScaleOpt = "absolute",
    fam_gradient: FamGradientOpt = "full",
    clip_grad_norm: ClipGradNormOpt = None,
    layer: LayerOpt = None,
    epochs: EpochsOpt = 5,
    optimizer: OptimizerOpt = "sgd",
    sam_rho: SamRhoOpt = 0.05,
    lr: LrOpt = 1e-3,
    momentum: MomentumOpt = 0.9,
    weight_decay: WeightDecayOpt = 0.0,
    batch_size: BatchSizeOpt = 32,
    schedule: ScheduleOpt = "cosine",
    fam_variant: FamVariantOpt = "neuronwise",
    fam_method: FamMethodOpt = "auto",
    fam_probes: FamProbesOpt = 1,
    out: OutOpt = None,
    log: LogOpt = None,
    plot: PlotOpt = None,
    resume: ResumeOpt = False,
    overwrite_input: OverwriteInputOpt = False,
    data: DataOpt = None,
    target: TargetOpt = None,
    max_samples: MaxSamplesOpt = None,
    loss: LossOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_code: TrustOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
    report_page: ReportOpt = None,
) -> None:
    """Fine-tune with FAM: minimize E + λ κ(W) with the exact gradient (Adilova et al. 2023).

    Writes the checkpoint, a CSV log, a PNG of the curves and a resumable state file, and
    prints the layer's measures and the test accuracy before and after, beside the starting
    model at the same train loss by a temperature alone. A run that diverges (NaN, train
    loss above 10× its start, κ above 2× its start, or a saturated softmax) stops, writes
    the last good epoch's weights and exits 1.

    Examples:

        flatcli finetune sample_models/digits_mlp.safetensors

        flatcli finetune sample_models/digits_mlp.safetensors --fam-lambda 0.1

        flatcli finetune model.safetensors --data data.npz --fam-lambda 0.1 --layer fc
        --epochs 5 --out tuned.safetensors
    """
    from ..finetune import finetune as run_finetune

    config = _config(
        fam_lambda=_lambda(fam_lambda),
        fam_scale=fam_scale,
        layer=layer,
        epochs=epochs,
        optimizer=optimizer,
        sam_rho=sam_rho,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        schedule=schedule,
        fam_variant=fam_variant,
        fam_method=fam_method,
        fam_probes=fam_probes,
        fam_gradient=fam_gradient,
        clip_grad_norm=_clip(clip_grad_norm),
        loss=loss,
        target=target,
        max_samples=max_samples,
        seed=seed,
        device=device,
        dtype=dtype,
        out_path=out,
        log_path=log,
        plot_path=plot,
        resume=resume,
        overwrite_input=overwrite_input,
    )
    ck, config = _inputs(checkpoint, config, data, report_page, arch, arch_kwargs, trust_code)
    with progress() as note, _flags():
        result = run_finetune(ck, data, config, progress=note)
    _emit(result, report_page, command_argv(ctx))


#: The CLI's flag for each option of FinetuneConfig whose flag is not ``--NAME-WITH-DASHES``.
FLAGS = {"out_path": "--out", "log_path": "--log", "plot_path": "--plot"}


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


@contextlib.contextmanager
def _flags() -> Iterator[None]:
    """Say the library's option errors in flags: ``epochs must…`` → ``--epochs must…``."""
    from ..finetune import ConfigError

    try:
        yield
    except ConfigError as e:
        message = str(e)
        for name in e.parameters:
            message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", _flag(name), message)
        raise UsageError(message) from None


def _config(**options: Any) -> FinetuneConfig:
    from ..finetune import FinetuneConfig

    with _flags():
        return FinetuneConfig(**options)


def _inputs(
    checkpoint: Path,
    config: FinetuneConfig,
    data: str | None,
    report_page: Path | None,
    arch: str | None,
    arch_kwargs: str | None,
    trust_code: bool,
) -> tuple[Any, FinetuneConfig]:
    """Load the checkpoint, name the outputs (default: beside ``CHECKPOINT-fam``), and
    check the page is no input or output."""
    from dataclasses import replace

    from ..checkpoints import load_checkpoint
    from ..hf import check_has_head
    from ..io import check_distinct, sidecar
    from ..prepare import check_layer_name, parse_json_object

    check_report_path(report_page)
    if config.layer is not None:
        check_layer_name(checkpoint, config.layer)  # before the model is built
    ck = load_checkpoint(
        checkpoint,
        arch=arch,
        arch_kwargs=parse_json_object(arch_kwargs, "--arch-kwargs"),
        trust_code=trust_code,
    )
    check_has_head(ck.model, ck.path)
    out = config.out_path or Path(f"{checkpoint.stem}-fam.safetensors")
    log = config.log_path or sidecar(out, ".csv")  # none beside a stream
    plot = config.plot_path or sidecar(out, ".png")
    if sidecar(out, ".state.pt") is None:
        warn(f"--out {out} is not a regular file: no state file (and no default log or plot)")
    # the library checks its own outputs against the inputs and each other; the page here
    check_distinct([("--report", report_page)], input_files([checkpoint], data))
    outputs = [("--out", out), ("--log", log), ("--plot", plot)]
    check_distinct([("--report", report_page), *outputs, ("the state", sidecar(out, ".state.pt"))])
    return ck, replace(config, out_path=out, log_path=log, plot_path=plot)


def _emit(result: Any, report_page: Path | None, argv: list[str]) -> None:
    """Write the page (the result's JSON, with the command line) and print the tables."""
    if report_page is not None:
        from ..html import finetune_result

        write_page(report_page, finetune_result(result, manifest={**result.manifest, "argv": argv}))
    from .render import finetune_tables

    finetune_tables(result)


def _lambda(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--fam-lambda must be a number ≥ 0 or auto, got {text!r}") from None


def _clip(text: str | None) -> float | None:
    if text is None:
        return None
    if text.strip().lower() in ("none", "off"):
        return 0.0
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--clip-grad-norm must be a number ≥ 0 or none, got {text!r}") from None
