r"""PAC-Bayes flatness and bound (Jiang et al. 2020, §C and measures 48–61), docs/measures.md.

.. math::

    \sigma' = \max\bigl\{\sigma : \mathbb{E}_{u \sim N(0, \sigma^2 I)}[\mathrm{err}(w + u)]
    - \mathrm{err}(w) \le 0.1\bigr\}, \qquad
    \text{flatness} = 1/\sigma'^2

The noise has **standard deviation** σ. The widely copied PyTorch port (and the authors'
copy of it) calls ``torch.normal(0, sigma**2)``, whose second argument is the standard
deviation, so its noise has std σ² (and, magnitude-aware, std :math:`\sigma^2 w^2 +
\epsilon^2`).

The model's own parameters are never modified: perturbed weights are passed through
``torch.func.functional_call``, so an exception cannot leave a model perturbed.

References:
    Jiang, Neyshabur, Mobahi, Krishnan, Bengio. *Fantastic Generalization Measures and
    Where to Find Them.* ICLR 2020. https://arxiv.org/abs/1912.02178

    Dziugaite, Roy. *Computing Nonvacuous Generalization Bounds for Deep (Stochastic)
    Neural Networks with Many More Parameters than Training Data.* UAI 2017.
    https://arxiv.org/abs/1703.11008
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import UsageError
from ..features import call_model
from ..losses import check_loss, per_sample_loss
from .budget import Stopwatch, fit_batches, format_seconds, param_bytes
from .estimate import Estimate, mean_and_stderr, with_warnings
from .norms import parameter_distance_squared
from .params import Target, batches_for, check_target, evaluating, mean_objective, select_params

SLOPE_STEP = 0.1
"""Relative half-width of the secant that estimates d(increase)/dσ at σ' (delta method)."""


@dataclass(frozen=True)
class SigmaSearch:
    """The outcome of the σ' bisection shared by flatness and bound.

    Attributes:
        sigma: σ', the midpoint of the final bisection bracket.
        sigma_stderr: Delta-method standard error of σ': ``mc_stderr / slope``
            (``inf`` when the estimated slope is not positive).
        increase: Monte Carlo estimate of ``E[err(w+u)] − err(w)`` at σ'.
        mc_stderr: Its standard error (std over draws, ddof = 1, over √M).
        slope: Secant estimate of d(increase)/dσ at σ'.
        base: ``err(w)`` (or the mean loss for ``target="loss"``).
        n: Number of samples.
        bracket: The final bisection bracket ``(lo, hi)``.
        hit_sigma_max: True when no step exceeded the threshold (σ' may be larger).
        method: How it was computed, in words.
        steps: Bisection steps taken (fewer than asked when the time budget stopped it).
        fewest_draws: The fewest Monte Carlo draws of any estimate (fewer than
            ``mc_samples`` when the time budget cut one short; at least 2).
        stopped: Whether the time budget stopped the search.
    """

    sigma: float
    sigma_stderr: float
    increase: float
    mc_stderr: float
    slope: float
    base: float
    n: int
    bracket: tuple[float, float]
    hit_sigma_max: bool
    method: str
    steps: int | None = None
    fewest_draws: int | None = None
    stopped: bool = False


def gaussian_perturbation(
    weights: Mapping[str, torch.Tensor],
    sigma: float,
    *,
    generator: torch.Generator,
    magnitude_aware: bool = False,
    epsilon: float = 1e-3,
) -> dict[str, torch.Tensor]:
    r"""One draw of the PAC-Bayes noise ``u`` for each weight tensor.

    .. math::

        u_i \sim N(0, \sigma^2) \quad\text{or, magnitude-aware,}\quad
        u_i \sim N(0, \sigma^2 w_i^2 + \epsilon^2)

    Standard normals are drawn on the CPU in float64 from ``generator`` (so a seed gives
    the same noise on every device and dtype), then scaled by the standard deviation.
    """
    out = {}
    for name, w in weights.items():
        z = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w)
        std = (sigma**2 * w.pow(2) + epsilon**2).sqrt() if magnitude_aware else sigma
        out[name] = std * z
    return out


class NoisyIncrease:
    r"""Monte Carlo estimate of :math:`\mathbb{E}_u[\mathrm{err}(w+u)] - \mathrm{err}(w)`.

    Every call reseeds its generator with ``seed``: the same standard normals are scaled
    by each σ (common random numbers), so the estimate is a smooth, deterministic
    function of σ for a fixed seed and the bisection sees no extra noise between steps.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Any,
        *,
        target: str,
        loss: str,
        magnitude_aware: bool,
        epsilon: float,
        mc_samples: int,
        seed: int,
        clock: Stopwatch | None = None,
    ) -> None:
        self.model, self.batches, self.target, self.loss = model, batches, target, loss
        self.magnitude_aware, self.epsilon = magnitude_aware, epsilon
        self.mc_samples, self.seed = mc_samples, seed
        self.clock = clock or Stopwatch()
        self.fewest_draws = mc_samples
        params = dict(model.named_parameters())
        self.weights = {n: params[n].detach() for n in select_params(model, "all")}
        self.base, self.n = mean_objective(model, batches, target=target, loss=loss)

    def __call__(self, sigma: float) -> tuple[float, float]:
        """Mean increase over ``mc_samples`` draws and its standard error.

        Once the time budget is spent, the draws stop after the current one (at least
        two, for a standard error); :attr:`fewest_draws` records the fewest used.
        """
        gen = torch.Generator().manual_seed(self.seed)
        increases = []
        for _ in range(self.mc_samples):
            u = gaussian_perturbation(
                self.weights,
                sigma,
                generator=gen,
                magnitude_aware=self.magnitude_aware,
                epsilon=self.epsilon,
            )
            moved = {n: w + u[n] for n, w in self.weights.items()}
            value, _ = mean_objective(
                self.model, self.batches, target=self.target, loss=self.loss, params=moved
            )
            increases.append(value - self.base)
            if len(increases) >= 2 and self.clock.spent():
                break
        self.fewest_draws = min(self.fewest_draws, len(increases))
        mean, se = mean_and_stderr(increases)
        return mean, float(se if se is not None else math.nan)


class Bracket(NamedTuple):
    """The final bracket of :func:`largest_below` and the steps it took."""

    lo: float
    hi: float
    steps: int


def largest_below(
    increase: Callable[[float], float],
    *,
    upper: float,
    depth: int,
    threshold: float,
    progress: Callable[[str], None] | None = None,
    what: str = "scale",
    clock: Stopwatch | None = None,
) -> Bracket:
    """Bisection on ``[0, upper]`` for the largest scale whose increase is ≤ ``threshold``.

    ``progress``, when given, is called with a line of text before every step (with the
    bracket so far and an ETA). With ``clock``, the search stops after the step that
    spent its budget (``steps < depth``).

    Returns:
        The final bracket ``(lo, hi)``: the increase was ≤ threshold at ``lo`` (or
        ``lo == 0``) and above it at ``hi`` (or ``hi == upper``, never exceeded).
    """
    clock = clock or Stopwatch()
    start = clock.elapsed
    lo, hi = 0.0, upper
    for step in range(depth):
        mid = (lo + hi) / 2
        if progress is not None:
            eta = ""
            if step:
                left = (clock.elapsed - start) / step * (depth - step)
                eta = f", ETA {format_seconds(min(left, clock.remaining))}"
            progress(
                f"{what}: bisection step {step + 1}/{depth}, bracket [{lo:.4g}, {hi:.4g}], "
                f"trying {mid:.4g}{eta}"
            )
        if increase(mid) <= threshold:
            lo = mid
        else:
            hi = mid
        if clock.spent():
            return Bracket(lo, hi, step + 1)
    return Bracket(lo, hi, depth)


def pacbayes_sigma(
    model: nn.Module,
    data: Any,
    *,
    loss: str = "cross_entropy",
    magnitude_aware: bool = False,
    target: Target = "error",
    threshold: float = 0.1,
    mc_samples: int = 10,
    search_depth: int = 15,
    sigma_max: float = 2.0,
    epsilon: float = 1e-3,
    seed: int = 0,
    batch_size: int = 256,
    max_memory: int | None = None,
    progress: Callable[[str], None] | None = None,
    time_budget: float | Stopwatch | None = None,
) -> SigmaSearch:
    r"""σ': the largest noise scale whose expected error increase is at most ``threshold``.

    Bisection on :math:`[0, \sigma_{\max}]` with a fixed depth (no early exit), each step
    an ``mc_samples``-draw Monte Carlo estimate of the increase. σ' is the midpoint of
    the final bracket (resolution :math:`\sigma_{\max} / 2^{\mathrm{depth}+1}`). Three
    more estimates, at σ' and at :math:`\sigma'(1 \pm 0.1)`, give the increase at σ', its
    Monte Carlo standard error and, by the delta method, the standard error of σ'.

    All trainable parameters are perturbed, biases and normalization parameters
    included (as Jiang et al. do); buffers (BatchNorm running statistics) are not.

    ``max_memory`` (bytes, default half the free memory) splits data batches into fewer
    rows when a forward pass would not fit; the objective is a per-sample mean, so the
    result does not change. ``time_budget`` (seconds, or a shared :class:`Stopwatch`)
    stops the bisection after the step that spent it, and each later estimate after its
    second draw; the result says how far it got (:attr:`SigmaSearch.steps`, the bracket).
    Other args: see :func:`pacbayes_flatness`.
    """
    clock = Stopwatch.of(time_budget)
    loss = check_loss(loss)
    check_search(target, threshold, search_depth, sigma_max, epsilon, upper_name="sigma_max")
    if mc_samples < 2:
        raise UsageError(f"mc_samples must be at least 2 (for a standard error), got {mc_samples}")
    batches = batches_for(model, data, batch_size=batch_size)
    with evaluating(model), torch.no_grad():
        check_target(target, batches.first()[1])
        batches, _ = fit_batches(
            model,
            batches,
            "forward",
            max_memory,
            loss_of=lambda _t, x, y: per_sample_loss(call_model(model, x), y, loss).sum(),
            fixed=2 * param_bytes(model),  # the noise and the moved weights
            what="a perturbed forward pass",
        )
        increase = NoisyIncrease(
            model,
            batches,
            target=target,
            loss=loss,
            magnitude_aware=magnitude_aware,
            epsilon=epsilon,
            mc_samples=mc_samples,
            seed=seed,
            clock=clock,
        )
        lo, hi, steps = largest_below(
            lambda s: increase(s)[0],
            upper=sigma_max,
            depth=search_depth,
            threshold=threshold,
            progress=progress,
            what="PAC-Bayes σ'" + (" (magnitude-aware)" if magnitude_aware else ""),
            clock=clock,
        )
        sigma = (lo + hi) / 2
        at_sigma, mc_stderr = increase(sigma)
        slope = _secant_slope(increase, sigma)
    noise = "N(0, σ²w² + ε²)" if magnitude_aware else "N(0, σ²)"
    return SigmaSearch(
        sigma=sigma,
        sigma_stderr=mc_stderr / slope if slope > 0 else math.inf,
        increase=at_sigma,
        mc_stderr=mc_stderr,
        slope=slope,
        base=increase.base,
        n=increase.n,
        bracket=(lo, hi),
        hit_sigma_max=hi == sigma_max,
        steps=steps,
        fewest_draws=increase.fewest_draws,
        stopped=steps < search_depth or increase.fewest_draws < mc_samples,
        method=(
            f"bisection on σ ∈ [0, {sigma_max:g}], {search_depth} steps × {mc_samples} "
            f"draws of u ~ {noise} over all parameters, {target} increase ≤ {threshold:g}"
        ),
    )


def _secant_slope(increase: Callable[[float], tuple[float, float]], sigma: float) -> float:
    up, _ = increase(sigma * (1 + SLOPE_STEP))
    down, _ = increase(sigma * (1 - SLOPE_STEP))
    return (up - down) / (2 * SLOPE_STEP * sigma)


def check_search(
    target: str,
    threshold: float,
    search_depth: int,
    upper: float,
    epsilon: float,
    *,
    upper_name: str,
) -> None:
    """Validate the options a bisection search (PAC-Bayes or sharpness) shares."""
    if target not in ("error", "loss"):
        raise UsageError(f"unknown target {target!r}; choose error or loss")
    if not threshold > 0:
        raise UsageError(f"threshold must be positive, got {threshold}")
    if search_depth < 1:
        raise UsageError(f"search_depth must be at least 1, got {search_depth}")
    if not upper > 0:
        raise UsageError(f"{upper_name} must be positive, got {upper}")
    if not epsilon >= 0:
        raise UsageError(f"epsilon must be at least 0, got {epsilon}")


def _details(search: SigmaSearch, mc_samples: int, search_depth: int) -> dict[str, Any]:
    return {
        "sigma": search.sigma,
        "sigma_stderr": search.sigma_stderr,
        "increase": search.increase,
        "mc_stderr": search.mc_stderr,
        "mc_samples": mc_samples,
        "search_depth": search_depth,
        "bracket": list(search.bracket),
        "hit_sigma_max": search.hit_sigma_max,
        "base": search.base,
        "steps": search.steps,
        "fewest_draws": search.fewest_draws,
        "stop": "time_budget" if search.stopped else "depth",
    }


def _budget_warnings(search: SigmaSearch, mc_samples: int, search_depth: int) -> list[str]:
    """A warning saying how far a search the time budget stopped got."""
    if not search.stopped:
        return []
    lo, hi = search.bracket
    return [
        f"stopped by the time budget after {search.steps}/{search_depth} bisection steps "
        f"(σ' in [{lo:.4g}, {hi:.4g}]; fewest Monte Carlo draws {search.fewest_draws}/"
        f"{mc_samples}); a longer --time-budget buys the other "
        f"{search_depth - (search.steps or 0)} steps, each halving the bracket"
    ]


def pacbayes_flatness(
    model: nn.Module,
    data: Any,
    *,
    loss: str = "cross_entropy",
    magnitude_aware: bool = False,
    target: Target = "error",
    threshold: float = 0.1,
    mc_samples: int = 10,
    search_depth: int = 15,
    sigma_max: float = 2.0,
    epsilon: float = 1e-3,
    seed: int = 0,
    batch_size: int = 256,
) -> Estimate:
    r"""PAC-Bayes flatness :math:`1/\sigma'^2` of Jiang et al. (2020), measures 53 and 61.

    .. math::

        \sigma' = \max\{\sigma : \mathbb{E}_{u}[\mathrm{err}(w+u)] - \mathrm{err}(w)
        \le \tau\}, \quad u \sim N(0, \sigma^2 I)
        \ \text{or}\ u_i \sim N(0, \sigma^2 w_i^2 + \epsilon^2)

    Args:
        model: The network (never modified).
        data: ``(x, y)`` tensors, a DataLoader, or :class:`~flatcli.data.Batches`.
        loss: ``cross_entropy`` or ``mse`` (used with ``target="loss"``).
        magnitude_aware: Noise proportional to each weight's magnitude (measure 61).
        target: ``error`` (training error, 1 − accuracy) or ``loss`` (mean loss).
        threshold: τ, the allowed increase (0.1 in Jiang et al.).
        mc_samples: Monte Carlo draws per bisection step (10 in Jiang et al.).
        search_depth: Bisection steps (15 in Jiang et al.).
        sigma_max: Upper end of the search (2 in Jiang et al.).
        epsilon: ε of the magnitude-aware noise.
        seed: Seed of the noise (one ``torch.Generator``).
        batch_size: Batch size when ``data`` is in memory.

    Returns:
        An :class:`Estimate` whose ``stderr`` is the delta-method error
        :math:`2\,\mathrm{se}(\sigma')/\sigma'^3`, with ``details`` ``sigma``,
        ``sigma_stderr``, ``increase`` and ``mc_stderr`` (at σ'), ``mc_samples``,
        ``search_depth``, ``bracket``, ``hit_sigma_max`` and ``base``.
    """
    search = pacbayes_sigma(
        model,
        data,
        loss=loss,
        magnitude_aware=magnitude_aware,
        target=target,
        threshold=threshold,
        mc_samples=mc_samples,
        search_depth=search_depth,
        sigma_max=sigma_max,
        epsilon=epsilon,
        seed=seed,
        batch_size=batch_size,
    )
    return flatness_estimate(search, mc_samples, search_depth)


def flatness_estimate(search: SigmaSearch, mc_samples: int, search_depth: int) -> Estimate:
    """``1/σ'²`` with its delta-method standard error, from a finished search."""
    s = search.sigma
    est = Estimate(
        1 / s**2,
        2 * search.sigma_stderr / s**3,
        f"1/σ'², {search.method}",
        _details(search, mc_samples, search_depth),
    )
    return with_warnings(
        est,
        *search_warnings(search.bracket, search.hit_sigma_max, "σ'"),
        *_budget_warnings(search, mc_samples, search_depth),
    )


def pacbayes_bound(
    model: nn.Module,
    data: Any,
    *,
    loss: str = "cross_entropy",
    init_model: nn.Module | None = None,
    target: Target = "error",
    threshold: float = 0.1,
    mc_samples: int = 10,
    search_depth: int = 15,
    sigma_max: float = 2.0,
    seed: int = 0,
    batch_size: int = 256,
) -> Estimate:
    r"""PAC-Bayes bound of Jiang et al. (2020), measures 48 (``init_model``) and 49.

    .. math:: \frac{\|w - w_0\|_2^2}{4\sigma'^2} + \log\frac{n}{\sigma'} + 10

    with :math:`w_0 = 0` unless ``init_model`` is given, σ' from the same search as
    :func:`pacbayes_flatness` (isotropic noise), and :math:`w` every trainable
    parameter — the set that is perturbed (Jiang et al.'s code perturbs all parameters
    but leaves biases and BatchNorm parameters out of the norm).

    Args:
        init_model: The network at initialization, for the distance form (measure 48).
        Others: see :func:`pacbayes_flatness`.

    Returns:
        An :class:`Estimate` whose ``stderr`` is the delta-method error through σ';
        ``details`` as for :func:`pacbayes_flatness` plus ``norm_squared``.
    """
    search = pacbayes_sigma(
        model,
        data,
        loss=loss,
        target=target,
        threshold=threshold,
        mc_samples=mc_samples,
        search_depth=search_depth,
        sigma_max=sigma_max,
        seed=seed,
        batch_size=batch_size,
    )
    return bound_estimate(search, model, init_model, mc_samples, search_depth)


def bound_estimate(
    search: SigmaSearch,
    model: nn.Module,
    init_model: nn.Module | None,
    mc_samples: int,
    search_depth: int,
) -> Estimate:
    """The PAC-Bayes bound from a finished isotropic search (see :func:`pacbayes_bound`)."""
    sq = _squared_distance(model, init_model)
    s, n = search.sigma, search.n
    value = sq / (4 * s**2) + math.log(n / s) + 10
    derivative = abs(-sq / (2 * s**3) - 1 / s)
    reference = "‖w − w₀‖²" if init_model is not None else "‖w‖²"
    est = Estimate(
        value,
        derivative * search.sigma_stderr,
        f"{reference}/(4σ'²) + log(n/σ') + 10, {search.method}",
        {**_details(search, mc_samples, search_depth), "norm_squared": sq},
    )
    return with_warnings(
        est,
        *search_warnings(search.bracket, search.hit_sigma_max, "σ'"),
        *_budget_warnings(search, mc_samples, search_depth),
    )


def search_warnings(
    bracket: tuple[float, float] | list[float], hit_max: bool, what: str
) -> list[str]:
    """Warnings for a bisection that hit either end of its range (PAC-Bayes, sharpness)."""
    lo, hi = bracket
    if hit_max:
        return [
            f"search hit its upper bound {hi:g}: the increase never exceeded the threshold, "
            f"so {what} ≥ {lo:g} and the flatness is only bounded"
        ]
    if lo == 0:
        return [
            f"search hit its lower bound: the increase exceeded the threshold at every scale "
            f"tried, so {what} < {hi:.3g} (the search resolution)"
        ]
    return []


def _squared_distance(model: nn.Module, init_model: nn.Module | None) -> float:
    names = select_params(model, "all")
    params = dict(model.named_parameters())
    if init_model is None:
        return float(sum(params[n].detach().double().pow(2).sum() for n in names))
    return parameter_distance_squared(model, init_model, names)
