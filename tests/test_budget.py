"""Memory and time budgets of the whole-network measures, and the Hutch++ trace."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from flatcli.data import as_batches
from flatcli.errors import FlatcliError, UsageError
from flatcli.measures.budget import (
    Activations,
    Stopwatch,
    activation_bytes,
    format_bytes,
    parse_memory,
    plan_rows,
    row_chunks,
    saved_bytes,
)
from flatcli.measures.estimate import warnings_of
from flatcli.measures.hessian import (
    LossHessian,
    MatrixOperator,
    hessian_top_eigenvalue,
    hessian_trace,
    trace_estimate,
)
from flatcli.measures.params import select_params

from . import models
from .dense import dense_hessian
from .test_hessian import case


def budget_for_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int) -> int:
    """The ``max_memory`` whose double-backward plan splits batches into ``rows`` rows."""
    names = select_params(model)
    op = LossHessian(model, as_batches((x, y)), "cross_entropy", names, probe_batch=1)
    probes = 2 * op.size  # hessian_trace holds int8 probes besides
    return int(op.fixed_bytes + probes + op.factor * op.activations.of(rows)) + 1


# --------------------------------------------------------------------------- memory


def test_parse_memory() -> None:
    assert parse_memory("4G") == 4 * 2**30
    assert parse_memory("512M") == 512 * 2**20
    assert parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory("100000") == 100_000
    assert parse_memory(None) is None
    for bad in ("", "-1G", "0", "lots", "4X"):
        with pytest.raises(UsageError, match="max_memory"):
            parse_memory(bad)
    assert format_bytes(1536) == "1.5 KiB"


def test_activation_bytes_grow_with_rows_and_exclude_parameters() -> None:
    model, x, y = case("cnn")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y, reduction="sum")

    acts = activation_bytes(loss_of, model, x, y, theta=theta)
    # the conv's input (2·3·3 float64 per sample) is saved at the least
    assert acts.per_row >= 2 * 3 * 3 * 8
    # parameters are not activations: far below one copy of them per sample
    assert acts.per_row < 20 * sum(p.numel() for p in model.parameters()) * 8


def test_saved_bytes_frees_the_measured_graph() -> None:
    """Measuring a pass leaves nothing of it behind: an output saved by its own op (``exp``)
    once kept the whole graph alive through autograd (about 0.4 GB per call on MiniLM)."""
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    refs: list[weakref.ref] = []

    def fn() -> torch.Tensor:
        y = x.exp()  # exp saves its output
        refs.append(weakref.ref(y))
        return y.sum()

    assert saved_bytes(fn, exclude=set()) == 1000 * 8
    gc.collect()
    assert refs[0]() is None


def test_plan_rows_fits_the_budget_and_refuses_below_one_sample() -> None:
    acts = Activations(per_row=100.0, fixed=50.0)
    rows = plan_rows(acts, 2.0, 10_000, fixed=1000)
    assert 1000 + 2 * acts.of(rows) <= 10_000 < 1000 + 2 * acts.of(rows + 1)
    with pytest.raises(FlatcliError, match="max-memory"):
        plan_rows(acts, 2.0, 1200, fixed=1000)


def test_row_chunks_split_batches_and_keep_every_row() -> None:
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    chunks = list(row_chunks(as_batches((x, y), batch_size=4), 3))
    assert [len(c[1]) for c in chunks] == [3, 1, 3, 1, 2]
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_small_budget_forces_chunking_and_gives_the_same_trace(model_name: str) -> None:
    model, x, y = case(model_name)
    kwargs = dict(method="hutchinson", rtol=0.0, max_probes=32, seed=5, batch_size=24)
    free = hessian_trace(model, (x, y), **kwargs)
    tight = hessian_trace(model, (x, y), max_memory=budget_for_rows(model, x, y, 5), **kwargs)
    assert free.details["engine"] == "retained" and free.details["chunk_rows"] is None
    assert tight.details["engine"] == "double_backward"
    assert tight.details["chunk_rows"] == 5
    assert tight.details["memory_estimate"] <= tight.details["max_memory"]
    assert "data in chunks of 5 rows" in tight.method
    assert tight.value == pytest.approx(free.value, rel=1e-10)
    assert tight.stderr == pytest.approx(free.stderr, rel=1e-8)


def test_small_budget_gives_the_same_top_eigenvalue_and_exact_trace() -> None:
    model, x, y = case("cnn")
    p = sum(q.numel() for q in model.parameters())
    basis = 31 * p * 8
    budget = max(budget_for_rows(model, x, y, 4) + basis, 2 * basis)
    free = hessian_top_eigenvalue(model, (x, y), max_iters=30)
    tight = hessian_top_eigenvalue(model, (x, y), max_iters=30, max_memory=budget)
    assert tight.details["chunk_rows"] is not None and tight.details["chunk_rows"] < 24
    assert tight.value == pytest.approx(free.value, rel=1e-9)
    exact = hessian_trace(model, (x, y), method="exact")
    assert hessian_trace(model, (x, y), method="exact", max_memory=budget).value == (
        pytest.approx(exact.value, rel=1e-10)
    )


def test_one_and_vmapped_probes_per_backward_pass_agree() -> None:
    model, x, y = case("mlp")
    kwargs = dict(method="hutchinson", rtol=0.0, max_probes=20, seed=2)
    one = hessian_trace(model, (x, y), probe_batch=1, **kwargs)
    many = hessian_trace(model, (x, y), probe_batch=8, **kwargs)
    assert one.details["engine"] == many.details["engine"] == "retained"
    assert (one.details["probe_batch"], many.details["probe_batch"]) == (1, 8)
    assert "one backward pass per probe" in one.method
    assert "8 probes per vmapped backward pass" in many.method
    assert one.value == pytest.approx(many.value, rel=1e-10)


def test_the_whole_graph_is_kept_only_when_it_fits_the_budget() -> None:
    model, x, y = case("cnn")
    names = select_params(model)
    batches = as_batches((x, y), batch_size=6)
    whole = LossHessian(model, batches, "cross_entropy", names, probe_batch=1)
    assert whole.engine == "retained" and whole.estimate <= whole.budget
    # room for one batch of 6 rows at a time, not for the graph of all 24
    tight = LossHessian(
        model, batches, "cross_entropy", names, probe_batch=1,
        max_memory=budget_for_rows(model, x, y, 6),
    )  # fmt: skip
    assert tight.engine == "double_backward" and tight.estimate <= tight.budget
    assert "gradient graph rebuilt per round" in tight.describe()


def test_lanczos_basis_is_capped_by_the_budget_with_a_warning() -> None:
    model = models.init(nn.Sequential(nn.Linear(200, 10)))  # many parameters, few activations
    x, y = models.classification_data(shape=(200,), classes=10)
    p = 200 * 10 + 10
    budget = int(2 * 12.5 * p * 8)  # half of it holds a basis of 12 vectors: 11 iterations
    got = hessian_top_eigenvalue(model, (x, y), max_memory=budget, tol=1e-14)
    assert got.details["iterations"] == 11
    assert not got.details["converged"]
    assert any("Lanczos basis of 11 vectors" in w for w in warnings_of(got))


def test_budget_below_one_sample_is_a_clear_error() -> None:
    model, x, y = case("cnn")
    with pytest.raises(FlatcliError, match="--max-memory .* raise --max-memory"):
        hessian_trace(model, (x, y), method="hutchinson", max_memory=1000)


# --------------------------------------------------------------------------- time


def test_time_budget_stops_early_and_reports_the_stderr_reached() -> None:
    model, x, y = case("mlp")
    got = hessian_trace(
        model, (x, y), method="hutchinson", rtol=1e-6, max_probes=10_000, time_budget=1e-6
    )
    assert got.details["stop"] == "time_budget"
    assert got.details["probes"] == 16  # one round
    loose = hessian_trace(model, (x, y), method="hutchinson", rtol=0.1, time_budget=1e6)
    free = hessian_trace(model, (x, y), method="hutchinson", rtol=0.1)
    assert loose.value == free.value and loose.details["stop"] == "rtol"
    assert got.stderr is not None and got.stderr > 0
    assert got.details["relative_stderr"] == pytest.approx(got.stderr / abs(got.value))
    assert "time budget reached at relative stderr" in got.method
    assert any("time budget" in w for w in warnings_of(got))


def test_progress_reports_probes_stderr_and_eta() -> None:
    model, x, y = case("mlp")
    lines: list[str] = []
    hessian_trace(
        model, (x, y), method="hutchinson", rtol=0.02, max_probes=64, progress=lines.append
    )
    assert any("32 probes; relative stderr" in s and "ETA" in s for s in lines)


def test_stopwatch() -> None:
    assert Stopwatch(None).remaining == float("inf")
    assert Stopwatch(0).budget is None
    assert Stopwatch(1e-9).spent() or True  # may or may not have ticked yet
    with pytest.raises(UsageError):
        Stopwatch(-1)


# --------------------------------------------------------------------------- Hutch++


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_hutchpp_within_four_stderr_of_dense_trace(model_name: str) -> None:
    model, x, y = case(model_name)
    want = float(dense_hessian(model, select_params(model), x, y, "cross_entropy").trace())
    got = hessian_trace(
        model, (x, y), method="hutchinson", trace_method="hutch++", sketch=8, rtol=0.05, seed=4
    )
    assert got.method.startswith("hutch++ (rank-8 sketch exact, ")
    assert got.details["sketch"] == 8
    assert got.details["probes"] == 16 + got.details["residual_probes"]
    assert got.stderr is not None and got.stderr > 0
    assert abs(got.value - want) <= 4 * got.stderr


def test_hutchpp_is_seeded() -> None:
    model, x, y = case("cnn")
    kwargs = dict(method="hutchinson", trace_method="hutch++", sketch=4, rtol=0.0, max_probes=24)
    a = hessian_trace(model, (x, y), seed=1, **kwargs)
    assert hessian_trace(model, (x, y), seed=1, **kwargs).value == a.value
    assert hessian_trace(model, (x, y), seed=2, **kwargs).value != a.value


def test_hutchpp_of_a_low_rank_matrix_is_exact() -> None:
    g = models.seeded(0)
    u = torch.randn(40, 3, generator=g, dtype=torch.float64)
    h = u @ torch.diag(torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)) @ u.T
    got = trace_estimate(MatrixOperator(h), trace_method="hutch++", sketch=4, rtol=0.0)
    assert got.value == pytest.approx(float(h.trace()), rel=1e-10)
    assert got.stderr == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("rtol", [0.0, 0.1])
def test_hutchinson_stderr_is_honest_by_simulation(model_name: str, rtol: float) -> None:
    """Plain Hutchinson: coverage of value ± 1.96 stderr over 600 seeds on a dense Hessian
    (46 probes, or the adaptive stop at 10%: about 330 probes on the MLP)."""
    model, x, y = case(model_name)
    h = dense_hessian(model, select_params(model), x, y, "cross_entropy")
    op, want = MatrixOperator(h), float(h.trace())
    max_probes = 46 if rtol == 0 else 5000
    hits = sum(
        abs((e := trace_estimate(op, rtol=rtol, max_probes=max_probes, seed=s)).value - want)
        <= 1.96 * e.stderr
        for s in range(600)
    )
    assert hits / 600 >= 0.93


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("rtol", [0.0, 0.05])
def test_hutchpp_stderr_is_honest_by_simulation(model_name: str, rtol: float) -> None:
    """Coverage of value ± 1.96 stderr over 600 seeds on a dense Hessian is at least 93%."""
    model, x, y = case(model_name)
    h = dense_hessian(model, select_params(model), x, y, "cross_entropy")
    op, want = MatrixOperator(h), float(h.trace())
    max_probes = 16 + 30 if rtol == 0 else 2000
    hits, seeds, variance = 0, 600, []
    for seed in range(seeds):
        e = trace_estimate(
            op, trace_method="hutch++", sketch=8, rtol=rtol, max_probes=max_probes, seed=seed
        )
        hits += abs(e.value - want) <= 1.96 * e.stderr
        variance.append(e.stderr**2)
    assert hits / seeds >= 0.93
    if rtol == 0:  # the sketch removes variance: below plain Hutchinson's with as many HVPs
        plain = [
            trace_estimate(op, rtol=0.0, max_probes=max_probes, seed=s).stderr ** 2
            for s in range(100)
        ]
        assert sum(variance) / seeds < sum(plain) / len(plain)


def test_hutchpp_needs_room_for_its_sketch() -> None:
    model, x, y = case("mlp")
    with pytest.raises(UsageError, match="max_probes"):
        hessian_trace(model, (x, y), method="hutchinson", trace_method="hutch++", max_probes=10)
    with pytest.raises(UsageError, match="trace method"):
        hessian_trace(model, (x, y), method="hutchinson", trace_method="xtrace")


# --------------------------------------------------------------------------- flags


def test_saturated_softmax_trace_is_flagged_not_printed_as_a_plain_zero() -> None:
    model = models.init(nn.Sequential(nn.Linear(5, 3)))
    with torch.no_grad():
        model[0].weight.mul_(1e4)
    x, _ = models.classification_data()
    y = model(x).argmax(-1)
    got = hessian_trace(model, (x, y), method="exact")
    assert 0 <= got.value < 1e-200  # a float64 rounding remnant
    assert any("softmax saturated on all 24 samples" in w for w in warnings_of(got))
    assert got.to_dict()["warnings"] == warnings_of(got)
    top = hessian_top_eigenvalue(model, (x, y))
    assert any("softmax saturated" in w for w in warnings_of(top))
    with torch.no_grad():
        model[0].weight.mul_(1e-4)  # back to a healthy softmax: no warning
    assert warnings_of(hessian_trace(model, (x, y), method="exact")) == []


def test_exact_zero_is_flagged() -> None:
    model = models.init(nn.Sequential(nn.Linear(5, 3)))
    x, y = models.classification_data()
    got = hessian_trace(model, (x * 0, y), params="0.weight", method="exact")
    assert got.value == 0.0
    assert any("exactly 0" in w for w in warnings_of(got))


def test_searches_that_hit_their_bound_are_flagged() -> None:
    from flatcli.measures.pac_bayes import pacbayes_flatness
    from flatcli.measures.sharpness import sharpness

    model = models.init(nn.Sequential(nn.Linear(5, 3)))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([1000.0, 0.0, 0.0]))
    x, _ = models.classification_data()
    y = torch.zeros(len(x), dtype=torch.long)  # always right, whatever the noise
    flat = pacbayes_flatness(model, (x, y), mc_samples=2, search_depth=3)
    assert flat.details["hit_sigma_max"]
    assert any("upper bound 2" in w for w in warnings_of(flat))
    sharp = sharpness(model, (x, y), search_depth=3, ascent_steps=2)
    assert sharp.details["hit_alpha_max"]
    assert any("upper bound 2" in w for w in warnings_of(sharp))
    with torch.no_grad():  # barely right on every sample: the smallest noise breaks it
        model[0].bias.copy_(torch.tensor([0.0, 0.05, 0.0]))
    y = torch.ones(len(x), dtype=torch.long)
    low = pacbayes_flatness(model, (x, y), mc_samples=2, search_depth=3, threshold=1e-9)
    assert any("lower bound" in w for w in warnings_of(low))
    assert not any("bound" in w for w in warnings_of(pacbayes_flatness(model, (x, y))))


# --------------------------------------------------------------------------- Hutchinson κ


def test_identity1_chunked_to_a_small_budget_gives_the_same_kappa() -> None:
    from flatcli.features import LayerSplit
    from flatcli.measures.relative_flatness import identity1_plan, layer_measures

    model = models.init(models.SmallCNN())
    x, y = models.classification_data(n=12, shape=(2, 3, 3))
    kwargs = dict(method="hutchinson", probes=20, seed=3)
    free = layer_measures(model, "conv2", (x, y), **kwargs)
    split, batches = LayerSplit(model, "conv2"), as_batches((x, y))
    assert identity1_plan(split, batches, None)[0] == 16
    chunk, chunked = identity1_plan(split, batches, 20_000)
    rows = [len(c[1]) for c in chunked]  # 1 probe, a few rows a call (the measured bytes)
    assert chunk == 1 and sum(rows) == 12 and 1 < len(rows) and max(rows) == rows[0] < 12
    tight = layer_measures(model, "conv2", (x, y), max_memory=20_000, **kwargs)
    for key in ("relative_flatness", "layer_hessian_trace"):
        assert tight[key].value == pytest.approx(free[key].value, rel=1e-10), key
        assert tight[key].stderr == pytest.approx(free[key].stderr, rel=1e-8), key
    with pytest.raises(FlatcliError, match="max-memory"):
        layer_measures(model, "conv2", (x, y), max_memory=1000, **kwargs)


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_hutchpp_kappa_within_four_stderr_of_dense(layer: str) -> None:
    from flatcli.measures.relative_flatness import layer_measures

    from .reference import dense_kappa, dense_trace

    model = models.init(models.SmallCNN())
    x, y = models.classification_data(n=12, shape=(2, 3, 3))
    got = layer_measures(
        model, layer, (x, y), method="hutchinson", probes=40, seed=1, trace_method="hutch++"
    )
    kappa, trace = got["relative_flatness"], got["layer_hessian_trace"]
    assert kappa.method.startswith("hutch++: Identity 1, A-space, rank-10 sketch exact")
    assert kappa.details["probes"] == 40 and kappa.stderr is not None
    assert abs(kappa.value - float(dense_kappa(model, layer, x, y))) <= 4 * kappa.stderr
    assert abs(trace.value - dense_trace(model, layer, x, y)) <= 4 * trace.stderr
