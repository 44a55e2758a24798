"""Second derivatives that survive ops without forward-mode AD.

flatcli's Hessian-vector products are forward-over-reverse (``jvp`` of ``grad``), and the
Fisher-Rao norm is one forward-mode JVP. Some kernels have no forward-mode derivative:
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
