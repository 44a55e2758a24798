"""FAM regularizer: value and full Lemma 1 gradient against dense float64 Hessians.

See docs/finetune.md.
"""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import flatcli.fam
from flatcli.errors import UsageError
from flatcli.fam import FAMRegularizer, detached_hessian_gradient

from . import models
from .reference import dense_kappa, dense_layer_hessian

RTOL = 1e-8


def num(t: torch.Tensor) -> float:
    return float(t.detach())


def build(factory):  # noqa: ANN001, ANN201
    model = factory()
    return model if next(model.parameters()).dtype == torch.float64 else models.init(model)


def image_data() -> tuple[torch.Tensor, torch.Tensor]:
    return models.classification_data(n=12, shape=(2, 3, 3))


def tied_data() -> tuple[torch.Tensor, torch.Tensor]:
    return models.classification_data(shape=(4,))


CE, MSE = "cross_entropy", "mse"
# factory, layer, loss, method, data, expected path
CASES = {
    "logits-ce-closed-form": (models.mlp, "fc", CE, "auto", None, "closed_form"),
    "logits-mse-closed-form": (models.mlp, "fc", MSE, "auto", None, "closed_form"),
    "hidden-relu-jacobian": (models.mlp, "fc2", CE, "auto", None, "jacobian"),
    "hidden-relu-two-layers-jacobian": (models.mlp, "fc1", CE, "auto", None, "jacobian"),
    "hidden-relu-mse-jacobian": (models.mlp, "fc1", MSE, "auto", None, "jacobian"),
    "hidden-gelu-identity2": (lambda: models.mlp("gelu"), "fc1", CE, "auto", None, "identity2"),
    "hidden-tanh-head-identity2": (models.TanhHead, "fc1", CE, "auto", None, "identity2"),
    "hidden-tanh-mse-identity2": (models.TanhHead, "fc2", MSE, "auto", None, "identity2"),
    "batchnorm-eval-fx-jacobian": (models.with_batchnorm, "fc1", CE, "auto", None, "jacobian"),
    "residual-fx-context": (models.Residual, "b", CE, "auto", None, "identity2"),
    "control-flow-hook": (models.ControlFlow, "b", CE, "auto", None, "identity2"),
    "tied-identity1-exact": (models.Tied, "b", CE, "exact", tied_data, "identity1"),
    "conv-identity1-exact": (models.SmallCNN, "conv2", CE, "exact", image_data, "identity1"),
    "cnn-logits-closed-form": (models.SmallCNN, "fc", CE, "auto", image_data, "closed_form"),
}


def flat_grads(value: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    params = list(model.parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float) -> None:
    g, w = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in want])
    assert float((g - w).norm()) <= rtol * float(w.norm()), float((g - w).norm() / w.norm())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(w.abs().max()))


def trunk_names(model: nn.Module, layer: str) -> list[str]:
    """Parameters strictly before the layer (in registration order, which is forward order here)."""
    names = [n for n, _ in model.named_parameters()]
    first = next(i for i, n in enumerate(names) if n.startswith(f"{layer}."))
    return names[:first]


@pytest.mark.parametrize("case", list(CASES))
def test_value_and_full_gradient_match_dense_hessian(case: str) -> None:
    factory, layer, loss, method, data, path = CASES[case]
    model = build(factory)
    x, y = data() if data else models.classification_data()
    reg = FAMRegularizer(model, layer, loss=loss, method=method)
    value = reg(x, y)
    dense = dense_kappa(model, layer, x, y, loss, create_graph=True)
    assert reg.path(reg.forward(x)[1]) == path
    assert num(value) == pytest.approx(num(dense), rel=RTOL)
    assert abs(num(dense)) > 1e-6
    got, want = flat_grads(value, model), flat_grads(dense, model)
    assert_grads_close(got, want, RTOL)
    # Term (II) reaches every parameter outside the layer: the trunk through φ, the
    # downstream part through B_i.
    named = dict(zip([n for n, _ in model.named_parameters()], got, strict=True))
    fam_weight = dict(model.named_modules())[layer].weight
    own = {n for n, p in model.named_parameters() if n.startswith(f"{layer}.") or p is fam_weight}
    outside = [n for n in named if n not in own]
    if path == "jacobian" and loss == MSE:
        # B_i = (2/C) J_iᵀ J_i does not depend on the biases after the layer (nor does the
        # dense oracle's gradient, compared above): only their weights get term (II).
        outside = [n for n in outside if not n.endswith(".bias")]
    assert outside
    for name in outside:
        assert float(named[name].abs().max()) > 1e-8, name
    if trunk_names(model, layer):
        assert any(float(named[n].abs().max()) > 0 for n in trunk_names(model, layer))


LAYERWISE = {
    "logits-closed-form": (models.mlp, "fc", "auto", None),
    "hidden-relu-jacobian": (models.mlp, "fc1", "auto", None),
    "hidden-tanh-identity2": (models.TanhHead, "fc1", "auto", None),
    "conv-identity1-exact": (models.SmallCNN, "conv2", "exact", image_data),
}


@pytest.mark.parametrize("case", list(LAYERWISE))
def test_layerwise_variant_matches_dense(case: str) -> None:
    factory, layer, method, data = LAYERWISE[case]
    model = build(factory)
    x, y = data() if data else models.classification_data()
    reg = FAMRegularizer(model, layer, variant="layerwise", method=method)
    value = reg(x, y)
    h = dense_layer_hessian(model, layer, x, y, create_graph=True)
    d, m = h.shape[:2]
    w = dict(model.named_modules())[layer].weight
    dense = (w * w).sum() * torch.diagonal(h.reshape(d * m, d * m)).sum()
    assert num(value) == pytest.approx(num(dense), rel=RTOL)
    assert_grads_close(flat_grads(value, model), flat_grads(dense, model), RTOL)


@pytest.mark.parametrize(("layer", "loss"), [("fc1", CE), ("fc2", CE), ("fc1", MSE)])
def test_jacobian_path_equals_the_hvp_path(layer: str, loss: str) -> None:
    """On a ReLU MLP both Identity 2 routes are the same function: value and full gradient."""
    model = build(models.mlp)
    x, y = models.classification_data()
    fast = FAMRegularizer(model, layer, loss=loss)
    slow = FAMRegularizer(model, layer, loss=loss)
    slow.piecewise_linear = False
    cut = fast.forward(x)[1]
    assert (fast.path(cut), slow.path(cut)) == ("jacobian", "identity2")
    assert "Jacobian" in fast.describe() and "HVPs" in slow.describe()
    a, b = fast(x, y), slow(x, y)
    assert num(a) == pytest.approx(num(b), rel=1e-12)
    assert_grads_close(flat_grads(a, model), flat_grads(b, model), 1e-11)


def mixed_sequential() -> nn.Module:
    """Every module the hand-chained Jacobian knows, after a hidden layer ``0``."""
    model = init_with_stats(
        nn.Sequential(
            nn.Linear(5, 6),
            nn.Sequential(nn.BatchNorm1d(6, momentum=0.0), nn.LeakyReLU(0.2), nn.Dropout(0.5)),
            nn.Linear(6, 7),
            nn.ReLU6(),
            nn.Flatten(),
            nn.Identity(),
            nn.Hardtanh(-0.5, 0.8),
            nn.Linear(7, 4),
            nn.ReLU(),
            nn.Linear(4, 3),
        )
    )
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # some units past ReLU6's and Hardtanh's kinks
    return model


def init_with_stats(model: nn.Module) -> nn.Module:
    model = models.init(model)
    bn = model[1][0]
    g = models.seeded(9)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    return model


@pytest.mark.parametrize("loss", [CE, MSE])
@pytest.mark.parametrize("variant", ["neuronwise", "layerwise"])
def test_chained_jacobian_matches_dense_and_the_batched_vjps(loss: str, variant: str) -> None:
    """An nn.Sequential downstream part is differentiated module by module: the same κ and
    full gradient as the dense oracle (eval-mode downstream, in train mode) and as the
    batched-VJP route."""
    model = mixed_sequential()
    x, y = models.classification_data()
    model.train()  # the penalty takes the downstream part in eval mode: no dropout, BN stats
    # (momentum 0: the training forward passes leave the running statistics as they are)
    fast = FAMRegularizer(model, "0", loss=loss, variant=variant)
    slow = FAMRegularizer(model, "0", loss=loss, variant=variant)
    slow._chain = None
    assert fast._chain is not None and "chained through the modules" in fast.describe()
    assert "one VJP per class" in slow.describe()
    a, b = fast.penalty(fast.forward(x)[1], y), slow.penalty(slow.forward(x)[1], y)
    assert model.training and model[1][2].training  # modes restored
    model.eval()
    if variant == "neuronwise":
        dense = dense_kappa(model, "0", x, y, loss, create_graph=True)
    else:
        h = dense_layer_hessian(model, "0", x, y, loss, create_graph=True)
        dense = (model[0].weight ** 2).sum() * torch.diagonal(h.reshape(30, 30)).sum()
    assert num(a) == pytest.approx(num(dense), rel=RTOL)
    assert num(a) == pytest.approx(num(b), rel=1e-12)
    got = flat_grads(a, model)
    assert_grads_close(got, flat_grads(dense, model), RTOL)
    assert_grads_close(got, flat_grads(b, model), 1e-11)


def test_chain_only_for_modules_it_knows() -> None:
    assert FAMRegularizer(models.mlp(), "fc1")._chain is not None
    assert FAMRegularizer(build(models.with_batchnorm), "fc1")._chain is None  # fx: VJPs
    no_stats = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False))
    assert FAMRegularizer(nn.Sequential(*no_stats, nn.Linear(4, 3)), "0")._chain is None


def test_piecewise_linear_is_read_from_the_structure() -> None:
    assert FAMRegularizer(models.mlp(), "fc1").piecewise_linear  # Sequential of Linear/ReLU
    assert not FAMRegularizer(models.mlp("tanh"), "fc1").piecewise_linear
    assert FAMRegularizer(build(models.with_batchnorm), "fc1").piecewise_linear  # fx graph
    assert not FAMRegularizer(build(models.Residual), "b").piecewise_linear  # tanh in fx
    assert not FAMRegularizer(build(models.ControlFlow), "b").piecewise_linear  # hooks


def test_hutchinson_on_conv_is_unbiased_in_value_and_gradient() -> None:
    """Single-probe estimates of κ and of its gradient, averaged: within 5 standard errors."""
    model = build(models.SmallCNN)
    x, y = image_data()
    dense = dense_kappa(model, "conv2", x, y, create_graph=True)
    want = torch.cat([g.flatten() for g in flat_grads(dense, model)])
    detached = detached_hessian_gradient(model, "conv2", x, y)
    shortcut = torch.cat([detached[n].flatten() for n, _ in model.named_parameters()])
    reg = FAMRegularizer(model, "conv2", method="hutchinson", probes=1, seed=3)
    values, grads = [], []
    for _ in range(300):
        v = reg(x, y)
        grads.append(torch.cat([g.flatten() for g in flat_grads(v, model)]))
        values.append(num(v))
    vals, gs = torch.tensor(values, dtype=torch.float64), torch.stack(grads)
    k = len(values)
    se = vals.std() / k**0.5
    assert abs(float(vals.mean()) - num(dense)) < 5 * float(se)
    g_mean, g_se = gs.mean(0), gs.std(0) / k**0.5
    live = g_se > 1e-12
    z = (g_mean - want).abs()[live] / g_se[live]
    assert float(z.max()) < 5, float(z.max())
    assert torch.allclose(g_mean[~live], want[~live], atol=1e-10)
    # The same test rejects the detached-Hessian gradient: it has power.
    assert float(((g_mean - shortcut).abs()[live] / g_se[live]).max()) > 20


def test_hutchinson_is_seeded() -> None:
    model = build(models.SmallCNN)
    x, y = image_data()
    a = FAMRegularizer(model, "conv1", method="hutchinson", probes=4, seed=7)(x, y)
    b = FAMRegularizer(model, "conv1", method="hutchinson", probes=4, seed=7)(x, y)
    g = torch.Generator().manual_seed(7)
    c = FAMRegularizer(model, "conv1", method="hutchinson", probes=4, generator=g)
    assert num(a) == num(b) == num(c(x, y))
    assert num(c(x, y)) != num(a)  # the generator advanced


@pytest.mark.parametrize("case", ["logits", "hidden"])
def test_detached_hessian_shortcut_gives_a_different_gradient(case: str) -> None:
    """Term (I) alone (what the published code computes) vs the full Lemma 1 gradient."""
    model = build(models.TanhHead)
    layer = "fc" if case == "logits" else "fc1"
    x, y = models.classification_data()
    names = [n for n, _ in model.named_parameters()]
    full = dict(zip(names, flat_grads(FAMRegularizer(model, layer)(x, y), model), strict=True))
    shortcut = detached_hessian_gradient(model, layer, x, y)
    # The shortcut is term (I): the gradient of ⟨W Wᵀ, T⟩ with T held fixed.
    h = dense_layer_hessian(model, layer, x, y)
    t = torch.einsum("atbt->ab", h)
    w = dict(model.named_modules())[layer].weight
    w2 = w.reshape(w.shape[0], -1)
    (term_one,) = torch.autograd.grad((w2 @ w2.T * t).sum(), w)
    torch.testing.assert_close(shortcut[f"{layer}.weight"], term_one, rtol=1e-10, atol=1e-12)
    key = f"{layer}.weight"
    rel = (full[key] - shortcut[key]).norm() / full[key].norm()
    assert float(rel) > 1e-2, float(rel)
    for name in trunk_names(model, layer):
        assert float(shortcut[name].abs().max()) == 0.0
        assert float(full[name].abs().max()) > 1e-6


def test_forward_reuse_equals_a_separate_pass() -> None:
    model = build(models.TanhHead)
    x, y = models.classification_data()
    reg = FAMRegularizer(model, "fc2")
    out, cut = reg.forward(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    ce = nn.functional.cross_entropy
    one_pass = ce(out, y) + 0.3 * reg.penalty(cut, y)
    two_passes = ce(model(x), y) + 0.3 * reg(x, y)
    assert num(one_pass) == pytest.approx(num(two_passes), rel=1e-14)
    assert_grads_close(flat_grads(one_pass, model), flat_grads(two_passes, model), 1e-12)


def test_train_mode_batchnorm_uses_eval_downstream_and_leaves_running_stats() -> None:
    """φ from the training forward, Hessian of the eval-mode downstream part, one BN update."""
    model = build(models.with_batchnorm)
    x, y = models.classification_data()
    model.train()
    model.fc.eval()  # a module the caller froze stays frozen
    reg = FAMRegularizer(model, "fc1")
    _, cut = reg.forward(x)
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone())
    value = reg.penalty(cut, y)
    assert torch.equal(model.bn.running_mean, stats[0])
    assert torch.equal(model.bn.running_var, stats[1])
    assert model.training and model.bn.training and not model.fc.training
    # fc1's input is x itself, so the reference is κ of the eval-mode model at these stats.
    model.eval()
    dense = dense_kappa(model, "fc1", x, y, create_graph=True)
    assert num(value) == pytest.approx(num(dense), rel=RTOL)
    assert_grads_close(flat_grads(value, model), flat_grads(dense, model), RTOL)


@pytest.mark.parametrize("factory", [models.TanhHead, models.mlp])  # HVPs; Jacobian
def test_no_grad_gives_the_value_only(factory) -> None:  # noqa: ANN001
    model = build(factory)
    x, y = models.classification_data()
    reg = FAMRegularizer(model, "fc1")
    with torch.no_grad():
        value = reg(x, y)
    assert not value.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert num(value) == pytest.approx(num(dense_kappa(model, "fc1", x, y)), rel=RTOL)


def test_float32_agrees_with_float64() -> None:
    model = build(models.TanhHead)
    x, y = models.classification_data()
    want = num(FAMRegularizer(model, "fc1")(x, y))
    got = num(FAMRegularizer(model.float(), "fc1")(x.float(), y))
    assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "rowwise"}, "unknown FAM variant"),
        ({"method": "dense"}, "unknown FAM method"),
        ({"probes": 0}, "at least 1"),
        ({"loss": "hinge"}, "unknown loss"),
    ],
)
def test_bad_options_are_usage_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        FAMRegularizer(models.mlp(), "fc", **kwargs)


def test_unknown_layer_suggests_a_name() -> None:
    with pytest.raises(UsageError, match="did you mean fc1"):
        FAMRegularizer(models.mlp(), "fc_1")


def test_docstring_examples_run() -> None:
    result = doctest.testmod(flatcli.fam, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# detached (published) gradient: term (I) of Lemma 1 only, against dense float64 Hessians
DETACHED = {
    "logits-ce-closed-form": (models.TanhHead, "fc", CE, "auto", "neuronwise", None),
    "logits-mse-closed-form": (models.mlp, "fc", MSE, "auto", "neuronwise", None),
    "hidden-tanh-identity2": (models.TanhHead, "fc1", CE, "auto", "neuronwise", None),
    "hidden-relu-jacobian": (models.mlp, "fc2", CE, "auto", "neuronwise", None),
    "layerwise-jacobian": (models.mlp, "fc1", CE, "auto", "layerwise", None),
    "conv-identity1-exact": (models.SmallCNN, "conv2", CE, "exact", "neuronwise", image_data),
    "tied-identity1-exact": (models.Tied, "b", CE, "exact", "neuronwise", tied_data),
    "layerwise-closed-form": (models.TanhHead, "fc", CE, "auto", "layerwise", None),
    "layerwise-identity2": (models.TanhHead, "fc1", CE, "auto", "layerwise", None),
}


@pytest.mark.parametrize("case", list(DETACHED))
def test_detached_gradient_is_term_one_of_a_fixed_dense_hessian(case: str) -> None:
    factory, layer, loss, method, variant, data = DETACHED[case]
    model = build(factory)
    x, y = data() if data else models.classification_data()
    reg = FAMRegularizer(model, layer, loss=loss, method=method, variant=variant)
    full = reg(x, y)
    reg.gradient = "detached"
    value = reg(x, y)
    assert num(value) == num(full)  # the same κ, only the gradient differs
    got = dict(zip([n for n, _ in model.named_parameters()], flat_grads(value, model), strict=True))
    # Oracle: the Hessian as a float64 constant; κ(V) = Σ ⟨v_s, v_s'⟩ T[s,s'] (or ‖V‖² Tr H).
    h = dense_layer_hessian(model, layer, x, y, loss)
    d, m = h.shape[:2]
    w = dict(model.named_modules())[layer].weight
    v = w.detach().clone().requires_grad_()
    v2 = v.reshape(d, m)
    if variant == "layerwise":
        fixed = (v * v).sum() * torch.diagonal(h.reshape(d * m, d * m)).sum()
    else:
        fixed = (v2 @ v2.T * torch.einsum("atbt->ab", h)).sum()
    assert num(fixed) == pytest.approx(num(value), rel=RTOL)
    (want,) = torch.autograd.grad(fixed, v)
    key = next(n for n, p in model.named_parameters() if p is w)
    torch.testing.assert_close(got[key], want, rtol=RTOL, atol=RTOL * float(want.abs().max()))
    assert float(want.abs().max()) > 1e-6
    for name, g in got.items():
        if name != key:
            assert float(g.abs().max()) == 0.0, name  # nothing to the bias, trunk or head
    if variant == "neuronwise" and method == "auto":
        shortcut = detached_hessian_gradient(model, layer, x, y, loss=loss)
        torch.testing.assert_close(got[key], shortcut[key], rtol=RTOL, atol=1e-12)


def test_detached_gradient_option_is_checked_and_described() -> None:
    with pytest.raises(UsageError, match="unknown FAM gradient"):
        FAMRegularizer(models.mlp(), "fc", gradient="frozen")  # type: ignore[arg-type]
    assert "term I only" in FAMRegularizer(models.mlp(), "fc", gradient="detached").describe()
