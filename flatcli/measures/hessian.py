r"""Trace and top eigenvalue of the loss Hessian over a chosen parameter set (MATH.md §6).

.. math::

    H = \nabla^2_\theta E(\theta), \qquad E(\theta) = \frac1n \sum_{i=1}^n \ell_i(\theta),

with :math:`\theta` the selected parameters (``"all"``, a module, or one parameter) and
every other parameter held fixed. Every product :math:`H v` is a per-sample **sum**
accumulated batch by batch and divided by ``n`` once, so a future multi-rank run only
needs an all-reduce of the sums.

References:
    Hutchinson. *A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines.* 1989.

    Yao, Gholami, Keutzer, Mahoney. *PyHessian: Neural Networks Through the Lens of the
    Hessian.* 2020. https://arxiv.org/abs/1912.07145 (its trace stops when the running
    mean stops moving; this module stops on a relative standard-error target instead).

    Jiang, Neyshabur, Mobahi, Krishnan, Bengio. *Fantastic Generalization Measures and
    Where to Find Them.* ICLR 2020. https://arxiv.org/abs/1912.02178
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from .. import distributed
from ..autodiff import SecondOrder
from ..data import Batches
from ..errors import UsageError
from ..features import batch_len
from ..losses import check_loss
from .estimate import Estimate, mean_and_stderr
from .params import (
    FlatParams,
    batches_for,
    empty_data,
    evaluating,
    fixed_params,
    functional_loss,
    hvp,
    select_params,
)

Progress = Callable[[str], None]
Method = Literal["auto", "exact", "hutchinson"]
METHODS = ("auto", "exact", "hutchinson")
AUTO_EXACT_MAX_PARAMS = 2000
"""``method="auto"`` computes the trace exactly up to this many parameters."""
MAX_EXACT_PARAMS = 100_000
"""An exact trace needs one HVP per parameter; refuse beyond this."""
EXACT_CHUNK = 256
"""Unit directions per vmapped HVP call of the exact trace."""


class LossHessian:
    r"""The operator :math:`V \mapsto H V` of the mean loss, one pass over the data per call.

    Args:
        model: The network (in eval mode; its parameters are never modified).
        batches: The data.
        loss: ``cross_entropy`` or ``mse``.
        names: Parameters :math:`\theta` (from :func:`select_params`).
    """

    def __init__(self, model: nn.Module, batches: Batches, loss: str, names: list[str]) -> None:
        self.model = model
        self.batches = batches
        self.loss = loss
        self.flat = FlatParams.of(model, names)
        self.theta = self.flat.vector(model)
        self.fixed = fixed_params(model, self.flat)
        self.n: int | None = None
        self.ad = SecondOrder()

    @property
    def size(self) -> int:
        """Number of parameters ``p``."""
        return self.flat.size

    def matmat(self, vectors: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """``H v_k`` for each row of ``vectors`` (``(k, p)``), in float64."""
        v = vectors.to(self.theta)
        total = torch.zeros(v.shape, dtype=torch.float64, device=v.device)
        n = 0
        for x, y in self.batches:
            f = functional_loss(self.model, self.flat, x, y, self.loss, fixed=self.fixed)
            total += hvp(f, self.theta, v, chunk_size=chunk_size, ad=self.ad).double()
            n += batch_len(x)
        total = distributed.sum_over_shards(self.batches, total)
        n = int(distributed.sum_floats(self.batches, n)[0])
        if n == 0:
            raise empty_data()
        self.n = n
        return total / n

    def quadratic_forms(self, vectors: torch.Tensor) -> torch.Tensor:
        """``v_kᵀ H v_k`` for each row of ``vectors``, in float64."""
        return (self.matmat(vectors) * vectors.to(torch.float64)).sum(-1)


# --------------------------------------------------------------------------- trace


def hessian_trace(
    model: nn.Module,
    data: Any,
    *,
    loss: str = "cross_entropy",
    params: str = "all",
    method: Method = "auto",
    rtol: float = 0.01,
    max_probes: int = 2000,
    probe_batch: int = 16,
    seed: int = 0,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> Estimate:
    r"""Trace of the Hessian of the mean loss with respect to the selected parameters.

    .. math::

        \mathrm{Tr}\,H = \sum_{j=1}^p e_j^\top H e_j
        \approx \frac1k \sum_{r=1}^k v_r^\top H v_r, \quad v_r \sim \mathrm{Rademacher}^p

    Hutchinson probes are drawn in rounds of ``probe_batch`` (one vmapped HVP per data
    batch per round, the same probes for every data batch of the round) from a
    ``torch.Generator`` seeded with ``seed``. The estimate stops once its standard error
    :math:`s/\sqrt{k}` (sample std, ddof = 1) is at most ``rtol`` times :math:`|\bar t|`,
    after at least two rounds, or at ``max_probes`` probes (``details["converged"]``
    says which).

    Args:
        model: The network.
        data: ``(x, y)`` tensors, a DataLoader, or :class:`~flatcli.data.Batches`.
        loss: ``cross_entropy`` or ``mse``.
        params: ``"all"``, a module name, or a parameter name (see :func:`select_params`).
        method: ``exact`` (one HVP per parameter, with unit vectors), ``hutchinson``, or
            ``auto`` (exact up to 2,000 parameters, Hutchinson above).
        rtol: Target relative standard error of the Hutchinson estimate.
        max_probes: Most Hutchinson probes.
        probe_batch: Probes per round (vmapped together).
        seed: Seed of the probes.
        batch_size: Batch size when ``data`` is in memory.
        progress: Called with a line of text after every round of probes (or chunk of
            unit vectors), for a progress display.

    Returns:
        An :class:`Estimate`; ``stderr`` is None when exact, ``details["probes"]`` the
        number of probes of a Hutchinson estimate, ``details["parameters"]`` is ``p``.

    Example:
        >>> import torch
        >>> from flatcli import archs
        >>> from flatcli.measures.hessian import hessian_trace
        >>> model = archs.mlp(4, [5], 3)
        >>> x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> hessian_trace(model, (x, y)).method
        'exact (diagonal by HVP; auto: 43 parameters ≤ 2000)'
    """
    loss = check_loss(loss)
    _check_trace_options(method, rtol, max_probes, probe_batch)
    names = select_params(model, params)
    batches = batches_for(model, data, batch_size=batch_size)
    with evaluating(model), torch.no_grad():
        op = LossHessian(model, batches, loss, names)
        p = op.size
        resolved = method
        note = ""
        if method == "auto":
            resolved = "exact" if p <= AUTO_EXACT_MAX_PARAMS else "hutchinson"
            relation = "≤" if resolved == "exact" else ">"
            note = f"; auto: {p} parameters {relation} {AUTO_EXACT_MAX_PARAMS}"
        tell = progress or (lambda _msg: None)
        if resolved == "exact":
            return _with_ad_note(_exact_trace(op, note, tell), op)
        return _with_ad_note(
            _hutchinson_trace(
                op, note, tell, rtol=rtol, max_probes=max_probes, probe_batch=probe_batch, seed=seed
            ),
            op,
        )


def _with_ad_note(est: Estimate, op: LossHessian) -> Estimate:
    """``est`` with the HVP fallback (if any) named in its method string."""
    if not op.ad.note:
        return est
    return Estimate(est.value, est.stderr, f"{est.method} [HVPs {op.ad.mode}]", est.details)


def _check_trace_options(method: str, rtol: float, max_probes: int, probe_batch: int) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not rtol >= 0:
        raise UsageError(f"rtol must be at least 0, got {rtol}")
    if max_probes < 2:
        raise UsageError(f"max_probes must be at least 2 (for a standard error), got {max_probes}")
    if probe_batch < 1:
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
    return Estimate(total, None, f"exact (diagonal by HVP{note})", {"parameters": p, "hvps": p})


def _hutchinson_trace(
    op: LossHessian,
    note: str,
    tell: Progress,
    *,
    rtol: float,
    max_probes: int,
    probe_batch: int,
    seed: int,
) -> Estimate:
    """Rademacher rounds until the relative standard error reaches ``rtol``."""
    gen = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    rounds = 0
    converged = False
    while len(samples) < max_probes:
        k = min(probe_batch, max_probes - len(samples))
        samples.extend(op.quadratic_forms(rademacher(gen, (k, op.size))).tolist())
        rounds += 1
        mean, se = mean_and_stderr(samples)
        if se is not None and mean != 0:
            tell(
                f"Hutchinson trace: {len(samples)} probes, relative stderr "
                f"{se / abs(mean):.2%} (target {rtol:.2%})"
            )
        if rounds >= 2 and se is not None and se <= rtol * abs(mean):
            converged = True
            break
    mean, se = mean_and_stderr(samples)
    k = len(samples)
    return Estimate(
        mean,
        se,
        f"hutchinson (rademacher, {k} probes{note}"
        + ("" if converged else f"; max_probes reached before rtol {rtol:g}")
        + ")",
        {"probes": k, "parameters": op.size, "converged": converged, "rtol": rtol},
    )


# --------------------------------------------------------------------------- top eigenvalue


def hessian_top_eigenvalue(
    model: nn.Module,
    data: Any,
    *,
    loss: str = "cross_entropy",
    params: str = "all",
    max_iters: int = 200,
    tol: float = 1e-6,
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
        max_iters: Most Lanczos iterations (HVPs).
        tol: Relative residual target.
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
    names = select_params(model, params)
    batches = batches_for(model, data, batch_size=batch_size)
    with evaluating(model), torch.no_grad():
        op = LossHessian(model, batches, loss, names)
        gen = torch.Generator().manual_seed(seed)
        start = torch.randn(op.size, generator=gen, dtype=torch.float64)
        value, vector, iterations, converged = _lanczos_top(
            op, start, max_iters, tol, progress or (lambda _msg: None)
        )
        residual = float((op.matmat(vector[None])[0] - value * vector).norm())
    return Estimate(
        value,
        None,
        f"lanczos (full reorthogonalization, {iterations} HVPs{op.ad.note})",
        {
            "iterations": iterations,
            "residual": residual,
            "converged": converged,
            "parameters": op.size,
        },
    )


def _lanczos_top(
    op: LossHessian, start: torch.Tensor, max_iters: int, tol: float, tell: Progress
) -> tuple[float, torch.Tensor, int, bool]:
    """Top Ritz pair after Lanczos with full reorthogonalization (all in float64)."""
    basis = [(start / start.norm()).to(op.theta.device)]
    alphas: list[float] = []
    betas: list[float] = []
    iterations = 0
    for iterations in range(1, min(max_iters, op.size) + 1):
        w = op.matmat(basis[-1][None])[0]
        alphas.append(float(w @ basis[-1]))
        q = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            w = w - q.T @ (q @ w)
        beta = float(w.norm())
        evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
        tell(f"Lanczos top eigenvalue: iteration {iterations}, λ ≈ {float(evals[-1]):.6g}")
        scale = max(float(evals.abs().max()), torch.finfo(torch.float64).tiny)
        invariant = beta <= 1e-12 * scale
        if invariant or beta * abs(float(evecs[-1, -1])) <= tol * scale:
            return float(evals[-1]), evecs[:, -1].to(q) @ q, iterations, True
        betas.append(beta)
        basis.append(w / beta)
    q = torch.stack(basis[: len(alphas)])
    evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas[: len(alphas) - 1]))
    return float(evals[-1]), evecs[:, -1].to(q) @ q, iterations, iterations == op.size


def _tridiagonal(alphas: list[float], betas: list[float]) -> torch.Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return t


# --------------------------------------------------------------------------- probes


def rademacher(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """±1 entries with equal probability, in float64, drawn from ``gen``."""
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).double() * 2 - 1


def _unit_rows(p: int, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo..hi`` of the ``p × p`` identity, without building all of it."""
    rows = torch.zeros(hi - lo, p, dtype=torch.float64)
    rows[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
    return rows
