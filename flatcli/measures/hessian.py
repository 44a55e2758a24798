r"""Trace and top eigenvalue of the loss Hessian over a chosen parameter set (docs/measures.md).

.. math::

    H = \nabla^2_\theta E(\theta), \qquad E(\theta) = \frac1n \sum_{i=1}^n \ell_i(\theta),

with :math:`\theta` the selected parameters (``"all"``, a module, or one parameter) and
every other parameter held fixed. Every product :math:`H v` is a per-sample **sum**
accumulated batch by batch and divided by ``n`` once, so a future multi-rank run only
needs an all-reduce of the sums.

References:
    Hutchinson. *A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines.* 1989.

    Meyer, Musco, Musco, Woodruff. *Hutch++: Optimal Stochastic Trace Estimation.*
    SOSA 2021. https://arxiv.org/abs/2010.09649

    Yao, Gholami, Keutzer, Mahoney. *PyHessian: Neural Networks Through the Lens of the
    Hessian.* 2020. https://arxiv.org/abs/1912.07145 (its trace stops when the running
    mean stops moving; this module stops on a relative standard-error target instead).

    Jiang, Neyshabur, Mobahi, Krishnan, Bengio. *Fantastic Generalization Measures and
    Where to Find Them.* ICLR 2020. https://arxiv.org/abs/1912.02178
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .. import distributed
from ..autodiff import FORWARD, REVERSE, GradientGraph, SecondOrder, hvp
from ..data import Batches, take
from ..errors import UsageError
from ..features import batch_len, call_model
from ..losses import check_loss
from .budget import (
    FACTORS,
    VMAP_BASE,
    VMAP_PER_DIRECTION,
    Stopwatch,
    activation_bytes,
    format_bytes,
    format_seconds,
    plan_rows,
    resolve_max_memory,
    row_chunks,
    rows_of,
    with_last,
)
from .estimate import Estimate, mean_and_stderr, with_warnings
from .gauss_newton import MAX_CLASSES, gauss_newton_trace, piecewise_linear_network
from .params import (
    FlatParams,
    batches_for,
    empty_data,
    evaluating,
    fixed_params,
    functional_loss,
    saturation_warning,
    select_params,
)

Progress = Callable[[str], None]
Method = Literal["auto", "exact", "hutchinson"]
METHODS = ("auto", "exact", "hutchinson")
TRACE_METHODS = ("hutchinson", "hutch++")
"""Estimators of a Hutchinson-method trace: plain, or with a low-rank sketch (Hutch++)."""
AUTO_EXACT_MAX_PARAMS = 2000
"""``method="auto"`` computes the trace exactly up to this many parameters."""
MAX_EXACT_PARAMS = 100_000
"""An exact trace needs one HVP per parameter; refuse beyond this."""
EXACT_CHUNK = 256
"""Unit directions per vmapped HVP call of the exact trace."""
ROUND = 16
"""Hutchinson probes per round (one pass over the data per round)."""
ROUTES = ("retained", "double_backward", "vmap")
"""How :class:`LossHessian` computes its products (see there)."""
VMAP_MAX_PARAMS = 1_000_000
"""``probe_batch=None`` vmaps forward-over-reverse products over parameters that are all
vectors or matrices (no conv kernels), up to this many (fast on MLPs); otherwise it uses
double backward, one probe at a time (faster and 2-3× leaner on conv nets and
transformers: bench/bench_models.py)."""
SKETCH = 16
"""Default Hutch++ sketch size (16 HVPs for the sketch, 16 for its exact part)."""


# --------------------------------------------------------------------------- directions


@dataclass(frozen=True)
class Directions:
    """``count`` directions of length ``p``, made block by block when needed.

    Attributes:
        count: Number of directions.
        block: ``(lo, hi) -> (hi - lo, p)`` tensor of directions ``lo..hi``.
    """

    count: int
    block: Callable[[int, int], torch.Tensor]

    @classmethod
    def of(cls, vectors: torch.Tensor) -> Directions:
        """The rows of a ``(k, p)`` tensor."""
        return cls(int(vectors.shape[0]), lambda lo, hi: vectors[lo:hi])

    def row(self, r: int) -> torch.Tensor:
        """Direction ``r``."""
        return self.block(r, r + 1)[0]


def _directions(vectors: torch.Tensor | Directions) -> Directions:
    return vectors if isinstance(vectors, Directions) else Directions.of(vectors)


class LossHessian:
    r"""The operator :math:`V \mapsto H V` of the mean loss.

    Products take one of three routes, chosen by what they cost within ``max_memory``:

    * ``retained`` (PyHessian's trick, and the default whenever it fits): the gradient of
      this process's whole data is built once, with its graph (``create_graph``), and kept
      for every later call. Each product is then one backward pass of
      :math:`\nabla E^\top v` through that graph, or, with ``probe_batch`` k > 1, one
      vmapped backward pass per k directions (``is_grads_batched``). No forward pass or
      first backward pass is repeated, whatever the number of probes, rounds or Lanczos
      iterations.
    * ``double_backward``: when the whole graph does not fit, per call and per data chunk:
      a forward pass and a ``create_graph`` backward pass, then one backward pass per
      direction of the call (the least memory).
    * ``vmap``: forward-over-reverse, ``probe_batch`` directions per vmapped call, per
      data chunk (chosen over ``double_backward`` for dense models of at most
      :data:`VMAP_MAX_PARAMS` parameters).

    Data batches whose estimated peak would exceed ``max_memory`` are split into chunks
    of fewer rows (per-sample sums, so the value does not change).

    Args:
        model: The network (in eval mode; its parameters are never modified).
        batches: The data.
        loss: ``cross_entropy`` or ``mse``.
        names: Parameters :math:`\theta` (from :func:`select_params`).
        max_memory: Bytes the products may use (default: half the free memory).
        probe_batch: Directions per product call (a vmapped backward pass on the retained
            graph, or a vmapped forward-over-reverse call); 1: one backward pass per
            direction; None: decided by cost (:func:`retained_round`).
        extra_bytes: Memory the caller will hold besides (probe or basis vectors).
        route: Force ``retained``, ``double_backward`` or ``vmap`` (None: by cost); the
            memory plan still splits batches for a per-call route.

    Attributes:
        engine: ``retained``, ``double_backward`` or ``vmap``.
        probe_batch: Directions per product call.
        rows: Most rows per data chunk (None: the batches as they come).
        estimate: Estimated peak bytes of the products.
        budget: The resolved ``max_memory``.
        on_step: Called after every product block with the fraction of the current call's
            products done (None while the number of data chunks is not yet known), for
            progress; or None.
        should_stop: Asked, during :meth:`quadratic_forms` only, after every product
            block with the number of directions complete over all the data; True ends the
            call there, returning those directions only (a time budget, at probe
            granularity). None: never asked. Ignored under ``torchrun`` (the ranks'
            all-reduces must stay in step).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Batches,
        loss: str,
        names: list[str],
        *,
        max_memory: int | None = None,
        probe_batch: int | None = None,
        extra_bytes: float = 0.0,
        route: str | None = None,
    ) -> None:
        if probe_batch is not None and probe_batch < 1:
            raise UsageError(f"probe_batch must be at least 1, got {probe_batch}")
        if route not in (None, *ROUTES):
            raise UsageError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
        self.model = model
        self.batches = batches
        self.loss = loss
        self.flat = FlatParams.of(model, names)
        self.theta = self.flat.vector(model)
        self.fixed = fixed_params(model, self.flat)
        self.n: int | None = None
        self.on_step: Callable[[float | None], None] | None = None
        self.should_stop: Callable[[int], bool] | None = None
        self.chunks: int | None = None
        """Data chunks per pass over the data, once one pass is done."""
        self.ad = SecondOrder()
        self.budget = resolve_max_memory(max_memory, self.theta.device)
        self._graph: GradientGraph | None = None
        self.logits: list[torch.Tensor] | None = None
        """The logits of every local batch, once the retained graph is built (else None)."""
        self._plan(probe_batch, extra_bytes, route)

    def _plan(self, probe_batch: int | None, extra_bytes: float, route: str | None) -> None:
        x, y = self.batches.first()
        acts = activation_bytes(
            lambda t, x, y: self._loss_fn(x, y)(t), self.model, x, y, theta=self.theta
        )
        p, item = self.size, self.theta.element_size()
        fixed = extra_bytes + 4 * p * item + 2 * p * 8  # θ, ∇, Hv, v; float64 accumulators
        first_rows = rows_of(x)
        self.activations, self.fixed_bytes = acts, fixed
        local = distributed.local_samples(self.batches)
        if route in (None, "retained") and local is not None:
            whole = acts.per_row * local + acts.fixed * max(1, math.ceil(local / first_rows))
            dense = all(len(shape) <= 2 for shape in self.flat.shapes)
            k = probe_batch or retained_round(whole, first_rows, dense)
            need = fixed + retained_factor(k) * whole
            # every rank takes the same route, so that their all-reduces stay in step
            if route == "retained" or distributed.all_ranks(self.batches, need <= self.budget):
                self.engine, self.probe_batch, self.rows = "retained", k, None
                self.factor, self.split, self.estimate = retained_factor(k), False, need
                self.ad.mode = REVERSE
                return
        self._plan_rounds(probe_batch, first_rows, route)

    def _plan_rounds(self, probe_batch: int | None, first_rows: int, route: str | None) -> None:
        """The per-call routes, when the whole graph does not fit: vmap or double backward."""
        acts, fixed = self.activations, self.fixed_bytes

        def vmap_factor(k: int) -> float:
            return VMAP_BASE + VMAP_PER_DIRECTION * k

        engine, k = "double_backward", 1
        dense = all(len(shape) <= 2 for shape in self.flat.shapes)
        if route == "vmap":
            engine, k = "vmap", probe_batch or ROUND
        elif route == "double_backward":
            pass
        elif probe_batch is None and self.size <= VMAP_MAX_PARAMS and dense:
            for cand in (ROUND, 8, 4, 2):
                if fixed + vmap_factor(cand) * acts.of(first_rows) <= self.budget:
                    engine, k = "vmap", cand
                    break
        elif probe_batch is not None and probe_batch > 1:
            engine, k = "vmap", probe_batch
        factor = FACTORS["double_backward"] if engine == "double_backward" else vmap_factor(k)
        what = f"a Hessian-vector product ({engine.replace('_', ' ')})"
        self.rows = plan_rows(acts, factor, self.budget, fixed=fixed, what=what)
        self.engine, self.probe_batch, self.factor = engine, k, factor
        if engine == "double_backward":
            self.ad.mode = REVERSE
        self.split = self.rows < first_rows
        self.estimate = fixed + factor * acts.of(min(self.rows, first_rows))

    @property
    def size(self) -> int:
        """Number of parameters ``p``."""
        return self.flat.size

    def describe(self) -> str:
        """The route and chunking, in words (for a method string)."""
        if self.engine == "retained":
            how = "one gradient graph kept for every probe, " + (
                "one backward pass per probe"
                if self.probe_batch == 1
                else f"{self.probe_batch} probes per vmapped backward pass"
            )
        elif self.engine == "double_backward":
            how = "double backward, gradient graph rebuilt per round, one probe at a time"
        else:
            how = f"forward-over-reverse, {self.probe_batch} probes per vmapped call"
        if "SDPA" in self.ad.mode:
            how += ", SDPA math kernel"
        elif self.engine == "vmap" and self.ad.mode != FORWARD:
            how += f", fell back to {self.ad.mode}"
        if self.split:
            how += f", data in chunks of {self.rows} rows"
        return how

    def plan_details(self) -> dict[str, Any]:
        """Engine, probe batch, chunk rows and memory estimate, for ``details``."""
        return {
            "engine": self.engine,
            "probe_batch": self.probe_batch,
            "chunk_rows": self.rows if self.split else None,
            "max_memory": self.budget,
            "memory_estimate": int(self.estimate),
        }

    def _loss_fn(self, x: Any, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return functional_loss(self.model, self.flat, x, y, self.loss, fixed=self.fixed)

    def _products(
        self,
        dirs: Directions,
        consume: Callable[[int, int, torch.Tensor], None],
        *,
        stoppable: bool = False,
    ) -> None:
        """``consume(lo, hi, H_chunk V[lo:hi])`` for every data chunk and direction block.

        With ``stoppable``, :attr:`should_stop` is asked after every block and a True
        raises :class:`RoundStopped` with the directions complete over all the data.
        """
        check = self._stop_check(stoppable)
        if self.engine == "retained":
            self._retained_products(dirs, consume, check)
            return
        n, chunk = 0, 0
        for (x, y), last in with_last(row_chunks(self.batches, self.rows)):
            f = self._loss_fn(x, y)
            rows = n + batch_len(x)

            def after(hi: int, chunk: int = chunk, last: bool = last, rows: int = rows) -> None:
                self._step(chunk * dirs.count + hi, dirs.count)
                if last and check(hi):  # a direction is complete in the last chunk only
                    raise RoundStopped(hi, rows)

            if self.engine == "double_backward":

                def run(f: Callable[[torch.Tensor], torch.Tensor] = f) -> None:
                    # a missing double-backward formula fails on the first product,
                    # before anything is consumed, so a retry starts clean
                    graph = GradientGraph(f, self.theta)
                    for r in range(dirs.count):
                        last = r == dirs.count - 1
                        consume(r, r + 1, graph.products(dirs.block(r, r + 1), release=last))
                        after(r + 1)

                self.ad(run, run)
            else:
                for lo in range(0, dirs.count, self.probe_batch):
                    hi = min(lo + self.probe_batch, dirs.count)
                    v = dirs.block(lo, hi).to(self.theta)
                    consume(lo, hi, hvp(f, self.theta, v, ad=self.ad))
                    after(hi)
            n, chunk = rows, chunk + 1
        self.chunks = chunk
        self._count(n)

    def _stop_check(self, stoppable: bool) -> Callable[[int], bool]:
        ask = self.should_stop
        if not stoppable or ask is None or distributed.active():
            return lambda _done: False
        return ask

    def _retained_products(
        self,
        dirs: Directions,
        consume: Callable[[int, int, torch.Tensor], None],
        check: Callable[[int], bool],
    ) -> None:
        """Products on the graph of all the data, built on the first call."""
        k, batched = self.probe_batch, self.probe_batch > 1
        start = 0
        if self._graph is None:
            rows = {"n": 0}

            def first() -> torch.Tensor:
                # a missing double-backward formula fails on the first product: a retry
                # (under the math attention kernel) builds the graph again
                self._graph, rows["n"] = self._build_graph()
                return self._graph.products(dirs.block(0, min(k, dirs.count)), batched=batched)

            hv = self.ad(first, first)
            start = min(k, dirs.count)
            consume(0, start, hv)
            self.chunks = 1
            self._step(start, dirs.count)
            self._count(rows["n"])
            if check(start):
                raise RoundStopped(start, rows["n"])
        for lo in range(start, dirs.count, k):
            hi = min(lo + k, dirs.count)
            assert self._graph is not None
            consume(lo, hi, self._graph.products(dirs.block(lo, hi), batched=batched))
            self._step(hi, dirs.count)
            if check(hi):
                raise RoundStopped(hi, 0)

    def _build_graph(self) -> tuple[GradientGraph, int]:
        """The gradient of the summed loss of every local batch, with its graph (and the
        logits of every batch, kept in :attr:`logits`)."""
        pairs = list(self.batches)
        n = sum(batch_len(x) for x, _ in pairs)
        self.logits = []

        def total(t: torch.Tensor) -> torch.Tensor:
            parts = [
                functional_loss(
                    self.model, self.flat, x, y, self.loss, fixed=self.fixed, outputs=self.logits
                )(t)
                for x, y in pairs
            ]
            return torch.stack(parts).sum() if parts else t.new_zeros(())

        return GradientGraph(total, self.theta), n

    def _count(self, n: int) -> None:
        """Set ``n`` (summed over the ranks, once: the same collectives on every route)."""
        if self.n is None:
            self.n = int(distributed.sum_floats(self.batches, n)[0])
        if self.n == 0:
            raise empty_data()

    def _step(self, done: int, count: int) -> None:
        """Tell :attr:`on_step` the fraction done: ``done`` products of ``count`` per chunk."""
        if self.on_step is not None:
            chunks = self.chunks
            self.on_step(None if chunks is None else min(1.0, done / (count * chunks)))

    def matmat(
        self, vectors: torch.Tensor | Directions, *, dtype: torch.dtype | None = torch.float64
    ) -> torch.Tensor:
        """``H v_k`` for each direction (rows of a ``(k, p)`` tensor).

        Accumulated over the data in ``dtype`` (None: the parameters' dtype, half the
        memory of float64 in float32, for a sketch whose accuracy does not matter).
        """
        dirs = _directions(vectors)
        dtype = dtype or self.theta.dtype
        total = torch.zeros(dirs.count, self.size, dtype=dtype, device=self.theta.device)

        def add(lo: int, hi: int, hv: torch.Tensor) -> None:
            total[lo:hi] += hv.to(dtype)

        self._products(dirs, add)
        total = distributed.sum_over_shards(self.batches, total)
        return total.div_(self.n)  # type: ignore[arg-type]

    def quadratic_forms(self, vectors: torch.Tensor | Directions) -> torch.Tensor:
        """``v_kᵀ H v_k`` for each direction, in float64 (only ``k`` numbers are kept).

        Fewer than ``k`` (the first ones) when :attr:`should_stop` ended the call.
        """
        dirs = _directions(vectors)
        total = torch.zeros(dirs.count, dtype=torch.float64)

        def add(lo: int, hi: int, hv: torch.Tensor) -> None:
            v = dirs.block(lo, hi)
            for r in range(hi - lo):
                total[lo + r] += dot64(v[r], hv[r])

        try:
            self._products(dirs, add, stoppable=True)
        except RoundStopped as stop:
            if self.n is None:
                self._count(stop.rows)
            total = total[: stop.done]
        total = distributed.sum_over_shards(self.batches, total)
        return total / self.n  # type: ignore[operator]


class RoundStopped(Exception):
    """Raised inside :meth:`LossHessian._products` when :attr:`LossHessian.should_stop`
    says so: ``done`` directions are complete over all the data (``rows`` samples)."""

    def __init__(self, done: int, rows: int) -> None:
        super().__init__(f"stopped after {done} directions")
        self.done, self.rows = done, rows


RETAINED_BATCH_MAX_BYTES = 3 * 2**20
"""Saved activations (of all the data) up to which :func:`retained_round` vmaps probes."""
RETAINED_BATCH_MAX_ROWS = 256
"""Rows per data batch up to which :func:`retained_round` vmaps probes."""


def retained_round(saved: float, rows: int, dense: bool) -> int:
    """Probes per backward pass on the retained graph when ``probe_batch`` is None.

    A vmapped backward pass of 16 probes turns every operation on a batch of ``rows``
    samples into one on ``16·rows``: cheaper than 16 passes while the operations are
    small enough for per-operation overhead to dominate. Measured (bench/bench_trace.py,
    CPU time per probe, one thread): MLPs in batches of 128–256 rows 0.61–0.81× one probe
    per pass, with batches of 512 rows 0.88–1.10×, and from about 5 MiB of saved
    activations 1.06–1.09×; on the digits CNN 0.76–1.07× between runs, so conv kernels
    keep one probe per pass. ``saved``: the bytes the forward pass saves for all the
    data; ``rows``: the rows of the first batch; ``dense``: no parameter has more than 2
    dimensions.
    """
    small = saved <= RETAINED_BATCH_MAX_BYTES and rows <= RETAINED_BATCH_MAX_ROWS
    return ROUND if dense and small else 1


def retained_factor(k: int) -> float:
    """Peak memory of the retained route over the saved activations of all the data."""
    return FACTORS["double_backward"] + VMAP_PER_DIRECTION * (k - 1)


DOT_CHUNK = 1 << 20


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """``a · b`` accumulated in float64, a million entries at a time (no full copies)."""
    total = 0.0
    for lo in range(0, a.numel(), DOT_CHUNK):
        hi = lo + DOT_CHUNK
        total += float(torch.dot(a[lo:hi].double(), b[lo:hi].double()))
    return total


def orthonormalize_rows(q: torch.Tensor) -> None:
    """Gram–Schmidt (twice) on the rows of ``q``, in place, dots in float64.

    A row that is (numerically) in the span of the earlier ones becomes 0; its part of
    the trace then goes to the Hutchinson residual, which stays unbiased.
    """
    for i in range(q.shape[0]):
        scale = math.sqrt(dot64(q[i], q[i]))
        for _ in range(2):
            for j in range(i):
                q[i] -= dot64(q[j], q[i]) * q[j]
        norm = math.sqrt(dot64(q[i], q[i]))
        if norm <= 1e-10 * scale or norm == 0:
            q[i].zero_()
        else:
            q[i] /= norm


class MatrixOperator:
    """A dense symmetric matrix with :class:`LossHessian`'s interface (tests, simulations)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix.double()
        self.on_step: Callable[[float | None], None] | None = None
        self.should_stop: Callable[[int], bool] | None = None

    @property
    def size(self) -> int:
        """Dimension ``p``."""
        return int(self.matrix.shape[0])

    def describe(self) -> str:
        """How products are computed."""
        return "dense matrix"

    def plan_details(self) -> dict[str, Any]:
        """Nothing to plan."""
        return {}

    def matmat(
        self, vectors: torch.Tensor | Directions, *, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``H v_k`` for each direction, in float64."""
        dirs = _directions(vectors)
        return dirs.block(0, dirs.count).double() @ self.matrix

    def quadratic_forms(self, vectors: torch.Tensor | Directions) -> torch.Tensor:
        """``v_kᵀ H v_k`` for each direction, one at a time (stopping as
        :class:`LossHessian` does when :attr:`should_stop` says so)."""
        dirs = _directions(vectors)
        out = []
        for r in range(dirs.count):
            v = dirs.block(r, r + 1).double()
            out.append(((v @ self.matrix) * v).sum(-1))
            if self.on_step is not None:
                self.on_step((r + 1) / dirs.count)
            if self.should_stop is not None and self.should_stop(r + 1):
                break
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


Operator = LossHessian | MatrixOperator


# --------------------------------------------------------------------------- trace


def hessian_trace(
    model: nn.Module,
    data: Any,
    *,
    loss: str = "cross_entropy",
    params: str = "all",
    method: Method = "auto",
    trace_method: str = "hutchinson",
    rtol: float = 0.01,
    max_probes: int = 2000,
    probe_batch: int | None = None,
    max_memory: int | None = None,
    time_budget: float | Stopwatch | None = None,
    sketch: int = SKETCH,
    seed: int = 0,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> Estimate:
    r"""Trace of the Hessian of the mean loss with respect to the selected parameters.

    .. math::

        \mathrm{Tr}\,H = \sum_{j=1}^p e_j^\top H e_j
        \approx \frac1k \sum_{r=1}^k v_r^\top H v_r, \quad v_r \sim \mathrm{Rademacher}^p

    Hutchinson probes are drawn in rounds of 16 (one pass over the data per round, the
    same probes for every data batch of the round) from a ``torch.Generator`` seeded with
    ``seed``. The estimate stops once its standard error :math:`s/\sqrt{k}` (sample std,
    ddof = 1) is at most ``rtol`` times :math:`|\bar t|`, after at least two rounds, at
    ``max_probes`` probes, or when ``time_budget`` seconds are spent (``details["stop"]``
    says which; a time-budget stop reports the standard error reached, with a warning).

    ``trace_method="hutch++"`` first spends ``sketch`` products on a sketch
    :math:`Y = HS` of Rademacher :math:`S`, takes its orthonormal basis :math:`Q`, and
    computes :math:`\mathrm{Tr}(Q^\top H Q)` exactly (``sketch`` more products); the rest,
    :math:`\mathrm{Tr}((I-QQ^\top)H(I-QQ^\top))`, is Hutchinson with projected probes
    :math:`(I-QQ^\top)v`, in rounds until ``rtol`` as above. Given :math:`Q` the two parts
    are an exact number and an unbiased mean of i.i.d. samples, so the standard error is
    that of the residual samples alone. Neural-network Hessians have a few outlier
    eigenvalues; removing them shrinks the variance (Meyer et al. 2021).

    Args:
        model: The network.
        data: ``(x, y)`` tensors, a DataLoader, or :class:`~flatcli.data.Batches`.
        loss: ``cross_entropy`` or ``mse``.
        params: ``"all"``, a module name, or a parameter name (see :func:`select_params`).
        method: ``exact``, ``hutchinson``, or ``auto``. Exact is the Gauss-Newton
            diagonal on a piecewise-linear network
            (:mod:`~flatcli.measures.gauss_newton`: ``C`` per-sample VJPs, any size),
            else one HVP per parameter with unit vectors; ``auto`` takes the first when
            it applies, else exact up to 2,000 parameters and Hutchinson above.
        trace_method: ``hutchinson`` or ``hutch++`` (for the Hutchinson method).
        rtol: Target relative standard error of the Hutchinson estimate.
        max_probes: Most Hessian-vector products of a Hutchinson estimate (Hutch++:
            sketch and exact part included).
        probe_batch: Probes per backward pass (or vmapped call); None: chosen by cost
            within ``max_memory`` (the routes of :class:`LossHessian`).
        max_memory: Bytes the products may use (default: half of the free memory).
        time_budget: Seconds after which the estimate stops, inside a round after the
            probe that spent them (None or 0: no limit); a :class:`Stopwatch` shares its
            budget with other measures.
        sketch: Hutch++ sketch size.
        seed: Seed of the probes.
        batch_size: Batch size when ``data`` is in memory.
        progress: Called with a line of text (probes done, relative stderr, ETA) at
            least every 2 seconds of work, for a progress display.

    Returns:
        An :class:`Estimate`; ``stderr`` is None when exact, ``details["probes"]`` the
        number of products of a Hutchinson estimate, ``details["parameters"]`` is ``p``,
        plus the engine and memory plan (see :meth:`LossHessian.plan_details`).

    Example:
        >>> import torch
        >>> from flatcli import archs
        >>> from flatcli.measures.hessian import hessian_trace
        >>> model = archs.mlp(4, [5], 3, activation="tanh")
        >>> x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> hessian_trace(model, (x, y)).method
        'exact (diagonal by HVP; auto: 43 parameters ≤ 2000)'
        >>> hessian_trace(archs.mlp(4, [5], 3), (x, y)).method[:41]  # ReLU
        'exact (Gauss-Newton diagonal: the network'
    """
    loss = check_loss(loss)
    _check_trace_options(method, rtol, max_probes, probe_batch, trace_method)
    clock = Stopwatch.of(time_budget)
    names = select_params(model, params)
    batches = batches_for(model, data, batch_size=batch_size)
    with evaluating(model), torch.no_grad():
        p = FlatParams.of(model, names).size
        resolved, note = _resolve_method(model, batches, method, p)
        if resolved == "gauss_newton":
            return _gauss_newton(model, batches, loss, names, max_memory, note)
        extra = 0.0
        if resolved != "exact":
            item = next(model.parameters()).element_size()
            # int8 probes made on demand; Hutch++'s sketch, orthonormalized in place
            extra = 2 * p + (sketch * p * item if trace_method == "hutch++" else 0)
        op = LossHessian(
            model, batches, loss, names, max_memory=max_memory, probe_batch=probe_batch,
            extra_bytes=extra,
        )  # fmt: skip
        tell = progress or (lambda _msg: None)
        if resolved == "exact":
            est = _exact_trace(op, note, tell)
        else:
            est = trace_estimate(
                op,
                trace_method=trace_method,
                rtol=rtol,
                max_probes=max_probes,
                seed=seed,
                sketch=sketch,
                clock=clock,
                progress=tell,
                note=note,
            )
        # the retained graph's forward pass already gave every logit: no pass of its own
        saturated = saturation_warning(model, batches, loss, logits=op.logits)
        return with_warnings(est, saturated or "")


def _gauss_newton(
    model: nn.Module,
    batches: Batches,
    loss: str,
    names: list[str],
    max_memory: int | None,
    note: str,
) -> Estimate:
    """The exact trace of a piecewise-linear network, with its warnings."""
    logits: list[torch.Tensor] = []
    budget = resolve_max_memory(max_memory, batches.device)
    est = gauss_newton_trace(model, batches, loss, names, budget=budget, note=note, outputs=logits)
    saturated = saturation_warning(model, batches, loss, logits=logits)  # no pass of its own
    return with_warnings(_flag_zero(est), saturated or "")


def _resolve_method(model: nn.Module, batches: Batches, method: str, p: int) -> tuple[str, str]:
    """``gauss_newton``, ``exact`` (the diagonal by HVPs) or ``hutchinson``, and the note.

    ``exact`` and ``auto`` take the Gauss-Newton diagonal on a piecewise-linear network
    with 2-D logits (``auto``: at most :data:`~flatcli.measures.gauss_newton.MAX_CLASSES`
    of them); otherwise ``auto`` is exact by HVPs up to :data:`AUTO_EXACT_MAX_PARAMS`
    parameters and Hutchinson above.
    """
    if method == "hutchinson":
        return method, ""
    if piecewise_linear_network(model):
        x, _ = batches.first()
        out = call_model(model, take(x, slice(0, 1)))
        if out.ndim == 2 and (method == "exact" or out.shape[1] <= MAX_CLASSES):
            return "gauss_newton", "; auto: a piecewise-linear network" if method == "auto" else ""
    if method == "exact":
        return method, ""
    resolved = "exact" if p <= AUTO_EXACT_MAX_PARAMS else "hutchinson"
    relation = "≤" if resolved == "exact" else ">"
    return resolved, f"; auto: {p} parameters {relation} {AUTO_EXACT_MAX_PARAMS}"


def _check_trace_options(
    method: str, rtol: float, max_probes: int, probe_batch: int | None, trace_method: str
) -> None:
    if trace_method not in TRACE_METHODS:
        raise UsageError(
            f"unknown trace method {trace_method!r}; choose one of {', '.join(TRACE_METHODS)}"
        )
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not rtol >= 0:
        raise UsageError(f"rtol must be at least 0, got {rtol}")
    if max_probes < 2:
        raise UsageError(f"max_probes must be at least 2 (for a standard error), got {max_probes}")
    if probe_batch is not None and probe_batch < 1:
        raise UsageError(f"probe_batch must be at least 1, got {probe_batch}")


def _exact_trace(op: LossHessian, note: str, tell: Progress) -> Estimate:
    """Sum of ``e_jᵀ H e_j`` over all unit vectors, ``EXACT_CHUNK`` per data pass."""
    p = op.size
    if p > MAX_EXACT_PARAMS:
        raise UsageError(
            f"an exact trace of {p} parameters needs {p} HVPs; use method='hutchinson'"
        )
    total = 0.0
    for lo in range(0, p, EXACT_CHUNK):
        hi = min(lo + EXACT_CHUNK, p)
        total += float(op.quadratic_forms(_unit_rows(p, lo, hi)).sum())
        tell(f"exact Hessian trace: {hi}/{p} HVPs")
    fallback = ""
    if "SDPA" in op.ad.mode:
        fallback = "; SDPA math kernel"
    elif op.engine == "vmap" and op.ad.mode != FORWARD:
        fallback = f"; {op.ad.mode}"
    est = Estimate(
        total, None, f"exact (diagonal by HVP{note}{fallback})", {"parameters": p, "hvps": p}
    )
    return _flag_zero(est)


def trace_estimate(
    op: Operator,
    *,
    trace_method: str = "hutchinson",
    rtol: float = 0.01,
    max_probes: int = 2000,
    seed: int = 0,
    sketch: int = SKETCH,
    clock: Stopwatch | None = None,
    progress: Progress | None = None,
    note: str = "",
) -> Estimate:
    """Hutchinson or Hutch++ trace of any operator (see :func:`hessian_trace`).

    ``op`` is a :class:`LossHessian` or, for simulations, a :class:`MatrixOperator`.
    """
    clock = clock or Stopwatch()
    tell = progress or (lambda _msg: None)
    p = op.size
    low, low_part, sketch_used = 0.0, None, 0
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    if trace_method == "hutch++":
        sketch_used = max(1, min(sketch, p // 2))
        if max_probes < 2 * sketch_used + 2:
            raise UsageError(
                f"hutch++ with a sketch of {sketch_used} needs max_probes ≥ "
                f"{2 * sketch_used + 2}, got {max_probes}"
            )
        phase = {"name": "sketch"}

        def on_step(fraction: float | None) -> None:
            if clock.due(2.0):
                share = "" if fraction is None else f" {fraction:.0%} of {sketch_used} HVPs,"
                tell(
                    f"Hutch++ trace: {phase['name']},{share} "
                    f"{format_seconds(clock.elapsed)} so far"
                )

        previous = op.on_step
        op.on_step = on_step
        try:
            tell(f"Hutch++ trace: sketch of {sketch_used} HVPs")
            sketch_probes = Probes(seed, p, stream=1)
            q = op.matmat(Directions(sketch_used, sketch_probes.block), dtype=None)
            orthonormalize_rows(q)  # in place: Q, with orthonormal rows spanning HS
            phase.update(name="exact part on the sketch")
            tell(f"Hutch++ trace: exact part on the {sketch_used}-dimensional sketch")
            forms = op.quadratic_forms(q)
        finally:
            op.on_step = previous
        low_part = [float(v) for v in forms]
        low = math.fsum(low_part)

        def project(v: torch.Tensor) -> torch.Tensor:
            v = v.to(q)
            return v - (v @ q.T) @ q

    spent = 2 * sketch_used
    samples, stop = _sampled_rounds(
        op,
        Probes(seed, p),
        rtol=rtol,
        max_probes=max_probes - spent,
        clock=clock,
        tell=tell,
        offset=low,
        label="Hutch++ trace" if project is not None else "Hutchinson trace",
        project=project,
    )
    mean, se = mean_and_stderr(samples)
    k = len(samples)
    value = low + mean
    rel = se / abs(value) if se is not None and value != 0 else math.inf
    if project is None:
        how = f"hutchinson (rademacher, {k} probes"
    else:
        how = f"hutch++ (rank-{sketch_used} sketch exact, {k} rademacher probes on the rest"
    how += f"{note}; {op.describe()}" if op.describe() != "dense matrix" else note
    if stop == "max_probes":
        how += f"; max_probes reached before rtol {rtol:g}"
    elif stop == "time_budget":
        how += f"; time budget reached at relative stderr {rel:.2%}"
    how += ")"
    details: dict[str, Any] = {
        "probes": k + spent,
        "parameters": p,
        "converged": stop == "rtol",
        "rtol": rtol,
        "stop": stop,
        "relative_stderr": rel,
        "seconds": clock.elapsed,
        **op.plan_details(),
    }
    if project is not None:
        details |= {"sketch": sketch_used, "residual_probes": k, "sketch_trace": low}
    est = Estimate(value, se, how, details)
    if stop == "time_budget":
        need = k * (rel / rtol) ** 2 if rtol > 0 else math.inf
        more = (need - k) * clock.elapsed / max(1, k + spent)
        est = with_warnings(
            est,
            f"stopped by the time budget at {rel:.1%} relative stderr (target {rtol:.1%}); "
            f"a longer --time-budget buys about {format_seconds(more)} more to reach it",
        )
    return _flag_zero(est)


def _sampled_rounds(
    op: Operator,
    probes: Probes,
    *,
    rtol: float,
    max_probes: int,
    clock: Stopwatch,
    tell: Progress,
    offset: float,
    label: str,
    project: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[list[float], str]:
    """Rademacher rounds of ``vᵀHv`` (``v`` projected by ``project``) until a stop.

    Stops when the standard error is ≤ ``rtol·|offset + mean|`` once ``2·ROUND``
    samples are in (or ``max_probes``), at ``max_probes`` samples, or when ``clock``'s
    budget is spent: inside a round, after the probe that spent it (at least two probes
    in all, for a standard error). Rounds end at multiples of ``ROUND`` probes, so a
    budget that does not bind changes nothing (same probes, same value). Where a
    direction completes only in the last data chunk of a pass (the routes that rebuild
    the gradient graph per chunk), the first round under a budget is two probes, and
    later rounds are shortened to what the budget still allows.
    """
    samples: list[float] = []
    loop_start = clock.elapsed
    state: dict[str, Any] = {"k": 0, "start": loop_start}
    status = {"text": ""}

    def on_step(fraction: float | None) -> None:
        if clock.due(2.0):
            tell(_round_line(label, len(samples), state, fraction, clock, status["text"]))

    def should_stop(done: int) -> bool:
        return len(samples) + done >= 2 and clock.spent()

    previous = (getattr(op, "on_step", None), getattr(op, "should_stop", None))
    op.on_step, op.should_stop = on_step, should_stop
    try:
        while len(samples) < max_probes:
            k = min(ROUND - len(samples) % ROUND, max_probes - len(samples))
            if clock.budget is not None and samples:
                per_probe = (clock.elapsed - loop_start) / len(samples)
                k = min(k, max(1, int(clock.remaining // per_probe)))
            elif clock.budget is not None and getattr(op, "engine", "retained") != "retained":
                k = min(k, 2)
            k = max(k, 2 - len(samples), 1)
            first, _ = probes.take(k)

            def block(lo: int, hi: int, first: int = first) -> torch.Tensor:
                v = probes.block(first + lo, first + hi)
                return v if project is None else project(v)

            state.update(k=k, start=clock.elapsed)
            got = op.quadratic_forms(Directions(k, block)).tolist()
            samples.extend(got)
            mean, se = mean_and_stderr(samples)
            value = offset + mean
            if se is None:
                continue
            rel = se / abs(value) if value != 0 else math.inf
            per_probe = (clock.elapsed - loop_start) / len(samples)
            need = len(samples) * (rel / rtol) ** 2 if rtol > 0 else math.inf
            eta = (min(need, max_probes) - len(samples)) * per_probe
            eta = min(max(eta, 0.0), clock.remaining)
            status["text"] = (
                f"; relative stderr {rel:.2%} (target {rtol:.2%}), ETA {format_seconds(eta)}"
            )
            tell(f"{label}: {len(samples)} probes{status['text']}")
            if len(got) < k or clock.spent():
                return samples, "time_budget"
            if len(samples) >= min(2 * ROUND, max_probes) and se <= rtol * abs(value):
                return samples, "rtol"
        return samples, "max_probes"
    finally:
        op.on_step, op.should_stop = previous


def _round_line(
    label: str,
    done: int,
    state: dict[str, Any],
    fraction: float | None,
    clock: Stopwatch,
    status: str,
) -> str:
    """The progress line inside a round: probes done, the round's share done (never
    past its total), and the stderr and ETA of the last finished round."""
    k = state["k"]
    if fraction is None:  # the first pass over chunked data: its length is not known yet
        return f"{label}: {done} probes done, round of {k} running{status}"
    inside = min(k, int(fraction * k))
    line = f"{label}: {done} probes done, round {inside}/{k} ({fraction:.0%})"
    if status:
        return line + status
    spent = clock.elapsed - state["start"]
    eta = spent * (1 - fraction) / fraction if fraction > 0 else math.inf
    return f"{line}, round ETA {format_seconds(min(eta, clock.remaining))}"


def _flag_zero(est: Estimate) -> Estimate:
    if est.value == 0:
        return with_warnings(
            est,
            "exactly 0: the loss curvature vanished in floating point (saturated softmax?)",
        )
    return est


# --------------------------------------------------------------------------- top eigenvalue


def hessian_top_eigenvalue(
    model: nn.Module,
    data: Any,
    *,
    loss: str = "cross_entropy",
    params: str = "all",
    max_iters: int = 200,
    tol: float = 1e-6,
    probe_batch: int | None = None,
    max_memory: int | None = None,
    time_budget: float | Stopwatch | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> Estimate:
    r"""Largest (algebraic) eigenvalue of the Hessian of the mean loss, by Lanczos.

    .. math:: \lambda_{\max}(H) = \max_{\|v\|=1} v^\top H v

    Lanczos with full reorthogonalization on HVPs (one pass over the data each) from a
    seeded Gaussian start. It stops when the Ritz pair :math:`(\lambda, v)` has
    :math:`\|Hv - \lambda v\| \le \mathrm{tol}\cdot\|T\|_2` (:math:`T` the Lanczos
    tridiagonal matrix, the spectral scale found so far), when the Krylov space is
    invariant, or after ``max_iters`` HVPs. The reported residual is recomputed with one
    more HVP. The eigenvalue error is of the order of ``residual² / gap``.

    Unlike power iteration (PyHessian), which finds the eigenvalue of largest
    *magnitude*, this returns the largest *algebraic* one even when the Hessian has a
    more negative eigenvalue (away from a minimum).

    Args:
        model: The network.
        data: ``(x, y)`` tensors, a DataLoader, or :class:`~flatcli.data.Batches`.
        loss: ``cross_entropy`` or ``mse``.
        params: ``"all"``, a module name, or a parameter name.
        max_iters: Most Lanczos iterations (HVPs). The basis is kept in float64 and may
            take half of ``max_memory``, which caps the iterations (with a warning).
        tol: Relative residual target.
        probe_batch: 1 for double-backward products, None to choose (see
            :class:`LossHessian`).
        max_memory: Bytes the products and the basis may use (default: half the free
            memory).
        time_budget: Seconds (or a shared :class:`Stopwatch`) after which Lanczos stops
            after the current iteration (unconverged, with a warning; the residual is then
            Lanczos' own estimate, without one more HVP).
        seed: Seed of the start vector.
        batch_size: Batch size when ``data`` is in memory.
        progress: Called with a line of text after every Lanczos iteration.

    Returns:
        An :class:`Estimate` with ``stderr`` None and ``details`` ``iterations``,
        ``residual`` (:math:`\|Hv - \lambda v\|`), ``converged`` and ``parameters``.
    """
    loss = check_loss(loss)
    if max_iters < 1:
        raise UsageError(f"max_iters must be at least 1, got {max_iters}")
    clock = Stopwatch.of(time_budget)
    names = select_params(model, params)
    batches = batches_for(model, data, batch_size=batch_size)
    with evaluating(model), torch.no_grad():
        p = FlatParams.of(model, names).size
        budget = resolve_max_memory(max_memory, batches.device)
        # the float64 basis gets at most half of the budget, the products the rest
        iters = max(2, min(max_iters, p, int(budget / 2 // (8 * p)) - 1))
        op = LossHessian(
            model,
            batches,
            loss,
            names,
            max_memory=budget,
            probe_batch=probe_batch,
            extra_bytes=(iters + 1) * p * 8,
        )
        gen = torch.Generator().manual_seed(seed)
        start = torch.randn(op.size, generator=gen, dtype=torch.float64)
        value, vector, iterations, converged, ritz = _lanczos_top(
            op, start, iters, tol, progress or (lambda _msg: None), clock
        )
        if converged or not clock.spent():
            residual = float((op.matmat(vector[None])[0] - value * vector).norm())
        else:  # out of time: Lanczos' own residual estimate, no further HVP
            residual = ritz
        saturated = saturation_warning(model, batches, loss, logits=op.logits)
    est = Estimate(
        value,
        None,
        f"lanczos (full reorthogonalization, {iterations} HVPs; {op.describe()})",
        {
            "iterations": iterations,
            "residual": residual,
            "converged": converged,
            "parameters": op.size,
            **op.plan_details(),
        },
    )
    if not converged and iters < max_iters and iterations == iters:
        est = with_warnings(
            est,
            f"unconverged: --max-memory {format_bytes(op.budget)} holds a Lanczos basis of "
            f"{iters} vectors only (residual {residual:.3g})",
        )
    elif not converged and clock.spent():
        est = with_warnings(
            est, f"unconverged: stopped by the time budget (residual {residual:.3g})"
        )
    return with_warnings(_flag_zero(est), saturated or "")


def _lanczos_top(
    op: LossHessian,
    start: torch.Tensor,
    max_iters: int,
    tol: float,
    tell: Progress,
    clock: Stopwatch,
) -> tuple[float, torch.Tensor, int, bool, float]:
    """Top Ritz pair after Lanczos with full reorthogonalization (all in float64), whether
    it converged, and its residual estimate ``β_k |e_kᵀ s|`` (no HVP).

    The basis lives in one preallocated ``(iterations + 1, p)`` matrix, so its memory is
    ``8·p`` bytes per iteration and nothing is copied.
    """
    steps = min(max_iters, op.size)
    basis = torch.empty(steps + 1, op.size, dtype=torch.float64, device=start.device)
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    iterations = 0
    for iterations in range(1, steps + 1):
        w = op.matmat(basis[iterations - 1][None])[0]
        alphas.append(float(w @ basis[iterations - 1]))
        q = basis[:iterations]
        before = float(w.norm())
        w = w - q.T @ (q @ w)
        beta = float(w.norm())
        if beta < DGKS * before:  # cancellation: once more, and twice is enough
            w = w - q.T @ (q @ w)
            beta = float(w.norm())
        evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
        tell(f"Lanczos top eigenvalue: iteration {iterations}, λ ≈ {float(evals[-1]):.6g}")
        scale = max(float(evals.abs().max()), torch.finfo(torch.float64).tiny)
        invariant = beta <= 1e-12 * scale
        ritz = beta * abs(float(evecs[-1, -1]))
        if invariant or ritz <= tol * scale:
            return float(evals[-1]), evecs[:, -1].to(q) @ q, iterations, True, ritz
        betas.append(beta)
        basis[iterations] = w / beta
        if clock.spent():
            break
    q = basis[: len(alphas)]
    evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas[: len(alphas) - 1]))
    ritz = betas[-1] * abs(float(evecs[-1, -1])) if len(betas) >= len(alphas) else 0.0
    return float(evals[-1]), evecs[:, -1].to(q) @ q, iterations, iterations == op.size, ritz


DGKS = 0.7071
"""Reorthogonalize a Lanczos vector a second time when the first pass left less than this
fraction of its norm (Daniel, Gragg, Kaufman, Stewart 1976; Kahan–Parlett: twice is
enough)."""


def _tridiagonal(alphas: list[float], betas: list[float]) -> torch.Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return t


# --------------------------------------------------------------------------- probes


def rademacher(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """±1 entries with equal probability, in float64, drawn from ``gen``."""
    return rademacher_signs(gen, shape).double()


class Probes:
    """Rademacher probes ``r = 0, 1, 2, …``, each made on demand from its own seed.

    Probe ``r`` of a stream seeded with ``seed`` is drawn from a ``torch.Generator``
    seeded with ``seed · 1,000,003 + r`` (plus a stream offset), so any block can be made
    again for every data chunk instead of holding ``k × p`` signs in memory.
    """

    def __init__(self, seed: int, size: int, stream: int = 0) -> None:
        self.seed, self.size, self.stream = seed, size, stream
        self.next = 0

    def take(self, k: int) -> tuple[int, int]:
        """Reserve the next ``k`` probes: their index range."""
        lo = self.next
        self.next += k
        return lo, lo + k

    def block(self, lo: int, hi: int) -> torch.Tensor:
        """Probes ``lo..hi`` as an int8 ``(hi - lo, p)`` tensor of ±1."""
        rows = []
        for r in range(lo, hi):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * self.stream + r)
            rows.append(rademacher_signs(gen, (self.size,)))
        return torch.stack(rows)


def rademacher_signs(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """The same draws as :func:`rademacher`, kept as int8 (one byte per entry)."""
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8) * 2 - 1


def _unit_rows(p: int, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo..hi`` of the ``p × p`` identity, without building all of it."""
    rows = torch.zeros(hi - lo, p, dtype=torch.float64)
    rows[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
    return rows
