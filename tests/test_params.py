"""Parameter selection and the shared functional plumbing of the whole-network measures."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from flatcli.autodiff import GradientGraph, hvp
from flatcli.errors import FlatcliError, UsageError
from flatcli.measures.params import (
    FlatParams,
    batches_for,
    evaluating,
    functional_loss,
    mean_objective,
    select_params,
)

from . import models
from .dense import dense_hessian


def nested() -> nn.Module:
    block = nn.Sequential(OrderedDict(lin=nn.Linear(5, 4), act=nn.ReLU(), out=nn.Linear(4, 4)))
    return models.init(nn.Sequential(OrderedDict(block=block, fc=nn.Linear(4, 3))))


def test_all_selects_every_trainable_parameter_in_order() -> None:
    model = models.mlp()
    assert select_params(model) == [n for n, _ in model.named_parameters()]


def test_include_bias_false_drops_biases() -> None:
    assert select_params(models.mlp(), include_bias=False) == [
        "fc1.weight",
        "fc2.weight",
        "fc.weight",
    ]


def test_module_name_selects_its_parameters_recursively() -> None:
    model = nested()
    assert select_params(model, "block") == [
        "block.lin.weight",
        "block.lin.bias",
        "block.out.weight",
        "block.out.bias",
    ]
    assert select_params(model, "block.out", include_bias=False) == ["block.out.weight"]


def test_exact_parameter_name() -> None:
    assert select_params(models.mlp(), "fc2.bias") == ["fc2.bias"]


def test_tied_weight_is_selected_once_under_its_first_name() -> None:
    model = models.init(models.Tied())
    assert select_params(model, "b.weight") == ["a.weight"]
    assert select_params(model).count("a.weight") == 1
    assert "b.weight" not in select_params(model)


def test_frozen_parameters_are_not_selected() -> None:
    model = models.mlp()
    model.fc1.weight.requires_grad_(False)
    assert "fc1.weight" not in select_params(model)
    with pytest.raises(UsageError, match="no trainable"):
        select_params(model, "fc1.weight")


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UsageError, match=r"no parameter or module named 'fc3'; did you mean .*fc"):
        select_params(models.mlp(), "fc3")
    with pytest.raises(UsageError, match="did you mean fc2.weight"):
        select_params(models.mlp(), "fc2.weigth")


def test_flatten_round_trip() -> None:
    model = models.mlp()
    flat = FlatParams.of(model, select_params(model))
    theta = flat.vector(model)
    assert theta.shape == (flat.size,) == (sum(p.numel() for p in model.parameters()),)
    params = dict(model.named_parameters())
    for name, value in flat.unflatten(theta).items():
        assert torch.equal(value, params[name])


@pytest.mark.parametrize("spec", ["all", "fc2"])
def test_hvp_matches_dense_hessian_times_vectors(spec: str) -> None:
    model = models.mlp()
    x, y = models.classification_data()
    names = select_params(model, spec)
    flat = FlatParams.of(model, names)
    f = functional_loss(model, flat, x, y, "cross_entropy")
    vectors = torch.randn(5, flat.size, generator=models.seeded(1), dtype=torch.float64)
    got = hvp(f, flat.vector(model), vectors, chunk_size=2)
    want = x.shape[0] * vectors @ dense_hessian(model, names, x, y, "cross_entropy")  # f is a sum
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_gradient_graph_products_match_dense_hessian_and_keep_the_graph(batched: bool) -> None:
    model = models.mlp()
    x, y = models.classification_data()
    names = select_params(model)
    flat = FlatParams.of(model, names)
    f = functional_loss(model, flat, x, y, "cross_entropy")
    vectors = torch.randn(5, flat.size, generator=models.seeded(2), dtype=torch.float64)
    want = x.shape[0] * vectors @ dense_hessian(model, names, x, y, "cross_entropy")
    with torch.no_grad():  # as the measures call it
        graph = GradientGraph(f, flat.vector(model))
        for _ in range(2):  # the same graph serves every call
            got = graph.products(vectors, batched=batched)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        last = graph.products(vectors[:2], batched=batched, release=True)
    torch.testing.assert_close(last, want[:2], rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="after release"):
        graph.products(vectors)
    affine = GradientGraph(lambda t: (t * 3.0).sum(), flat.vector(model))  # no curvature
    assert affine.products(vectors).abs().max() == 0


def test_functional_loss_holds_other_parameters_fixed() -> None:
    model = models.mlp()
    x, y = models.classification_data()
    flat = FlatParams.of(model, ["fc.weight"])
    grad = torch.func.grad(functional_loss(model, flat, x, y, "mse"))(flat.vector(model))
    assert grad.shape == (model.fc.weight.numel(),)
    assert all(p.grad is None for p in model.parameters())


def test_mean_objective_error_and_loss() -> None:
    model = models.mlp()
    x, y = models.classification_data()
    batches = batches_for(model, (x, y), batch_size=5)
    with evaluating(model), torch.no_grad():
        err, n = mean_objective(model, batches, target="error", loss="cross_entropy")
        ce, _ = mean_objective(model, batches, target="loss", loss="cross_entropy")
        out = model(x)
    assert n == 24
    assert err == pytest.approx(float((out.argmax(-1) != y).double().mean()), abs=1e-15)
    assert ce == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-12)


def test_mean_objective_rejects_empty_data_and_error_on_regression() -> None:
    model = models.mlp()
    x, y = models.classification_data()
    with pytest.raises(FlatcliError, match="empty"):
        mean_objective(model, batches_for(model, (x[:0], y[:0])), target="loss", loss="mse")
    with pytest.raises(UsageError, match="class labels"):
        mean_objective(model, batches_for(model, (x, y.double())), target="error", loss="mse")


def test_evaluating_restores_training_mode_even_on_error() -> None:
    model = models.mlp().train()
    with pytest.raises(RuntimeError), evaluating(model):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training
