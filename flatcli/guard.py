r"""The divergence guard of FAM fine-tuning, defined by what a user would lose.

After every epoch, :class:`DivergenceGuard` compares the model with the starting model and
with *chance*, the best constant predictor: its loss is the entropy of the training labels
(``ln C`` for ``C`` balanced classes) for cross-entropy and the variance of the targets
for MSE, and its accuracy the largest class's share. Each check names itself:

* ``non-finite``: the loss, κ or ``‖W‖²`` is NaN or Inf;
* ``loss``: the train loss gave back more than half of the start's lead over chance,
  ``L > L₀ + max(½(L_chance − L₀), 0.1)``, or, from a near-zero start, rose above
  ``10·L₀ + 0.1``, whichever limit is lower;
* ``accuracy``: the train accuracy lost more than half of the start's lead over chance
  (and at least 0.05): ``A < A₀ − max(½(A₀ − A_chance), 0.05)``;
* ``feature collapse``: the mean ``‖φ‖²`` of the FAM layer's input fell below 1/10 of its
  start, or fewer than half of its live units (not constant over the data) are left;
* ``κ rise`` (λ > 0): κ above 2× its start, unless the train loss fell more than 0.1 below
  its start (a model still being fitted gains κ as it leaves the uniform softmax). An
  exact κ is compared directly, on the whole training set at the end of the epoch in eval
  mode, as κ₀ is (the snapshot's, when it has one; train-mode batch means with dropout
  can be many times κ₀); a Hutchinson κ, the mean of the epoch's noisy batch
  estimates, only when it is above ``2κ₀`` by a one-sided test at the 1% level on its
  standard error over the batches (Student's t with ``batches − 1`` degrees of freedom,
  which is the z-test for many batches);
* ``saturation`` (λ > 0): κ fell below 10% of its start while ``‖W‖²`` of the layer grew
  above 10×: flatness by a saturated softmax, not a flatter minimum.

The train loss, accuracy and features are measured on the whole training set at the end of
the epoch (:func:`snapshot`, eval mode), so they describe the weights that would be
written; so is an exact κ when the snapshot has it, and a Hutchinson κ is the epoch's
mean over its batches (:class:`~flatcli.training.EpochStats`), for its standard error.
The guard is a plain object fed one epoch at a time, independent of the training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .data import take
from .errors import FlatcliError
from .features import ModelInput, batch_len
from .losses import mse_targets, per_sample_loss
from .training import EpochStats

_EVAL_BATCH = 256


@dataclass(frozen=True)
class Snapshot:
    """A model on the whole training set, in eval mode.

    Attributes:
        loss: Mean train loss.
        accuracy: Train accuracy; None for float regression targets.
        phi_sq: Mean ``‖φ_i‖²`` of the FAM layer's input.
        live_units: Input units of the FAM layer (its input features, the last axis; the
            channels of a convolution) that are not constant over the training set.
        units: All input units of the FAM layer.
        kappa: The FAM penalty κ on the whole training set (the mean of ``reg.penalty`` over
            the evaluation batches, weighted by their size), when it was asked for; else
            None. The guard does not read it: it is for the curves of the log and plot.
    """

    loss: float
    accuracy: float | None
    phi_sq: float
    live_units: int
    units: int
    kappa: float | None = None


@dataclass(frozen=True)
class Chance:
    """The best constant predictor on the training labels.

    Attributes:
        loss: Its mean loss: the entropy of the label frequencies (cross-entropy), or the
            mean variance of the targets (MSE).
        accuracy: The largest class's share; None for float regression targets.
    """

    loss: float
    accuracy: float | None


def chance_level(y: torch.Tensor, loss: str, classes: int) -> Chance:
    """:class:`Chance` of the labels ``y`` (``classes`` outputs) under ``loss``."""
    if y.is_floating_point():
        t = y.double().reshape(y.shape[0], -1)
        return Chance(float(t.var(0, unbiased=False).mean()), None)
    freq = torch.bincount(y.long().reshape(-1), minlength=classes).double()
    freq = freq / freq.sum()
    top = float(freq.max())
    if loss == "mse":
        t = mse_targets(y.long(), torch.empty(1, classes, dtype=torch.float64))
        return Chance(float(t.var(0, unbiased=False).mean()), top)
    nz = freq[freq > 0]
    return Chance(float(-(nz * nz.log()).sum()), top)


@torch.no_grad()
def snapshot(reg: Any, x: ModelInput, y: torch.Tensor, *, kappa: bool = False) -> Snapshot:
    """:class:`Snapshot` of ``reg``'s model (a :class:`~flatcli.fam.FAMRegularizer`) on
    ``(x, y)``, in eval mode; the model's mode is restored.

    With ``kappa``, the same pass also gives κ on the whole set (``reg.penalty`` on each
    batch). Hutchinson probes drawn for it are given back: ``reg.generator`` ends in the
    state it started in, so the training steps see the same probes either way.
    """
    net = reg.model
    was_training = net.training
    net.eval()
    n = batch_len(x)
    loss_sum, phi_sq, correct, kappa_sum = 0.0, 0.0, 0, 0.0
    low = high = None
    probes = reg.generator.get_state()
    try:
        for lo in range(0, n, _EVAL_BATCH):
            out, cut = reg.forward(take(x, slice(lo, lo + _EVAL_BATCH)))
            yb = y[lo : lo + _EVAL_BATCH]
            loss_sum += float(per_sample_loss(out, yb, reg.loss).double().sum())
            if kappa:
                kappa_sum += float(reg.penalty(cut, yb).double()) * len(yb)
            if not yb.is_floating_point():
                correct += int((out.argmax(-1) == yb).sum())
            phi = cut.phi.detach().double()
            phi_sq += float(phi.reshape(phi.shape[0], -1).pow(2).sum())
            axis = 1 if reg.split.kind == "conv2d" else phi.dim() - 1  # channels or features
            units = phi.movedim(axis, 0).reshape(phi.shape[axis], -1)  # unit × the rest
            bmin, bmax = units.amin(1), units.amax(1)
            low = bmin if low is None else torch.minimum(low, bmin)
            high = bmax if high is None else torch.maximum(high, bmax)
    finally:
        net.train(was_training)
        reg.generator.set_state(probes)
    if low is None or high is None:
        raise FlatcliError("the training data are empty")
    scale = max(1.0, float(torch.maximum(low.abs(), high.abs()).max()))
    live = int(((high - low) > 1e-9 * scale).sum())
    accuracy = None if y.is_floating_point() else correct / n
    full_kappa = kappa_sum / n if kappa else None
    return Snapshot(loss_sum / n, accuracy, phi_sq / n, live, int(low.numel()), full_kappa)


@dataclass(frozen=True)
class DivergenceGuard:
    """Checks each epoch against the starting model and chance (see the module docstring).

    Attributes:
        start: The starting model's :class:`Snapshot`.
        chance: The best constant predictor (:func:`chance_level`).
        kappa0: κ of the starting model on the whole training set.
        weight0: ``‖W‖²_F`` of the FAM layer at the start.
        fam: Whether λ > 0 (the κ checks run only then).
        kappa_exact: Whether the epoch's κ is exact; a Hutchinson κ is tested on its
            standard error.
    """

    start: Snapshot
    chance: Chance
    kappa0: float
    weight0: float
    fam: bool
    kappa_exact: bool = True
    loss_factor: float = 10.0
    loss_floor: float = 0.1
    lost_share: float = 0.5
    accuracy_floor: float = 0.05
    feature_factor: float = 10.0
    live_share: float = 0.5
    kappa_factor: float = 2.0
    kappa_level: float = 0.01
    saturation_kappa: float = 0.1
    saturation_weight: float = 10.0

    def check(self, now: Snapshot, stats: EpochStats, weight_sq: float) -> str | None:
        """Why the epoch counts as diverged (the check's name first), or None when fine.

        Args:
            now: The model at the end of the epoch (:func:`snapshot`).
            stats: The epoch's batch averages: κ, its standard error and batch count.
            weight_sq: ``‖W‖²_F`` of the FAM layer at the end of the epoch.
        """
        values = (stats.train_loss, stats.kappa, now.loss, now.phi_sq, weight_sq)
        if not all(map(math.isfinite, values)) or not math.isfinite(now.kappa or 0.0):
            return "non-finite check: the loss or κ became NaN or Inf"
        return (
            self._loss(now)
            or self._accuracy(now)
            or self._features(now)
            or self._kappa(now, stats, weight_sq)
        )

    def loss_limit(self) -> float:
        """The train loss above which the loss check fires."""
        l0, lc = self.start.loss, self.chance.loss
        toward_chance = l0 + max(self.lost_share * (lc - l0), self.loss_floor)
        return min(self.loss_factor * l0 + self.loss_floor, toward_chance)

    def _loss(self, now: Snapshot) -> str | None:
        limit = self.loss_limit()
        if now.loss <= limit:
            return None
        return (
            f"loss check: the train loss rose to {now.loss:.4g}, above {limit:.4g} (start "
            f"{self.start.loss:.4g}, chance {self.chance.loss:.4g}: more than half the way "
            f"to chance, or above {self.loss_factor:g}× the start + {self.loss_floor:g})"
        )

    def _accuracy(self, now: Snapshot) -> str | None:
        a0, ac, a = self.start.accuracy, self.chance.accuracy, now.accuracy
        if a0 is None or ac is None or a is None or a0 <= ac:
            return None
        limit = a0 - max(self.lost_share * (a0 - ac), self.accuracy_floor)
        if a >= limit:
            return None
        return (
            f"accuracy check: the train accuracy fell to {a:.3f}, below {limit:.3f} (start "
            f"{a0:.3f}, chance {ac:.3f}: more than half the way to chance)"
        )

    def _features(self, now: Snapshot) -> str | None:
        s = self.start
        if s.phi_sq > 0 and now.phi_sq < s.phi_sq / self.feature_factor:
            return (
                f"feature-collapse check: the mean ‖φ‖² of the layer's input fell to "
                f"{now.phi_sq:.3g}, {now.phi_sq / s.phi_sq:.2g}× its start {s.phi_sq:.3g}"
            )
        if s.live_units >= 2 and now.live_units < self.live_share * s.live_units:
            return (
                f"feature-collapse check: {now.live_units} of the layer's {s.units} input "
                f"units are live (not constant over the data), from {s.live_units} at the start"
            )
        return None

    def _kappa(self, now: Snapshot, stats: EpochStats, weight_sq: float) -> str | None:
        if not self.fam:
            return None
        kappa, stderr, batches = stats.kappa, stats.kappa_stderr, stats.batches
        if self.kappa_exact and now.kappa is not None:
            kappa = now.kappa  # the quantity κ₀ is: the whole set in eval mode (no dropout)
        limit = self.kappa_factor * self.kappa0
        fitting = now.loss < self.start.loss - self.loss_floor
        if kappa > limit and not fitting:
            if self.kappa_exact:
                return (
                    f"κ-rise check: κ rose to {kappa:.4g}, above {self.kappa_factor:g}× its "
                    f"start {self.kappa0:.4g}"
                )
            if stderr is not None and batches >= 2 and stderr > 0:
                from scipy.stats import t as student

                score = (kappa - limit) / stderr
                critical = float(student.ppf(1 - self.kappa_level, batches - 1))
                if score > critical:
                    return (
                        f"κ-rise check (Hutchinson): κ rose to {kappa:.4g} ± {stderr:.2g}, "
                        f"above {self.kappa_factor:g}× its start {self.kappa0:.4g} "
                        f"(t = {score:.2f} > {critical:.2f}, one-sided {self.kappa_level:g})"
                    )
        if kappa < self.saturation_kappa * self.kappa0 and weight_sq > (
            self.saturation_weight * self.weight0
        ):
            return (
                f"saturation check: κ collapsed to {kappa:.3g} ({kappa / self.kappa0:.1%} of "
                f"its start) while ‖W‖² grew {weight_sq / self.weight0:.3g}×: flatness by a "
                "saturated softmax, not a flatter minimum"
            )
        return None
