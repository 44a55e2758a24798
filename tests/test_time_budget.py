"""The time budget stops every iterative measure at probe granularity (issue 24).

No test here measures time: a clock the test controls advances by a fixed amount per
Hessian-vector product (or forward pass), as if each took that long.
"""

from __future__ import annotations

import re

import pytest

from flatcli import autodiff, registry
from flatcli.measures import pac_bayes
from flatcli.measures.budget import Stopwatch
from flatcli.measures.estimate import warnings_of
from flatcli.measures.hessian import hessian_top_eigenvalue, hessian_trace

from .test_hessian import case


class FakeClock:
    """Time that moves only when :meth:`tick` is called."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def slow_hvp(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeClock, list[int]]:
    """Every product call on a gradient graph takes 10 s of the fake clock, per direction."""
    clock, calls = FakeClock(), []
    real = autodiff.GradientGraph.products

    def products(self, vectors, **kw):  # noqa: ANN001, ANN003, ANN202
        out = real(self, vectors, **kw)
        clock.tick(10.0 * vectors.shape[0])
        calls.append(int(vectors.shape[0]))
        return out

    monkeypatch.setattr(autodiff.GradientGraph, "products", products)
    return clock, calls


def test_trace_stops_inside_the_first_round_at_probe_granularity(slow_hvp) -> None:  # noqa: ANN001
    clock, calls = slow_hvp
    model, x, y = case("cnn")
    lines: list[str] = []
    got = hessian_trace(
        model,
        (x, y),
        method="hutchinson",
        probe_batch=1,
        rtol=1e-9,
        time_budget=Stopwatch(25.0, clock=clock),
        progress=lines.append,
    )
    # 10 s per probe, 25 s budget: the third probe spends it, and the round of 16 stops there
    assert got.details["stop"] == "time_budget"
    assert got.details["probes"] == 3 and sum(calls) == 3
    assert got.stderr is not None and got.stderr > 0
    assert got.details["relative_stderr"] == pytest.approx(got.stderr / abs(got.value))
    assert "time budget reached at relative stderr" in got.method
    assert any("stopped by the time budget" in w for w in warnings_of(got))
    # progress inside the round: never past its total, with an ETA
    inside = [s for s in lines if "round " in s and "/" in s]
    assert inside, lines
    for s in inside:
        done, total = map(int, re.search(r"round (\d+)/(\d+)", s).groups())  # type: ignore[union-attr]
        assert done <= total == 16, s
        assert "ETA" in s, s
    assert any("relative stderr" in s and "ETA" in s for s in lines), lines


def test_a_budget_that_does_not_bind_changes_nothing(slow_hvp) -> None:  # noqa: ANN001
    clock, _ = slow_hvp
    model, x, y = case("cnn")
    free = hessian_trace(model, (x, y), method="hutchinson", probe_batch=1, rtol=0.2)
    loose = hessian_trace(
        model,
        (x, y),
        method="hutchinson",
        probe_batch=1,
        rtol=0.2,
        time_budget=Stopwatch(1e9, clock=clock),
    )
    assert loose.value == free.value and loose.details["probes"] == free.details["probes"]
    assert loose.details["stop"] == "rtol"


def test_lanczos_stops_after_the_hvp_that_spent_the_budget(slow_hvp) -> None:  # noqa: ANN001
    clock, calls = slow_hvp
    model, x, y = case("cnn")
    got = hessian_top_eigenvalue(
        model, (x, y), tol=1e-14, probe_batch=1, time_budget=Stopwatch(35.0, clock=clock)
    )
    assert got.details["iterations"] == 4 and not got.details["converged"]
    assert sum(calls) == 4  # no further product for the residual once out of time
    assert got.details["residual"] > 0
    assert any("stopped by the time budget" in w for w in warnings_of(got))


def test_pacbayes_stops_between_draws_and_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    real = pac_bayes.mean_objective

    def slow(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        clock.tick(1.0)  # one pass over the data: 1 s
        return real(*args, **kw)

    monkeypatch.setattr(pac_bayes, "mean_objective", slow)
    model, x, y = case("mlp")
    search = pac_bayes.pacbayes_sigma(
        model, (x, y), mc_samples=10, search_depth=15, time_budget=Stopwatch(5.0, clock=clock)
    )
    # base at t = 1; step 1 draws until t = 5 (4 draws), then the search stops; σ' and the
    # secant take 2 draws each
    assert search.steps == 1 and search.fewest_draws == 2 and search.stopped
    assert clock.now == 5 + 3 * 2
    est = pac_bayes.flatness_estimate(search, 10, 15)
    assert est.details["stop"] == "time_budget" and est.details["steps"] == 1
    assert any("stopped by the time budget after 1/15" in w for w in warnings_of(est))


def test_one_budget_is_shared_by_the_measures_of_a_run(slow_hvp) -> None:  # noqa: ANN001
    clock, calls = slow_hvp
    model, x, y = case("cnn")
    from flatcli.data import as_batches

    batches = as_batches((x, y), batch_size=256)
    config = registry.MeasureConfig(
        layer="fc", method="hutchinson", probe_batch=1, rtol=1e-9, search_depth=15
    )
    shared = Stopwatch(25.0, clock=clock)
    out = registry.run_measures(
        model,
        batches,
        ["hessian_trace", "pacbayes_flatness"],
        config,
        inputs=registry.Inputs(clock=shared),
    )
    assert out["hessian_trace"].details["stop"] == "time_budget"
    # the trace spent the run's budget: the search that follows takes one step only
    assert out["pacbayes_flatness"].details["steps"] == 1
    assert out["pacbayes_flatness"].details["stop"] == "time_budget"


def test_correlate_progress_line_counts_checkpoints_with_an_eta() -> None:
    from flatcli.cli.correlate import checkpoint_line

    line = checkpoint_line("runs/a.safetensors", "computed", 1, 4, 90.0)
    assert line == "flatcli: [1/4] a.safetensors: computed, 1 min 30 s so far, ETA 4 min 30 s"
    assert checkpoint_line("b.pt", "cached", 4, 4, 10.0).endswith("ETA 0 s")


def test_robustness_budget_keeps_only_complete_probes() -> None:
    from flatcli.robustness import feature_robustness

    model, x, y = case("mlp")
    free = feature_robustness(model, None, (x, y), [0.1], probes=8)
    cut = feature_robustness(model, None, (x, y), [0.1], probes=8, time_budget=1e-9)
    assert free.probes == 8 and cut.probes == 2  # the budget is spent: two probes, the minimum
    assert "time budget: 2 of 8" in cut.method
    assert cut.points[0].stderr is not None
