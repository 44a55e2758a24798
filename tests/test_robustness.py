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


# --------------------------------------------------------------------------- kinks (issue 21)


class FunctionalReLU(nn.Module):
    """``F.relu`` after the layer ``a``, in a traced graph (no ReLU module to find)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.relu(self.a(x)))


@pytest.mark.parametrize(
    ("model", "layer", "kinks"),
    [
        (models.mlp(), "fc", []),
        (models.mlp(), "fc2", ["act2 (ReLU)"]),
        (models.mlp(), "fc1", ["act1 (ReLU)", "act2 (ReLU)"]),
        (models.mlp("tanh"), "fc1", []),
        (models.init(models.TanhHead()), "fc1", []),
        (models.init(models.Residual()), "b", []),  # the ReLU is before b
        (models.init(FunctionalReLU()), "a", ["relu (relu)"]),
        (models.init(models.ControlFlow()), "b", None),  # hooks: no structure to read
    ],
    ids=["logits", "fc2", "fc1", "tanh", "tanh-fx", "residual", "F.relu", "hooks"],
)
def test_kinks_after_the_layer_are_found(model: nn.Module, layer: str, kinks) -> None:  # noqa: ANN001
    x, y = models.classification_data(n=12)
    got = feature_robustness(model, layer, (x, y), [1e-3, 1e-2], probes=2)
    assert got.kinks_after_layer == kinks
    assert all(p.kinks == bool(kinks) for p in got.points)
    assert any("kinks after the layer" in n for n in got.notes) == bool(kinks)
    assert any("could not be read" in n for n in got.notes) == (kinks is None)
    assert got.to_dict()["kinks_after_layer"] == kinks


def test_a_sample_on_a_kink_makes_feature_robustness_first_order() -> None:
    """Why kinks matter: one hidden ReLU unit whose pre-activation is exactly 0 on every
    sample. κ (autograd's Hessian, relu'' = 0, relu'(0) = 0) is 0, yet the antithetic pair
    gives ½(relu(δv) + relu(−δv)) = ½δ|v| > 0: E_F grows like δ, not δ², and Theorem 5's
    prediction (0) misses it entirely."""
    model = nn.Sequential(nn.Linear(3, 1), nn.ReLU(), nn.Linear(1, 2)).double()
    x = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [2.0, 0.1, -0.4]], dtype=torch.float64)
    y = torch.tensor([1, 1, 1])  # raising the hidden unit raises every sample's loss
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.4, -0.3, 0.7]], dtype=torch.float64))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.5], [-1.0]], dtype=torch.float64))
        model[2].bias.zero_()
    phi_layer = model[0]
    with torch.no_grad():  # move the data so that every pre-activation is exactly 0
        w = phi_layer.weight[0]
        x = x - (x @ w).unsqueeze(1) * w / w.dot(w)
        assert float((x @ w).abs().max()) < 1e-15
    got = feature_robustness(model, "0", (x, y), [1e-4, 2e-4, 4e-4], probes=64, seed=1)
    assert got.kappa == 0.0 and got.kinks_after_layer == ["1 (ReLU)"]
    rises = [p.feature_robustness for p in got.points]
    assert rises[0] > 0
    assert rises[1] / rises[0] == pytest.approx(2.0, rel=1e-3)  # first order in δ
    assert rises[2] / rises[0] == pytest.approx(4.0, rel=1e-3)


def test_ratio_settles_when_the_loss_is_smooth_and_not_when_it_jumps() -> None:
    from flatcli.robustness import _ratio_settled

    model = quadratic_model()  # exactly quadratic: the same ratio at every δ
    x, y = models.classification_data(n=40, shape=(6,))
    got = feature_robustness(model, "0", (x, y), [1e-3, 1e-2, 0.1], loss="mse", probes=16)
    assert got.ratio_settled is True and got.to_dict()["ratio_settled"] is True
    kappa, m = 2.0, 4
    deltas = [0.01, 0.1]
    predicted = torch.tensor([d**2 * kappa / (2 * m) for d in deltas], dtype=torch.float64)
    noise = 1 + 0.01 * torch.randn(32, 2, generator=models.seeded(0), dtype=torch.float64)
    assert _ratio_settled(predicted * noise, deltas, kappa, m) is True  # ratio ≈ 1 at both
    jump = predicted * noise * torch.tensor([1.0, 1.3], dtype=torch.float64)
    assert _ratio_settled(jump, deltas, kappa, m) is False  # 1 → 1.3: not settled
    wild = predicted * (1 + torch.randn(32, 2, generator=models.seeded(1), dtype=torch.float64))
    wild[:, 1] = wild[:, 1] * 1.3
    assert _ratio_settled(wild, deltas, kappa, m) is True  # within its own noise
    assert _ratio_settled((predicted * noise)[:, :1], deltas[:1], kappa, m) is None
