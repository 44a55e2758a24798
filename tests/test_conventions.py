"""The conventions of issue 11 against independent dense oracles.

* ``--l2 α``: κ, κ̃ and Tr(H) of the regularized objective ``E + (α/2)‖W‖²`` against the
  dense float64 Hessian of that objective.
* ``--fr-labels model``: the Fisher-Rao norm with labels drawn from the softmax against a
  brute-force expectation (one backward pass per sample and label).
* ``--dead-units drop`` is the default everywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatcli.errors import UsageError
from flatcli.measures.fisher_rao import fisher_rao
from flatcli.measures.params import select_params
from flatcli.measures.relative_flatness import layer_measures
from flatcli.registry import MeasureConfig, MeasureOptions

from . import models
from .dense import flat_values, per_sample_gradients
from .reference import mean_loss_of_weight

ALPHA = 0.37


def regularized_identity1_trace(model, layer, x, y, loss, alpha, left, right) -> float:
    """``Tr ∇²_A [E + (α/2)‖·‖²](W + left·A·right)`` by a dense Hessian over ``A``."""
    w = dict(model.named_modules())[layer].weight.detach()
    w2 = w.reshape(w.shape[0], -1)
    m = w2.shape[1]
    f = mean_loss_of_weight(model, layer, x, y, loss)

    def g(a: torch.Tensor) -> torch.Tensor:
        moved = (w2 + left @ a.reshape(m, m) @ right).reshape(w.shape)
        return f(moved) + 0.5 * alpha * moved.pow(2).sum()

    h = torch.autograd.functional.hessian(g, torch.zeros(m * m, dtype=w.dtype))
    return float(torch.diagonal(h).sum())


@pytest.mark.parametrize(
    ("factory", "layer", "loss", "method"),
    [
        (models.mlp, "fc", "cross_entropy", "exact"),
        (models.mlp, "fc2", "cross_entropy", "exact"),
        (lambda: models.init(models.TanhHead()), "fc1", "mse", "exact"),
    ],
)
def test_l2_matches_dense_hessian_of_regularized_loss(factory, layer, loss, method) -> None:
    model = factory()
    x, y = models.classification_data()
    got = layer_measures(model, layer, (x, y), loss=loss, method=method, normalize=True, l2=ALPHA)
    plain = layer_measures(model, layer, (x, y), loss=loss, method=method, normalize=True)
    w = dict(model.named_modules())[layer].weight.detach()
    d, m = w.shape
    # κ: Definition 3 read off the dense Hessian of the regularized objective.
    f = mean_loss_of_weight(model, layer, x, y, loss)
    h = torch.autograd.functional.hessian(
        lambda v: f(v.reshape(d, m)) + 0.5 * ALPHA * v.pow(2).sum(), w.reshape(-1)
    ).reshape(d, m, d, m)
    kappa = sum(
        float(w[s] @ w[t]) * float(torch.diagonal(h[s, :, t, :]).sum())
        for s in range(d)
        for t in range(d)
    )
    assert got["relative_flatness"].value == pytest.approx(kappa, rel=1e-10)
    trace = float(torch.diagonal(h.reshape(d * m, d * m)).sum())
    assert got["layer_hessian_trace"].value == pytest.approx(trace, rel=1e-10)
    assert got["layerwise_flatness"].value == pytest.approx(trace * float(w.pow(2).sum()))
    # κ̃: Definition 3 on the explicitly normalized twin (dead units removed), with the
    # penalty (α/2)‖W̃‖² on its weight.
    with torch.no_grad():
        phi = models_phi(model, layer, x)
    sigma = phi.std(0, unbiased=False)
    keep = sigma > 1e-12
    twin = copy.deepcopy(model)
    lin = nn.Linear(int(keep.sum()), d).double()
    module = dict(model.named_modules())[layer]
    with torch.no_grad():
        lin.weight.copy_(w[:, keep] * sigma[keep])
        lin.bias.copy_(module.bias)
    setattr(twin, layer, nn.Sequential(Pick(keep, 1 / sigma[keep]), lin))
    want = dense_kappa_of(twin, f"{layer}.1", x, y, loss, ALPHA)
    assert got["relative_flatness_normalized"].value == pytest.approx(want, rel=1e-9)
    # The penalty's term is not small here, so the test can tell it apart from none.
    assert got["relative_flatness"].value - plain["relative_flatness"].value > 0.05 * kappa
    assert "L2 term" in got["relative_flatness"].method


class Pick(nn.Module):
    """``φ ↦ V⁺φ`` restricted to the kept coordinates."""

    def __init__(self, keep: torch.Tensor, inverse: torch.Tensor) -> None:
        super().__init__()
        self.keep, self.inverse = keep, inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.keep] * self.inverse


def dense_kappa_of(model, layer, x, y, loss, alpha) -> float:
    """Definition 3 from the dense Hessian of ``E(W) + (α/2)‖W‖²`` in ``layer``'s weight."""
    w = dict(model.named_modules())[layer].weight.detach()
    d, m = w.shape
    f = mean_loss_of_weight(model, layer, x, y, loss)
    h = torch.autograd.functional.hessian(
        lambda v: f(v.reshape(d, m)) + 0.5 * alpha * v.pow(2).sum(), w.reshape(-1)
    ).reshape(d, m, d, m)
    return sum(
        float(w[s] @ w[t]) * float(torch.diagonal(h[s, :, t, :]).sum())
        for s in range(d)
        for t in range(d)
    )


def models_phi(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    captured = {}
    module = dict(model.named_modules())[layer]

    def hook(mod: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured["phi"] = inputs[0]

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    return captured["phi"]


def test_l2_on_a_conv_layer_with_identity1() -> None:
    model = models.init(models.SmallCNN())
    x, y = models.classification_data(n=10, shape=(2, 3, 3))
    got = layer_measures(model, "conv2", (x, y), method="exact", l2=ALPHA)
    w2 = model.conv2.weight.detach().reshape(2, -1)
    eye = torch.eye(w2.shape[1], dtype=w2.dtype)
    want = regularized_identity1_trace(model, "conv2", x, y, "cross_entropy", ALPHA, w2, eye)
    assert got["relative_flatness"].value == pytest.approx(want, rel=1e-9)


def test_l2_rejects_negative() -> None:
    x, y = models.classification_data()
    with pytest.raises(UsageError, match="--l2"):
        layer_measures(models.mlp(), "fc", (x, y), l2=-1.0)


def brute_force_model_fisher(model, x, y_shape_like, bias: bool) -> float:
    """(1/n) Σ_i Σ_y p_i(y) ⟨θ, ∇ℓ(f_i, y)⟩², one backward pass per (sample, label)."""
    names = select_params(model, include_bias=bias)
    theta = flat_values(model, names)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    total = torch.zeros((), dtype=torch.float64)
    for label in range(p.shape[1]):
        y = torch.full_like(y_shape_like, label)
        along = per_sample_gradients(model, names, x, y, "cross_entropy") @ theta
        total = total + (p[:, label] * along**2).sum()
    return float(total / x.shape[0])


@pytest.mark.parametrize("bias", [False, True])
def test_fisher_rao_model_labels_match_brute_force_expectation(bias: bool) -> None:
    model = models.mlp()
    x, y = models.classification_data()
    got = fisher_rao(model, (x, y), labels="model", include_bias=bias, batch_size=7)
    want = brute_force_model_fisher(model, x, y, bias)
    assert got.value == pytest.approx(want, rel=1e-10)
    assert "model" in got.method and got.details["labels"] == "model"
    empirical = fisher_rao(model, (x, y), include_bias=bias)
    assert "true labels" in empirical.method
    assert abs(empirical.value - got.value) > 1e-3 * got.value


def test_fisher_rao_model_labels_refuse_mse_and_unknown() -> None:
    x, y = models.classification_data()
    with pytest.raises(UsageError, match="cross_entropy"):
        fisher_rao(models.mlp(), (x, y), loss="mse", labels="model")
    with pytest.raises(UsageError, match="--fr-labels"):
        fisher_rao(models.mlp(), (x, y), labels="predicted")


def test_dead_units_drop_is_the_default() -> None:
    assert MeasureOptions().dead_units == "drop"
    assert MeasureConfig(layer="fc").dead_units == "drop"
    model = models.mlp()
    with torch.no_grad():  # unit 1 of fc2's output dead on every input
        model.fc2.weight[1].zero_()
        model.fc2.bias[1] = -1.0
    x, y = models.classification_data()
    default = layer_measures(model, "fc", (x, y), normalize=True)
    est = default["relative_flatness_normalized"]
    assert est.details["dead_unit_handling"] == "drop" and est.details["dead_units"] == 1
    drop = layer_measures(model, "fc", (x, y), normalize=True, dead_units="drop")
    unscaled = layer_measures(model, "fc", (x, y), normalize=True, dead_units="unscaled")
    assert est.value == drop["relative_flatness_normalized"].value
    assert est.value != pytest.approx(unscaled["relative_flatness_normalized"].value, rel=1e-6)


def test_l2_keeps_normalized_kappa_neuronwise_invariant() -> None:
    from flatcli.reparam import find_pairs, neuronwise

    model = models.mlp()
    x, y = models.classification_data()
    alphas = torch.tensor([2.0, 9.0, 0.5, 3.0], dtype=torch.float64)
    twin = neuronwise(model, find_pairs(model)[0][-1], alphas)
    torch.testing.assert_close(twin(x), model(x))
    a, b = (
        layer_measures(m, "fc", (x, y), normalize=True, l2=ALPHA)["relative_flatness_normalized"]
        for m in (model, twin)
    )
    assert a.value == pytest.approx(b.value, rel=1e-10)
    assert a.details["l2_term"] > 0.05 * a.value
