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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers become None)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
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
        seed: Seed of the splits and the kernel draws.
        batch_size: Batch size when data are in memory.
        progress: Called with a line saying what is being computed.
    """
    loss = check_loss(loss)
    if splits < 2:
        raise UsageError(f"--splits must be at least 2 (for a standard error), got {splits}")
    if draws < 1:
        raise UsageError(f"--draws must be at least 1, got {draws}")
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
        reps, factor = [], math.nan
        for order in orders:
            a, b = np.sort(order[: n // 2]), order[n // 2 :]
            cov, factor = _kde_covariance(phi[a][:, alive], bandwidth)
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
        dead_units=int((~alive).sum()),
        bandwidth=factor,
        seed=seed,
        layer=split.name,
        bandwidth_rule="scott" if bandwidth is None else "given",
    )


def _kde_covariance(points: np.ndarray, bandwidth: float | None) -> tuple[np.ndarray, float]:
    """The kernel covariance of scipy's Gaussian KDE (Scott's rule) and Scott's factor.

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
    return cov, float(kde.factor)


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
