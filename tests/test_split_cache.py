"""The fx split is cached per (model, layer) and invalidated when it would be wrong."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from flatcli import features
from flatcli.features import LayerSplit
from flatcli.measures.relative_flatness import layer_measures

from . import models
from .reference import dense_kappa, dense_trace


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """Every model ``torch.fx.symbolic_trace`` is called on."""
    calls: list[nn.Module] = []
    real = torch.fx.symbolic_trace

    def counting(root, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(root)
        return real(root, *args, **kwargs)

    monkeypatch.setattr(torch.fx, "symbolic_trace", counting)
    return calls


def check_exact(model: nn.Module, layer: str) -> None:
    x, y = models.classification_data()
    got = layer_measures(model, layer, (x, y), method="exact")
    want = float(dense_kappa(model, layer, x, y))
    assert got["relative_flatness"].value == pytest.approx(want, rel=1e-9)
    assert got["layer_hessian_trace"].value == pytest.approx(
        dense_trace(model, layer, x, y), rel=1e-9
    )


def test_second_split_reuses_the_trace(traces: list[nn.Module]) -> None:
    model = models.init(models.Residual())
    first = LayerSplit(model, "b")
    second = LayerSplit(model, "b")
    assert len(traces) == 1
    assert second.mechanism == "fx" and second._trunk is first._trunk
    check_exact(model, "b")
    assert len(traces) == 1


def test_another_layer_is_traced_separately(traces: list[nn.Module]) -> None:
    model = models.init(models.Residual())
    check_exact(model, "b")
    check_exact(model, "a")
    assert len(traces) == 2
    check_exact(model, "b")
    assert len(traces) == 2


def test_weights_changed_in_place_give_the_new_value(traces: list[nn.Module]) -> None:
    model = models.init(models.Residual())
    check_exact(model, "b")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)
    check_exact(model, "b")
    assert len(traces) == 1


@pytest.mark.parametrize("what", ["downstream module", "the layer itself", "a parameter"])
def test_structural_change_retraces(traces: list[nn.Module], what: str) -> None:
    model = models.init(models.Residual())
    check_exact(model, "b")
    g = torch.Generator().manual_seed(5)
    if what == "downstream module":
        model.fc = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    elif what == "the layer itself":
        model.b = nn.Linear(4, 4).double()
    else:
        model.b.weight = nn.Parameter(torch.randn(4, 4, generator=g, dtype=torch.float64))
    check_exact(model, "b")
    assert len(traces) == 2


def test_training_flag_is_part_of_the_key(traces: list[nn.Module]) -> None:
    class ModeDependent(models.Residual):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            if self.training:  # traced as a constant
                h = 2 * h
            return self.fc(h + torch.tanh(self.b(h)))

    model = models.init(ModeDependent())
    x = models.classification_data()[0]
    with torch.no_grad():
        for mode in (True, False, True):
            model.train(mode)
            out, _ = LayerSplit(model, "b").run(x)
            torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert len(traces) == 2  # train and eval, each traced once


def test_untraceable_model_is_tried_once(traces: list[nn.Module]) -> None:
    model = models.init(models.ControlFlow())
    assert LayerSplit(model, "b").mechanism == "hook"
    assert LayerSplit(model, "b").mechanism == "hook"
    assert len(traces) == 1
    check_exact(model, "b")


def test_cache_does_not_keep_the_model_alive() -> None:
    model = models.init(models.Residual())
    LayerSplit(model, "b")
    assert model in features._FX_CACHE
    gc.collect()
    before = len(features._FX_CACHE)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert len(features._FX_CACHE) == before - 1


def test_cache_is_bounded_per_model(traces: list[nn.Module]) -> None:
    model = models.init(models.Residual())
    for _ in range(features._FX_CACHE_PER_MODEL + 3):  # a new Parameter object each time
        model.fc.weight = nn.Parameter(model.fc.weight.detach().clone())
        LayerSplit(model, "b")
    assert len(features._FX_CACHE[model]) == features._FX_CACHE_PER_MODEL
    check_exact(model, "b")
