"""Theorem 6's terms recomputed by hand on a tiny case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flatcli.bound import bound_terms
from flatcli.errors import UsageError
from flatcli.registry import MeasureConfig, run_measures, select

from . import models


def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A lone 3 → 2 linear layer with MSE: the loss is quadratic in the features."""
    model = models.init(nn.Sequential(nn.Linear(3, 2)))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    return model, x, y


def test_terms_match_hand_computation() -> None:
    model, x, y = tiny()
    xt, yt = x[:10] + 0.3, y[:10]
    splits, draws = 6, 400
    got = bound_terms(
        model, "0", (x, y), test_data=(xt, yt), loss="mse", splits=splits, draws=draws, seed=5
    )
    w, bias = model[0].weight.detach(), model[0].bias.detach()
    n, m, d = 40, 3, 2

    def losses(xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return ((xx @ w.T + bias - yy) ** 2).mean(1)

    ell = losses(x, y).numpy()
    # κ for MSE on the output layer: (2/d)(1/n) Σ ‖φ_i‖² ‖W‖²_F.
    kappa = (2 / d) * float((x * x).sum(1).mean()) * float((w * w).sum())
    assert got.kappa == pytest.approx(kappa, rel=1e-12)
    assert got.sample_term == pytest.approx(n ** (-2 / (4 + m)), rel=1e-15)
    assert got.flatness_term == pytest.approx(kappa / (2 * m), rel=1e-12)
    assert got.robustness_term == pytest.approx(got.sample_term * got.flatness_term)
    # Representativeness: for a quadratic loss, E_ξ ℓ(φ + ξ) = ℓ(φ) + Tr(W Σ Wᵀ)/d exactly,
    # with Σ the KDE kernel covariance, Scott's factor² times the sample covariance of a.
    order_rng = np.random.default_rng(5)
    want = []
    for _ in range(splits):
        order = order_rng.permutation(n)
        a, b = order[: n // 2], order[n // 2 :]
        factor = (n // 2) ** (-1 / (m + 4))
        cov = factor**2 * np.cov(x.numpy()[a].T, ddof=1)
        noise = float(np.trace(w.numpy() @ cov @ w.numpy().T)) / d
        want.append(ell[b].mean() - (ell[a].mean() + noise))
    assert got.bandwidth == pytest.approx((n // 2) ** (-1 / (m + 4)), rel=1e-12)
    # Only the kernel draws are random: 400 draws × 20 points per split.
    assert got.representativeness == pytest.approx(float(np.mean(want)), abs=0.02 * noise)
    assert got.representativeness_stderr == pytest.approx(
        float(np.std(want, ddof=1)) / math.sqrt(splits), rel=0.05
    )
    assert got.estimate == pytest.approx(got.representativeness + got.robustness_term)
    assert got.train_loss == pytest.approx(float(ell.mean()), rel=1e-12)
    test_loss = float(losses(xt, yt).mean())
    assert got.test_loss == pytest.approx(test_loss, rel=1e-12)
    assert got.gap == pytest.approx(test_loss - float(ell.mean()), rel=1e-10)
    assert got.to_dict()["estimate_is"] == "an approximation, not a bound"


def test_bound_estimate_is_a_registry_measure() -> None:
    model, x, y = tiny()
    config = MeasureConfig(layer="0", loss="mse", seed=5)
    names = select("bound_estimate")
    est = run_measures(model, _batches(x, y), names, config)["bound_estimate"]
    direct = bound_terms(model, "0", (x, y), loss="mse", seed=5)
    assert est.value == pytest.approx(direct.estimate, rel=1e-12)
    assert est.stderr == pytest.approx(direct.representativeness_stderr, rel=1e-12)
    assert "not a bound" in est.method
    assert "bound_estimate" not in select(None)


def _batches(x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
    from flatcli.data import as_batches

    return as_batches((x, y), batch_size=16)


def test_constant_feature_coordinates_are_left_out_of_the_kde() -> None:
    model = models.mlp()
    x, y = models.classification_data(n=60)
    with torch.no_grad():  # unit 1 of fc2's output dead on every input
        model.fc2.weight[1].zero_()
        model.fc2.bias[1] = -1.0
    got = bound_terms(model, "fc", (x, y), splits=3, draws=2)
    assert got.dead_units >= 1 and math.isfinite(got.estimate)


def test_rejects_bad_options() -> None:
    model, x, y = tiny()
    with pytest.raises(UsageError, match="splits"):
        bound_terms(model, "0", (x, y), loss="mse", splits=1)
    with pytest.raises(UsageError, match="nn.Linear"):
        xc, yc = models.classification_data(shape=(2, 3, 3))
        bound_terms(models.init(models.SmallCNN()), "conv2", (xc, yc))


def test_given_bandwidth_sets_the_kernel_width() -> None:
    model, x, y = tiny()
    got = bound_terms(model, "0", (x, y), loss="mse", splits=3, draws=200, bandwidth=0.2)
    assert got.bandwidth == 0.2 and got.bandwidth_rule == "given"
    scott = bound_terms(model, "0", (x, y), loss="mse", splits=3, draws=200)
    assert scott.bandwidth_rule == "scott"
    # A narrower kernel smooths less: the smoothed loss is lower, representativeness higher.
    assert got.representativeness > scott.representativeness
    with pytest.raises(UsageError, match="bandwidth"):
        bound_terms(model, "0", (x, y), loss="mse", bandwidth=0.0)


def test_all_leaves_the_optional_bound_estimate_out() -> None:
    assert "bound_estimate" not in select("all")
    assert select("bound_estimate,relative_flatness") == ["bound_estimate", "relative_flatness"]


def test_measured_robustness_at_the_rate_delta_beside_the_term() -> None:
    """On a loss that is exactly quadratic in the features the expansion holds at any δ,
    and the measured E_F at δ = |S|^(−1/(4+m)) agrees with the robustness term; it is the
    same estimate as :func:`feature_robustness` there (same seed, same probes)."""
    from flatcli.robustness import feature_robustness

    model, x, y = tiny()
    got = bound_terms(model, "0", (x, y), loss="mse", splits=2, draws=2, robustness_probes=200)
    delta = 40 ** (-1 / (4 + 3))
    assert got.robustness_delta == pytest.approx(delta, rel=1e-15)
    direct = feature_robustness(model, "0", (x, y), [delta], loss="mse", probes=200)
    assert got.measured_robustness == pytest.approx(direct.points[0].feature_robustness)
    assert direct.points[0].predicted == pytest.approx(got.robustness_term, rel=1e-12)
    se = got.measured_robustness_stderr
    assert abs(got.measured_robustness - got.robustness_term) < 4 * se
    assert "they agree" in got.notes[0]
    assert "Haar" in got.notes[1] and "KDE" in got.notes[1]
    assert got.kde_dim == 3 and "m = 3" in got.notes[2]
    assert got.to_dict()["notes"] == list(got.notes)
    with pytest.raises(UsageError, match="probes"):
        bound_terms(model, "0", (x, y), loss="mse", robustness_probes=1)
