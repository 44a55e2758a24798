"""Second derivatives that survive ops without forward-mode AD.

flatcli's Hessian-vector products come from the two primitives of this module:
:func:`hvp` (forward-over-reverse, ``jvp`` of ``grad``, vmapped over directions) and
:class:`GradientGraph` (reverse-over-reverse: the gradient built once with its graph, each
product one backward pass through it, PyHessian's trick). The Fisher-Rao norm is one
forward-mode JVP. Some kernels have no forward-mode derivative:
PyTorch's fused CPU attention kernel (``scaled_dot_product_attention``, which Hugging Face
models use by default) has neither a forward-mode nor a double-backward formula, and other
ops (custom autograd functions) may lack only the forward-mode one.

:class:`SecondOrder` runs a computation in the first way that works and remembers it for
the next call (the next batch of the same measure):

1. ``forward-over-reverse``: the fast path;
2. ``reverse-over-reverse``: the same numbers by double backward, when the caller gives
   that variant;
3. ``forward-over-reverse, SDPA math kernel``: both again with attention computed by
   PyTorch's reference (math) kernel, which is differentiable to any order. The values
   are the same function; only the kernel differs.

:attr:`SecondOrder.note` is what a measure appends to its method string, so a report
says which path ran.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch

from .errors import FlatcliError

T = TypeVar("T")

FORWARD = "forward-over-reverse"
REVERSE = "reverse-over-reverse"
MATH_SDPA = "forward-over-reverse, SDPA math kernel"
MATH_SDPA_REVERSE = "reverse-over-reverse, SDPA math kernel"


def _missing_derivative(e: BaseException) -> bool:
    """True for PyTorch's "this op has no (forward-mode / double) derivative" errors."""
    text = str(e)
    return isinstance(e, (NotImplementedError, RuntimeError)) and (
        "forward AD" in text
        or "forward-mode" in text
        or "jvp" in text.lower()
        or ("derivative for" in text and "not implemented" in text)
    )


def _math_attention() -> AbstractContextManager[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class SecondOrder:
    """Which way a measure takes second derivatives; falls back once, then sticks.

    Attributes:
        mode: The path that last worked (``forward-over-reverse`` until a fallback).
    """

    def __init__(self) -> None:
        self.mode = FORWARD

    def __call__(self, forward: Callable[[], T], reverse: Callable[[], T] | None = None) -> T:
        """``forward()``, or the first fallback that works (see the module docstring).

        Raises:
            FlatcliError: No path works; the message names the op PyTorch reported.
        """
        plans: list[tuple[str, Callable[[], T], Callable[[], AbstractContextManager[None]]]]
        plans = [(FORWARD, forward, nullcontext)]
        if reverse is not None:
            plans.append((REVERSE, reverse, nullcontext))
        plans.append((MATH_SDPA, forward, _math_attention))
        if reverse is not None:
            plans.append((MATH_SDPA_REVERSE, reverse, _math_attention))
        start = next((i for i, (mode, _, _) in enumerate(plans) if mode == self.mode), 0)
        error: BaseException | None = None
        for mode, fn, context in plans[start:]:
            try:
                with context():
                    result = fn()
            except (NotImplementedError, RuntimeError) as e:
                if not _missing_derivative(e):
                    raise
                error = e
                continue
            self.mode = mode
            return result
        first = str(error).strip().splitlines()[0] if error else "unknown op"
        raise FlatcliError(f"the model has an op without second derivatives: {first}")

    @property
    def note(self) -> str:
        """``""`` on the default path, else ``", <path>"`` for a method string."""
        return "" if self.mode == FORWARD else f", {self.mode}"


def hvp(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    vectors: torch.Tensor,
    *,
    chunk_size: int | None = None,
    ad: SecondOrder | None = None,
) -> torch.Tensor:
    r"""Hessian-vector products :math:`\nabla^2 f(x)\, v_k` for every ``vectors[k]``.

    Forward-over-reverse (``jvp`` of ``grad``), vmapped over the ``k`` directions: the
    primal forward and backward pass is shared by all of them, only the tangents are
    batched. Built from ``torch.func`` transforms, so it works under an outer
    ``torch.no_grad()`` and composes with an outer autograd graph (FAM differentiates
    through it). When an op has no forward-mode derivative, ``ad`` falls back to
    reverse-over-reverse (``vjp`` of ``grad``; the Hessian is symmetric) or to the math
    attention kernel, and records which.

    Args:
        f: Scalar function of a tensor of any shape.
        x: The point.
        vectors: Directions, shape ``(k, *x.shape)`` (an expanded view is fine: a
            direction shared by every sample of a per-sample sum).
        chunk_size: Directions per vmapped call (memory bound); None for all at once.
        ad: Fallback state (default: a fresh :class:`SecondOrder`).

    Returns:
        ``(k, *x.shape)``: row ``k`` is :math:`\nabla^2 f(x)\, v_k`.
    """
    grad_f = torch.func.grad(f)

    def one(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad_f, (x,), (v,))[1]

    def forward() -> torch.Tensor:
        return torch.func.vmap(one, chunk_size=chunk_size)(vectors)

    def reverse() -> torch.Tensor:
        _, pullback = torch.func.vjp(grad_f, x)
        return torch.func.vmap(lambda v: pullback(v)[0], chunk_size=chunk_size)(vectors)

    return (ad or SecondOrder())(forward, reverse)


class GradientGraph:
    r"""The gradient :math:`\nabla f(x)` with its autograd graph kept, for products
    :math:`\nabla^2 f(x)\, v` by reverse-over-reverse (double backward).

    One forward pass and one ``create_graph`` backward pass build the gradient; each
    product is then one more backward pass of :math:`\nabla f^\top v` through that graph,
    which stays alive until :meth:`release` (PyHessian's trick: the forward pass and the
    first backward pass are paid once for any number of directions). Works under an outer
    ``torch.no_grad()``; the products are detached.

    Args:
        f: Scalar function of a tensor.
        x: The point (detached and copied into a leaf that requires grad).
    """

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
        with torch.enable_grad():
            self.x = x.detach().requires_grad_(True)
            value = f(self.x)
            self.grad: torch.Tensor | None = None
            if isinstance(value, torch.Tensor) and value.requires_grad:
                (self.grad,) = torch.autograd.grad(value, self.x, create_graph=True)
        self.released = False

    def products(
        self, vectors: torch.Tensor, *, batched: bool = False, release: bool = False
    ) -> torch.Tensor:
        """``(k, *x.shape)`` products of the rows of ``vectors``.

        One backward pass per row, or with ``batched`` one vmapped backward pass for all
        rows (``is_grads_batched``: fewer, larger kernels, more memory). ``release`` frees
        the graph after the last row.
        """
        if self.released:
            raise RuntimeError("GradientGraph.products after release()")
        v = vectors.to(self.x)
        k = v.shape[0]
        if self.grad is None or not self.grad.requires_grad:  # f is affine in x
            out = torch.zeros_like(v)
        elif batched and k > 1:
            out = self._backward(v, keep=not release, batched=True)
        else:
            out = torch.stack(
                [self._backward(v[r], keep=not (release and r == k - 1)) for r in range(k)]
            )
        if release:
            self.release()
        return out

    def _backward(self, v: torch.Tensor, *, keep: bool, batched: bool = False) -> torch.Tensor:
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(
                self.grad, self.x, v, retain_graph=keep, allow_unused=True, is_grads_batched=batched
            )
        return torch.zeros_like(v) if hv is None else hv

    def release(self) -> None:
        """Free the graph (a later :meth:`products` is an error)."""
        self.grad = None
        self.released = True
