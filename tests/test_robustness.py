"""Feature robustness (Theorem 5) and the Haar sampler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatcli.errors import UsageError
from flatcli.measures.relative_flatness import relative_flatness
from flatcli.robustness import feature_robustness, haar_orthogonal

from . import models


def test_haar_matrices_are_orthogonal_with_haar_trace_moments() -> None:
    k, m = 4000, 5
    a = haar_orthogonal(k, m, torch.Generator().manual_seed(3))
    eye = torch.eye(m, dtype=torch.float64)
    assert float((a.transpose(1, 2) @ a - eye).abs().max()) < 1e-10
    # For Haar O(m), m ≥ 2: E[Tr A] = 0 and E[(Tr A)²] = 1, with Var((Tr A)²) = 2 (m ≥ 4).
    tr = torch.diagonal(a, dim1=1, dim2=2).sum(1)
    se = 1 / k**0.5
    assert abs(float(tr.mean())) < 4 * se
    assert abs(float(tr.pow(2).mean()) - 1) < 4 * (2 / k) ** 0.5
    # Both components of O(m): det = ±1, half each.
    det = torch.linalg.det(a)
    assert float((det.abs() - 1).abs().max()) < 1e-10
    assert abs(float((det > 0).double().mean()) - 0.5) < 4 * 0.5 * se


def test_haar_sampler_is_seeded() -> None:
    one = haar_orthogonal(3, 4, torch.Generator().manual_seed(1))
    two = haar_orthogonal(3, 4, torch.Generator().manual_seed(1))
    assert torch.equal(one, two)


def quadratic_model() -> nn.Module:
    """A lone linear layer with MSE: the loss is exactly quadratic in the features."""
    return models.init(nn.Sequential(nn.Linear(6, 3)))


def test_quadratic_loss_gives_theorem_5_exactly_up_to_monte_carlo_error() -> None:
    model = quadratic_model()
    x, y = models.classification_data(n=40, shape=(6,))
    deltas = [0.01, 0.1, 1.0, 3.0]
    got = feature_robustness(model, "0", (x, y), deltas, loss="mse", probes=400, seed=2)
    kappa = relative_flatness(model, "0", (x, y), loss="mse").value
    assert got.kappa == pytest.approx(kappa, rel=1e-10)
    assert got.m == 6 and got.n == 40
    for p in got.points:
        assert p.predicted == pytest.approx(p.delta**2 * kappa / 12, rel=1e-12)
        assert p.stderr is not None and p.stderr < 0.1 * p.predicted
        assert abs(p.feature_robustness - p.predicted) < 4 * p.stderr
    # Quadratic: every draw's rise is δ² times the same number, so with common random
    # numbers the ratio is the same at every δ (only rounding differs).
    ratios = [p.ratio for p in got.points]
    assert max(ratios) - min(ratios) < 1e-8


def test_cross_entropy_small_delta_matches_prediction() -> None:
    model = models.mlp()
    x, y = models.classification_data(n=30)
    got = feature_robustness(model, "fc", (x, y), [1e-3, 1.0], probes=300, seed=0)
    small, large = got.points
    assert abs(small.feature_robustness - small.predicted) < 4 * small.stderr
    assert small.stderr < 0.15 * small.predicted
    # Antithetic pairs leave only even orders: the relative error at δ = 1e-3 is O(δ²).
    assert abs(large.ratio - 1) > 1e-3  # the large δ is outside the quadratic regime here


def test_label_change_variant_equals_constant_labels_at_tiny_delta() -> None:
    model = models.mlp()
    x, y = models.classification_data(n=30)
    got = feature_robustness(model, "fc", (x, y), [1e-4, 5.0], probes=8, label_change=True)
    tiny, big = got.points
    assert tiny.labels_changed == 0.0
    assert tiny.label_change == pytest.approx(tiny.feature_robustness, rel=1e-12)
    assert big.labels_changed is not None and big.labels_changed > 0
    assert any("nearest" in n for n in got.notes)
    assert "label_change" in tiny.to_dict()
    plain = feature_robustness(model, "fc", (x, y), [1e-4], probes=8)
    assert "label_change" not in plain.points[0].to_dict()
    assert plain.points[0].feature_robustness == tiny.feature_robustness  # same draws


def test_rejects_bad_input() -> None:
    x, y = models.classification_data()
    with pytest.raises(UsageError, match="deltas"):
        feature_robustness(models.mlp(), "fc", (x, y), [0.0])
    with pytest.raises(UsageError, match="probes"):
        feature_robustness(models.mlp(), "fc", (x, y), [0.1], probes=1)
    with pytest.raises(UsageError, match="nn.Linear"):
        xc, yc = models.classification_data(shape=(2, 3, 3))
        feature_robustness(models.init(models.SmallCNN()), "conv2", (xc, yc), [0.1])
    with pytest.raises(UsageError, match="integer"):
        feature_robustness(
            models.mlp(), "fc", (x, torch.randn(24, 3).double()), [0.1], loss="mse",
            label_change=True,
        )
