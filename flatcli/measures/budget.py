r"""Memory and time budgets of the whole-network measures (docs/budgets.md).

**Memory.** Every whole-network measure streams the data in batches, so its peak memory
is set by one batch's activations (times a factor that depends on how it differentiates)
plus a few parameter-sized vectors. :func:`activation_bytes` measures the activations a
forward pass saves for the backward pass (through ``torch.autograd.graph``'s saved-tensor
hooks, on 2 and 4 samples), and :func:`plan_rows` splits every data batch into chunks of
at most the number of rows that fit ``max_memory``. All measures are per-sample sums, so
chunking changes nothing but the rounding order.

The factors (peak extra memory over the saved activations of the same rows) were
measured on a CIFAR-size ResNet-18 at batch 64 (bench/bench_models.py): about 4.3 for a
double-backward Hessian-vector product, 6 for one forward-over-reverse product and 2 more
per extra vmapped direction; 1 for a gradient; about 2 for a forward-mode JVP.

**Time.** :class:`Stopwatch` says when a ``time_budget`` in seconds is spent and formats
an ETA, for the estimators that stop early and report the standard error they reached.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import FlatcliError, ParameterError, UsageError

T = TypeVar("T")

DEFAULT_MEMORY_FRACTION = 0.5
"""``max_memory=None`` allows this fraction of the memory free when the measure starts."""

FACTORS = {"double_backward": 5.0, "gradient": 1.5, "jvp": 2.5, "forward": 0.5}
"""Peak extra memory over the saved activations, per engine (conservative; see above)."""
VMAP_BASE, VMAP_PER_DIRECTION = 5.0, 2.0
"""Forward-over-reverse vmapped over ``k`` directions: ``(VMAP_BASE + VMAP_PER_DIRECTION·k)``."""


# --------------------------------------------------------------------------- sizes


def parse_memory(text: str | int | None) -> int | None:
    """Bytes from ``4G``, ``512M``, ``1.5GB``, ``100000`` (bytes) or None.

    Raises:
        ParameterError: Not a positive size (it names ``max_memory``).
    """
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text <= 0:
            raise ParameterError("max_memory", f"must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise ParameterError(
            "max_memory", f"must be a size like 4G, 512M or 2.5GB, got {text!r}"
        )
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return max(1, int(float(match.group(1)) * scale))


def format_bytes(n: float) -> str:
    """``1.5 GiB``-style size."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def available_memory(device: torch.device | str = "cpu") -> int:
    """Free bytes: CUDA's free device memory, else the OS's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


def resolve_max_memory(max_memory: int | None, device: torch.device | str = "cpu") -> int:
    """``max_memory``, or :data:`DEFAULT_MEMORY_FRACTION` of the free memory when None."""
    if max_memory is not None:
        if max_memory <= 0:
            raise UsageError(f"max_memory must be positive, got {max_memory}")
        return int(max_memory)
    return int(DEFAULT_MEMORY_FRACTION * available_memory(device))


# --------------------------------------------------------------------------- activations


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (what one more copy of the weights costs)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _storages(model: nn.Module, *extra: torch.Tensor) -> set[int]:
    tensors = [*model.parameters(), *model.buffers(), *extra]
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_bytes(fn: Callable[[], Any], exclude: set[int]) -> int:
    """Bytes of the distinct tensors autograd saves while ``fn()`` runs (grad enabled).

    Tensors that share storage with ``exclude`` (parameters, buffers) are not counted:
    they exist anyway.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        # Not ``t`` itself: a saved output packed as itself is a reference cycle through
        # autograd's C++ graph that Python's collector cannot break (the whole graph of
        # the measured pass leaked, ~0.4 GB per call on MiniLM). The pass is never
        # differentiated, so a detached alias is as good.
        return t.detach()

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@dataclass(frozen=True)
class Activations:
    """Saved-activation bytes of the loss's forward pass: ``fixed + per_row · rows``."""

    per_row: float
    fixed: float

    def of(self, rows: int) -> float:
        """Bytes for a chunk of ``rows`` samples."""
        return self.fixed + self.per_row * rows


def activation_bytes(
    loss_of: Callable[[Any, torch.Tensor, torch.Tensor], Any],
    model: nn.Module,
    x: Any,
    y: torch.Tensor,
    *,
    theta: torch.Tensor | None = None,
) -> Activations:
    """Measure :class:`Activations` from two small forward passes (2 and 4 rows).

    Args:
        loss_of: ``(theta, x, y) -> loss``, the function whose graph is measured; it is
            called with ``theta`` requiring grad (or None when ``theta`` is None).
        model: The network (its parameters and buffers are not counted).
        x, y: A batch; only its first 4 rows are used.
        theta: Flat parameters to differentiate with respect to.
    """
    exclude = _storages(model, *(() if theta is None else (theta,)))
    rows = rows_of(x)

    def at(k: int) -> int:
        t = None if theta is None else theta.detach().clone().requires_grad_(True)
        # this pass's own θ copy only: a storage freed since (the 2-row pass's copy) may be
        # reused by an activation of the next pass, which must still count
        mine = exclude if t is None else exclude | {t.untyped_storage().data_ptr()}
        xk = slice_rows(x, 0, k)  # a copy, so that its storage is k rows, not the batch
        xk = {n: v.clone() for n, v in xk.items()} if isinstance(xk, Mapping) else xk.clone()
        return saved_bytes(lambda: loss_of(t, xk, y[:k].clone()), mine)

    if rows >= 4:
        two, four = at(2), at(4)
        per_row = max(0.0, (four - two) / 2)
        return Activations(per_row, max(0.0, two - 2 * per_row))
    return Activations(at(rows) / max(rows, 1), 0.0)


# --------------------------------------------------------------------------- row chunks


def rows_of(x: Any) -> int:
    """Number of samples in a batch's inputs (a tensor, or a dict of tensors)."""
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def slice_rows(x: Any, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of a batch's inputs (a tensor, or each tensor of a dict)."""
    if isinstance(x, Mapping):
        return {k: v[lo:hi] for k, v in x.items()}
    return x[lo:hi]


def with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Each item with whether it is the last one (one item of lookahead)."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def row_chunks(batches: Any, rows: int | None) -> Iterator[tuple[Any, torch.Tensor]]:
    """Each batch of ``batches``, split into chunks of at most ``rows`` samples."""
    for x, y in batches:
        n = rows_of(x)
        if rows is None or n <= rows:
            yield x, y
            continue
        for lo in range(0, n, rows):
            yield slice_rows(x, lo, lo + rows), y[lo : lo + rows]


def chunked(batches: Any, rows: int | None) -> Any:
    """``batches`` (a :class:`~flatcli.data.Batches`) re-batched to at most ``rows`` rows."""
    from .. import distributed
    from ..data import Batches

    if rows is None:
        return batches
    if isinstance(batches, distributed.ShardedBatches):  # keep the ranks' sums reduced
        return batches.rebatched(rows)
    return Batches(
        lambda: row_chunks(batches, rows),
        n_samples=batches.n_samples,
        device=batches.device,
        dtype=batches.dtype,
        source=batches.source,
        split=batches.split,
    )


def fit_batches(
    model: nn.Module,
    batches: Any,
    engine: str,
    max_memory: int | None,
    *,
    loss_of: Callable[[Any, torch.Tensor, torch.Tensor], Any],
    theta: torch.Tensor | None = None,
    fixed: float = 0.0,
    what: str = "this measure",
) -> tuple[Any, int | None]:
    """``batches`` split to fit ``max_memory`` under ``engine``, and the chunk rows (None:
    no batch needed splitting, as far as the first batch tells)."""
    rows = chunked_rows(
        model, batches, engine, max_memory, loss_of=loss_of, theta=theta, fixed=fixed, what=what
    )
    if rows >= rows_of(batches.first()[0]):
        return batches, None
    return chunked(batches, rows), rows


def plan_rows(
    activations: Activations,
    factor: float,
    budget: int,
    *,
    fixed: float = 0.0,
    what: str = "this measure",
) -> int:
    """The most rows per chunk whose estimate ``fixed + factor · activations`` fits ``budget``.

    Raises:
        FlatcliError: Not even one sample fits.
    """
    room = budget - fixed - factor * activations.fixed
    need_one = factor * activations.per_row
    if room < need_one:
        least = fixed + factor * activations.of(1)
        raise FlatcliError(
            f"--max-memory {format_bytes(budget)} is below what {what} needs for one sample "
            f"(about {format_bytes(least)}); raise --max-memory"
        )
    return max(1, int(room // need_one)) if need_one > 0 else 2**31


def chunked_rows(
    model: nn.Module,
    batches: Any,
    engine: str,
    max_memory: int | None,
    *,
    loss_of: Callable[[Any, torch.Tensor, torch.Tensor], Any],
    theta: torch.Tensor | None = None,
    fixed: float = 0.0,
    what: str = "this measure",
) -> int:
    """Rows per chunk for one of :data:`FACTORS`' engines under ``max_memory``."""
    x, y = batches.first()
    device = y.device
    budget = resolve_max_memory(max_memory, device)
    acts = activation_bytes(loss_of, model, x, y, theta=theta)
    return plan_rows(acts, FACTORS[engine], budget, fixed=fixed, what=what)


# --------------------------------------------------------------------------- time


class Stopwatch:
    """Elapsed time against an optional ``time_budget`` (seconds; None or 0: no limit).

    One stopwatch may be shared by the measures of a run (``flatcli measure``'s
    ``--time-budget`` is the run's total): each measure that takes ``time_budget`` also
    accepts a :class:`Stopwatch` and then spends what is left of it. ``clock`` (default
    ``time.monotonic``) is the time source, replaceable in tests.
    """

    def __init__(
        self, time_budget: float | None = None, *, clock: Callable[[], float] | None = None
    ) -> None:
        if time_budget is not None and not (time_budget >= 0 and math.isfinite(time_budget)):
            raise UsageError(f"time budget must be at least 0 seconds, got {time_budget}")
        self.budget = time_budget or None
        self.now = clock or time.monotonic
        self.start = self.now()
        self.last_tell = -math.inf

    @classmethod
    def of(cls, time_budget: float | Stopwatch | None) -> Stopwatch:
        """``time_budget`` itself when it is a stopwatch (shared), else a new one."""
        return time_budget if isinstance(time_budget, Stopwatch) else cls(time_budget)

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return self.now() - self.start

    @property
    def remaining(self) -> float:
        """Seconds left of the budget (``inf`` without one)."""
        return math.inf if self.budget is None else self.budget - self.elapsed

    def spent(self) -> bool:
        """True once the budget is used up."""
        return self.remaining <= 0

    def due(self, every: float = 1.0) -> bool:
        """True at most once every ``every`` seconds (to throttle progress lines)."""
        now = self.now()
        if now - self.last_tell >= every:
            self.last_tell = now
            return True
        return False


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 5 s`` or ``2 h 10 min``."""
    if not math.isfinite(s):
        return "?"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
