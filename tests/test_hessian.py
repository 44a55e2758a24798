"""Hessian trace and top eigenvalue against dense float64 Hessians (docs/measures.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatcli.data import as_batches
from flatcli.errors import FlatcliError, UsageError
from flatcli.measures.hessian import hessian_top_eigenvalue, hessian_trace
from flatcli.measures.params import select_params

from . import models
from .dense import dense_hessian

RTOL = 1e-8


def small_cnn() -> nn.Module:
    return models.init(models.SmallCNN())


MODELS = {
    "mlp": (models.mlp, (5,)),
    "cnn": (small_cnn, (2, 3, 3)),
    "tanh": (lambda: models.init(models.TanhHead()), (5,)),
}

TRACE_CASES = {
    "mlp-all": ("mlp", "all", "cross_entropy"),
    "mlp-module-fc2": ("mlp", "fc2", "cross_entropy"),
    "mlp-param-fc1.weight": ("mlp", "fc1.weight", "cross_entropy"),
    "mlp-all-mse": ("mlp", "all", "mse"),
    "cnn-all": ("cnn", "all", "cross_entropy"),
    "cnn-module-conv1": ("cnn", "conv1", "cross_entropy"),
    "tanh-all": ("tanh", "all", "cross_entropy"),
}


def case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    factory, shape = MODELS[name]
    x, y = models.classification_data(shape=shape)
    return factory(), x, y


def dense(model: nn.Module, spec: str, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    return dense_hessian(model, select_params(model, spec), x, y, loss)


@pytest.mark.parametrize("name", list(TRACE_CASES))
def test_exact_trace_matches_dense_hessian(name: str) -> None:
    model_name, spec, loss = TRACE_CASES[name]
    model, x, y = case(model_name)
    got = hessian_trace(model, (x, y), loss=loss, params=spec, method="exact", batch_size=7)
    want = float(dense(model, spec, x, y, loss).trace())
    assert got.stderr is None
    assert got.value == pytest.approx(want, rel=RTOL)
    assert abs(want) > 1e-3
    assert got.method == "exact (diagonal by HVP)"


def test_auto_is_exact_for_small_parameter_sets_and_says_so() -> None:
    model, x, y = case("mlp")
    got = hessian_trace(model, (x, y))
    assert got.stderr is None
    assert got.method == "exact (diagonal by HVP; auto: 79 parameters ≤ 2000)"
    assert got.details == {"parameters": 79, "hvps": 79}


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_hutchinson_within_four_stderr_of_dense_trace(model_name: str) -> None:
    model, x, y = case(model_name)
    got = hessian_trace(
        model, (x, y), method="hutchinson", rtol=0.05, max_probes=400, probe_batch=32, seed=3
    )
    want = float(dense(model, "all", x, y, "cross_entropy").trace())
    assert got.stderr is not None and got.stderr > 0
    assert abs(got.value - want) <= 4 * got.stderr
    unconverged = "" if got.details["converged"] else "; max_probes reached before rtol 0.05"
    assert got.method == (
        f"hutchinson (rademacher, {got.details['probes']} probes; forward-over-reverse, "
        f"32 probes per vmapped call{unconverged})"
    )


def test_hutchinson_stops_on_relative_stderr_after_two_rounds() -> None:
    model, x, y = case("cnn")
    got = hessian_trace(model, (x, y), method="hutchinson", rtol=0.05, probe_batch=16)
    k = got.details["probes"]
    assert got.details["converged"]
    assert got.stderr <= 0.05 * abs(got.value)
    assert k % 16 == 0 and k >= 32
    # one round fewer would not have met the target: the rule stopped at the first chance
    fewer = hessian_trace(model, (x, y), method="hutchinson", rtol=0.05, max_probes=k - 16)
    assert k - 16 < 32 or fewer.stderr > 0.05 * abs(fewer.value)


def test_hutchinson_stops_at_max_probes_and_reports_it() -> None:
    model, x, y = case("mlp")
    got = hessian_trace(
        model, (x, y), method="hutchinson", rtol=1e-6, max_probes=40, probe_batch=16
    )
    assert got.details["probes"] == 40
    assert not got.details["converged"]


def test_hutchinson_is_a_per_sample_sum_independent_of_batching() -> None:
    """The same probes go through every data batch, and sums are divided by n once."""
    model, x, y = case("mlp")
    kwargs = dict(method="hutchinson", max_probes=48, rtol=0.0, seed=7)
    split = hessian_trace(model, (x, y), batch_size=5, **kwargs)
    whole = hessian_trace(model, (x, y), batch_size=24, **kwargs)
    assert split.value == pytest.approx(whole.value, rel=1e-12)
    assert split.stderr == pytest.approx(whole.stderr, rel=1e-10)


def test_hutchinson_seed_decides_the_probes() -> None:
    model, x, y = case("mlp")
    kwargs = dict(method="hutchinson", max_probes=32, rtol=0.0)
    a = hessian_trace(model, (x, y), seed=1, **kwargs)
    assert hessian_trace(model, (x, y), seed=1, **kwargs).value == a.value
    assert hessian_trace(model, (x, y), seed=2, **kwargs).value != a.value


@pytest.mark.parametrize("model_name", list(MODELS))
def test_top_eigenvalue_is_the_largest_algebraic_one(model_name: str) -> None:
    model, x, y = case(model_name)
    eigenvalues = torch.linalg.eigvalsh(dense(model, "all", x, y, "cross_entropy"))
    want = float(eigenvalues.max())
    got = hessian_top_eigenvalue(model, (x, y), batch_size=7)
    assert got.value == pytest.approx(want, rel=1e-6)
    assert got.stderr is None
    assert got.details["converged"]
    assert got.details["residual"] <= 1e-4 * abs(want)
    assert 1 <= got.details["iterations"] <= 200
    if model_name in ("cnn", "tanh"):  # a more negative eigenvalue: power iteration finds it
        assert float(eigenvalues.min()) < -want


def test_top_eigenvalue_of_one_module() -> None:
    model, x, y = case("mlp")
    want = float(torch.linalg.eigvalsh(dense(model, "fc2", x, y, "cross_entropy")).max())
    got = hessian_top_eigenvalue(model, (x, y), params="fc2")
    assert got.value == pytest.approx(want, rel=1e-6)
    assert got.details["parameters"] == 6 * 4 + 4


def test_top_eigenvalue_reports_residual_when_stopped_early() -> None:
    model, x, y = case("cnn")
    got = hessian_top_eigenvalue(model, (x, y), max_iters=3)
    assert got.details["iterations"] == 3
    assert not got.details["converged"]
    assert got.details["residual"] > 1e-3


def test_measured_in_eval_mode_and_mode_restored() -> None:
    model, x, y = case("mlp")
    model = nn.Sequential(model, nn.Dropout(0.5)).train()
    exact = hessian_trace(model, (x, y))
    assert model.training
    model.eval()
    assert hessian_trace(model, (x, y)).value == exact.value


def test_bad_inputs() -> None:
    model, x, y = case("mlp")
    with pytest.raises(FlatcliError, match="empty"):
        hessian_trace(model, (x[:0], y[:0]))
    with pytest.raises(FlatcliError, match="empty"):
        hessian_top_eigenvalue(model, as_batches((x[:0], y[:0])))
    with pytest.raises(UsageError, match="did you mean"):
        hessian_trace(model, (x, y), params="fc_2")
    with pytest.raises(UsageError, match="method"):
        hessian_trace(model, (x, y), method="lanczos")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="max_probes"):
        hessian_trace(model, (x, y), method="hutchinson", max_probes=1)
