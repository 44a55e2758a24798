"""Data-parallel measurement and sharded ``correlate`` on ``torch.distributed``.

flatcli does not launch processes itself: ``torchrun`` does, and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``::

    torchrun --nproc-per-node 4 -m flatcli measure model.pt --data train.npz
    torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint HOST:29500 \\
        --nproc-per-node 8 -m flatcli correlate runs/*.pt

:func:`init` joins the process group when launched that way (backend ``gloo`` on CPU,
``nccl`` on CUDA, each rank on ``cuda:LOCAL_RANK``) and does nothing otherwise.

``measure`` shards the *data*: :func:`shard` gives each rank every ``world``-th batch
(the batches themselves are the single-process ones). Every measure accumulates
per-sample sums over its batches and calls :func:`sum_over_shards` on them before
dividing by ``n``; that is an ``all_reduce`` for a :class:`ShardedBatches` stream and
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
from collections.abc import Iterator
from itertools import islice
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
    """This rank's share of a batch stream: batches ``rank, rank + world, ...``.

    ``n_samples`` and :meth:`first` are those of the whole stream (for reports and for
    shape checks); measures count their own samples and reduce the count.
    """

    def __init__(self, inner: Batches, rank: int, world: int) -> None:
        def make_iter() -> Iterator[Any]:
            return islice(inner._make_iter(), rank, None, world)

        super().__init__(
            make_iter,
            n_samples=inner.n_samples,
            device=inner.device,
            dtype=inner.dtype,
            source=inner.source,
            split=inner.split,
        )
        self.inner, self.rank, self.world = inner, rank, world

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch of the whole stream."""
        return self.inner.first()

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Batches:
        """The same shard on another device or dtype."""
        return ShardedBatches(self.inner.to(device, dtype), self.rank, self.world)


def shard(batches: Batches) -> Batches:
    """This rank's share of ``batches`` (``batches`` itself when not distributed).

    Raises:
        UsageError: On every rank, when some rank's share is empty (fewer batches than
            ranks).
    """
    if not active():
        return batches
    out = ShardedBatches(batches, rank(), world_size())
    has = float(next(iter(out._make_iter()), None) is not None)
    empty = world_size() - int(sum_floats(out, has)[0])
    if empty:
        raise UsageError(
            f"{world_size()} ranks but only {world_size() - empty} batch(es) of data: "
            "use a smaller --batch-size or fewer processes"
        )
    return out


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
