"""Fisher-Rao norm against per-sample gradients and Euler's theorem (docs/measures.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatcli.errors import FlatcliError
from flatcli.measures.fisher_rao import fisher_rao
from flatcli.measures.params import select_params

from . import models
from .dense import flat_values, per_sample_gradients

RTOL = 1e-10

CASES = {
    "mlp-weights": (models.mlp, (5,), "cross_entropy", False),
    "mlp-with-biases": (models.mlp, (5,), "cross_entropy", True),
    "mlp-mse": (models.mlp, (5,), "mse", False),
    "cnn-weights": (lambda: models.init(models.SmallCNN()), (2, 3, 3), "cross_entropy", False),
    "tanh-weights": (lambda: models.init(models.TanhHead()), (5,), "cross_entropy", False),
}


def brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, bias: bool):
    """(1/n) Σ_i ⟨θ, ∇ℓ_i⟩², one backward pass per sample."""
    names = select_params(model, include_bias=bias)
    grads = per_sample_gradients(model, names, x, y, loss)
    return float((grads @ flat_values(model, names)).pow(2).mean())


@pytest.mark.parametrize("name", list(CASES))
def test_matches_per_sample_gradient_loop(name: str) -> None:
    factory, shape, loss, bias = CASES[name]
    model = factory()
    x, y = models.classification_data(shape=shape)
    got = fisher_rao(model, (x, y), loss=loss, include_bias=bias, batch_size=7)
    assert got.stderr is None
    assert got.value == pytest.approx(brute_force(model, x, y, loss, bias), rel=RTOL)
    assert got.value > 1e-3


def test_biases_change_the_value_only_when_included() -> None:
    model = models.mlp()
    x, y = models.classification_data()
    without = fisher_rao(model, (x, y))
    with_bias = fisher_rao(model, (x, y), include_bias=True)
    assert without.details["parameters"] == 5 * 6 + 6 * 4 + 4 * 3
    assert with_bias.details["parameters"] == without.details["parameters"] + 6 + 4 + 3
    assert abs(with_bias.value - without.value) > 1e-3 * without.value


def test_euler_closed_form_for_bias_free_relu_network() -> None:
    r"""For a bias-free ReLU network with K weight layers, f(cθ) = c^K f(θ).

    Differentiating at c = 1 (Euler's theorem): ⟨θ, ∇_θ f_i⟩ = K f_i. By the chain rule
    ⟨θ, ∇_θ ℓ_i⟩ = ⟨∂ℓ/∂f, ⟨θ, ∇_θ f_i⟩⟩ = K ⟨∂ℓ/∂f, f_i⟩, and for softmax
    cross-entropy ℓ = logsumexp(f) − f_y, so ∂ℓ/∂f = softmax(f) − e_y and
    ⟨θ, ∇ℓ_i⟩ = K (⟨softmax(f_i), f_i⟩ − f_{i,y_i}). Hence
    FR = K² · mean_i (⟨softmax(f_i), f_i⟩ − f_{i,y_i})².
    """
    model = models.mlp(bias=False)  # fc1, fc2, fc: K = 3
    x, y = models.classification_data(n=40)
    with torch.no_grad():
        f = model(x)
    inner = (f.softmax(-1) * f).sum(-1) - f[torch.arange(len(y)), y]
    closed_form = 3**2 * float(inner.pow(2).mean())
    assert fisher_rao(model, (x, y), batch_size=16).value == pytest.approx(closed_form, rel=RTOL)


def rescaled(model: nn.Module, scales: torch.Tensor) -> nn.Module:
    """Neuron-wise reparameterization: rows of fc1 times α_s, columns of fc2 over α_s."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        new.fc1.weight.mul_(scales[:, None])
        new.fc2.weight.div_(scales[None, :])
    return new


def test_invariant_under_neuron_wise_rescaling_of_a_bias_free_relu_network() -> None:
    model = models.mlp(bias=False)
    x, y = models.classification_data()
    scales = torch.tensor([7.0, 0.2, 3.0, 1.5, 0.5, 11.0], dtype=torch.float64)
    other = rescaled(model, scales)
    torch.testing.assert_close(other(x), model(x))
    assert fisher_rao(other, (x, y)).value == pytest.approx(
        fisher_rao(model, (x, y)).value, rel=1e-10
    )


def test_normalization_scales_count_as_weights() -> None:
    model = models.with_batchnorm()
    x, y = models.classification_data()
    got = fisher_rao(model, (x, y))
    assert got.details["parameters"] == 5 * 6 + 6 + 6 * 3  # fc1.weight, bn.weight, fc.weight
    assert got.value == pytest.approx(
        brute_force(model.eval(), x, y, "cross_entropy", False), rel=RTOL
    )


def test_empty_data() -> None:
    x, y = models.classification_data()
    with pytest.raises(FlatcliError, match="empty"):
        fisher_rao(models.mlp(), (x[:0], y[:0]))
