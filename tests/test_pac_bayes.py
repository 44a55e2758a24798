"""PAC-Bayes flatness and bound against closed forms (docs/measures.md, "pacbayes_flatness").

The oracle: a linear model ``z = W x + b`` fitted exactly (targets ``t_i = W x_i + b``)
with ``ℓ_i = (1/d) ‖z_i − t_i‖²``. Perturbing all parameters by ``U, v`` gives
``ℓ_i(w + u) = (1/d) ‖U x_i + v‖²``, so, with ``x̃_i = (x_i, 1)`` and independent
entries ``U_st ~ N(0, s_st²)``,

    E_u[L(w+u)] − L(w) = (1/d) Σ_{s,t} s_st² · mean_i x̃_it².

Isotropic noise (s = σ): the increase is ``σ² (mean_i ‖x_i‖² + 1)``, the ``+1`` being the
perturbed bias. Magnitude-aware (s² = σ² w̃_st² + ε²): it is
``(1/d) (σ² Σ w̃_st² c_t + ε² d Σ_t c_t)`` with ``c_t = mean_i x̃_it²``.
Setting either equal to τ gives σ' in closed form.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from flatcli.data import Batches
from flatcli.errors import FlatcliError, UsageError
from flatcli.measures.budget import Stopwatch
from flatcli.measures.pac_bayes import gaussian_perturbation, pacbayes_bound, pacbayes_flatness

from . import models

TAU = 0.1
DEPTH = 15


def exact_fit(n: int = 40, m: int = 20, d: int = 10, *, positive: bool = False):
    g = models.seeded(11)
    model = nn.Linear(m, d).double()
    with torch.no_grad():
        model.weight.copy_(0.5 * torch.randn(d, m, generator=g, dtype=torch.float64))
        model.bias.copy_(0.5 * torch.randn(d, generator=g, dtype=torch.float64))
    if positive:
        x = torch.rand(n, m, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(n, m, generator=g, dtype=torch.float64)
    with torch.no_grad():
        t = model(x)
    return model.eval(), x, t


def test_noise_has_standard_deviation_sigma_not_sigma_squared() -> None:
    weights = {"a": torch.zeros(300, 400, dtype=torch.float64), "b": torch.zeros(50)}
    u = gaussian_perturbation(weights, 0.3, generator=models.seeded(0))
    assert u["b"].dtype == torch.float32
    std = float(u["a"].std())
    assert std == pytest.approx(0.3, rel=0.01)  # σ² = 0.09 would be far outside
    assert float(u["a"].mean()) == pytest.approx(0.0, abs=0.003)


def test_magnitude_aware_noise_variance_is_sigma2_w2_plus_eps2() -> None:
    w = torch.linspace(-3, 3, 200_001, dtype=torch.float64)
    sigma, eps = 0.4, 0.05
    u = gaussian_perturbation(
        {"w": w}, sigma, generator=models.seeded(0), magnitude_aware=True, epsilon=eps
    )["w"]
    standardized = u / (sigma**2 * w**2 + eps**2).sqrt()
    assert float(standardized.std()) == pytest.approx(1.0, rel=0.01)
    near_zero = u[w.abs() < 1e-3]
    assert float(near_zero.std()) == pytest.approx(eps, rel=0.3)  # ε alone where w ≈ 0


def test_isotropic_sigma_matches_closed_form() -> None:
    model, x, t = exact_fit()
    want = math.sqrt(TAU / (float(x.pow(2).sum(1).mean()) + 1))
    got = pacbayes_flatness(
        model, (x, t), loss="mse", target="loss", mc_samples=40, sigma_max=0.5, batch_size=16
    )
    sigma, se = got.details["sigma"], got.details["sigma_stderr"]
    resolution = 0.5 / 2 ** (DEPTH + 1)
    assert 0 < se < 0.03 * want  # tight enough that the σ² bug (σ' ≈ √want) would fail
    assert abs(sigma - want) <= 4 * se + resolution
    assert got.value == 1 / sigma**2
    assert got.stderr == pytest.approx(2 * se / sigma**3)
    assert got.details["increase"] == pytest.approx(TAU, abs=4 * got.details["mc_stderr"])
    assert not got.details["hit_sigma_max"]


@pytest.mark.parametrize("eps", [1e-3, 0.04])
def test_magnitude_aware_sigma_matches_closed_form(eps: float) -> None:
    model, x, t = exact_fit()
    d = model.out_features
    w_tilde = torch.cat([model.weight, model.bias[:, None]], 1).detach()
    c = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).pow(2).mean(0)
    want = math.sqrt((TAU * d - eps**2 * d * float(c.sum())) / float((w_tilde**2 * c).sum()))
    got = pacbayes_flatness(
        model, (x, t), loss="mse", target="loss", magnitude_aware=True, mc_samples=40, epsilon=eps
    )
    sigma, se = got.details["sigma"], got.details["sigma_stderr"]
    assert 0 < se < 0.05 * want
    assert abs(sigma - want) <= 4 * se + 2.0 / 2 ** (DEPTH + 1)


def test_bound_uses_the_same_sigma_and_all_parameters() -> None:
    model, x, t = exact_fit()
    kwargs = dict(loss="mse", target="loss", mc_samples=8, sigma_max=0.5)
    sigma = pacbayes_flatness(model, (x, t), **kwargs).details["sigma"]
    bound = pacbayes_bound(model, (x, t), **kwargs)
    sq = float(model.weight.detach().pow(2).sum() + model.bias.detach().pow(2).sum())
    assert bound.details["sigma"] == sigma
    assert bound.details["norm_squared"] == pytest.approx(sq, rel=1e-12)
    assert bound.value == pytest.approx(sq / (4 * sigma**2) + math.log(len(x) / sigma) + 10)


def test_bound_from_initialization_uses_the_distance() -> None:
    model, x, t = exact_fit()
    init = nn.Linear(20, 10).double()
    with torch.no_grad():
        init.weight.copy_(model.weight)
        init.bias.copy_(model.bias)
        init.weight[0, 0] += 3.0
        init.bias[1] -= 4.0
    bound = pacbayes_bound(
        model, (x, t), init_model=init, loss="mse", target="loss", mc_samples=4, sigma_max=0.5
    )
    sigma = bound.details["sigma"]
    assert bound.details["norm_squared"] == pytest.approx(25.0, rel=1e-12)
    assert bound.value == pytest.approx(25 / (4 * sigma**2) + math.log(len(x) / sigma) + 10)


def test_error_target_on_a_classifier_leaves_the_model_untouched() -> None:
    model = models.mlp().train()
    x, _ = models.classification_data(n=60)
    y = model.eval()(x).argmax(-1)  # the model's own labels: training error 0
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = pacbayes_flatness(model, (x, y), mc_samples=4, search_depth=8)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert 0 < got.details["sigma"] < 2 and not got.details["hit_sigma_max"]
    assert got.details["base"] == pytest.approx(
        float((model.eval()(x).argmax(-1) != y).double().mean())
    )


def test_model_untouched_when_the_data_fails_mid_search() -> None:
    model = models.mlp().train()
    x, y = models.classification_data()
    passes = []

    def make_iter():
        passes.append(1)
        if len(passes) > 5:
            raise RuntimeError("data source failed")
        return [(x, y)]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="data source failed"):
        pacbayes_flatness(model, Batches(make_iter, n_samples=24, dtype=torch.float64))
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_seed_is_the_only_randomness() -> None:
    model, x, t = exact_fit(n=10, m=3, d=2)
    kwargs = dict(loss="mse", target="loss", mc_samples=3, search_depth=10)
    torch.manual_seed(0)
    a = pacbayes_flatness(model, (x, t), seed=5, **kwargs)
    torch.manual_seed(1)
    assert pacbayes_flatness(model, (x, t), seed=5, **kwargs).value == a.value
    assert pacbayes_flatness(model, (x, t), seed=6, **kwargs).value != a.value


def test_bad_inputs() -> None:
    model, x, t = exact_fit(n=10, m=3, d=2)
    with pytest.raises(UsageError, match="class labels"):
        pacbayes_flatness(model, (x, t), loss="mse")  # target "error" needs labels
    with pytest.raises(UsageError, match="mc_samples"):
        pacbayes_flatness(model, (x, t), loss="mse", target="loss", mc_samples=1)
    with pytest.raises(UsageError, match="target"):
        pacbayes_flatness(model, (x, t), loss="mse", target="accuracy")  # type: ignore[arg-type]
    with pytest.raises(FlatcliError, match="empty"):
        pacbayes_flatness(model, (x[:0], t[:0]), loss="mse", target="loss")


def near_copy(model: nn.Module, shift: float) -> nn.Module:
    """``model`` with every weight moved by ``shift``: a small ‖w − w₀‖², so both terms of
    the bound's σ'-derivative (−‖w − w₀‖²/(2σ'³) and −1/σ') matter."""
    init = copy.deepcopy(model)
    with torch.no_grad():
        init.weight.add_(shift)
    return init


@pytest.mark.parametrize("shift", [None, 0.01, 0.0], ids=["from-zero", "near-init", "at-init"])
def test_bound_stderr_is_the_secant_derivative_times_sigma_stderr(shift: float | None) -> None:
    model, x, t = exact_fit()
    init = None if shift is None else near_copy(model, shift)
    got = pacbayes_bound(
        model, (x, t), init_model=init, loss="mse", target="loss", mc_samples=5, sigma_max=0.5
    )
    sq, n = got.details["norm_squared"], len(x)

    def bound(s: float) -> float:  # the documented closed form, as a function of σ'
        return sq / (4 * s**2) + math.log(n / s) + 10

    s, h = got.details["sigma"], 1e-5 * got.details["sigma"]
    slope = (bound(s + h) - bound(s - h)) / (2 * h)
    assert got.value == pytest.approx(bound(s), rel=1e-12)
    assert got.stderr == pytest.approx(abs(slope) * got.details["sigma_stderr"], rel=1e-6)
    assert got.stderr > 0


def test_bound_and_flatness_stderr_match_the_spread_over_seeds() -> None:
    # The delta-method standard errors against the empirical standard deviation of the
    # estimates over 20 seeds (relative precision of that std: about 16%).
    model, x, t = exact_fit()
    init = near_copy(model, 0.01)
    bounds, flats = [], []
    for seed in range(20):
        kwargs = dict(loss="mse", target="loss", mc_samples=5, sigma_max=0.5, seed=seed)
        bounds.append(pacbayes_bound(model, (x, t), init_model=init, search_depth=12, **kwargs))
        flats.append(pacbayes_flatness(model, (x, t), search_depth=12, **kwargs))
    for name, ests in (("bound", bounds), ("flatness", flats)):
        spread = float(np.std([e.value for e in ests], ddof=1))
        reported = float(np.mean([e.stderr for e in ests]))
        assert 0.7 < reported / spread < 1.4, (name, reported, spread)
    sigma_spread = float(np.std([e.details["sigma"] for e in bounds], ddof=1))
    sigma_se = float(np.mean([e.details["sigma_stderr"] for e in bounds]))
    assert 0.7 < sigma_se / sigma_spread < 1.4


def test_bound_passes_every_search_option_and_names_its_reference() -> None:
    model, x, t = exact_fit()
    kwargs = dict(
        loss="mse", target="loss", mc_samples=6, sigma_max=0.4, threshold=0.05, search_depth=11
    )
    flat = pacbayes_flatness(model, (x, t), **kwargs)
    bound = pacbayes_bound(model, (x, t), **kwargs)
    for key in ("sigma", "sigma_stderr", "increase", "bracket", "mc_samples", "search_depth"):
        assert bound.details[key] == flat.details[key], key
    assert bound.details["mc_samples"] == 6 and bound.details["search_depth"] == 11
    assert bound.details["increase"] == pytest.approx(0.05, abs=4 * bound.details["mc_stderr"])
    assert bound.method.startswith("‖w‖²/(4σ'²) + log(n/σ') + 10, bisection on σ ∈ [0, 0.4]")
    assert "11 steps × 6 draws" in bound.method and "loss increase ≤ 0.05" in bound.method
    init = pacbayes_bound(model, (x, t), init_model=near_copy(model, 0.1), **kwargs)
    assert init.method.startswith("‖w − w₀‖²/(4σ'²)")
    assert flat.method.startswith("1/σ'², bisection on σ ∈ [0, 0.4], 11 steps × 6 draws")


def test_bound_defaults_are_jiangs_and_the_flatness_defaults() -> None:
    import inspect

    bound = inspect.signature(pacbayes_bound).parameters
    flat = inspect.signature(pacbayes_flatness).parameters
    jiang = {"threshold": 0.1, "mc_samples": 10, "search_depth": 15, "sigma_max": 2.0}
    for name, value in jiang.items():
        assert bound[name].default == flat[name].default == value, name
    for name in ("loss", "target", "seed", "batch_size"):
        assert bound[name].default == flat[name].default, name
    assert bound["target"].default == "error" and bound["loss"].default == "cross_entropy"


def test_bisection_bracket_ties_and_progress_lines() -> None:
    from flatcli.measures.pac_bayes import largest_below

    lines: list[str] = []
    # increase(σ) = σ, threshold 0.5: the first midpoint is exactly at the threshold, which
    # is allowed (≤), so it becomes the lower end.
    ticks = iter(range(100))  # a clock that advances 1 s per reading
    clock = Stopwatch(None, clock=lambda: float(next(ticks)))
    lo, hi, steps = largest_below(
        lambda s: s, upper=1.0, depth=3, threshold=0.5, progress=lines.append, clock=clock
    )
    assert (lo, hi, steps) == (0.5, 0.625, 3)
    assert lines == [
        "scale: bisection step 1/3, bracket [0, 1], trying 0.5",
        "scale: bisection step 2/3, bracket [0.5, 1], trying 0.75, ETA 2 s",
        "scale: bisection step 3/3, bracket [0.5, 0.75], trying 0.625, ETA 1 s",
    ]


def test_two_draws_are_enough_and_bad_search_options_name_themselves() -> None:
    import inspect

    from flatcli.measures.pac_bayes import pacbayes_sigma

    model, x, t = exact_fit(n=10, m=3, d=2)
    kwargs = dict(loss="mse", target="loss", search_depth=4)
    assert pacbayes_flatness(model, (x, t), mc_samples=2, **kwargs).stderr > 0
    with pytest.raises(UsageError, match="^sigma_max must be positive, got 0$"):
        pacbayes_flatness(model, (x, t), sigma_max=0, **kwargs)
    sigma = inspect.signature(pacbayes_sigma).parameters
    flat = inspect.signature(pacbayes_flatness).parameters
    for name in ("loss", "target", "threshold", "mc_samples", "search_depth", "sigma_max"):
        assert sigma[name].default == flat[name].default, name
    for name in ("epsilon", "seed", "batch_size", "magnitude_aware"):
        assert sigma[name].default == flat[name].default, name


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_search_reports_its_noise_and_progress(magnitude_aware: bool) -> None:
    from flatcli.measures.pac_bayes import pacbayes_sigma

    model, x, t = exact_fit(n=10, m=3, d=2)
    lines: list[str] = []
    search = pacbayes_sigma(
        model,
        (x, t),
        loss="mse",
        target="loss",
        search_depth=3,
        mc_samples=2,
        magnitude_aware=magnitude_aware,
        progress=lines.append,
    )
    what = "PAC-Bayes σ' (magnitude-aware)" if magnitude_aware else "PAC-Bayes σ'"
    first = f"{what}: bisection step 1/3, bracket [0, 2], trying 1"
    assert len(lines) == 3 and lines[0] == first
    for k, line in enumerate(lines, 1):
        assert line.startswith(f"{what}: bisection step {k}/3, bracket ["), line
    noise = "u ~ N(0, σ²w² + ε²)" if magnitude_aware else "u ~ N(0, σ²)"
    assert noise in search.method


def test_noise_is_float64_normals_scaled_whatever_the_weights_dtype() -> None:
    import inspect

    weights = {"a": torch.zeros(7, 3), "b": torch.zeros(5, dtype=torch.float64)}
    u = gaussian_perturbation(weights, 0.25, generator=models.seeded(4))
    gen = models.seeded(4)
    za = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    zb = torch.randn(5, generator=gen, dtype=torch.float64)
    assert u["a"].dtype == torch.float32 and torch.equal(u["a"], (0.25 * za).float())
    assert torch.equal(u["b"], 0.25 * zb)
    eps = inspect.signature(gaussian_perturbation).parameters["epsilon"].default
    assert eps == inspect.signature(pacbayes_flatness).parameters["epsilon"].default == 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, "threshold must be positive, got 0.0"),
        ({"search_depth": 0}, "search_depth must be at least 1, got 0"),
        ({"epsilon": -1.0}, "epsilon must be at least 0, got -1.0"),
    ],
)
def test_search_option_edges(kwargs: dict, message: str) -> None:
    model, x, t = exact_fit(n=10, m=3, d=2)
    base = dict(loss="mse", target="loss", mc_samples=2)
    with pytest.raises(UsageError) as info:
        pacbayes_flatness(model, (x, t), **base, **kwargs)
    assert str(info.value) == message
    # The edges themselves are allowed: one bisection step, no ε floor.
    one = pacbayes_flatness(model, (x, t), **base, search_depth=1, sigma_max=0.5)
    assert one.details["bracket"] in ([0.0, 0.25], [0.25, 0.5])
    pacbayes_flatness(model, (x, t), **base, magnitude_aware=True, epsilon=0.0, search_depth=2)


def test_isotropic_sigma_with_a_nonzero_base_loss() -> None:
    # Targets off the fit: L(w) > 0, and the increase (not the perturbed loss) is what is
    # held to τ. In expectation the residuals' cross term vanishes, so σ' is unchanged.
    model, x, t = exact_fit()
    t = t + 0.15 * torch.randn(t.shape, generator=models.seeded(3), dtype=t.dtype)
    want = math.sqrt(TAU / (float(x.pow(2).sum(1).mean()) + 1))
    got = pacbayes_flatness(model, (x, t), loss="mse", target="loss", mc_samples=40, sigma_max=0.5)
    assert got.details["base"] == pytest.approx(0.15**2, rel=0.3)  # ≈ 0.02, not 0
    sigma, se = got.details["sigma"], got.details["sigma_stderr"]
    assert 0 < se < 0.03 * want and abs(sigma - want) <= 4 * se + 0.5 / 2 ** (DEPTH + 1)


def test_search_slope_stderr_and_sigma_max_flag() -> None:
    from flatcli.measures.pac_bayes import pacbayes_sigma

    model, x, t = exact_fit()
    c = float(x.pow(2).sum(1).mean()) + 1  # increase = c σ²: slope 2 c σ
    kwargs = dict(loss="mse", target="loss", mc_samples=20)
    free = pacbayes_sigma(model, (x, t), sigma_max=0.5, **kwargs)
    assert free.hit_sigma_max is False
    assert free.slope == pytest.approx(2 * c * free.sigma, rel=0.1)
    assert free.sigma_stderr == free.mc_stderr / free.slope
    # σ_max too small to reach τ: flagged, and a slope below 1 still gives a finite error.
    capped = pacbayes_sigma(model, (x, t), sigma_max=0.01, **kwargs)
    assert capped.hit_sigma_max is True and 0 < capped.slope < 1
    assert capped.sigma_stderr == capped.mc_stderr / capped.slope
    # A flat increase (no error change at tiny σ): slope 0, standard error infinite.
    clf = models.mlp()
    xc, _ = models.classification_data(n=30)
    yc = clf(xc).argmax(-1)
    flat = pacbayes_sigma(clf, (xc, yc), sigma_max=1e-9, mc_samples=2, search_depth=3)
    assert flat.slope == 0 and flat.sigma_stderr == math.inf and flat.hit_sigma_max is True


def test_defaults_run_jiangs_search() -> None:
    from flatcli.measures.pac_bayes import pacbayes_sigma

    model = models.mlp()
    x, _ = models.classification_data(n=30)
    y = model(x).argmax(-1)
    want = "bisection on σ ∈ [0, 2], 15 steps × 10 draws of u ~ N(0, σ²) over all parameters, "
    want += "error increase ≤ 0.1"
    search = pacbayes_sigma(model, (x, y))
    assert search.method == want
    assert search.bracket[1] - search.bracket[0] == 2.0 / 2**15
    for fn in (pacbayes_flatness, pacbayes_bound):
        est = fn(model, (x, y))
        assert want in est.method and est.details["sigma"] == search.sigma
        assert est.details["mc_samples"] == 10 and est.details["search_depth"] == 15
    u = gaussian_perturbation(
        {"w": torch.zeros(100_000)}, 0.5, generator=models.seeded(0), magnitude_aware=True
    )["w"]
    assert float(u.std()) == pytest.approx(1e-3, rel=0.02)  # ε defaults to 1e-3


def test_a_search_at_either_bound_is_flagged_on_the_estimates() -> None:
    from flatcli.measures.estimate import warnings_of
    from flatcli.measures.pac_bayes import (
        bound_estimate,
        flatness_estimate,
        pacbayes_sigma,
        search_warnings,
    )

    assert search_warnings((0.1, 0.2), False, "σ") == []
    assert search_warnings((0.0, 0.25), False, "σ") == [
        "search hit its lower bound: the increase exceeded the threshold at every scale "
        "tried, so σ < 0.25 (the search resolution)"
    ]
    assert search_warnings((1.0, 2.0), True, "σ") == [
        "search hit its upper bound 2: the increase never exceeded the threshold, "
        "so σ ≥ 1 and the flatness is only bounded"
    ]
    model, x, t = exact_fit()
    capped = pacbayes_sigma(model, (x, t), sigma_max=0.01, loss="mse", target="loss", mc_samples=20)
    want = search_warnings(capped.bracket, True, "σ'")
    assert want and want[0].startswith("search hit its upper bound")
    assert warnings_of(flatness_estimate(capped, 20, DEPTH)) == want
    assert warnings_of(bound_estimate(capped, model, None, 20, DEPTH)) == want


def test_library_defaults_and_the_memory_budget() -> None:
    from flatcli.errors import FlatcliError
    from flatcli.measures.pac_bayes import pacbayes_flatness, pacbayes_sigma

    model, x, t = exact_fit()
    kw = dict(loss="mse", target="loss", mc_samples=4, search_depth=8, magnitude_aware=True)
    # ε (the floor of the magnitude-aware noise, σ'|w| + ε) defaults to 1e-3.
    default = pacbayes_sigma(model, (x, t), **kw)
    assert default.sigma == pacbayes_sigma(model, (x, t), epsilon=1e-3, **kw).sigma
    assert pacbayes_sigma(model, (x, t), epsilon=0.3, **kw).sigma != default.sigma
    flat = pacbayes_flatness(model, (x, t), **kw)
    assert flat.value == pacbayes_flatness(model, (x, t), epsilon=1e-3, **kw).value
    # A budget below one sample's perturbed forward pass: the user's limit is the one applied.
    with pytest.raises(FlatcliError) as info:
        pacbayes_sigma(model, (x, t), max_memory=1, **kw)
    assert re.fullmatch(
        r"--max-memory 1 B is below what a perturbed forward pass needs for one sample "
        r"\(about [\d.]+ [KM]?i?B\); raise --max-memory",
        str(info.value),
    ), str(info.value)
