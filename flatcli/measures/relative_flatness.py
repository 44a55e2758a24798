r"""Relative flatness (Petzka et al. 2021) and the layer-wise quantities beside it.

References:
    Petzka, Kamp, Adilova, Sminchisescu, Boley. *Relative Flatness and Generalization.*
    NeurIPS 2021. https://arxiv.org/abs/2001.00939

    Adilova, Abourayya, Li, Dada, Petzka, Egger, Kleesiek, Kamp. *FAM: Relative
    Flatness Aware Minimization.* 2023. https://arxiv.org/abs/2307.02337

All quantities are per-sample averages accumulated batch by batch (docs/measures.md):

.. math::

    \kappa = \frac1n \sum_i \|\phi_i\|^2 \,\mathrm{Tr}(W^\top B_i W), \qquad
    \mathrm{Tr}\,H = \frac1n \sum_i \|\phi_i\|^2 \,\mathrm{Tr}(B_i),

with :math:`B_i` the per-sample loss Hessian with respect to the layer output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .. import distributed
from ..autodiff import hvp
from ..checkpoints import eval_mode
from ..data import Batches, as_batches, take
from ..errors import FlatcliError, UsageError
from ..features import (
    Cut,
    LayerSplit,
    batch_len,
    call_model,
    default_layer,
    per_sample_hvp,
)
from ..losses import SoftmaxCurvature, check_loss, per_sample_loss
from .estimate import Estimate, mean_and_stderr

Method = Literal["auto", "exact", "hutchinson"]
METHODS = ("auto", "exact", "hutchinson")
DEAD_UNITS = ("unscaled", "drop")
MAX_EXACT_DIRECTIONS = 100_000
"""Identity 1 enumerates ``m²`` basis directions for an exact conv/tied κ; refuse beyond this."""


# --------------------------------------------------------------------------- public API


def relative_flatness(
    model: nn.Module,
    layer: str | None,
    data: Any,
    *,
    loss: str = "cross_entropy",
    method: Method = "auto",
    normalize: bool = False,
    probes: int = 64,
    seed: int = 0,
    batch_size: int = 256,
    dead_units: str = "drop",
    l2: float = 0.0,
) -> Estimate:
    r"""Relative flatness :math:`\kappa` of Petzka et al. (2021), Definition 3.

    .. math:: \kappa(W) = \sum_{s,s'} \langle w_s, w_{s'}\rangle\, \mathrm{Tr}(H_{s,s'})

    with the mean-reduced loss, no factor 1/2 or 1/m (the authors' ``normalize=True``
    reports :math:`\kappa/m`).

    Args:
        model: The network.
        layer: Name of the feature layer (default: the last ``nn.Linear``).
        data: ``(x, y)`` tensors, a DataLoader, or :class:`~flatcli.data.Batches`.
        loss: ``cross_entropy`` or ``mse`` (mean over all elements, one-hot for int labels).
        method: ``exact`` (Identity 3 closed form for a logits layer, Identity 2 per-sample
            HVPs for a hidden Linear layer, Identity 1 basis enumeration for conv or tied
            weights), ``hutchinson`` (Rademacher probes: in feature space through
            Identity 2 for an untied Linear layer with one output row per sample, one
            length-``d`` vector per probe; Identity 1 in A-space otherwise), or
            ``auto`` (exact for an untied ``nn.Linear`` with one output row per sample;
            Hutchinson otherwise, e.g. for a Linear applied per token).
        normalize: Return :math:`\tilde\kappa` after Theorem 4's normalization instead.
        dead_units: Theorem 4's treatment of units with σ = 0: ``drop`` (default;
            ``W̃[:, t] = W[:, t]·σ_t = 0``, exactly neuron-wise invariant) or ``unscaled``
            (the unit keeps scale 1; not invariant when its outgoing weights are nonzero).
        l2: Weight-decay coefficient α: add the Hessian ``α·I`` of the penalty
            ``(α/2)‖W‖²_F`` to ``H`` (see :func:`layer_measures`). 0 is the data loss alone.
        probes: Hutchinson probes.
        seed: Seed of the Hutchinson probes.
        batch_size: Batch size when ``data`` is in memory.

    Returns:
        An :class:`Estimate`; ``stderr`` is None when exact.

    Example:
        >>> from flatcli import archs, relative_flatness
        >>> import torch
        >>> model = archs.mlp(4, [5], 3)
        >>> x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> est = relative_flatness(model, "fc", (x, y))
        >>> est.stderr is None and est.value > 0
        True
    """
    key = "relative_flatness_normalized" if normalize else "relative_flatness"
    return layer_measures(
        model,
        layer,
        data,
        loss=loss,
        method=method,
        normalize=normalize,
        probes=probes,
        seed=seed,
        batch_size=batch_size,
        dead_units=dead_units,
        l2=l2,
    )[key]


def layer_hessian_trace(
    model: nn.Module,
    layer: str | None,
    data: Any,
    *,
    loss: str = "cross_entropy",
    method: Method = "auto",
    probes: int = 64,
    seed: int = 0,
    batch_size: int = 256,
) -> Estimate:
    r""":math:`\mathrm{Tr}\,\nabla^2_W E` of the layer weight (bias excluded)."""
    return layer_measures(
        model,
        layer,
        data,
        loss=loss,
        method=method,
        probes=probes,
        seed=seed,
        batch_size=batch_size,
    )["layer_hessian_trace"]


def layerwise_flatness(
    model: nn.Module,
    layer: str | None,
    data: Any,
    *,
    loss: str = "cross_entropy",
    method: Method = "auto",
    probes: int = 64,
    seed: int = 0,
    batch_size: int = 256,
) -> Estimate:
    r"""Simplified relative flatness of the FAM paper §3.2: :math:`\|W\|_F^2\,\mathrm{Tr}\,H`."""
    return layer_measures(
        model,
        layer,
        data,
        loss=loss,
        method=method,
        probes=probes,
        seed=seed,
        batch_size=batch_size,
    )["layerwise_flatness"]


def weight_norm(model: nn.Module, layer: str | None = None) -> Estimate:
    r"""Squared Frobenius norm :math:`\|W\|_F^2` of the layer weight."""
    split = LayerSplit(model, layer or default_layer(model))
    return Estimate(squared_norm(split.weight), None, "exact")


def layer_measures(
    model: nn.Module,
    layer: str | None,
    data: Any,
    *,
    loss: str = "cross_entropy",
    method: Method = "auto",
    normalize: bool = False,
    probes: int = 64,
    seed: int = 0,
    batch_size: int = 256,
    dead_units: str = "drop",
    l2: float = 0.0,
    progress: Callable[[str], None] | None = None,
    max_memory: int | None = None,
    trace_method: str = "hutchinson",
) -> dict[str, Estimate]:
    r"""Every layer-wise measure of one layer, sharing the passes over the data.

    ``dead_units`` (``drop`` or ``unscaled``) chooses how Theorem 4 treats coordinates with
    σ = 0; see :func:`feature_scaling`.

    The Hutchinson estimates of Identity 1 (conv and tied layers) vmap as many probes per
    call, and split data batches into as few rows, as ``max_memory`` allows (bytes;
    default half the free memory); see :func:`identity1_plan`. ``trace_method="hutch++"``
    estimates κ and the layer trace by Hutch++ with ``probes`` products in all (see
    :func:`flatcli.measures.hessian.hessian_trace`).

    ``l2 = α > 0`` measures the regularized objective ``E + (α/2)‖W‖²_F`` of a net trained
    with weight decay α: its Hessian is ``H + α·I``, so, exactly, Tr(H) gains ``α·d·m``
    and κ gains ``α·m·‖W‖²_F`` (Definition 3 with ``H_{s,s'} += α·δ_{ss'}·I_m``). κ̃ is κ
    of the normalized layer ``W̃ = WV``, and the penalty's Hessian ``α·I`` is added to the
    Hessian in ``W̃`` (as the authors' code adds it to whichever weights it measures): κ̃
    gains ``α·m̃·‖WV‖²_F``, ``m̃`` the coordinates the normalization keeps (dropped dead
    units leave). That keeps κ̃ neuron-wise invariant. These closed-form terms are added
    to the data-loss values (and change no standard error).

    Returns:
        ``relative_flatness``, ``relative_flatness_normalized`` (only with ``normalize``),
        ``layerwise_flatness``, ``layer_hessian_trace``, ``weight_norm``, ``train_loss``,
        ``train_accuracy`` (None-valued for float regression targets), in that order.
    """
    loss = check_loss(loss)
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not (math.isfinite(l2) and l2 >= 0):
        raise UsageError(f"--l2 must be a finite number >= 0, got {l2}")
    if probes < 2 and method != "exact":
        raise UsageError(f"--probes must be at least 2 (for a standard error), got {probes}")
    split = LayerSplit(model, layer or default_layer(model))
    batches = _batches_for(model, data, batch_size)
    note = progress or (lambda _msg: None)
    with _eval_mode(model), torch.no_grad():
        sigma: FeatureScaling | None = None
        # One sample is enough to see whether the layer gives one output row per sample.
        rows = (
            split.kind == "linear"
            and split.cut(take(batches.first()[0], slice(0, 1))).z.ndim == 2
        )
        if normalize:
            if split.kind != "linear":
                raise UsageError(
                    "--normalize (Theorem 4) is defined for nn.Linear feature "
                    f"layers; {split.name!r} is {type(split.layer).__name__}"
                )
            if not rows:
                raise UsageError(
                    f"--normalize (Theorem 4) needs one feature vector per sample; "
                    f"{split.name!r} is applied per position (a token), so its features "
                    "have no per-sample standard deviation"
                )
            note("feature statistics for Theorem 4 normalization")
            sigma = feature_scaling(split, batches, dead_units=dead_units)
        per_sample = rows and not split.tied
        resolved = _resolve_method(split, method, per_sample)
        note(f"relative flatness ({resolved})")
        if resolved == "exact" and per_sample:
            out, fit = _identity2(split, batches, loss, sigma)
        elif per_sample:
            out, fit = _feature_hutchinson(split, batches, loss, sigma, probes=probes, seed=seed)
        else:
            fit = evaluate(split, batches, loss)
            out = _identity1(
                split,
                batches,
                loss,
                fit["n"],
                sigma,
                exact=resolved == "exact",
                probes=probes,
                seed=seed,
                max_memory=max_memory,
                trace_method=trace_method,
            )
        n = fit["n"]
    wn = squared_norm(split.weight)
    if l2 > 0:
        out = _with_l2(split, out, sigma, l2)
    trace = out["layer_hessian_trace"]
    result = {"relative_flatness": out["relative_flatness"]}
    if normalize:
        result["relative_flatness_normalized"] = _with_details(
            out["relative_flatness_normalized"],
            dead_units=sigma.dead,  # type: ignore[union-attr]
            dead_unit_handling=dead_units,
            sigma_ddof=0,
        )
    result["layerwise_flatness"] = Estimate(
        wn * trace.value,
        None if trace.stderr is None else wn * trace.stderr,
        f"‖W‖²_F · Tr(H), Tr(H) {trace.method}",
    )
    result["layer_hessian_trace"] = trace
    result["weight_norm"] = Estimate(wn, None, "exact: ‖W‖²_F")
    result["train_loss"] = Estimate(fit["loss"], None, f"exact: mean {loss} over {n} samples")
    result["train_accuracy"] = Estimate(fit["accuracy"], None, f"exact: over {n} samples")
    return result


def _with_l2(
    split: LayerSplit, out: dict[str, Estimate], sigma: FeatureScaling | None, l2: float
) -> dict[str, Estimate]:
    """Add the exact terms of the penalty ``(α/2)‖W‖²_F`` (Hessian ``α·I``), see above."""
    w = split.weight_matrix().detach().double()
    d, m = w.shape
    extra = {
        "relative_flatness": l2 * m * float(w.pow(2).sum()),
        "layer_hessian_trace": l2 * d * m,
    }
    if sigma is not None:
        wv = w * sigma.scale.to(w)
        kept = int((sigma.inverse != 0).sum())
        extra["relative_flatness_normalized"] = l2 * kept * float(wv.pow(2).sum())
    return {
        key: Estimate(
            est.value + extra[key],
            est.stderr,
            f"{est.method} + L2 term (α = {l2:g})",
            {**est.details, "l2": l2, "l2_term": extra[key]},
        )
        if key in extra
        else est
        for key, est in out.items()
    }


# --------------------------------------------------------------------------- passes over data


class _Fit:
    """Running mean loss and accuracy, checking the loss stays finite."""

    def __init__(self, loss: str) -> None:
        self.loss, self.n, self.loss_sum, self.correct, self.classify = loss, 0, 0.0, 0, True
        self._sums: torch.Tensor | None = None  # (loss sum, correct), kept on the device

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        losses = per_sample_loss(out, y, self.loss)  # type: ignore[arg-type]
        self.n += out.shape[0]
        if y.is_floating_point():
            self.classify = False
            sums = losses.sum(dtype=torch.float64).expand(2)
        else:
            right = (out.argmax(-1) == y).sum(dtype=torch.float64)
            sums = torch.stack([losses.sum(dtype=torch.float64), right])
        self._sums = sums if self._sums is None else self._sums + sums

    def merge(self, batches: Batches) -> _Fit:
        """Check the loss and sum the counts over the ranks when ``batches`` is a shard.

        A NaN or Inf loss makes the (non-negative) loss sum non-finite, so one check of the
        sum finds it (see distributed.py for the ranks).
        """
        if self._sums is not None:
            loss_sum, correct = self._sums.tolist()
            if not math.isfinite(loss_sum):
                raise FlatcliError("the loss is NaN or Inf on this data")
            self.loss_sum, self.correct, self._sums = loss_sum, int(correct), None
        n, loss_sum, correct, regression = distributed.sum_floats(
            batches, self.n, self.loss_sum, self.correct, float(not self.classify)
        )
        self.n, self.loss_sum, self.correct = int(n), loss_sum, int(correct)
        self.classify = regression == 0
        return self

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise FlatcliError("the dataset is empty")
        acc = self.correct / self.n if self.classify else math.nan
        return {"n": self.n, "loss": self.loss_sum / self.n, "accuracy": acc}


def evaluate(split: LayerSplit, batches: Batches, loss: str) -> dict[str, Any]:
    """Mean loss and accuracy over the data (one forward pass), checking it is usable."""
    fit = _Fit(loss)
    for x, y in batches:
        fit.add(call_model(split.model, x), y)
    return fit.merge(batches).result()


def feature_std(split: LayerSplit, batches: Batches) -> tuple[torch.Tensor, int]:
    """Population std (ddof=0) of each feature coordinate ``φ_t`` over the data.

    Streams batch by batch with Chan's parallel update in float64, so it is exact up to
    rounding without holding the features. Dead coordinates (σ = 0) come back as 1 and are
    counted (Theorem 4's dead units).
    """
    sigma, dead = _population_std(split, batches)
    return torch.where(dead, torch.ones_like(sigma), sigma), int(dead.sum())


@dataclass(frozen=True)
class FeatureScaling:
    """Theorem 4's ``V = diag(σ)``: ``scale`` multiplies W's columns, ``inverse`` divides φ.

    Attributes:
        scale: ``σ`` (dead units: 1 when unscaled, 0 when dropped).
        inverse: ``1/σ`` (dead units: 1 when unscaled, 0 when dropped: the pseudo-inverse).
        dead: Number of dead units (σ = 0 over the data).
        dead_units: ``unscaled`` or ``drop``.
    """

    scale: torch.Tensor
    inverse: torch.Tensor
    dead: int
    dead_units: str


def feature_scaling(
    split: LayerSplit, batches: Batches, *, dead_units: str = "drop"
) -> FeatureScaling:
    """The normalization of Theorem 4, with a choice for dead units.

    ``drop`` (the default) uses ``σ_t = 0`` and the pseudo-inverse: ``W̃[:, t] = W[:, t]·σ_t
    = 0``, the limit of Theorem 4's normalization and what the authors' CIFAR code computes.
    The dead column leaves ``W V`` and ``V⁺φ`` (function-preserving on the data when the
    unit is a dead ReLU, ``φ_t = 0``), and κ̃ is exactly invariant to every neuron-wise rescaling.
    ``unscaled`` leaves a dead coordinate's scale at 1. Its column of ``W`` still enters
    ``W V² Wᵀ``, so rescaling a dead unit's outgoing weights changes κ̃.
    """
    if dead_units not in DEAD_UNITS:
        raise UsageError(f"--dead-units must be one of {', '.join(DEAD_UNITS)}, got {dead_units!r}")
    sigma, dead = _population_std(split, batches)
    fill = 1.0 if dead_units == "unscaled" else 0.0
    safe = torch.where(dead, torch.ones_like(sigma), sigma)
    scale = torch.where(dead, torch.full_like(sigma, fill), sigma)
    inverse = torch.where(dead, torch.full_like(sigma, fill), 1 / safe)
    return FeatureScaling(scale, inverse, int(dead.sum()), dead_units)


def _population_std(split: LayerSplit, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    count, mean, m2 = 0, None, None
    for x, _ in batches:
        phi = split.cut(x).phi.reshape(batch_len(x), -1).double()
        b = phi.shape[0]
        b_mean = phi.mean(0)
        b_m2 = ((phi - b_mean) ** 2).sum(0)
        if mean is None:
            count, mean, m2 = b, b_mean, b_m2
            continue
        delta = b_mean - mean
        total = count + b
        mean = mean + delta * (b / total)
        m2 = m2 + b_m2 + delta**2 * (count * b / total)
        count = total
    if mean is None or m2 is None:
        raise FlatcliError("the dataset is empty")
    if isinstance(batches, distributed.ShardedBatches):  # Chan's merge over the ranks
        total = distributed.sum_floats(batches, count)[0]
        merged = distributed.sum_over_shards(batches, mean * count) / total
        m2 = distributed.sum_over_shards(batches, m2 + count * (mean - merged) ** 2)
        count = total
    sigma = (m2 / count).sqrt()
    return sigma, sigma <= 1e-12 * max(1.0, float(sigma.max()))


def _identity2(
    split: LayerSplit, batches: Batches, loss: str, sigma: FeatureScaling | None
) -> tuple[dict[str, Estimate], dict[str, Any]]:
    """Exact κ, κ̃ and Tr(H) of an untied Linear layer from per-sample ``B_i``.

    Also returns the mean loss and accuracy, from the same trunk pass.
    """
    w = split.weight_matrix().detach()
    mats = [w]  # U = W: Tr(Wᵀ B W)
    if sigma is not None:
        mats.append(w * sigma.scale.to(w))  # U = W V
    d, m = w.shape
    if split.produces_output and loss == "cross_entropy" and d <= m:
        sums, fit = _identity3_softmax(split, batches, mats, sigma)
    else:
        sums = torch.zeros(len(mats) + 1, dtype=torch.float64)
        fit = _Fit(loss)
        for x, y in batches:
            cut = split.cut(x)
            fit.add(cut.z if split.produces_output else split.downstream(cut.z, cut.context), y)
            phi = cut.phi.reshape(batch_len(x), -1)
            q, tr = split.quadratic_forms(cut, y, loss, mats, trace=True)
            assert tr is not None
            norms = [(phi * phi).sum(1)]
            if sigma is not None:
                norms.append(((phi * sigma.inverse.to(phi)) ** 2).sum(1))
            values = torch.cat([q, tr[:, None]], 1).double()  # Tr(UᵀBU) for each U, then Tr(B)
            weights = torch.stack([*norms, norms[0]], 1).double()
            sums += (weights * values).sum(0).to(sums.device)
    sums = distributed.sum_over_shards(batches, sums)
    n = fit.merge(batches).result()["n"]
    how = (
        "closed form (Identity 3, logits layer)"
        if split.produces_output
        else f"per-sample downstream HVPs (Identity 2, {split.mechanism} split{split.ad.note})"
    )
    out = {
        "relative_flatness": Estimate(float(sums[0]) / n, None, f"exact: {how}"),
        "layer_hessian_trace": Estimate(float(sums[-1]) / n, None, f"exact: {how}"),
    }
    if sigma is not None:
        out["relative_flatness_normalized"] = Estimate(float(sums[1]) / n, None, f"exact: {how}")
    return out, fit.result()


def _identity3_softmax(
    split: LayerSplit, batches: Batches, mats: list[torch.Tensor], sigma: FeatureScaling | None
) -> tuple[torch.Tensor, _Fit]:
    r"""Identity 3 for softmax cross-entropy on the logits layer, on reduced sums.

    ``Tr(UᵀB_iU) = Σ_k p_ik ‖u_k − ū_i‖²`` (``ū_i = Uᵀp_i``, ``u_k`` the rows of ``U``) is
    the variance of the rows under ``p_i``, so it is unchanged when every row is shifted by
    the row ``u_j`` of the sample's top class ``j``. With ``v_k = u_k − u_j`` (``v_j = 0``)
    and ``p̃_i`` the softmax with its top entry set to 0 (``s_i = Σ_k p̃_ik = 1 − p_ij``):

    .. math::

        \mathrm{Tr}(U^\top B_i U) = \sum_k \tilde p_{ik} \|v_k\|^2
            - \|\textstyle\sum_k \tilde p_{ik} v_k\|^2, \qquad
        \mathrm{Tr}\,B_i = 2 s_i - s_i^2 - \|\tilde p_i\|^2 .

    ``p_ij ≈ 1`` never enters, so nothing cancels on a saturated softmax: the first term
    is O(s), the second O(s²). (The textbook ``Σ_k p_k‖u_k‖² − ‖Uᵀp‖²`` subtracts two
    O(1) numbers to get an O(s) one, and lost 1.4e-2 of κ in float32 at train loss 1e-6.)
    Summed over samples with weights ``w_i = ‖φ_i‖²``, with ``G = UUᵀ`` and
    ``C[j, k] = ‖u_j − u_k‖²``, this is
    ``⟨S, C⟩ − ⟨Ã, G⟩ + 2⟨S', G⟩ − Σ_j G_jj Σ_k S'[j, k]`` where ``Ã = Σ_i w_i p̃_i p̃_iᵀ``,
    and ``S``, ``S'`` hold ``w_i p̃_i`` and ``w_i s_i p̃_i`` summed into row ``j`` of each
    sample's top class. Per batch one ``(3d × n)(n × d)`` product gives all three,
    ``[‖φ_i‖p̃_i; ‖φ_i‖e_j; ‖φ_i‖s_ie_j]`` against ``‖φ_i‖p̃_i``, added to float64 sums;
    ``U`` enters once at the end. The same log-softmax gives the loss and accuracy (for a
    correct top class, ``−log(1 − s_i)``: float32's ``log p_j`` is 0 below a loss of 6e-8).
    Used when ``d ≤ m``, so ``d²`` is at most the weight's size.

    Returns:
        ``[Σ_i ‖φ_i‖² Tr(UᵀB_iU) for each U, Σ_i ‖φ_i‖² Tr(B_i)]`` (float64, this rank) and
        the fit (loss and accuracy).
    """
    f64 = torch.float64
    fit = _Fit("cross_entropy")
    inverse = None if sigma is None else sigma.inverse
    stats: list[torch.Tensor] = []  # per weighting: [Ã; S; S'] stacked, (3d, d), float64
    nll: list[tuple[torch.Tensor, ...]] = []  # per batch: log p_y, s, y is the top class
    offsets: torch.Tensor | None = None
    for x, y in batches:
        cut = split.cut(x)
        z = cut.z
        n, d = z.shape
        # Classes along dim 0 (samples contiguous): over few classes the softmax along dim 0
        # of zᵀ is several times faster, and the products below read contiguous rows.
        logp = torch.log_softmax(z.T, dim=0) if d < 32 else torch.log_softmax(z, dim=1).T
        top = z.argmax(-1)
        rest = logp.exp().scatter_(0, top[None], 0.0)  # p̃ᵀ: the top class's entry is 0
        mass = rest.sum(0)  # s = 1 − p_top, summed from the small entries
        if y.is_floating_point():
            fit.add(z, y)
        else:
            fit.n += n
            nll.append((logp.gather(0, y.long()[None])[0], mass, top == y))
        phi = cut.phi.reshape(n, -1)
        # ‖φ_i‖ without an n × m temporary (a fresh large buffer per batch costs page faults)
        norms = [torch.linalg.vector_norm(phi, dim=1)]
        if inverse is not None:
            norms.append(torch.linalg.vector_norm(phi * inverse.to(phi), dim=1))
        if offsets is None:
            offsets = top.new_tensor([[d], [2 * d]])
        slots = top + offsets  # rows of e_top in the two lower blocks
        for k, nrm in enumerate(norms):
            # [‖φ_i‖ p̃_i ; ‖φ_i‖ e_top ; ‖φ_i‖ s_i e_top] times (‖φ_i‖ p̃_i)ᵀ, summed over
            # the batch: Ã, S and S' stacked, (3d, d)
            block = z.new_zeros(3 * d, n)
            torch.mul(rest, nrm, out=block[:d])
            block.scatter_(0, slots, torch.stack([nrm, nrm * mass]))
            stat = block @ block[:d].T
            if k == len(stats):
                stats.append(stat.to(f64))
            else:
                stats[k] += stat
        # Free this batch's activations before the next trunk pass, so that it reuses their
        # memory instead of faulting in fresh pages (about a third of a forward pass here).
        del cut, phi, norms
    if nll:
        at_label, mass, hit = (torch.cat(t) for t in zip(*nll, strict=True))
        # log p_y, and log(1 − s) where y is the top class: float32's log p_top is 0 once
        # the loss is below 6e-8
        log_like = torch.where(hit, torch.log1p(-mass.double()), at_label.double())
        more = torch.stack([-log_like.sum(), hit.sum(dtype=f64)])
        fit._sums = more if fit._sums is None else fit._sums + more
    if not stats:
        return torch.zeros(len(mats) + 1, dtype=f64), fit
    values = []
    for u, stat in zip(mats, stats, strict=True):
        a_tilde, s1, s2 = stat.split(stat.shape[1])
        u64 = u.to(device=stat.device, dtype=f64)
        gram = u64 @ u64.T
        g = gram.diagonal()
        dist = g[:, None] + g[None, :] - 2 * gram  # ‖u_j − u_k‖² (0 on the diagonal)
        values.append(
            (s1 * dist).sum() - (a_tilde * gram).sum() + 2 * (s2 * gram).sum() - g @ s2.sum(1)
        )
    a_tilde, s1, s2 = stats[0].split(stats[0].shape[1])
    values.append(2 * s1.sum() - s2.sum() - a_tilde.diagonal().sum())
    return torch.stack(values).cpu(), fit


FEATURE_PROBE_CHUNK = 32
"""Directions per batched downstream HVP of the feature-space Hutchinson estimate."""


def _feature_hutchinson(
    split: LayerSplit,
    batches: Batches,
    loss: str,
    sigma: FeatureScaling | None,
    *,
    probes: int,
    seed: int,
) -> tuple[dict[str, Estimate], dict[str, Any]]:
    r"""Hutchinson κ, κ̃ and Tr(H) of an untied Linear layer in feature space (Identity 2).

    .. math::

        \mathrm{Tr}(W^\top B_i W) = \mathbb{E}_u[(Wu)^\top B_i (Wu)], \quad
        u \in \{\pm1\}^m, \qquad
        \mathrm{Tr}(B_i) = \mathbb{E}_v[v^\top B_i v], \quad v \in \{\pm1\}^d.

    Each probe ``u`` is shared by every sample, so probe ``j``'s value
    :math:`\frac1n\sum_i \|\phi_i\|^2 (Wu_j)^\top B_i (Wu_j)` is an unbiased estimate of κ
    and the probes are independent: mean and standard error over probes. A probe is one
    vector of length ``d`` (one batched downstream HVP, or the closed form of a logits
    layer), not an ``m × m`` matrix as in A-space, so memory is ``O(d·probes)`` beyond the
    weight itself. Also returns the mean loss and accuracy, from the same trunk pass.
    """
    w = split.weight_matrix().detach()
    d, m = w.shape
    gen = torch.Generator().manual_seed(seed)
    u = _rademacher(gen, (m, probes)).to(w)
    groups = {"relative_flatness": w @ u}
    if sigma is not None:
        groups["relative_flatness_normalized"] = (w * sigma.scale.to(w)) @ u
    groups["layer_hessian_trace"] = _rademacher(gen, (d, probes)).to(w)
    dirs = torch.cat(list(groups.values()), dim=1)  # (d, K)
    sums = torch.zeros(dirs.shape[1], dtype=torch.float64, device=w.device)
    fit = _Fit(loss)
    for x, y in batches:
        cut = split.cut(x)
        fit.add(cut.z if split.produces_output else split.downstream(cut.z, cut.context), y)
        phi = cut.phi.reshape(batch_len(x), -1)
        norm = (phi * phi).sum(1).double()
        weights = [norm] * len(groups)
        if sigma is not None:
            weights[1] = ((phi * sigma.inverse.to(phi)) ** 2).sum(1).double()
        forms = _probe_forms(split, cut, y, loss, dirs).double()  # (n, K)
        for j, wt in enumerate(weights):
            sums[j * probes : (j + 1) * probes] += wt @ forms[:, j * probes : (j + 1) * probes]
    sums = distributed.sum_over_shards(batches, sums)
    n = fit.merge(batches).result()["n"]
    per_probe = (sums / n).cpu()
    how = (
        "closed form (Identity 3, logits layer)"
        if split.produces_output
        else f"downstream HVPs (Identity 2, {split.mechanism} split{split.ad.note})"
    )
    out = {}
    for j, key in enumerate(groups):
        mean, se = mean_and_stderr(per_probe[j * probes : (j + 1) * probes].tolist())
        space = "v ∈ {±1}^d" if key == "layer_hessian_trace" else "u ∈ {±1}^m"
        out[key] = Estimate(
            mean,
            se,
            f"hutchinson: feature space, {probes} Rademacher probes {space}, {how}",
            {"probes": probes},
        )
    return out, fit.result()


def _probe_forms(
    split: LayerSplit, cut: Cut, y: torch.Tensor, loss: str, dirs: torch.Tensor
) -> torch.Tensor:
    """``vᵀ B_i v`` for every sample ``i`` and every column ``v`` of ``dirs`` (``(n, K)``)."""
    z = cut.z
    if z.ndim != 2:
        raise UsageError(
            f"layer {split.name!r} output has shape {tuple(z.shape)}; feature-space "
            "probes need (batch, features)"
        )
    d = z.shape[-1]
    if split.produces_output and loss == "cross_entropy":
        return SoftmaxCurvature.of(z).forms(dirs)
    if split.produces_output and loss == "mse":
        return (2 / d) * (dirs * dirs).sum(0).expand(z.shape[0], -1)

    def total(zz: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(split.downstream(zz, cut.context), y, loss).sum()  # type: ignore[arg-type]

    cols = []
    for lo, hi in _ranges(dirs.shape[1], FEATURE_PROBE_CHUNK):
        chunk = dirs[:, lo:hi]
        hv = per_sample_hvp(total, z, chunk.T, ad=split.ad)  # (k, n, d): B_i v
        cols.append(torch.einsum("knd,dk->nk", hv, chunk))
    return torch.cat(cols, dim=1)


def _identity1(
    split: LayerSplit,
    batches: Batches,
    loss: str,
    n: int,
    sigma: FeatureScaling | None,
    *,
    exact: bool,
    probes: int,
    seed: int,
    max_memory: int | None = None,
    trace_method: str = "hutchinson",
) -> dict[str, Estimate]:
    r"""κ and Tr H from HVPs in the weight: :math:`\kappa = \mathrm{Tr}\,\nabla^2_A E(W + WA)`.

    Exact: sum over the ``m²`` basis directions ``A = e_a e_bᵀ`` (and the ``|W|`` unit
    directions for the trace). Hutchinson: Rademacher ``A`` (and Rademacher weight-shaped
    directions for the trace), ``probes`` of each, seeded.
    """
    w = split.weight.detach()
    w2 = split.weight_matrix(w)
    d, m = w2.shape
    if exact and max(m * m, w.numel()) > MAX_EXACT_DIRECTIONS:
        raise UsageError(
            f"exact κ of {split.name!r} needs {m * m} HVP directions; use --method hutchinson"
        )
    gen = torch.Generator().manual_seed(seed)
    chunk = 16
    if not exact:
        chunk, batches = identity1_plan(split, batches, max_memory, loss)

    def kappa_dirs(a: torch.Tensor) -> torch.Tensor:  # (k, m, m) -> (k, *w.shape): W A
        return (w2 @ a.to(w2)).reshape(-1, *w.shape)

    def kappa_norm_dirs(a: torch.Tensor) -> torch.Tensor:  # W V A V⁻¹ (Theorem 4)
        s = sigma.scale.to(w2)  # type: ignore[union-attr]
        s_inv = sigma.inverse.to(w2)  # type: ignore[union-attr]
        return ((w2 * s) @ a.to(w2) * s_inv).reshape(-1, *w.shape)

    targets: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relative_flatness": kappa_dirs}
    if sigma is not None:
        targets["relative_flatness_normalized"] = kappa_norm_dirs
    out: dict[str, Estimate] = {}
    for key, to_dirs in targets.items():
        if exact:
            chunks = (
                to_dirs(_basis(m * m, lo, hi).reshape(-1, m, m)) for lo, hi in _ranges(m * m, 256)
            )
        elif trace_method == "hutch++":
            out[key] = _hutchpp_estimate(
                split, batches, loss, n, to_dirs, (m, m), probes, seed, chunk, "Identity 1, A-space"
            )
            continue
        else:
            chunks = (to_dirs(_rademacher(gen, (k, m, m))) for k in _sizes(probes, chunk))
        out[key] = _quadratic_estimate(
            split, batches, loss, n, chunks, exact=exact, what="Identity 1, A-space"
        )
    if exact:
        chunks = (
            _basis(w.numel(), lo, hi).reshape(-1, *w.shape).to(w)
            for lo, hi in _ranges(w.numel(), 256)
        )
    elif trace_method == "hutch++":
        out["layer_hessian_trace"] = _hutchpp_estimate(
            split, batches, loss, n, lambda v: v.to(w), tuple(w.shape), probes, seed, chunk,
            "weight space",
        )
        return out
    else:
        chunks = (_rademacher(gen, (k, *w.shape)).to(w) for k in _sizes(probes, chunk))
    out["layer_hessian_trace"] = _quadratic_estimate(
        split, batches, loss, n, chunks, exact=exact, what="weight space"
    )
    return out


def _quadratic_estimate(
    split: LayerSplit,
    batches: Batches,
    loss: str,
    n: int,
    chunks: Iterator[torch.Tensor],
    *,
    exact: bool,
    what: str,
) -> Estimate:
    """Sum (exact) or mean (Hutchinson) of ``⟨V, H V⟩`` over direction chunks."""
    w = split.weight.detach()
    values: list[torch.Tensor] = []
    for dirs in chunks:
        acc = torch.zeros(dirs.shape[0], dtype=torch.float64)
        for x, y in batches:
            cut = split.cut(x)

            def total(weight: torch.Tensor, cut: Cut = cut, y: torch.Tensor = y) -> torch.Tensor:
                return per_sample_loss(split.weight_output(cut, weight), y, loss).sum()  # type: ignore[arg-type]

            v = dirs.to(w.device)
            hv = hvp(total, w, v, ad=split.ad)
            acc += (v * hv).flatten(1).sum(1).double().cpu()
        values.append(distributed.sum_over_shards(batches, acc) / n)
    per_dir = torch.cat(values)
    tied = (", tied weight" if split.tied else "") + split.ad.note
    if exact:
        return Estimate(
            float(per_dir.sum()), None, f"exact: {what} basis, {per_dir.numel()} HVPs{tied}"
        )
    mean, se = mean_and_stderr(per_dir.tolist())
    return Estimate(
        mean,
        se,
        f"hutchinson: {what}, {per_dir.numel()} Rademacher probes{tied}",
        {"probes": per_dir.numel()},
    )


# --------------------------------------------------------------------------- helpers


def squared_norm(t: torch.Tensor, chunk: int = 1 << 22) -> float:
    """``‖t‖²`` accumulated in float64, ``chunk`` elements at a time (no float64 copy of a
    huge weight)."""
    flat = t.detach().reshape(-1)
    return math.fsum(float(c.double().square().sum()) for c in flat.split(chunk))


def _resolve_method(split: LayerSplit, method: str, per_sample: bool) -> str:
    """``auto``: exact (Identity 2) for an untied Linear with one output row per sample.

    A Linear applied per token (output ``(batch, tokens, features)``), a convolution and a
    tied weight go through Identity 1 in the weight, with Hutchinson probes.
    """
    if method != "auto":
        return method
    return "exact" if per_sample else "hutchinson"


def _batches_for(model: nn.Module, data: Any, batch_size: int) -> Batches:
    p = next(model.parameters(), None)
    if p is None:
        raise UsageError("the model has no parameters")
    return as_batches(data, batch_size=batch_size, device=p.device, dtype=p.dtype)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (samples independent downstream), restoring the caller's mode after."""
    was_training = model.training
    eval_mode(model)
    try:
        yield
    finally:
        if was_training:
            model.train()


def _rademacher(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).double() * 2 - 1


def _basis(size: int, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo..hi`` of the ``size × size`` identity, without building all of it."""
    rows = torch.zeros(hi - lo, size, dtype=torch.float64)
    rows[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
    return rows


def _ranges(total: int, step: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, total, step):
        yield lo, min(lo + step, total)


def _sizes(total: int, step: int) -> Iterator[int]:
    for lo, hi in _ranges(total, step):
        yield hi - lo


def _with_details(est: Estimate, **details: Any) -> Estimate:
    return Estimate(est.value, est.stderr, est.method, {**est.details, **details})


# --------------------------------------------------------------------------- budget, Hutch++


def identity1_plan(
    split: LayerSplit, batches: Batches, max_memory: int | None, loss: str = "cross_entropy"
) -> tuple[int, Batches]:
    r"""Probes per vmapped call and the (possibly re-chunked) data for Identity 1 Hutchinson.

    Each vmapped direction holds an ``m × m`` probe ``A`` (float64 and int8), ``W A`` and
    its tangents (about 4 weight-sized tensors), plus forward-over-reverse tangents of the
    activations (:data:`~flatcli.measures.budget.VMAP_PER_DIRECTION` times the saved
    activations of a batch). The most directions (at most 16) that fit ``max_memory``
    are vmapped together; when not even one fits at full batches, batches are split.
    """
    from .budget import (
        VMAP_BASE,
        VMAP_PER_DIRECTION,
        activation_bytes,
        chunked,
        plan_rows,
        resolve_max_memory,
        rows_of,
    )

    x, y = batches.first()
    w = split.weight.detach()
    m = split.weight_matrix(w).shape[1]
    budget = resolve_max_memory(max_memory, w.device)

    def loss_of(_t: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(call_model(split.model, x), y, loss).sum()  # type: ignore[arg-type]

    acts = activation_bytes(loss_of, split.model, x, y)
    per_direction = 9.0 * m * m + 4.0 * w.numel() * 8
    rows = rows_of(x)
    for k in (16, 8, 4, 2, 1):
        need = k * per_direction + (VMAP_BASE + VMAP_PER_DIRECTION * k) * acts.of(rows)
        if need <= budget:
            return k, batches
    factor = VMAP_BASE + VMAP_PER_DIRECTION
    fit = plan_rows(acts, factor, budget, fixed=per_direction, what="one Identity 1 probe")
    return 1, chunked(batches, fit)


class _WeightHessian:
    """The layer-weight Hessian in A-space (``V = W A``) or weight space, as an operator."""

    def __init__(
        self,
        split: LayerSplit,
        batches: Batches,
        loss: str,
        n: int,
        to_dirs: Callable[[torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        chunk: int,
    ) -> None:
        self.split, self.batches, self.loss, self.n = split, batches, loss, n
        self.to_dirs, self.shape, self.chunk = to_dirs, shape, chunk
        self.w = split.weight.detach()
        self.on_step: Callable[[float | None], None] | None = None
        self.should_stop: Callable[[int], bool] | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.chunk} probes per vmapped call"

    def plan_details(self) -> dict[str, Any]:
        return {"probe_batch": self.chunk}

    def _hvps(self, v: torch.Tensor) -> torch.Tensor:
        """``Σ_batches H_W V_k`` for weight-shaped directions ``V`` (``(k, *w.shape)``)."""
        w = self.w
        total = torch.zeros(v.shape, dtype=torch.float64, device=w.device)
        for x, y in self.batches:
            cut = self.split.cut(x)

            def f(weight: torch.Tensor, cut: Cut = cut, y: torch.Tensor = y) -> torch.Tensor:
                out = self.split.weight_output(cut, weight)
                return per_sample_loss(out, y, self.loss).sum()  # type: ignore[arg-type]

            total += hvp(f, w, v.to(w), chunk_size=self.chunk, ad=self.split.ad).double()
        return distributed.sum_over_shards(self.batches, total) / self.n

    def matmat(self, vectors: Any, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``∇²_A`` (or ``∇²_W``) applied to each direction, flattened, in float64."""
        from .hessian import _directions

        dirs = _directions(vectors)
        a = dirs.block(0, dirs.count).reshape(-1, *self.shape)
        hv = self._hvps(self.to_dirs(a))
        if self.shape == tuple(self.w.shape):
            return hv.reshape(dirs.count, -1)
        w2 = self.split.weight_matrix(self.w).double()  # A-space: ∇_A = W2ᵀ ∇_W2
        return (w2.T @ hv.reshape(dirs.count, *w2.shape)).reshape(dirs.count, -1)

    def quadratic_forms(self, vectors: Any) -> torch.Tensor:
        """``⟨V, H V⟩`` for each direction, ``chunk`` at a time, in float64."""
        from .hessian import _directions

        dirs = _directions(vectors)
        out = []
        for lo in range(0, dirs.count, self.chunk):
            hi = min(lo + self.chunk, dirs.count)
            v = self.to_dirs(dirs.block(lo, hi).reshape(-1, *self.shape)).double()
            out.append((v * self._hvps(v)).reshape(hi - lo, -1).sum(-1).cpu())
            if self.on_step is not None:
                self.on_step(hi / dirs.count)
            if self.should_stop is not None and self.should_stop(hi):
                break
        return torch.cat(out)


def _hutchpp_estimate(
    split: LayerSplit,
    batches: Batches,
    loss: str,
    n: int,
    to_dirs: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    probes: int,
    seed: int,
    chunk: int,
    what: str,
) -> Estimate:
    """Hutch++ with ``probes`` products in all: a sketch of ``probes // 4`` (at most 16)."""
    from .hessian import trace_estimate

    op = _WeightHessian(split, batches, loss, n, to_dirs, shape, chunk)
    sketch = max(1, min(16, probes // 4))
    if probes < 2 * sketch + 2:
        raise UsageError(f"--probes must be at least {2 * sketch + 2} for hutch++, got {probes}")
    est = trace_estimate(
        op, trace_method="hutch++", rtol=0.0, max_probes=probes, seed=seed, sketch=sketch
    )
    tied = (", tied weight" if split.tied else "") + split.ad.note
    method = (
        f"hutch++: {what}, rank-{est.details['sketch']} sketch exact + "
        f"{est.details['residual_probes']} Rademacher probes{tied}"
    )
    keep = ("probes", "sketch", "residual_probes", "sketch_trace", "probe_batch")
    return Estimate(est.value, est.stderr, method, {k: est.details[k] for k in keep})
