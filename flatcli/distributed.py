"""Data-parallel measurement and sharded ``correlate`` on ``torch.distributed``.

flatcli does not launch processes itself: ``torchrun`` does, and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``::

    torchrun --nproc-per-node 4 -m flatcli measure model.pt --data train.npz
    torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint HOST:29500 \\
        --nproc-per-node 8 -m flatcli correlate runs/*.pt

:func:`init` joins the process group when launched that way (backend ``gloo`` on CPU,
``nccl`` on CUDA, each rank on ``cuda:LOCAL_RANK``) and does nothing otherwise.

``measure`` shards the *data* by samples: :func:`shard` gives each rank an even share of
the samples (the shares differ by at most one), which the rank batches itself. Every
measure accumulates per-sample sums over its batches and calls :func:`sum_over_shards` on
them before dividing by ``n``; that is an ``all_reduce`` for a :class:`ShardedBatches` stream and
the identity for any other, so library calls on ordinary data never communicate. Random
probes and perturbations are drawn from the same seed on every rank, so each rank sees
the same probes on its part of the data and the reduced result is the single-process
one (up to the order of floating-point additions).

``correlate`` shards the *checkpoints*: rank ``r`` measures every ``world``-th one and
rank 0 gathers the rows (:func:`gather`) and writes the outputs.

A rank that raises exits non-zero and ``torchrun`` stops the others; a rank that hangs
is caught by the collective timeout (``FLATCLI_DIST_TIMEOUT`` seconds, default 1800).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import torch

from .data import Batches
from .errors import FlatcliError, UsageError

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_S = 1800


def launched() -> bool:
    """True when started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when the process group is initialized with more than one rank."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return torch.distributed.get_world_size() if active() else 1


def local_world_size() -> int:
    """Ranks on this machine (``LOCAL_WORLD_SIZE`` under torchrun, else 1)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if active() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes output (always True when not distributed)."""
    return rank() == 0


def backend() -> str | None:
    """The process group's backend, or None when not distributed."""
    return str(torch.distributed.get_backend()) if active() else None


def info() -> dict[str, Any]:
    """``world_size`` and ``backend``, for the run manifest."""
    return {"world_size": world_size(), "backend": backend()}


def init(device: str = "auto", backend_name: str = "auto") -> str:
    """Join the ``torchrun`` process group, if launched by it; return the device to use.

    Args:
        device: The ``--device`` option. With ``auto`` or ``cuda`` under ``torchrun``,
            each rank takes ``cuda:LOCAL_RANK``.
        backend_name: ``auto`` (``nccl`` for CUDA, else ``gloo``), ``gloo`` or ``nccl``.

    Returns:
        ``device``, or each rank's own CUDA device.
    """
    if backend_name not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend_name!r}")
    if not launched() or active():
        return device
    if not torch.distributed.is_available():
        raise FlatcliError("torchrun started several processes but torch.distributed is missing")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device.startswith("cuda"):
        cuda = True
    if cuda:
        device = f"cuda:{local % max(torch.cuda.device_count(), 1)}"
        torch.cuda.set_device(torch.device(device))
    chosen = backend_name if backend_name != "auto" else ("nccl" if cuda else "gloo")
    if chosen == "nccl" and not cuda:
        raise UsageError("--backend nccl needs CUDA devices; use gloo on CPU")
    timeout = datetime.timedelta(seconds=_timeout_s())
    torch.distributed.init_process_group(chosen, timeout=timeout)
    return device if cuda or device != "auto" else "cpu"


def shutdown(*, barrier: bool = True) -> None:
    """Leave the process group (when in one).

    Args:
        barrier: First wait until every rank has got here (a command that finished). Without
            it, a rank could tear down its gloo connections (or rank 0 its rendezvous store)
            while another still uses them, which aborts that process at exit. A failed rank
            leaves without waiting: torchrun then stops the others.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if barrier:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _timeout_s() -> float:
    raw = os.environ.get("FLATCLI_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"FLATCLI_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise UsageError(f"FLATCLI_DIST_TIMEOUT must be positive, got {raw!r}")
    return value


# --------------------------------------------------------------------------- data


class ShardedBatches(Batches):
    """This rank's share of a data stream: an even split of its *samples*.

    Rank ``r`` of ``world`` takes samples ``⌊r·n/world⌋ .. ⌊(r+1)·n/world⌋`` (the shares
    differ by at most one sample) and batches them itself, in batches of ``batch_size``
    (default: the stream's own). In-memory data is sliced; any other stream is read up to
    the end of the rank's share. ``n_samples`` and :meth:`first` are those of the whole
    stream (for reports, shape checks and memory plans, which then agree on every rank);
    measures count their own samples and reduce the count.

    Attributes:
        inner: The whole stream.
        rank, world: This rank and the number of ranks.
        lo, hi: This rank's samples.
    """

    def __init__(
        self, inner: Batches, rank: int, world: int, *, batch_size: int | None = None
    ) -> None:
        n = inner.count()
        self.lo, self.hi = rank * n // world, (rank + 1) * n // world
        mine = inner.rows(self.lo, self.hi, batch_size)
        super().__init__(
            mine._make_iter,
            n_samples=n,
            device=inner.device,
            dtype=inner.dtype,
            source=inner.source,
            split=inner.split,
            batch_size=mine.batch_size,
        )
        self.inner, self.rank, self.world = inner, rank, world

    @property
    def local_samples(self) -> int:
        """The number of samples this rank holds."""
        return self.hi - self.lo

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch of the whole stream."""
        return self.inner.first()

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Batches:
        """The same shard on another device or dtype."""
        return ShardedBatches(
            self.inner.to(device, dtype), self.rank, self.world, batch_size=self.batch_size
        )

    def rebatched(self, batch_size: int) -> ShardedBatches:
        """The same samples in batches of ``batch_size`` rows (still reduced over the ranks)."""
        return ShardedBatches(self.inner, self.rank, self.world, batch_size=batch_size)


def shard(batches: Batches) -> Batches:
    """This rank's share of the samples of ``batches`` (``batches`` itself when not
    distributed): see :class:`ShardedBatches`.

    Raises:
        UsageError: On every rank, when there are fewer samples than ranks.
    """
    if not active():
        return batches
    n = batches.count()
    if n < world_size():
        raise UsageError(
            f"{world_size()} ranks but only {n} sample(s) of data: use fewer processes"
        )
    return ShardedBatches(batches, rank(), world_size())


def local_samples(batches: Any) -> int | None:
    """The number of samples this process holds of ``batches`` (None when unknown)."""
    if isinstance(batches, ShardedBatches):
        return batches.local_samples
    return getattr(batches, "n_samples", None)


def sum_over_shards(batches: Any, value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the ranks when ``batches`` is sharded, else ``value`` itself.

    The sum runs in float64 on the backend's device and comes back on ``value``'s device
    in float64 (sums of per-sample quantities are kept in float64 throughout flatcli).
    """
    if not isinstance(batches, ShardedBatches):
        return value
    comm = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else "cpu"
    buf = value.detach().to(comm, torch.float64).clone()
    torch.distributed.all_reduce(buf)
    return buf.to(value.device)


def sum_floats(batches: Any, *values: float) -> list[float]:
    """Python numbers summed over the ranks when ``batches`` is sharded."""
    if not isinstance(batches, ShardedBatches):
        return list(values)
    return sum_over_shards(batches, torch.tensor(values, dtype=torch.float64)).tolist()


def all_ranks(batches: Any, flag: bool) -> bool:
    """``flag`` on every rank (one all-reduce) when ``batches`` is sharded, else ``flag``."""
    if not isinstance(batches, ShardedBatches):
        return flag
    return sum_floats(batches, float(not flag))[0] == 0


def gather(obj: Any) -> list[Any]:
    """Every rank's JSON-serializable ``obj``, in rank order (``[obj]`` when not distributed).

    Sent as JSON text (not pickled), over the process group's device.
    """
    if not active():
        return [obj]
    comm = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else "cpu"
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=comm)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=comm)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, size)
    longest = int(max(int(t) for t in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=comm)
    padded[: data.numel()] = data
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    torch.distributed.all_gather(parts, padded)
    return [
        json.loads(bytes(p[: int(k)].cpu().tolist()).decode())
        for p, k in zip(parts, sizes, strict=True)
    ]
