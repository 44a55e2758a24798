r"""Feature robustness and Theorem 5 of Petzka et al. (2021) on the user's model.

Feature robustness (Petzka et al., Definition 2 with the orthogonal perturbations of
Theorem 5) measures how much the loss rises when every feature vector is perturbed by
``δ`` times a random rotation of itself:

.. math::

    \mathcal E_F(\delta) = \frac1n \sum_i \mathbb E_{A}\big[
        \ell(\psi(W, (I + \delta A)\phi_i), y_i) - \ell(\psi(W, \phi_i), y_i)\big],

with :math:`A` Haar-distributed on the orthogonal group :math:`O(m)`. Theorem 5: at a
local minimum, and when labels are locally constant, :math:`\mathcal E_F(\delta) =
\frac{\delta^2}{2m}\kappa + O(\delta^3)`, with :math:`\kappa` the relative flatness
(Definition 3). The reason: :math:`\mathbb E_A[A\phi\phi^\top A^\top] =
\frac{\|\phi\|^2}{m} I`, so the second-order term of the loss averages to
:math:`\frac{\delta^2}{2m}\|\phi_i\|^2\mathrm{Tr}(W^\top B_i W)`.

The Monte Carlo estimate uses antithetic pairs ``(A, −A)``: the first-order term
:math:`\delta\langle\nabla_z\ell_i, WA\phi_i\rangle` cancels exactly within each pair
(without that it swamps the :math:`\delta^2` signal at small δ, since the model is
rarely at an exact minimum). The same draws serve every δ (common random numbers), so the
curve over δ is smooth. Each probe ``A_k`` is applied to every sample; the standard error
is over the probes (the data are fixed).

The rise at small δ is far below float32's resolution of the loss, so the loss differences
are taken per sample from float64 outputs, whatever the model's dtype: the layer and the
part after it run on a float64 copy of the weights. Where that is impossible, they are
taken in the model's dtype, and an estimate within a few rounding units of zero is
flagged (``below_resolution``), never reported as a value.

The *label-change* variant lets the label of a perturbed feature vector change: it is the
label of the nearest feature vector of the data (a nearest-neighbour labelling of feature
space; a tie with the sample's own class keeps its label, so duplicated features of
different classes do not count as a change). Theorem 5 assumes locally constant labels;
when perturbations of size δ reach other classes' features, the two variants part, and the
theorem says nothing about the second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import take
from .errors import FlatcliError, UsageError
from .features import Cut, LayerSplit, batch_len, default_layer
from .losses import check_loss, per_sample_loss
from .measures.budget import Stopwatch, with_last
from .measures.estimate import mean_and_stderr
from .measures.params import batches_for, evaluating

CACHE_BYTES = 256 * 2**20
"""Keep the K orthogonal matrices in memory up to this size; regenerate them per batch above."""
MAX_REFERENCE = 20_000
"""Most samples the nearest-neighbour (label-change) variant holds as its reference set."""
SETTLED = 0.05
"""Between the two smallest δ, a ratio that moves by more than this has not settled."""

#: Operations with a kink (a jump in the first derivative): their Hessian, and so κ, does
#: not see it, while a perturbation of size δ crosses it at first order.
_KINKED_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_KINKED_FUNCTIONS = (
    torch.relu,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.hardtanh,
    F.hardswish,
    torch.clamp,
    torch.abs,
    torch.maximum,
    torch.minimum,
    F.max_pool1d,
    F.max_pool2d,
)
_KINKED_METHODS = ("relu", "clamp", "clamp_min", "clamp_max", "abs")
FLOAT64_BYTES = 2**30
"""Largest float64 copy of the weights made for the loss differences; above it they are
computed in the model's dtype (and flagged where that is too coarse)."""
RESOLUTION_MARGIN = 10.0
"""An ``E_F(δ)`` under this many rounding units of the loss is flagged, not reported."""


def haar_orthogonal(
    k: int, m: int, generator: torch.Generator, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``k`` independent Haar-distributed orthogonal ``m × m`` matrices, shape ``(k, m, m)``.

    QR of a standard Gaussian matrix, with the signs of ``R``'s diagonal moved into ``Q``
    (Mezzadri 2007, "How to generate random matrices from the classical compact groups"):
    without the sign fix the distribution of ``Q`` is not Haar.
    """
    g = torch.randn(k, m, m, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs.unsqueeze(-2)).to(dtype)


@dataclass(frozen=True)
class RobustnessPoint:
    """Feature robustness at one δ.

    Attributes:
        delta: The perturbation size δ.
        feature_robustness: Monte Carlo mean of ``E_F(δ)`` (labels held constant).
        stderr: Its standard error over the probes.
        predicted: Theorem 5's ``δ²κ/(2m)``.
        ratio: ``feature_robustness / predicted``.
        label_change: ``E_F(δ)`` with nearest-neighbour labels, or None.
        label_change_stderr: Its standard error, or None.
        labels_changed: Fraction of perturbed samples whose nearest-neighbour label
            differs from their own, or None.
        kinks: True when operations with kinks (ReLU, max-pooling, ...) follow the layer,
            so that κ, a Hessian, misses what a perturbation of size δ crosses.
        resolution: Mean over samples of one rounding unit of the loss in the precision
            the loss differences were computed in (see :func:`feature_robustness`).
        below_resolution: ``|feature_robustness|`` is under :data:`RESOLUTION_MARGIN`
            rounding units: rounding, not the model, may set it. Its ``to_dict`` then
            gives None for ``feature_robustness``, ``stderr`` and ``ratio`` (the table
            prints ⚠).
    """

    delta: float
    feature_robustness: float
    stderr: float | None
    predicted: float
    ratio: float
    label_change: float | None = None
    label_change_stderr: float | None = None
    labels_changed: float | None = None
    kinks: bool = False
    resolution: float = 0.0
    below_resolution: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers, and values below resolution, become None)."""
        out = {k: _finite(v) for k, v in self.__dict__.items()}
        if self.below_resolution:
            out["feature_robustness"] = out["stderr"] = out["ratio"] = None
        if self.label_change is None:
            for k in ("label_change", "label_change_stderr", "labels_changed"):
                out.pop(k)
        return out


@dataclass(frozen=True)
class Robustness:
    """The result of :func:`feature_robustness`.

    Attributes:
        points: One :class:`RobustnessPoint` per δ, in the order given.
        kappa: Relative flatness κ of the layer (exact, same pass over the data).
        m: Feature dimension (the layer's ``in_features``).
        n: Number of samples.
        probes: Antithetic pairs ``(A, −A)`` per δ.
        seed: Seed of the Haar draws.
        train_loss: Mean loss of the unperturbed model.
        layer: Layer name.
        method: How it was computed, in words.
        notes: Caveats worth printing (local minimum, locally constant labels, kinks,
            precision).
        kinks_after_layer: The operations with kinks between the layer and the output
            (module names, or function names in a traced graph); None when the structure
            cannot be read (a model split with hooks).
        ratio_settled: Whether the ratio moved by at most :data:`SETTLED` between the two
            smallest δ (None with one δ): Theorem 5's expansion makes it settle, with
            changes of order δ², as δ shrinks.
        precision: The dtype of the loss differences (``float64`` unless the model could
            not be evaluated in it).
    """

    points: list[RobustnessPoint]
    kappa: float
    m: int
    n: int
    probes: int
    seed: int
    train_loss: float
    layer: str
    method: str
    notes: list[str] = field(default_factory=list)
    kinks_after_layer: list[str] | None = None
    ratio_settled: bool | None = None
    precision: str = "float64"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "layer": self.layer,
            "kinks_after_layer": self.kinks_after_layer,
            "ratio_settled": self.ratio_settled,
            "kappa": _finite(self.kappa),
            "m": self.m,
            "n": self.n,
            "probes": self.probes,
            "seed": self.seed,
            "train_loss": _finite(self.train_loss),
            "method": self.method,
            "precision": self.precision,
            "notes": list(self.notes),
            "warnings": self.warnings,
            "deltas": [p.to_dict() for p in self.points],
        }

    @property
    def warnings(self) -> list[str]:
        """One line per δ whose estimate is below the resolution of its loss differences."""
        return [
            f"E_F(δ = {p.delta:g}) is within {RESOLUTION_MARGIN:g} rounding units "
            f"({p.resolution:.2g} each) of zero in {self.precision}: not reported; use a "
            "larger δ" + (" or --dtype float64" if self.precision != "float64" else "")
            for p in self.points
            if p.below_resolution
        ]


def feature_robustness(
    model: nn.Module,
    layer: str | None,
    data: Any,
    deltas: Sequence[float],
    *,
    loss: str = "cross_entropy",
    probes: int = 64,
    seed: int = 0,
    label_change: bool = False,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    time_budget: float | None = None,
) -> Robustness:
    r"""Monte Carlo :math:`\mathcal E_F(\delta)` beside Theorem 5's :math:`\delta^2\kappa/(2m)`.

    One pass over the data: the trunk runs once per batch, κ comes from the same cut
    (Identity 2/3 of the relative-flatness module), and every probe and δ only re-runs the
    layer and what is downstream of it.

    Args:
        model: The network (put in eval mode while measuring).
        layer: An ``nn.Linear`` feature layer (default: the last one).
        data: ``(x, y)`` tensors, a DataLoader, or :class:`~flatcli.data.Batches`.
        deltas: Perturbation sizes δ > 0.
        loss: ``cross_entropy`` or ``mse``.
        probes: Antithetic pairs ``(A, −A)`` (at least 2, for a standard error).
        seed: Seed of the Haar draws.
        label_change: Also compute the nearest-neighbour-label variant (integer labels
            only; holds the data's features, at most :data:`MAX_REFERENCE` samples).
        batch_size: Batch size when ``data`` is in memory.
        progress: Called with a line of text saying what is being computed.
        time_budget: Seconds after which, in the last data batch, the probes stop after
            the one that spent them (at least 2); the points then use the probes complete
            over all the data and say so in ``notes``. None or 0: no limit.

    Raises:
        UsageError: A non-Linear or tied layer, δ ≤ 0, fewer than 2 probes, or a
            label-change request on float targets or too many samples.
    """
    loss = check_loss(loss)
    deltas = [float(d) for d in deltas]
    if not deltas or any(not (math.isfinite(d) and d > 0) for d in deltas):
        raise UsageError(f"--deltas must be positive numbers, got {deltas}")
    if probes < 2:
        raise UsageError(f"--probes must be at least 2 (for a standard error), got {probes}")
    split = LayerSplit(model, layer or default_layer(model))
    if split.kind != "linear" or split.tied:
        raise UsageError(
            f"feature robustness needs an untied nn.Linear feature layer; {split.name!r} is "
            f"{type(split.layer).__name__}{' (tied)' if split.tied else ''}"
        )
    note = progress or (lambda _msg: None)
    clock = Stopwatch(time_budget)
    used = probes
    batches = batches_for(model, data, batch_size=batch_size)
    w = split.weight_matrix().detach()
    m = w.shape[1]
    draws = _Probes(probes, m, seed, torch.float64, w.device)
    k_d = (probes, len(deltas))
    sums = torch.zeros(k_d, dtype=torch.float64)
    nn_sums = torch.zeros(k_d, dtype=torch.float64)
    changed = torch.zeros(k_d, dtype=torch.float64)  # per probe, summed over samples
    kappa_sum, loss_sum, unit_sum, n = 0.0, 0.0, 0.0, 0
    with evaluating(model), torch.no_grad():
        reference = _reference(split, batches, loss) if label_change else None
        outputs = _PreciseOutputs(split, split.cut(take(batches.first()[0], slice(0, 1))))
        note(f"feature robustness: {probes} antithetic Haar pairs × {len(deltas)} deltas")
        for (x, y), last in with_last(batches):
            cut = split.cut(x)
            q, _ = split.quadratic_forms(cut, y, loss, [w])
            kappa_sum += float(((cut.phi * cut.phi).sum(1).double() * q[:, 0].double()).sum())
            phi, context = outputs.inputs(cut)
            base_out = outputs(phi, context)
            base = per_sample_loss(base_out, y, loss)
            if not torch.isfinite(base).all():
                raise FlatcliError("the loss is NaN or Inf on this data")
            loss_sum += float(base.double().sum())
            unit_sum += _rounding_units(base_out, base, y, loss)
            n += batch_len(x)
            for k in range(probes):
                rotated = phi @ draws.get(k).T.to(phi)  # A φ_i for every sample
                for j, delta in enumerate(deltas):
                    pair = []
                    for sign in (1.0, -1.0):
                        moved = phi + (sign * delta) * rotated
                        pair.append((moved, outputs(moved, context)))
                    rise, nn_rise, moves = _rises(pair, base, y, loss, reference)
                    sums[k, j] += rise
                    nn_sums[k, j] += nn_rise
                    changed[k, j] += moves / 2
                if last and k >= 1 and clock.spent():  # probes 0..k are complete
                    used = k + 1
                    break
    if n == 0:
        raise FlatcliError("the dataset is empty")
    sums, nn_sums, changed = sums[:used], nn_sums[:used], changed[:used].mean(0)
    kappa = kappa_sum / n
    kinks = kinks_after(split)
    settled = _ratio_settled(sums / n, deltas, kappa, m)
    points = []
    for j, delta in enumerate(deltas):
        mean, se = mean_and_stderr((sums[:, j] / n).tolist())
        predicted = delta**2 * kappa / (2 * m)
        extra: dict[str, Any] = {}
        if reference is not None:
            nn_mean, nn_se = mean_and_stderr((nn_sums[:, j] / n).tolist())
            extra = {
                "label_change": nn_mean,
                "label_change_stderr": nn_se,
                "labels_changed": float(changed[j]) / n,
            }
        ratio = mean / predicted if predicted > 0 else math.nan
        extra["kinks"] = bool(kinks)
        points.append(RobustnessPoint(delta, mean, se, predicted, ratio, **extra))
    return Robustness(
        points=_flag_resolution(points, unit_sum / n),
        kappa=kappa,
        m=m,
        n=n,
        probes=used,
        seed=seed,
        train_loss=loss_sum / n,
        layer=split.name,
        method=(
            f"Monte Carlo over {used} antithetic Haar pairs (A, −A) per δ"
            + (f" (time budget: {used} of {probes})" if used < probes else "")
            + ", common random "
            f"numbers across δ, loss differences per sample in {outputs.precision}; κ exact "
            f"({split.mechanism} split)"
        ),
        notes=_notes(
            reference is not None,
            outputs,
            _kink_notes(kinks, points, settled, outputs.dtype),
        ),
        precision=outputs.precision,
        kinks_after_layer=kinks,
        ratio_settled=settled,
    )


def kinks_after(split: LayerSplit) -> list[str] | None:
    """The operations with kinks after ``split``'s layer, in order; None when unknown.

    Read from the structure the split exposes, as FAM's downstream check does: the modules
    after the layer of an ``nn.Sequential``, or the nodes of a ``torch.fx`` downstream
    graph. A layer that produces the output has none; a split by hooks cannot be read.
    """
    if split.produces_output:
        return []
    down = getattr(split, "_down", None)
    if split.mechanism == "sequence" and isinstance(down, nn.Sequential):
        names = {id(m): name for name, m in split.model.named_modules()}
        return [
            f"{names.get(id(m), '?')} ({type(m).__name__})"
            for m in down.modules()
            if isinstance(m, _KINKED_MODULES)
        ]
    graphs = [
        cell.cell_contents
        for cell in getattr(down, "__closure__", None) or ()
        if isinstance(cell.cell_contents, torch.fx.GraphModule)
    ]
    if split.mechanism != "fx" or len(graphs) != 1:
        return None
    found = []
    for node in graphs[0].graph.nodes:
        if node.op == "call_module":
            module = graphs[0].get_submodule(str(node.target))
            found += [
                f"{node.target}.{name}".rstrip(".") + f" ({type(m).__name__})"
                for name, m in module.named_modules()
                if isinstance(m, _KINKED_MODULES)
            ]
        elif (node.op == "call_function" and node.target in _KINKED_FUNCTIONS) or (
            node.op == "call_method" and node.target in _KINKED_METHODS
        ):
            found.append(f"{node.name} ({getattr(node.target, '__name__', node.target)})")
    return found


def _ratio_settled(
    per_probe: torch.Tensor, deltas: Sequence[float], kappa: float, m: int
) -> bool | None:
    """False when the ratio moved by more than :data:`SETTLED`, and by more than 3 standard
    errors of the paired difference over the probes, between the two smallest δ.

    ``per_probe[k, j]`` is probe ``k``'s mean loss rise at ``deltas[j]``. Pairing over the
    common probes removes their shared noise; what is left (rounding, at tiny δ in float32)
    goes into the standard error, so that it is not mistaken for a trend.
    """
    if len(deltas) < 2 or not kappa > 0:
        return None
    i, j = sorted(range(len(deltas)), key=lambda t: deltas[t])[:2]
    scale = [2 * m / (d**2 * kappa) for d in (deltas[i], deltas[j])]
    diff = (per_probe[:, j] * scale[1] - per_probe[:, i] * scale[0]).tolist()
    mean, se = mean_and_stderr(diff)
    return not (abs(mean) > SETTLED and abs(mean) > 3 * (se or 0.0))


def _kink_notes(
    kinks: list[str] | None,
    points: Sequence[RobustnessPoint],
    settled: bool | None,
    dtype: torch.dtype,
) -> list[str]:
    """What the kinks after the layer, and the ratio's trend over δ, mean for Theorem 5."""
    points = [p for p in points if math.isfinite(p.ratio)] or list(points)
    notes = []
    if kinks:
        small = min(points, key=lambda p: p.delta)
        notes.append(
            f"kinks after the layer ({', '.join(kinks)}): κ is built from the Hessian, which is "
            "zero across a ReLU's kink, but a perturbation of size δ crosses kinks at first "
            "order, so E_F(δ) gains a term κ does not contain and the ratio need not tend to "
            f"1 (here {small.ratio:.3g} at δ = {small.delta:g}); Theorem 5 assumes a smooth "
            "model after the layer"
        )
    elif kinks is None:
        notes.append(
            "the operations after the layer could not be read (a model split with hooks): "
            "kinks (ReLU, max-pooling) there would not be flagged"
        )
    if settled is False:
        a, b = sorted(points, key=lambda p: p.delta)[:2]
        notes.append(
            f"the ratio moved from {a.ratio:.3g} (δ = {a.delta:g}) to {b.ratio:.3g} "
            f"(δ = {b.delta:g}): it has not settled at small δ, as Theorem 5's expansion "
            "would make it (changes of order δ²)"
            + (
                "; in float32, rounding of the loss differences at tiny δ does this too "
                "(--dtype float64)"
                if dtype != torch.float64
                else ""
            )
        )
    return notes




def _flag_resolution(points: list[RobustnessPoint], unit: float) -> list[RobustnessPoint]:
    """Each point with the rounding unit ``unit`` of the loss, flagged when
    ``|E_F(δ)|`` is under :data:`RESOLUTION_MARGIN` of them."""
    return [
        replace(
            p,
            resolution=unit,
            below_resolution=abs(p.feature_robustness) < RESOLUTION_MARGIN * unit,
        )
        for p in points
    ]


def _notes(label_change: bool, outputs: _PreciseOutputs, kink_notes: list[str]) -> list[str]:
    notes = [
        "Theorem 5 (E_F(δ) = δ²κ/(2m) + O(δ³)) assumes a local minimum and locally constant "
        "labels; a ratio far from 1 at small δ means the second-order picture does not hold.",
        *kink_notes,
    ]
    if label_change:
        notes.append(
            "label_change: the label of a perturbed feature is the label of its nearest "
            "feature vector in the data; Theorem 5 does not cover this variant."
        )
    if outputs.reason is not None:
        notes.append(f"loss differences in {outputs.precision}, not float64: {outputs.reason}")
    return notes


def _rises(
    pair: list[tuple[torch.Tensor, torch.Tensor]],
    base: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    reference: _Reference | None,
) -> tuple[float, float, int]:
    """Summed loss rises of one antithetic pair ``(φ ± δAφ, output)`` over the batch.

    Per sample, in the outputs' precision (float64 unless the model cannot run in it):
    ``(ℓ(+) + ℓ(−))/2 − ℓ``, the same with nearest-neighbour labels (0 without a
    reference), and how many perturbed samples changed label.
    """
    rise = sum(per_sample_loss(out, y, loss) for _, out in pair) / 2 - base  # type: ignore[arg-type]
    if reference is None:
        return float(rise.double().sum()), 0.0, 0
    nn_rise, moves = torch.zeros_like(base), 0
    for moved, out in pair:
        labels = reference.label(moved, y)
        nn_rise = nn_rise + per_sample_loss(out, labels, loss) / 2  # type: ignore[arg-type]
        moves += int((labels != y).sum())
    return float(rise.double().sum()), float((nn_rise - base).double().sum()), moves


class _Tail(nn.Module):
    """The layer and the part of the model after it, ``(φ, context) ↦ output``, as a module
    over the model's own parameters (so that ``functional_call`` can swap them)."""

    def __init__(self, split: LayerSplit) -> None:
        super().__init__()
        self.model = split.model
        self.split = [split]  # a list: not registered as a submodule

    def forward(self, phi: torch.Tensor, context: Sequence[Any]) -> torch.Tensor:
        split = self.split[0]
        return split.downstream(split.layer_forward(phi), context)


class _PreciseOutputs:
    """The model's output as a function of the layer's features, in float64 when it can be.

    A loss rise of δ²κ/(2m) (1e-9 at δ = 1e-3 on a small classifier) is far below float32's
    resolution of a loss of 0.1, and the perturbed logits' own float32 rounding does not
    cancel between ``A`` and ``−A``. So the layer and the part after it run on a float64
    copy of the model's floating-point parameters and buffers (``functional_call``; the
    model is untouched), on float64 features and context. A model that cannot run so (a
    device without float64, a dtype fixed inside the model, a copy over
    :data:`FLOAT64_BYTES`) keeps its own dtype, and ``reason`` says why.
    """

    def __init__(self, split: LayerSplit, sample: Cut) -> None:
        self.split, self.tail = split, _Tail(split)
        self.dtype, self.reason = split.weight.dtype, None
        self.tensors: dict[str, torch.Tensor] | None = None
        named = [*split.model.named_parameters(), *split.model.named_buffers()]
        if all(t.dtype == torch.float64 for _, t in named if t.is_floating_point()):
            self.dtype = torch.float64  # already float64: no copy
            return
        size = 8 * sum(t.numel() for _, t in named if t.is_floating_point())
        if size > FLOAT64_BYTES:
            self.reason = f"a float64 copy of the weights would take {size / 2**30:.1f} GiB"
            return
        self.tensors = {
            f"model.{k}": t.detach().double() if t.is_floating_point() else t for k, t in named
        }
        self.dtype = torch.float64
        try:
            self(*self.inputs(sample))
        except (RuntimeError, TypeError, NotImplementedError) as err:
            self.tensors, self.dtype = None, split.weight.dtype
            self.reason = f"the model does not run in float64 ({str(err).splitlines()[0]})"

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def inputs(self, cut: Cut) -> tuple[torch.Tensor, Any]:
        """The features and the downstream context, in the working dtype."""
        return cut.phi.to(self.dtype), _cast(cut.context, self.dtype)

    def __call__(self, phi: torch.Tensor, context: Any) -> torch.Tensor:
        if self.tensors is None:
            return self.tail(phi, context)
        return torch.func.functional_call(self.tail, self.tensors, (phi, context))


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors in ``obj`` (nested in tuples, lists and dicts) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


def _rounding_units(out: torch.Tensor, losses: torch.Tensor, y: torch.Tensor, loss: str) -> float:
    """``Σ_i ε (|ℓ_i| + Σ_k |∂ℓ_i/∂out_ik · out_ik|)``: one rounding unit of each loss as a
    function of the outputs (``ε`` of their dtype), summed over the batch."""
    with torch.enable_grad():
        leaf = out.detach().requires_grad_()
        (grad,) = torch.autograd.grad(per_sample_loss(leaf, y, loss).sum(), leaf)  # type: ignore[arg-type]
    scale = losses.abs() + (grad * out).abs().reshape(len(losses), -1).sum(1)
    return torch.finfo(out.dtype).eps * float(scale.double().sum())


class _Probes:
    """The K Haar matrices, kept in memory when small, else regenerated per request."""

    def __init__(self, k: int, m: int, seed: int, dtype: torch.dtype, device: torch.device):
        self.k, self.m, self.seed, self.dtype, self.device = k, m, seed, dtype, device
        self.cache: torch.Tensor | None = None
        if k * m * m * 8 <= CACHE_BYTES:
            gen = torch.Generator().manual_seed(seed)
            self.cache = haar_orthogonal(k, m, gen, dtype=dtype).to(device)

    def get(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[i]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return haar_orthogonal(1, self.m, gen, dtype=self.dtype)[0].to(self.device)


@dataclass
class _Reference:
    """The data's feature vectors and labels, for nearest-neighbour labels."""

    phi: torch.Tensor
    y: torch.Tensor

    def label(self, points: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """The nearest reference label; a tie with the point's own class keeps ``own``."""
        dist = torch.cdist(points.to(self.phi), self.phi)
        same = self.y.unsqueeze(0) == own.unsqueeze(1)
        d_same = dist.masked_fill(~same, torch.inf).min(dim=1).values
        d_other, nearest = dist.masked_fill(same, torch.inf).min(dim=1)
        return torch.where(d_other < d_same, self.y[nearest], own)


def _reference(split: LayerSplit, batches: Any, loss: str) -> _Reference:
    phis, ys = [], []
    count = 0
    for x, y in batches:
        if y.is_floating_point():
            raise UsageError("--label-change needs integer class labels")
        count += batch_len(x)
        if count > MAX_REFERENCE:
            raise UsageError(
                f"--label-change holds every feature vector; use at most {MAX_REFERENCE} "
                "samples (--max-samples)"
            )
        phis.append(split.cut(x).phi)
        ys.append(y)
    if not phis:
        raise FlatcliError("the dataset is empty")
    return _Reference(torch.cat(phis), torch.cat(ys))


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def plot_robustness(result: Robustness, path: str | Path) -> Path:
    """Log-log plot of E_F(δ) (± 2 stderr) and δ²κ/(2m) against δ, written atomically.

    The format follows the suffix (``.png``, ``.svg``, ``.pdf``). Points whose estimate is
    not positive cannot be drawn on a log axis and are left out (the table has them), as
    are estimates below the resolution of their loss differences.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_write

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("png", "svg", "pdf"):
        raise UsageError(f"--plot must end in .png, .svg or .pdf, got {path.name!r}")
    fig = Figure(figsize=(5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    pts = list(result.points)
    deltas = [p.delta for p in pts]
    ax.plot(deltas, [p.predicted for p in pts], "-", color="0.3", label="δ²κ/(2m) (Theorem 5)")
    shown = [p for p in pts if p.feature_robustness > 0 and not p.below_resolution]
    ax.errorbar(
        [p.delta for p in shown],
        [p.feature_robustness for p in shown],
        yerr=[2 * (p.stderr or 0.0) for p in shown],
        fmt="o",
        color="tab:blue",
        capsize=3,
        label="E_F(δ), labels held constant (± 2 se)",
    )
    changed = [p for p in pts if p.label_change is not None and p.label_change > 0]
    if changed:
        ax.plot(
            [p.delta for p in changed],
            [p.label_change for p in changed],
            "s",
            color="tab:orange",
            label="E_F(δ), nearest-neighbour labels",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("δ")
    ax.set_ylabel("loss increase")
    ax.set_title(f"layer {result.layer}: κ = {result.kappa:.4g}, m = {result.m}", fontsize=9)
    ax.legend(fontsize=7)
    meta = {"Software": None} if fmt == "png" else {"Date": None} if fmt == "svg" else {}
    atomic_write(path, lambda p: fig.savefig(p, format=fmt, dpi=150, metadata=meta))
    return path
