r"""Sharpness (Jiang et al. 2020, measures 50–52 and 58–60), docs/measures.md.

.. math::

    \alpha' = \max\Bigl\{\alpha : \max_{|u_i| \le \alpha} \mathrm{err}(w + u)
    - \mathrm{err}(w) \le 0.1\Bigr\}, \qquad \text{sharpness} = 1/\alpha'^2

with the magnitude-aware box :math:`|u_i| \le \alpha |w_i| + \epsilon`. The inner
maximum is found by projected sign-gradient ascent on the *loss* from a random start
in the box; the error (or loss) is evaluated at every iterate and the largest value is
kept. Ascent only finds a lower bound of the inner maximum, so α' can only be
over-estimated and :math:`1/\alpha'^2` under-estimated.

The model's own parameters are never modified: perturbed weights are passed through
``torch.func.functional_call``.

References:
    Jiang, Neyshabur, Mobahi, Krishnan, Bengio. *Fantastic Generalization Measures and
    Where to Find Them.* ICLR 2020. https://arxiv.org/abs/1912.02178

    Keskar, Mudigere, Nocedal, Smelyanskiy, Tang. *On Large-Batch Training for Deep
    Learning: Generalization Gap and Sharp Minima.* ICLR 2017.
    https://arxiv.org/abs/1609.04836
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..data import Batches
from ..errors import UsageError
from ..features import ModelInput, call_model
from ..losses import check_loss, per_sample_loss
from .budget import Stopwatch, fit_batches, param_bytes
from .estimate import Estimate, with_warnings
from .pac_bayes import check_search, largest_below, search_warnings
from .params import (
    FlatParams,
    Target,
    batches_for,
    check_target,
    evaluating,
    fixed_params,
    mean_objective,
    select_params,
)

STEP_FRACTION = 0.25
"""Each ascent step moves every coordinate by this fraction of its box half-width."""


class WorstIncrease:
    r"""Lower bound of :math:`\max_{u \in \text{box}(\alpha)} \mathrm{err}(w+u) - \mathrm{err}(w)`.

    Every call starts from the same uniform draw (reseeded with ``seed``) scaled to the
    box, then takes ``ascent_steps`` steps
    :math:`u \leftarrow \Pi_{\text{box}}(u + \tfrac14 r \odot \mathrm{sign}\,\nabla_u L(w+u))`
    with full-data gradients of the mean loss, :math:`r` the box half-widths.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Batches,
        *,
        target: str,
        loss: str,
        magnitude_aware: bool,
        epsilon: float,
        ascent_steps: int,
        seed: int,
    ) -> None:
        self.model, self.batches, self.target, self.loss = model, batches, target, loss
        self.magnitude_aware, self.epsilon = magnitude_aware, epsilon
        self.ascent_steps, self.seed = ascent_steps, seed
        self.flat = FlatParams.of(model, select_params(model, "all"))
        self.w = self.flat.vector(model)
        self.fixed = fixed_params(model, self.flat)
        self.base, self.n = mean_objective(model, batches, target=target, loss=loss)

    def radius(self, alpha: float) -> torch.Tensor:
        """Box half-widths: ``α`` or ``α|w_i| + ε``."""
        if self.magnitude_aware:
            return alpha * self.w.abs() + self.epsilon
        return torch.full_like(self.w, alpha)

    def __call__(self, alpha: float) -> float:
        """The largest increase seen along the ascent at scale ``alpha``."""
        r = self.radius(alpha)
        gen = torch.Generator().manual_seed(self.seed)
        u = r * (2 * torch.rand(r.shape, generator=gen, dtype=torch.float64).to(r) - 1)
        best = -math.inf
        for _ in range(self.ascent_steps):
            grad, value = self._gradient_and_objective(self.w + u)
            best = max(best, value)
            u = torch.clamp(u + STEP_FRACTION * r * grad.sign(), -r, r)
        params = {**self.fixed, **self.flat.unflatten(self.w + u)}
        value, _ = mean_objective(
            self.model, self.batches, target=self.target, loss=self.loss, params=params
        )
        return max(best, value) - self.base

    def _gradient_and_objective(self, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Gradient of the summed loss at ``theta`` and the mean objective there."""
        grad = torch.zeros_like(theta)
        total = 0.0
        for x, y in self.batches:
            g, objective = torch.func.grad(self._batch_loss(x, y), has_aux=True)(theta)
            grad += g
            total += float(objective)
        grad = distributed.sum_over_shards(self.batches, grad).to(theta.dtype)
        (total,) = distributed.sum_floats(self.batches, total)
        return grad, total / self.n

    def _batch_loss(self, x: ModelInput, y: torch.Tensor) -> Any:
        def f(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = call_model(self.model, x, {**self.fixed, **self.flat.unflatten(theta)})
            losses = per_sample_loss(out, y, self.loss)  # type: ignore[arg-type]
            if self.target == "error":
                objective = (out.argmax(-1) != y).sum()
            else:
                objective = losses.detach().double().sum()
            return losses.sum(), objective.detach()

        return f


def sharpness(
    model: nn.Module,
    data: Any,
    *,
    loss: str = "cross_entropy",
    magnitude_aware: bool = False,
    target: Target = "error",
    threshold: float = 0.1,
    search_depth: int = 15,
    ascent_steps: int = 20,
    alpha_max: float = 2.0,
    epsilon: float = 1e-3,
    seed: int = 0,
    batch_size: int = 256,
    max_memory: int | None = None,
    progress: Callable[[str], None] | None = None,
    time_budget: float | Stopwatch | None = None,
) -> Estimate:
    r"""Sharpness :math:`1/\alpha'^2` of Jiang et al. (2020), measures 52 and 60.

    .. math::

        \alpha' = \max\Bigl\{\alpha : \max_{|u_i| \le \alpha\,(|w_i|) + \epsilon}
        \mathrm{err}(w+u) - \mathrm{err}(w) \le \tau\Bigr\}

    Bisection on :math:`[0, \alpha_{\max}]` with a fixed depth; α' is the midpoint of the
    final bracket (resolution :math:`\alpha_{\max}/2^{\mathrm{depth}+1}`). Each step runs
    the ascent of :class:`WorstIncrease` (``ascent_steps`` full-data gradient passes and
    one forward pass). All trainable parameters are perturbed, biases included.

    Args:
        model: The network (never modified).
        data: ``(x, y)`` tensors, a DataLoader, or :class:`~flatcli.data.Batches`.
        loss: ``cross_entropy`` or ``mse``: the loss the ascent climbs (and the objective
            for ``target="loss"``).
        magnitude_aware: Box :math:`|u_i| \le \alpha|w_i| + \epsilon` (measure 60).
        target: ``error`` (training error, 1 − accuracy) or ``loss`` (mean loss).
        threshold: τ, the allowed increase (0.1 in Jiang et al.).
        search_depth: Bisection steps.
        ascent_steps: Projected sign-gradient steps per bisection step.
        alpha_max: Upper end of the search.
        epsilon: ε of the magnitude-aware box.
        seed: Seed of the random start.
        batch_size: Batch size when ``data`` is in memory.
        max_memory: Bytes a gradient pass may use (default: half the free memory); data
            batches are split into fewer rows to fit (per-sample sums: same value).
        progress: Called with a line of text before every bisection step.
        time_budget: Seconds (or a shared :class:`Stopwatch`) after which the bisection
            stops after its current step (``details["steps"]``, the bracket reached).

    Returns:
        An :class:`Estimate` with ``stderr`` None (deterministic for a seed; see the
        module docstring for its bias) and ``details`` ``alpha``, ``increase`` (at α'),
        ``bracket``, ``hit_alpha_max``, ``search_depth``, ``ascent_steps`` and ``base``.
    """
    clock = Stopwatch.of(time_budget)
    loss = check_loss(loss)
    check_search(target, threshold, search_depth, alpha_max, epsilon, upper_name="alpha_max")
    if ascent_steps < 0:
        raise UsageError(f"ascent_steps must be at least 0, got {ascent_steps}")
    batches = batches_for(model, data, batch_size=batch_size)
    with evaluating(model), torch.no_grad():
        check_target(target, batches.first()[1])
        batches, _ = fit_batches(
            model,
            batches,
            "gradient",
            max_memory,
            loss_of=lambda _t, x, y: per_sample_loss(call_model(model, x), y, loss).sum(),
            fixed=6 * param_bytes(model),  # w, u, r, the gradient and the moved weights
            what="a gradient pass",
        )
        worst = WorstIncrease(
            model,
            batches,
            target=target,
            loss=loss,
            magnitude_aware=magnitude_aware,
            epsilon=epsilon,
            ascent_steps=ascent_steps,
            seed=seed,
        )
        lo, hi, steps = largest_below(
            worst,
            upper=alpha_max,
            depth=search_depth,
            threshold=threshold,
            progress=progress,
            what="sharpness α'" + (" (magnitude-aware)" if magnitude_aware else ""),
            clock=clock,
        )
        alpha = (lo + hi) / 2
        at_alpha = worst(alpha)
    box = "|u_i| ≤ α|w_i| + ε" if magnitude_aware else "|u_i| ≤ α"
    est = Estimate(
        1 / alpha**2,
        None,
        f"1/α'², bisection on α ∈ [0, {alpha_max:g}] ({search_depth} steps), worst case in "
        f"{box} by {ascent_steps} projected sign-gradient steps on the {loss} loss, "
        f"{target} increase ≤ {threshold:g}",
        {
            "alpha": alpha,
            "increase": at_alpha,
            "bracket": [lo, hi],
            "hit_alpha_max": hi == alpha_max,
            "search_depth": search_depth,
            "steps": steps,
            "stop": "time_budget" if steps < search_depth else "depth",
            "ascent_steps": ascent_steps,
            "base": worst.base,
        },
    )
    stopped = (
        [f"stopped by the time budget after {steps}/{search_depth} bisection steps "
         f"(α' in [{lo:.4g}, {hi:.4g}])"]
        if steps < search_depth
        else []
    )
    return with_warnings(est, *search_warnings((lo, hi), hi == alpha_max, "α'"), *stopped)
