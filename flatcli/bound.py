r"""The terms of Theorem 6 of Petzka et al. (2021) on the user's model.

Theorem 6 (informal): at a local minimum, with a smooth feature density and approximately
locally constant labels, with probability :math:`1-\Delta`,

.. math::

    \mathcal E_{gen} \lesssim |S|^{-\frac{2}{4+m}}
        \Big(\frac{\kappa}{2m} + C_1 + \frac{C_2}{\sqrt\Delta}\Big).

:math:`C_1, C_2` depend on the unknown data distribution, so the bound cannot be evaluated.
What can be computed (Petzka et al. §6, Fig. 4):

* ``sample_term`` :math:`|S|^{-2/(4+m)}` and ``flatness_term`` :math:`\kappa/(2m)`; their
  product is the feature-robustness term, Theorem 5's :math:`\delta^2\kappa/(2m)` at the
  kernel-density rate :math:`\delta = |S|^{-1/(4+m)}`.
* ``representativeness``: an empirical estimate of :math:`\mathcal E_{Rep}` (Eq. 3 of the
  paper, in feature space). Over several seeded random splits of the training features
  into halves ``a`` (the first ``n // 2`` of ``numpy.random.default_rng(seed)``'s k-th
  permutation) and ``b`` (the rest), a Gaussian kernel density estimate is fitted on ``a``
  (:class:`scipy.stats.gaussian_kde`, bandwidth by Scott's rule, in the span of the
  features' principal directions, constant coordinates left out), and

  .. math::

      \widehat{\mathcal E}_{Rep} = \frac1{|b|}\sum_{j\in b}\ell_j \;-\;
          \frac1{|a|}\sum_{i\in a}\mathbb E_{\xi\sim N(0,\Sigma_{KDE})}
          \big[\ell(\psi(W,\phi_i+\xi), y_i)\big],

  the held-out part's loss (standing in for the risk) minus the loss of the KDE's local
  distributions around ``a`` with locally constant labels (the second term of Eq. 3).
  The expectation over ξ is a Monte Carlo mean over ``draws`` samples per point. The
  standard error is over the splits.
* ``estimate`` = ``representativeness + sample_term · flatness_term``: an
  **approximation**, not a bound (the model was trained on both halves, the KDE is not
  the paper's variable-bandwidth kernel, and the constants are not computed).

Where the decomposition stops (reported in ``notes``):

* The robustness term is Theorem 5's second-order expansion taken at
  :math:`\delta = |S|^{-1/(4+m)}`, which is not small (0.82 on the bundled digits MLP).
  ``measured_robustness`` is the Monte Carlo :math:`\mathcal E_F(\delta)` at that δ
  (:func:`~flatcli.robustness.feature_robustness`), beside the term, so the size of the
  expansion's error shows.
* Eq. 5 splits the gap into representativeness and feature robustness over *one* family
  of local distributions. Here they differ: the KDE's Gaussians (covariance
  :math:`\Sigma_{KDE}`) for representativeness, Theorem 5's rotations
  :math:`(I + \delta A)\phi`, :math:`A` Haar on :math:`O(m)`, for robustness.
* ``m`` is the layer's input width, constant units included (as in κ/(2m) and the
  rate); the KDE works in the span of the non-constant ones (``kde_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import FlatcliError, UsageError
from .features import LayerSplit, batch_len, call_model, default_layer
from .losses import check_loss, per_sample_loss
from .measures.estimate import Estimate, mean_and_stderr
from .measures.params import batches_for, evaluating
from .robustness import feature_robustness


@dataclass(frozen=True)
class BoundTerms:
    """The computable terms of Theorem 6 and the approximate combination.

    Attributes:
        n: ``|S|``, the training samples.
        m: Feature dimension.
        kappa: Relative flatness κ of the layer (exact).
        sample_term: ``|S|^(−2/(4+m))``.
        flatness_term: ``κ/(2m)``.
        robustness_term: ``sample_term · flatness_term``.
        representativeness: KDE estimate of representativeness (mean over splits).
        representativeness_stderr: Its standard error over the splits.
        estimate: ``representativeness + robustness_term`` (an approximation, not a bound).
        train_loss: Mean training loss.
        test_loss: Mean test loss, when test data were given.
        gap: ``test_loss − train_loss``, when test data were given.
        splits: Random splits.
        draws: Kernel draws per training point.
        dead_units: Feature coordinates left out of the KDE (constant over the data).
        bandwidth: The KDE's bandwidth factor: Scott's ``n_a^(−1/(r+4))`` (``r`` the span's
            rank) unless one was given.
        bandwidth_rule: ``scott`` or ``given``.
        seed: The seed.
        layer: Layer name.
        kde_dim: Dimension of the span the KDE is fitted in (``m`` less the constant and
            linearly dependent coordinates).
        robustness_delta: ``|S|^(−1/(4+m))``, the δ of the robustness term.
        measured_robustness: Monte Carlo ``E_F`` at that δ (labels held constant).
        measured_robustness_stderr: Its standard error over the probes.
        robustness_probes: Antithetic Haar pairs of that estimate.
        notes: Where Theorem 5 and Eq. 5 stop for these numbers, in words.
    """

    n: int
    m: int
    kappa: float
    sample_term: float
    flatness_term: float
    robustness_term: float
    representativeness: float
    representativeness_stderr: float | None
    estimate: float
    train_loss: float
    test_loss: float | None
    gap: float | None
    splits: int
    draws: int
    dead_units: int
    bandwidth: float
    seed: int
    layer: str
    bandwidth_rule: str = "scott"
    kde_dim: int | None = None
    robustness_delta: float | None = None
    measured_robustness: float | None = None
    measured_robustness_stderr: float | None = None
    robustness_probes: int | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers become None)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        out["notes"] = list(self.notes)
        out["estimate_is"] = "an approximation, not a bound"
        return out

    def as_estimate(self) -> Estimate:
        """``bound_estimate`` as a registry measure (value: the combined estimate)."""
        return Estimate(
            self.estimate,
            self.representativeness_stderr,
            f"approximation (not a bound): KDE representativeness over {self.splits} splits "
            f"+ |S|^(−2/(4+m))·κ/(2m)",
            {
                k: getattr(self, k)
                for k in (
                    "representativeness",
                    "sample_term",
                    "flatness_term",
                    "robustness_term",
                    "kappa",
                    "m",
                    "splits",
                    "draws",
                    "bandwidth",
                    "seed",
                )
            },
        )


def bound_terms(
    model: nn.Module,
    layer: str | None,
    data: Any,
    *,
    test_data: Any = None,
    loss: str = "cross_entropy",
    splits: int = 10,
    draws: int = 8,
    bandwidth: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    robustness_probes: int = 32,
    progress: Callable[[str], None] | None = None,
) -> BoundTerms:
    """The terms of Theorem 6 on ``data`` (the training set), see the module docstring.

    Args:
        model: The network (eval mode while measuring).
        layer: An untied ``nn.Linear`` feature layer (default: the last one).
        data: The training data: ``(x, y)`` tensors, a DataLoader or Batches.
        test_data: Test data for the actual gap, or None.
        loss: ``cross_entropy`` or ``mse``.
        splits: Random half splits for the representativeness estimate (at least 2).
        draws: Kernel samples per training point and split.
        bandwidth: The KDE's bandwidth factor (kernel covariance = factor² × the sample
            covariance); None: Scott's rule ``n_a^(−1/(r+4))``. In many dimensions Scott's
            factor is close to 1, kernels as wide as the data, and the estimate is then
            dominated by the smoothing (see docs/theory.md).
        seed: Seed of the splits, the kernel draws and the robustness probes.
        batch_size: Batch size when data are in memory.
        robustness_probes: Antithetic Haar pairs for the measured ``E_F`` at
            ``δ = |S|^(−1/(4+m))`` (at least 2).
        progress: Called with a line saying what is being computed.
    """
    loss = check_loss(loss)
    if splits < 2:
        raise UsageError(f"--splits must be at least 2 (for a standard error), got {splits}")
    if draws < 1:
        raise UsageError(f"--draws must be at least 1, got {draws}")
    if robustness_probes < 2:
        raise UsageError(f"--probes must be at least 2, got {robustness_probes}")
    if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
        raise UsageError(f"--bandwidth must be a positive number, got {bandwidth}")
    split = LayerSplit(model, layer or default_layer(model))
    if split.kind != "linear" or split.tied:
        raise UsageError(
            f"the bound needs an untied nn.Linear feature layer; {split.name!r} is "
            f"{type(split.layer).__name__}{' (tied)' if split.tied else ''}"
        )
    note = progress or (lambda _msg: None)
    batches = batches_for(model, data, batch_size=batch_size)
    w = split.weight_matrix().detach()
    m = w.shape[1]
    with evaluating(model), torch.no_grad():
        note("features, losses and κ (one pass)")
        cuts, losses, kappa_sum = [], [], 0.0
        for x, y in batches:
            cut = split.cut(x)
            base = per_sample_loss(split.downstream(cut.z, cut.context), y, loss)
            if not torch.isfinite(base).all():
                raise FlatcliError("the loss is NaN or Inf on this data")
            q, _ = split.quadratic_forms(cut, y, loss, [w])
            kappa_sum += float(((cut.phi * cut.phi).sum(1).double() * q[:, 0].double()).sum())
            cuts.append((cut, y))
            losses.append(base.double().cpu())
        if not cuts:
            raise FlatcliError("the dataset is empty")
        ell = torch.cat(losses).numpy()
        n = ell.shape[0]
        if n < 4:
            raise UsageError(f"the bound needs at least 4 samples, got {n}")
        phi = torch.cat([c.phi for c, _ in cuts]).double().cpu().numpy()
        alive = phi.std(axis=0) > 1e-12 * max(1.0, float(np.abs(phi).max()))
        note(f"KDE representativeness over {splits} random splits")
        order_rng = np.random.default_rng(seed)
        orders = [order_rng.permutation(n) for _ in range(splits)]
        rng = np.random.default_rng([seed, 1])  # the kernel draws
        reps, factor, rank = [], math.nan, 0
        for order in orders:
            a, b = np.sort(order[: n // 2]), order[n // 2 :]
            cov, factor, rank = _kde_covariance(phi[a][:, alive], bandwidth)
            in_a = np.zeros(n, dtype=bool)
            in_a[a] = True
            smoothed = _smoothed_loss(split, cuts, loss, in_a, alive, cov, draws, rng)
            reps.append(float(ell[b].mean()) - smoothed)
        rep, rep_se = mean_and_stderr(reps)
        test_loss = None
        if test_data is not None:
            note("test loss")
            total, count = 0.0, 0
            for x, y in batches_for(model, test_data, batch_size=batch_size):
                total += float(per_sample_loss(call_model(model, x), y, loss).double().sum())
                count += batch_len(x)
            if count == 0:
                raise FlatcliError("the test dataset is empty")
            test_loss = total / count
    kappa = kappa_sum / n
    sample_term = n ** (-2 / (4 + m))
    flatness_term = kappa / (2 * m)
    train_loss = float(ell.mean())
    delta = n ** (-1 / (4 + m))
    note(f"feature robustness at δ = |S|^(−1/(4+m)) = {delta:.3g}")
    measured = feature_robustness(
        model, split.name, batches, [delta], loss=loss, probes=robustness_probes, seed=seed
    ).points[0]
    dead = int((~alive).sum())
    return BoundTerms(
        n=n,
        m=m,
        kappa=kappa,
        sample_term=sample_term,
        flatness_term=flatness_term,
        robustness_term=sample_term * flatness_term,
        representativeness=rep,
        representativeness_stderr=rep_se,
        estimate=rep + sample_term * flatness_term,
        train_loss=train_loss,
        test_loss=test_loss,
        gap=None if test_loss is None else test_loss - train_loss,
        splits=splits,
        draws=draws,
        dead_units=dead,
        bandwidth=factor,
        seed=seed,
        layer=split.name,
        bandwidth_rule="scott" if bandwidth is None else "given",
        kde_dim=rank,
        robustness_delta=delta,
        measured_robustness=measured.feature_robustness,
        measured_robustness_stderr=measured.stderr,
        robustness_probes=robustness_probes,
        notes=_bound_notes(delta, measured, sample_term * flatness_term, m, dead, rank),
    )


def _bound_notes(
    delta: float, measured: Any, term: float, m: int, dead: int, rank: int
) -> tuple[str, ...]:
    """Where Theorem 5 and Eq. 5 stop for these numbers (module docstring), in words."""
    se = measured.stderr or 0.0
    fold = measured.feature_robustness / term if term > 0 else math.inf
    if term > 0 and abs(measured.feature_robustness - term) <= max(3 * se, 0.1 * term):
        verdict = "they agree, so the expansion holds at this δ"
    else:
        verdict = (
            f"{fold:.3g}× apart: Theorem 5's expansion, valid as δ → 0, does not hold at this δ"
        )
    return (
        f"the robustness term is Theorem 5's δ²κ/(2m) at δ = |S|^(−1/(4+m)) = {delta:.3g}, "
        f"not a small δ; measured E_F there is {measured.feature_robustness:.3g} ± {se:.2g} "
        f"against the term's {term:.3g}: {verdict}",
        "Eq. 5 needs one family of local distributions for both terms; here "
        "representativeness uses the KDE's Gaussian kernels and robustness the Haar "
        "rotations (I + δA)φ of Theorem 5, so their sum is not the paper's decomposition",
        f"m = {m} counts every input unit of the layer (κ/(2m) and the rate |S|^(−2/(4+m)) "
        f"use it); the KDE works in the {rank}-dimensional span of the non-constant ones"
        + (f" ({dead} constant over the data)" if dead else ""),
    )


def _kde_covariance(
    points: np.ndarray, bandwidth: float | None
) -> tuple[np.ndarray, float, int]:
    """The kernel covariance of scipy's Gaussian KDE (Scott's rule), its factor, and the
    dimension of the span it is fitted in.

    The KDE is fitted in the span of the points' principal directions (eigenvalues of the
    sample covariance above 1e-10 of the largest), as scipy advises for data in a
    lower-dimensional subspace; the kernel covariance is mapped back to feature space.
    """
    from scipy.stats import gaussian_kde

    if points.shape[1] == 0:
        raise FlatcliError("every feature coordinate is constant over the data")
    evals, evecs = np.linalg.eigh(np.atleast_2d(np.cov(points.T)))
    basis = evecs[:, evals > 1e-10 * max(float(evals.max()), 1e-300)]
    if basis.shape[1] == 0 or points.shape[0] <= basis.shape[1]:
        raise FlatcliError(
            f"the KDE needs more feature vectors than dimensions ({points.shape[0]} in a "
            f"{basis.shape[1]}-dimensional span); use more samples"
        )
    try:
        kde = gaussian_kde((points @ basis).T, bw_method=bandwidth or "scott")
    except (np.linalg.LinAlgError, ValueError) as e:
        raise FlatcliError(f"the KDE cannot be fitted on the features: {e}") from None
    cov = basis @ np.atleast_2d(kde.covariance) @ basis.T
    return cov, float(kde.factor), int(basis.shape[1])


def _smoothed_loss(
    split: LayerSplit,
    cuts: list[Any],
    loss: str,
    in_a: np.ndarray,
    alive: np.ndarray,
    cov: np.ndarray,
    draws: int,
    rng: np.random.Generator,
) -> float:
    """Mean over ``a`` of ``E_ξ ℓ(ψ(W, φ_i + ξ), y_i)``, ξ on the live coordinates.

    The noise is drawn for all samples at once, so the batch size does not change it.
    """
    n = in_a.shape[0]
    live = torch.from_numpy(np.flatnonzero(alive))
    total = 0.0
    for _ in range(draws):
        xi_all = rng.multivariate_normal(np.zeros(cov.shape[0]), cov, size=n, method="eigh")
        offset = 0
        for cut, y in cuts:
            b = cut.phi.shape[0]
            rows = torch.from_numpy(in_a[offset : offset + b])
            xi = torch.from_numpy(xi_all[offset : offset + b])
            offset += b
            if not bool(rows.any()):
                continue
            moved = cut.phi.clone()
            moved[:, live] += xi.to(moved)
            out = split.downstream(split.layer_forward(moved), cut.context)
            total += float(per_sample_loss(out, y, loss)[rows].double().sum())
    return total / (int(in_a.sum()) * draws)
