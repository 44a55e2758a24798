"""Relative flatness against dense float64 Hessians, and its invariances (MATH.md §1–§5)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatcli.errors import UsageError
from flatcli.features import LayerSplit
from flatcli.measures.relative_flatness import feature_std, layer_measures, relative_flatness

from . import models
from .reference import dense_kappa, dense_trace, normalized_copy

RTOL = 1e-8

CASES = {
    "logits-ce": (lambda: models.mlp(), "fc", "cross_entropy"),
    "logits-mse": (lambda: models.mlp(), "fc", "mse"),
    "hidden-relu": (lambda: models.mlp(), "fc2", "cross_entropy"),
    "hidden-tanh-head": (models.TanhHead, "fc1", "cross_entropy"),
    "hidden-tanh-mse": (models.TanhHead, "fc2", "mse"),
    "batchnorm-eval": (models.with_batchnorm, "fc1", "cross_entropy"),
    "residual-fx-context": (models.Residual, "b", "cross_entropy"),
    "control-flow-hook": (models.ControlFlow, "b", "cross_entropy"),
}


def build(factory):
    model = factory()
    return model if next(model.parameters()).dtype == torch.float64 else models.init(model)


@pytest.mark.parametrize("case", list(CASES))
def test_exact_kappa_and_trace_match_dense_hessian(case: str) -> None:
    factory, layer, loss = CASES[case]
    model = build(factory)
    x, y = models.classification_data()
    got = layer_measures(model, layer, (x, y), loss=loss, method="exact", batch_size=7)
    want = float(dense_kappa(model, layer, x, y, loss))
    assert got["relative_flatness"].stderr is None
    assert got["relative_flatness"].value == pytest.approx(want, rel=RTOL)
    assert got["layer_hessian_trace"].value == pytest.approx(
        dense_trace(model, layer, x, y, loss), rel=RTOL
    )
    assert abs(want) > 1e-6  # not trivially 0 == 0 (κ may be negative away from a minimum)


def test_methods_named_as_used() -> None:
    x, y = models.classification_data()
    closed = relative_flatness(models.mlp(), "fc", (x, y))
    hvp = relative_flatness(models.mlp(), "fc2", (x, y))
    fx = relative_flatness(build(models.TanhHead), "fc1", (x, y))
    hook = relative_flatness(build(models.ControlFlow), "b", (x, y))
    assert "closed form" in closed.method
    assert "Identity 2" in hvp.method and "sequence split" in hvp.method
    assert "Identity 2" in fx.method and "fx split" in fx.method
    assert "hook" in hook.method


class Wrapped(torch.nn.Module):
    """The same network inside a plain module, so that the split must trace it."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("layer", ["fc1", "fc2", "fc"])
def test_sequence_and_fx_splits_agree(layer: str) -> None:
    x, y = models.classification_data()
    seq = models.mlp()
    traced = Wrapped(seq)
    assert LayerSplit(seq, layer).mechanism == "sequence"
    assert LayerSplit(traced, f"net.{layer}").mechanism == "fx"
    a = layer_measures(seq, layer, (x, y), normalize=True)
    b = layer_measures(traced, f"net.{layer}", (x, y), normalize=True)
    for name in ("relative_flatness", "relative_flatness_normalized", "layer_hessian_trace"):
        assert a[name].value == pytest.approx(b[name].value, rel=1e-12), name


def test_batch_size_does_not_change_the_value() -> None:
    model, (x, y) = models.mlp(), models.classification_data(n=30)
    values = [relative_flatness(model, "fc2", (x, y), batch_size=b).value for b in (1, 7, 30)]
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert values[0] == pytest.approx(values[2], rel=1e-12)


def test_tied_weight_is_detected_and_exact_identity1_matches_dense() -> None:
    model = build(models.Tied)
    x, y = models.classification_data(shape=(4,))
    assert LayerSplit(model, "b").tied == ["a.weight"]
    got = relative_flatness(model, "b", (x, y), method="exact")
    assert "tied" in got.method
    assert got.value == pytest.approx(float(dense_kappa(model, "b", x, y)), rel=RTOL)


def test_conv_exact_identity1_matches_dense() -> None:
    model = build(models.SmallCNN)
    x, y = models.classification_data(n=10, shape=(2, 3, 3))
    got = layer_measures(model, "conv2", (x, y), method="exact")
    assert got["relative_flatness"].value == pytest.approx(
        float(dense_kappa(model, "conv2", x, y)), rel=RTOL
    )
    assert got["layer_hessian_trace"].value == pytest.approx(
        dense_trace(model, "conv2", x, y), rel=RTOL
    )


@pytest.mark.parametrize(
    ("factory", "layer", "shape"),
    [
        (models.mlp, "fc2", (5,)),
        (models.SmallCNN, "conv1", (2, 3, 3)),
    ],
    ids=["linear", "conv2d"],
)
def test_hutchinson_within_4_stderr_of_dense(factory, layer, shape) -> None:
    model = build(factory)
    x, y = models.classification_data(n=12, shape=shape)
    want = float(dense_kappa(model, layer, x, y))
    got = relative_flatness(model, layer, (x, y), method="hutchinson", probes=200, seed=3)
    assert got.stderr is not None and got.stderr > 0
    assert abs(got.value - want) < 4 * got.stderr
    again = relative_flatness(model, layer, (x, y), method="hutchinson", probes=200, seed=3)
    assert again.value == got.value  # seeded


def test_feature_std_is_population_std_and_counts_dead_units() -> None:
    model = models.mlp()
    x, _ = models.classification_data(n=25)
    split = LayerSplit(model, "fc")
    from flatcli.data import as_batches

    batches = as_batches((x, torch.zeros(25, dtype=torch.long)), batch_size=4)
    with torch.no_grad():
        sigma, dead = feature_std(split, batches)
        phi = split.cut(x).phi
    ref = phi.std(0, unbiased=False)
    alive = ref > 0
    torch.testing.assert_close(sigma[alive], ref[alive], rtol=1e-12, atol=0)
    assert dead == int((~alive).sum())
    assert torch.all(sigma[~alive] == 1)


@pytest.mark.parametrize(
    ("factory", "layer", "loss"),
    [
        (models.mlp, "fc", "cross_entropy"),
        (models.TanhHead, "fc2", "cross_entropy"),
        (models.mlp, "fc", "mse"),
    ],
    ids=["logits-ce", "hidden", "logits-mse"],
)
def test_normalized_kappa_equals_dense_kappa_of_reparameterized_model(factory, layer, loss):
    model = build(factory)
    x, y = models.classification_data()
    with torch.no_grad():
        phi = LayerSplit(model, layer).cut(x).phi
    sigma = phi.std(0, unbiased=False)
    twin = normalized_copy(model, layer, sigma)
    torch.testing.assert_close(twin(x), model(x), rtol=1e-12, atol=1e-12)
    want = float(dense_kappa(twin, f"{layer}.1", x, y, loss))
    for method in ("exact", "hutchinson"):
        got = layer_measures(
            model, layer, (x, y), loss=loss, normalize=True, method=method, probes=300
        )["relative_flatness_normalized"]
        tol = 1e-8 * abs(want) if got.stderr is None else 4 * got.stderr
        assert abs(got.value - want) <= tol, method


# --------------------------------------------------------------------------- invariances


def layerwise_reparam(model: nn.Module, first: str, second: str, alpha: float) -> nn.Module:
    new = copy.deepcopy(model)
    mods = dict(new.named_modules())
    with torch.no_grad():
        mods[first].weight.mul_(alpha)
        mods[first].bias.mul_(alpha)
        mods[second].weight.div_(alpha)
    return new


def neuronwise_reparam(
    model: nn.Module, first: str, second: str, alphas: torch.Tensor
) -> nn.Module:
    new = copy.deepcopy(model)
    mods = dict(new.named_modules())
    with torch.no_grad():
        mods[first].weight.mul_(alphas[:, None])
        mods[first].bias.mul_(alphas)
        mods[second].weight.div_(alphas[None, :])
    return new


def test_kappa_invariant_under_layerwise_reparameterization() -> None:
    model = models.mlp()
    x, y = models.classification_data()
    for first, second, layer in (("fc2", "fc", "fc"), ("fc1", "fc2", "fc2")):
        new = layerwise_reparam(model, first, second, 7.0)
        torch.testing.assert_close(new(x), model(x), rtol=1e-12, atol=1e-12)
        before = layer_measures(model, layer, (x, y))
        after = layer_measures(new, layer, (x, y))
        assert after["relative_flatness"].value == pytest.approx(
            before["relative_flatness"].value, rel=RTOL
        )
        # the non-invariant measures really do move
        assert after["layer_hessian_trace"].value != pytest.approx(
            before["layer_hessian_trace"].value, rel=0.1
        )
        assert after["weight_norm"].value != pytest.approx(before["weight_norm"].value, rel=0.1)


def test_neuronwise_reparameterization_changes_kappa_but_not_normalized_kappa() -> None:
    model = models.mlp()
    x, y = models.classification_data()
    alphas = torch.tensor([0.2, 3.0, 1.5, 9.0], dtype=torch.float64)
    new = neuronwise_reparam(model, "fc2", "fc", alphas)
    torch.testing.assert_close(new(x), model(x), rtol=1e-12, atol=1e-12)
    before = layer_measures(model, "fc", (x, y), normalize=True)
    after = layer_measures(new, "fc", (x, y), normalize=True)
    assert after["relative_flatness"].value != pytest.approx(
        before["relative_flatness"].value, rel=0.01
    )
    assert after["relative_flatness_normalized"].value == pytest.approx(
        before["relative_flatness_normalized"].value, rel=RTOL
    )


def test_float32_closed_form_agrees_with_float64() -> None:
    x, y = models.classification_data(n=50)
    model = models.mlp()
    want = relative_flatness(model, "fc", (x, y)).value
    got = relative_flatness(copy.deepcopy(model).float(), "fc", (x.float(), y)).value
    assert got == pytest.approx(want, rel=1e-5)


def test_model_mode_is_restored() -> None:
    model = models.with_batchnorm().train()
    x, y = models.classification_data()
    relative_flatness(model, "fc1", (x, y))
    assert model.training


def test_normalize_refused_for_conv() -> None:
    model = build(models.SmallCNN)
    x, y = models.classification_data(n=4, shape=(2, 3, 3))
    with pytest.raises(UsageError, match="nn.Linear"):
        relative_flatness(model, "conv1", (x, y), normalize=True, method="hutchinson")


def test_unknown_layer_suggests_close_names() -> None:
    x, y = models.classification_data()
    with pytest.raises(UsageError, match="did you mean.*fc2"):
        relative_flatness(models.mlp(), "fc3", (x, y))


# ------------------------------------------------------------ feature-space Hutchinson


@pytest.mark.parametrize(
    ("factory", "layer", "loss"),
    [
        (models.mlp, "fc", "cross_entropy"),
        (models.mlp, "fc", "mse"),
        (models.mlp, "fc2", "cross_entropy"),
        (models.TanhHead, "fc1", "cross_entropy"),
        (models.Residual, "b", "cross_entropy"),
    ],
    ids=["logits-ce", "logits-mse", "hidden-sequence", "hidden-tanh", "hidden-fx-context"],
)
def test_feature_space_hutchinson_converges_to_exact(factory, layer, loss) -> None:
    """Enough probes that 4 stderr is a small fraction of the value: a tight check."""
    model = build(factory)
    x, y = models.classification_data(n=30)
    exact = layer_measures(model, layer, (x, y), loss=loss, method="exact", normalize=True)
    got = layer_measures(
        model, layer, (x, y), loss=loss, method="hutchinson", normalize=True, probes=4000, seed=1
    )
    for key in ("relative_flatness", "relative_flatness_normalized", "layer_hessian_trace"):
        want, est = exact[key].value, got[key]
        assert "feature space" in est.method, key
        assert est.stderr is not None and 4 * est.stderr < 0.1 * abs(want), key
        if loss == "mse" and key == "layer_hessian_trace":  # B = (2/d)I: vᵀBv = 2 always
            assert est.stderr == 0 and est.value == pytest.approx(want, rel=1e-12)
            continue
        assert est.stderr > 0 and abs(est.value - want) < 4 * est.stderr, key
    assert got["train_loss"].value == pytest.approx(exact["train_loss"].value, rel=1e-12)


def test_feature_space_hutchinson_stderr_falls_as_one_over_sqrt_probes() -> None:
    model = models.mlp()
    x, y = models.classification_data()
    few = relative_flatness(model, "fc2", (x, y), method="hutchinson", probes=100, seed=0)
    many = relative_flatness(model, "fc2", (x, y), method="hutchinson", probes=1600, seed=0)
    assert few.stderr is not None and many.stderr is not None
    assert many.stderr / few.stderr == pytest.approx(0.25, rel=0.3)


def test_conv_and_tied_hutchinson_stay_in_a_space() -> None:
    model = build(models.SmallCNN)
    x, y = models.classification_data(n=6, shape=(2, 3, 3))
    est = relative_flatness(model, "conv1", (x, y), method="hutchinson", probes=4)
    assert "A-space" in est.method
