"""Hessian trace and top eigenvalue against dense float64 Hessians (docs/measures.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from flatcli.data import as_batches
from flatcli.errors import FlatcliError, UsageError
from flatcli.measures.hessian import (
    LossHessian,
    hessian_top_eigenvalue,
    hessian_trace,
    trace_estimate,
)
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
    if model_name == "mlp":  # ReLU: piecewise linear in each parameter
        assert got.method.startswith("exact (Gauss-Newton diagonal: the network is piecewise")
    else:  # tanh
        assert got.method == "exact (diagonal by HVP)"


def test_auto_is_exact_for_small_parameter_sets_and_says_so() -> None:
    model, x, y = case("tanh")
    got = hessian_trace(model, (x, y))
    assert got.stderr is None
    p = sum(q.numel() for q in model.parameters())
    assert got.method == f"exact (diagonal by HVP; auto: {p} parameters ≤ 2000)"
    assert got.details == {"parameters": p, "hvps": p}


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
        f"hutchinson (rademacher, {got.details['probes']} probes; one gradient graph kept for "
        f"every probe, 32 probes per vmapped backward pass{unconverged})"
    )
    assert got.details["engine"] == "retained"


@pytest.mark.parametrize(
    ("route", "probe_batch"),
    [("retained", 1), ("retained", 4), ("double_backward", 1), ("vmap", 4)],
)
def test_every_route_gives_the_dense_hessian_products(route: str, probe_batch: int) -> None:
    model, x, y = case("cnn")
    names = select_params(model)
    op = LossHessian(
        model, as_batches((x, y), batch_size=7), "cross_entropy", names,
        route=route, probe_batch=probe_batch,
    )  # fmt: skip
    vectors = torch.randn(6, op.size, generator=models.seeded(4), dtype=torch.float64)
    want = vectors @ dense(model, "all", x, y, "cross_entropy")
    with torch.no_grad():
        for _ in range(2):  # the retained graph serves every call
            torch.testing.assert_close(op.matmat(vectors), want, rtol=1e-10, atol=1e-12)
        forms = op.quadratic_forms(vectors)
    torch.testing.assert_close(forms, (want * vectors).sum(1), rtol=1e-10, atol=1e-12)
    assert (op.engine, op.probe_batch, op.n) == (route, probe_batch, 24)


def test_retained_graph_is_built_once_for_all_probes_and_iterations() -> None:
    """PyHessian's trick: the forward pass (and first backward pass) is paid once."""
    model, x, y = case("mlp")
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))

    def forwards(fn: Callable[[], object]) -> int:
        calls.clear()
        fn()
        return len(calls)

    kwargs = dict(method="hutchinson", rtol=0.0, batch_size=7)
    few = forwards(lambda: hessian_trace(model, (x, y), max_probes=32, **kwargs))
    many = forwards(lambda: hessian_trace(model, (x, y), max_probes=128, **kwargs))
    assert few == many  # planning and the saturation check, then one pass over 4 batches
    lanczos = [forwards(lambda i=i: hessian_top_eigenvalue(model, (x, y), max_iters=i, tol=0))
               for i in (5, 40)]  # fmt: skip
    assert lanczos[0] == lanczos[1]
    op = LossHessian(
        model, as_batches((x, y), batch_size=7), "cross_entropy", select_params(model),
        route="double_backward",
    )  # fmt: skip
    with torch.no_grad():
        per_call = [forwards(lambda: op.quadratic_forms(torch.ones(3, 79))) for _ in range(2)]
    assert per_call == [4, 4]  # the per-call route runs the forward pass again every time


def test_hutchinson_stderr_is_honest_on_the_default_route() -> None:
    """Coverage of value ± 1.96 stderr over 300 seeds with the real products: one retained
    graph (the default route) serves every seed."""
    model, x, y = case("mlp")
    want = float(dense(model, "all", x, y, "cross_entropy").trace())
    op = LossHessian(model, as_batches((x, y)), "cross_entropy", select_params(model))
    assert op.engine == "retained"
    with torch.no_grad():
        for rtol, max_probes in ((0.0, 32), (0.25, 2000)):
            hits = 0
            for seed in range(300):
                got = trace_estimate(op, rtol=rtol, max_probes=max_probes, seed=seed)
                hits += abs(got.value - want) <= 1.96 * got.stderr
            assert hits / 300 >= 0.93, (rtol, hits)


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
