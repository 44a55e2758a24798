"""The options that several commands share, as ``Annotated`` Typer types.

Boolean flags take ``metavar=""``: they take no value, and without it Typer's help shows
an odd ``<bool>`` type next to them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..options import AUDIT_TIME_BUDGET, MEASURE_TIME_BUDGET  # noqa: F401 - audit's

F = TypeVar("F", bound=Callable[..., Any])

Checkpoint = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: .safetensors, .pt/.pth/.bin "
        "state dict (or, with --trust-code, a pickled "
        "module, TorchScript, .pt2).",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Builds the model: package.module:callable or path/file.py:callable "
        "(default: the checkpoint's metadata).",
    ),
]
ArchKwargsOpt = Annotated[
    str | None, typer.Option("--arch-kwargs", help="JSON object of keyword arguments for --arch.")
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Allow formats whose loading runs code from the file (pickled modules,"
        " TorchScript, .pt2) and architectures named by the file. Only for files you trust.",
        metavar="",
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Data: .npz/.pt with x, y (x_test, y_test), .csv with --target, or a bundled"
        " name (digits). Default: the checkpoint's metadata.",
    ),
]
TargetOpt = Annotated[str | None, typer.Option("--target", help="Label column of a CSV file.")]
SplitOpt = Annotated[str, typer.Option("--split", help="train or test.")]
MaxSamplesOpt = Annotated[
    int | None, typer.Option("--max-samples", help="Use only the first N samples.")
]
BatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size", help="Samples per batch (memory only; results do not depend on it)."
    ),
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help="Feature layer, a name from model.named_modules() (default: the last nn.Linear).",
    ),
]
LossOpt = Annotated[
    str | None,
    typer.Option(
        "--loss",
        help="cross_entropy or mse (default: the checkpoint's metadata, else cross_entropy).",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 or float64.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads per process. Default: the cores shared evenly by the processes"
        " on this machine (torchrun ranks; each --jobs worker gets 1), 1 for a model under"
        " 100,000 parameters, OMP_NUM_THREADS when set. See docs/scaling.md.",
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="torch.distributed backend under torchrun: auto (nccl on CUDA, gloo on CPU),"
        " gloo or nccl.",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random estimate.")]
DeadUnitsOpt = Annotated[
    str,
    typer.Option(
        "--dead-units",
        help="Theorem 4 normalization of units with zero std: drop (default; their "
        "normalized weight column is W[:, t]·σ_t = 0, exactly neuron-wise invariant) or "
        "unscaled (scale 1; not invariant when a dead unit has nonzero outgoing weights).",
    ),
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="auto, exact or hutchinson: relative flatness (auto: exact for nn.Linear; "
        "hutchinson: Identity 1, any layer incl. Conv2d) and the Hessian trace (auto: exact "
        "up to 2,000 parameters).",
    ),
]
ProbesOpt = Annotated[
    int, typer.Option("--probes", help="Hutchinson probes of the layer-wise measures.")
]
TraceParamsOpt = Annotated[
    str,
    typer.Option(
        "--trace-params",
        help="Parameters of hessian_trace and hessian_top_eigenvalue: all, layer (the "
        "feature layer) or a module/parameter name.",
    ),
]
RtolOpt = Annotated[
    float,
    typer.Option("--rtol", help="Hutchinson Hessian trace: stop at this relative stderr."),
]
MaxProbesOpt = Annotated[
    int, typer.Option("--max-probes", help="Hutchinson Hessian trace: most probes.")
]
TraceMethodOpt = Annotated[
    str,
    typer.Option(
        "--trace-method",
        help="Estimator of the Hutchinson Hessian trace and of Hutchinson κ / layer trace "
        "(Identity 1): hutchinson, or hutch++ (an exact low-rank part plus Hutchinson on "
        "the rest: fewer probes for the same stderr).",
    ),
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Memory the whole-network measures may use, e.g. 4G or 512M (default: half "
        "of the free RAM or device memory). Data and probe batches are split to fit.",
    ),
]
ProbeBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--probe-batch",
        help="Probes per Hessian-vector product call: 1 = double backward, one at a time "
        "(least memory); N > 1 = N vmapped forward-over-reverse (default: from --max-memory).",
    ),
]
DEFAULT_TIME_BUDGET = MEASURE_TIME_BUDGET
"""``--time-budget`` of the computing commands: seconds for one run's iterative measures
together (correlate: per checkpoint); ``audit``'s is :data:`AUDIT_TIME_BUDGET`."""
TimeBudgetOpt = Annotated[
    float,
    typer.Option(
        "--time-budget",
        help="Seconds for the iterative measures together (Hutchinson trace, Lanczos, "
        "PAC-Bayes and sharpness searches; correlate: per checkpoint). Each stops after "
        "the probe, HVP, bisection step or Monte Carlo draw that spent it and reports the "
        "stderr, residual or bracket reached (0: no limit). For audit: seconds for the "
        "whole audit, which skips the default measures that would not fit.",
    ),
]
FrBiasOpt = Annotated[
    bool,
    typer.Option("--fr-include-bias", help="Count biases in the Fisher-Rao norm.", metavar=""),
]
FrLabelsOpt = Annotated[
    str,
    typer.Option(
        "--fr-labels",
        help="Fisher-Rao labels: true (the data's labels, the empirical Fisher-Rao norm) or "
        "model (exact expectation over labels drawn from the softmax; cross-entropy only).",
    ),
]
L2Opt = Annotated[
    float,
    typer.Option(
        "--l2",
        help="Weight decay α the net was trained with: add the Hessian α·I of the penalty "
        "(α/2)‖W‖² to the layer's H (κ, κ̃, Tr H). 0 (default): the data loss alone.",
    ),
]
PacTargetOpt = Annotated[
    str,
    typer.Option(
        "--pacbayes-target",
        help="PAC-Bayes and sharpness search on the training error or loss increase.",
    ),
]
PacThresholdOpt = Annotated[
    float,
    typer.Option("--pacbayes-threshold", help="Allowed increase τ of PAC-Bayes and sharpness."),
]
McOpt = Annotated[
    int, typer.Option("--mc-samples", help="PAC-Bayes: Monte Carlo draws per bisection step.")
]
DepthOpt = Annotated[
    int, typer.Option("--search-depth", help="PAC-Bayes and sharpness: bisection steps.")
]
InitOpt = Annotated[
    Path | None,
    typer.Option(
        "--init",
        help="Checkpoint at initialization: enables distance_from_init and the "
        "distance form of pacbayes_bound.",
    ),
]
FormatOpt = Annotated[str, typer.Option("--format", help="table, json or csv.")]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Also write the result to this file (atomically)."),
]


PlotsOpt = Annotated[
    Path | None,
    typer.Option(
        "--plots", help="Directory for the figures (PNG and SVG): scatter grids and τ bar charts."
    ),
]
ColorByOpt = Annotated[
    str | None,
    typer.Option("--color-by", help="Hyperparameter that colors the scatter points (e.g. width)."),
]
LogXOpt = Annotated[
    bool, typer.Option("--log-x", help="Logarithmic measure axes.", metavar="")
]
BootstrapOpt = Annotated[
    int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% confidence intervals.")
]

ReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report",
        help="Also write the result as one self-contained HTML page (figures inline, "
        "nothing loaded from the network).",
    ),
]


MEASURE_OPTIONS: dict[str, Any] = {
    "method": MethodOpt,
    "probes": ProbesOpt,
    "dead_units": DeadUnitsOpt,
    "trace_params": TraceParamsOpt,
    "rtol": RtolOpt,
    "max_probes": MaxProbesOpt,
    "trace_method": TraceMethodOpt,
    "max_memory": MaxMemoryOpt,
    "probe_batch": ProbeBatchOpt,
    "time_budget": TimeBudgetOpt,
    "fr_include_bias": FrBiasOpt,
    "fr_labels": FrLabelsOpt,
    "l2": L2Opt,
    "pacbayes_target": PacTargetOpt,
    "pacbayes_threshold": PacThresholdOpt,
    "mc_samples": McOpt,
    "search_depth": DepthOpt,
}
"""The Typer declaration of each field of :class:`flatcli.options.MeasureOptions` (but
``seed``, which every command declares), in the order ``--help`` lists them."""


BUDGET_OPTIONS = ("trace_method", "probe_batch")
"""The measure options that only ``measure`` has (audit and correlate use the defaults)."""


def with_measure_options(
    *, after: str, skip: tuple[str, ...] = (), **defaults: Any
) -> Callable[[F], F]:
    """Give a command the measure options, after its parameter ``after``, in place of its
    ``**options`` parameter (the manifest's ``argv`` lists options in that order).

    Each field of :class:`flatcli.options.MeasureOptions` (but ``skip``) becomes the
    option :data:`MEASURE_OPTIONS` declares, with the record's default unless ``defaults``
    names another; the command reads them back with :func:`flatcli.cli.common.options_from`.
    """
    from dataclasses import MISSING, fields

    from ..options import MeasureOptions

    record = {f.name: f.default for f in fields(MeasureOptions) if f.default is not MISSING}

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = 1 + next(i for i, p in enumerate(params) if p.name == after)
        extra = [
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=annotation,
                default=defaults.get(name, record[name]),
            )
            for name, annotation in MEASURE_OPTIONS.items()
            if name not in skip
        ]
        new = sig.replace(parameters=[*params[:at], *extra, *params[at:]])
        fn.__signature__ = new  # type: ignore[attr-defined]
        return fn

    return decorate
