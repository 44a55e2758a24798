"""Relative flatness against dense float64 Hessians, and its invariances (docs/measures.md)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import scipy.linalg
import torch
from torch import nn

import flatcli.measures.relative_flatness as rf
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


class HadamardProbes:
    """Stands in for the Rademacher draws: rows of a ``P × P`` Hadamard matrix, cut to the
    probe dimension ``d ≤ P``. Over all ``P`` rows ``Σ a aᵀ = P I``, so the Hutchinson mean
    ``(1/P) Σ ⟨a, M a⟩`` is exactly ``Tr M``: the whole Hutchinson path (directions, HVPs,
    averaging) becomes exact and can be held to a dense Hessian at rounding level.

    A-space draws come as ``(k, m, m)`` chunks of probes; feature-space draws as one
    ``(m, P)`` block whose columns are the probes. Both get distinct Hadamard rows
    (orthogonal rows, or in the second case the columns of ``m`` orthogonal rows), so the
    design is exact either way."""

    def __init__(self, probes: int) -> None:
        self.h = torch.from_numpy(scipy.linalg.hadamard(probes)).double()
        self.next_row: dict[int, int] = {}

    def __call__(self, gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        k, d = shape[0], math.prod(shape[1:])
        assert d <= self.h.shape[0], "probes must be a power of 2 at least the dimension"
        start = self.next_row.get(d, 0)
        rows = (start + torch.arange(k)) % self.h.shape[0]  # each target uses all P rows
        self.next_row[d] = start + k
        return self.h[rows, :d].reshape(shape)


HUTCHINSON_CASES = {
    # name: (factory, layer, input shape, probes ≥ m² and ≥ |W|, a power of 2)
    "linear-hidden": (models.mlp, "fc2", (5,), 64),
    "linear-logits": (models.mlp, "fc", (5,), 16),
    "conv2d": (models.SmallCNN, "conv1", (2, 3, 3), 512),
}


@pytest.mark.parametrize("case", list(HUTCHINSON_CASES))
def test_hutchinson_path_is_exact_with_an_orthogonal_probe_design(case, monkeypatch) -> None:
    factory, layer, shape, probes = HUTCHINSON_CASES[case]
    model = build(factory)
    x, y = models.classification_data(n=12, shape=shape)
    monkeypatch.setattr(rf, "_rademacher", HadamardProbes(probes))
    got = layer_measures(model, layer, (x, y), method="hutchinson", probes=probes)
    assert "hutchinson" in got["relative_flatness"].method
    assert got["relative_flatness"].details["probes"] == probes
    want = float(dense_kappa(model, layer, x, y))
    assert got["relative_flatness"].value == pytest.approx(want, rel=RTOL)
    trace = got["layer_hessian_trace"].value
    assert trace == pytest.approx(dense_trace(model, layer, x, y), rel=RTOL)


NORMALIZED_CASES = [
    (models.mlp, "fc", "cross_entropy"),
    (models.TanhHead, "fc2", "cross_entropy"),
    (models.mlp, "fc", "mse"),
]
"""κ̃ cases: logits layer under both losses, and a hidden layer."""
NORMALIZED_IDS = ["logits-ce", "hidden", "logits-mse"]


@pytest.mark.parametrize(("factory", "layer", "loss"), NORMALIZED_CASES, ids=NORMALIZED_IDS)
def test_hutchinson_normalized_kappa_is_exact_with_an_orthogonal_probe_design(
    factory, layer, loss, monkeypatch
) -> None:
    model = build(factory)
    x, y = models.classification_data()
    with torch.no_grad():
        sigma = LayerSplit(model, layer).cut(x).phi.std(0, unbiased=False)
    want = float(dense_kappa(normalized_copy(model, layer, sigma), f"{layer}.1", x, y, loss))
    probes = 64  # m² ≤ 36 and |W| ≤ 24 for both layers
    monkeypatch.setattr(rf, "_rademacher", HadamardProbes(probes))
    got = layer_measures(
        model, layer, (x, y), loss=loss, normalize=True, method="hutchinson", probes=probes
    )["relative_flatness_normalized"]
    assert got.value == pytest.approx(want, rel=RTOL)


def test_rademacher_probes_are_plus_or_minus_one_and_balanced() -> None:
    a = rf._rademacher(torch.Generator().manual_seed(0), (100, 50, 40))
    assert a.dtype == torch.float64 and a.shape == (100, 50, 40)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(a.mean())) < 4 / math.sqrt(a.numel())  # 4 standard errors of the mean


@pytest.mark.parametrize(
    ("factory", "layer", "shape", "probes"),
    [
        (models.mlp, "fc2", (5,), 600),
        (models.SmallCNN, "conv1", (2, 3, 3), 800),
    ],
    ids=["linear", "conv2d"],
)
def test_hutchinson_within_4_stderr_of_dense(factory, layer, shape, probes) -> None:
    # The random draw itself: enough probes that 4 standard errors are under 30% of the value.
    model = build(factory)
    x, y = models.classification_data(n=12, shape=shape)
    want = float(dense_kappa(model, layer, x, y))
    got = relative_flatness(model, layer, (x, y), method="hutchinson", probes=probes, seed=3)
    assert got.stderr is not None and 0 < 4 * got.stderr < 0.3 * abs(want)
    assert abs(got.value - want) < 4 * got.stderr
    again = relative_flatness(model, layer, (x, y), method="hutchinson", probes=probes, seed=3)
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


@pytest.mark.parametrize(("factory", "layer", "loss"), NORMALIZED_CASES, ids=NORMALIZED_IDS)
def test_normalized_kappa_equals_dense_kappa_of_reparameterized_model(factory, layer, loss):
    model = build(factory)
    x, y = models.classification_data()
    with torch.no_grad():
        phi = LayerSplit(model, layer).cut(x).phi
    sigma = phi.std(0, unbiased=False)
    twin = normalized_copy(model, layer, sigma)
    torch.testing.assert_close(twin(x), model(x), rtol=1e-12, atol=1e-12)
    want = float(dense_kappa(twin, f"{layer}.1", x, y, loss))
    got = layer_measures(model, layer, (x, y), loss=loss, normalize=True, method="exact")
    assert got["relative_flatness_normalized"].value == pytest.approx(want, rel=RTOL)
    # The random Hutchinson draw, where 300 probes make 4 standard errors under 20% of κ̃
    # (the hidden case's κ̃ is near 0: its Hutchinson path is held exact above instead).
    if layer == "fc":
        hutch = layer_measures(
            model, layer, (x, y), loss=loss, normalize=True, method="hutchinson", probes=300
        )["relative_flatness_normalized"]
        assert hutch.stderr is not None and 4 * hutch.stderr < 0.2 * abs(want)
        assert abs(hutch.value - want) < 4 * hutch.stderr


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


# ------------------------------------------------------------------ dead and constant units


def with_constant_and_dead_units(first: str, second: str, model: nn.Module | None = None):
    """A ReLU MLP whose unit 0 of ``first`` outputs 2 on every input (σ = 0, not zero) and
    whose unit 1 is dead (always 0); both keep non-zero outgoing weights in ``second``."""
    model = copy.deepcopy(model or models.mlp())
    mods = dict(model.named_modules())
    with torch.no_grad():
        mods[first].weight[:2] = 0.0
        mods[first].bias[0], mods[first].bias[1] = 2.0, -1.0
        assert mods[second].weight[:, :2].abs().min() > 0.05
    return model


def theorem4_twin(model: nn.Module, layer: str, x: torch.Tensor, dead_units: str) -> nn.Module:
    """The layer as ``Sequential(Scale(V⁺), Linear(W V, b'))``, function-preserving.

    ``unscaled``: σ = 0 coordinates keep scale 1. ``drop``: they get scale 0 in both
    factors, and a constant coordinate's contribution ``W[:, t]·c_t`` moves into the bias.
    Its dense κ is κ̃ by definition (docs/measures.md, "relative_flatness_normalized").
    """
    from .reference import Scale

    with torch.no_grad():
        phi = LayerSplit(model, layer).cut(x).phi
    sigma = phi.std(0, unbiased=False)
    zero = sigma == 0
    twin = copy.deepcopy(model)
    old = dict(twin.named_modules())[layer]
    fill = 1.0 if dead_units == "unscaled" else 0.0
    scale = torch.where(zero, torch.full_like(sigma, fill), sigma)
    inverse = torch.where(zero, torch.full_like(sigma, fill), 1 / sigma)
    lin = nn.Linear(old.in_features, old.out_features).double()
    with torch.no_grad():
        lin.weight.copy_(old.weight * scale)
        lin.bias.copy_(old.bias)
        if dead_units == "drop":
            lin.bias.add_(old.weight[:, zero] @ phi[0, zero])
    setattr(twin, layer, nn.Sequential(Scale(inverse), lin))
    torch.testing.assert_close(twin(x), model(x), rtol=1e-12, atol=1e-12)
    return twin


@pytest.mark.parametrize("dead_units", ["drop", "unscaled"])
@pytest.mark.parametrize(
    ("first", "layer"), [("fc2", "fc"), ("fc1", "fc2")], ids=["logits", "hidden"]
)
def test_normalized_kappa_with_constant_and_dead_units_matches_dense(
    first: str, layer: str, dead_units: str
) -> None:
    model = with_constant_and_dead_units(first, layer)
    x, y = models.classification_data()
    with torch.no_grad():
        phi = LayerSplit(model, layer).cut(x).phi
    assert torch.all(phi[:, 0] == 2.0) and torch.all(phi[:, 1] == 0.0)
    want = float(dense_kappa(theorem4_twin(model, layer, x, dead_units), f"{layer}.1", x, y))
    got = layer_measures(
        model, layer, (x, y), normalize=True, method="exact", dead_units=dead_units
    )["relative_flatness_normalized"]
    assert got.details["dead_units"] == 2 and got.details["dead_unit_handling"] == dead_units
    assert got.value == pytest.approx(want, rel=RTOL)
    if layer == "fc":  # Identity 1 (A-space) has its own V, V⁺ code path
        hutch = layer_measures(
            model,
            layer,
            (x, y),
            normalize=True,
            method="hutchinson",
            probes=300,
            dead_units=dead_units,
        )["relative_flatness_normalized"]
        assert hutch.stderr is not None and 4 * hutch.stderr < 0.25 * abs(want)
        assert abs(hutch.value - want) < 4 * hutch.stderr


@pytest.mark.parametrize("unit", [0, 1], ids=["constant", "dead"])
def test_drop_is_invariant_to_rescaling_a_constant_or_dead_unit_and_unscaled_is_not(
    unit: int,
) -> None:
    model = with_constant_and_dead_units("fc2", "fc")
    x, y = models.classification_data()
    alphas = torch.ones(4, dtype=torch.float64)
    alphas[unit] = 5.0
    new = neuronwise_reparam(model, "fc2", "fc", alphas)
    torch.testing.assert_close(new(x), model(x), rtol=1e-12, atol=1e-12)

    def kappa(m: nn.Module, dead_units: str) -> float:
        est = layer_measures(m, "fc", (x, y), normalize=True, dead_units=dead_units)
        return est["relative_flatness_normalized"].value

    assert kappa(new, "drop") == pytest.approx(kappa(model, "drop"), rel=RTOL)
    assert kappa(new, "unscaled") != pytest.approx(kappa(model, "unscaled"), rel=0.01)


def test_dead_units_option_default_and_message() -> None:
    import inspect

    from flatcli.measures.relative_flatness import feature_scaling

    default = inspect.signature(layer_measures).parameters["dead_units"].default
    assert inspect.signature(feature_scaling).parameters["dead_units"].default == default
    x, y = models.classification_data()
    with pytest.raises(UsageError) as info:
        layer_measures(models.mlp(), "fc", (x, y), normalize=True, dead_units="zero")
    assert re.fullmatch(
        r"--dead-units must be one of (unscaled, drop|drop, unscaled), got 'zero'", str(info.value)
    )


@pytest.mark.parametrize("dead_units", ["drop", "unscaled"])
def test_feature_scaling_entries(dead_units: str) -> None:
    from flatcli.data import as_batches
    from flatcli.measures.relative_flatness import feature_scaling

    model = with_constant_and_dead_units("fc2", "fc")
    x, y = models.classification_data()
    split = LayerSplit(model, "fc")
    with torch.no_grad():
        got = feature_scaling(split, as_batches((x, y), batch_size=5), dead_units=dead_units)
        sigma = split.cut(x).phi.std(0, unbiased=False)
    fill = 0.0 if dead_units == "drop" else 1.0
    assert got.dead == 2 and got.dead_units == dead_units
    assert got.scale[:2].tolist() == [fill, fill] and got.inverse[:2].tolist() == [fill, fill]
    torch.testing.assert_close(got.scale[2:], sigma[2:], rtol=1e-12, atol=0)
    torch.testing.assert_close(got.inverse[2:], 1 / sigma[2:], rtol=1e-12, atol=0)
    if dead_units == "drop":  # the default
        with torch.no_grad():
            default = feature_scaling(split, as_batches((x, y), batch_size=5))
        assert default.dead_units == "drop" and torch.equal(default.scale, got.scale)


def test_dead_means_sigma_below_1e_12_of_the_largest_sigma() -> None:
    # A unit whose std is ~1e-11 (rounding-level next to units with std ~1e2) counts as
    # dead; the same absolute std next to units with std below 1 would not.
    x, _ = models.classification_data(n=40)
    model = with_constant_and_dead_units("fc2", "fc")
    mods = dict(model.named_modules())
    with torch.no_grad():
        mods["fc2"].weight[0] = 1e-11 * torch.arange(1.0, 7.0, dtype=torch.float64)
        mods["fc2"].weight[2:] *= 300.0
        mods["fc2"].bias[2:] = 1e3  # stay active
    from flatcli.data import as_batches

    batches = as_batches((x, torch.zeros(40, dtype=torch.long)), batch_size=8)
    with torch.no_grad():
        sigma, dead = feature_std(LayerSplit(model, "fc"), batches)
        phi = LayerSplit(model, "fc").cut(x).phi
    raw = phi.std(0, unbiased=False)
    assert 1e-12 < float(raw[0]) < 1e-10 and float(raw.max()) > 100
    assert dead == 2 and float(sigma[0]) == 1.0  # unit 0 (tiny std) and unit 1 (dead)


def test_normalize_on_empty_data_is_a_clear_error() -> None:
    from flatcli.errors import FlatcliError

    x, y = models.classification_data()
    with pytest.raises(FlatcliError) as info:
        layer_measures(models.mlp(), "fc", (x[:0], y[:0]), normalize=True)
    assert str(info.value) == "the dataset is empty"


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


def test_feature_std_merges_the_ranks_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chan's merge over ranks, with two ranks as two threads and all_reduce as their sum:
    unequal shards (20 and 17 samples) give the whole data's population std."""
    import threading

    from flatcli import distributed
    from flatcli.data import as_batches

    bufs: list[torch.Tensor | None] = [None, None]
    barrier, local = threading.Barrier(2, timeout=60), threading.local()

    def all_reduce(buf: torch.Tensor) -> None:
        bufs[local.rank] = buf.clone()
        barrier.wait()
        total = bufs[0] + bufs[1]  # type: ignore[operator]
        barrier.wait()
        buf.copy_(total)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed, "backend", lambda: "gloo")
    model = models.mlp()
    x, y = models.classification_data(n=37)
    split = LayerSplit(model, "fc")
    inner = as_batches((x, y), batch_size=5)
    out: list[object] = [None, None]

    def rank(r: int) -> None:
        local.rank = r
        with torch.no_grad():
            out[r] = rf._population_std(split, distributed.ShardedBatches(inner, r, 2))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        want = split.cut(x).phi.double().std(0, unbiased=False)
    for got in out:
        sigma, dead = got  # type: ignore[misc]
        torch.testing.assert_close(sigma, want, rtol=1e-12, atol=1e-15)
        assert not dead.any()
