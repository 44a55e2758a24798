"""Device and dtype choice, and the run manifest every machine-readable output carries."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

from .errors import FlatcliError, UsageError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise FlatcliError(f"--device {spec}: CUDA is not available on this machine")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FlatcliError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return device
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` or ``float64``."""
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


TINY_MODEL_PARAMS = 100_000
"""Below this many parameters a model runs fastest on one thread (thread start-up and
synchronisation cost more than the tiny matrix products gain)."""


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(*, processes: int = 1, params: int | None = None) -> int:
    """Intra-op threads per process when ``--threads`` is not given.

    The cores are split evenly between the ``processes`` that run at once on this machine
    (``--jobs`` workers, or ``torchrun`` ranks per node), so that no core is oversubscribed:
    two processes of two OpenMP threads each on two cores run small models 100× slower.
    A tiny model (under :data:`TINY_MODEL_PARAMS` parameters) gets one thread.
    ``OMP_NUM_THREADS``, when set, is respected as the per-process count.
    """
    if processes < 1:
        raise UsageError(f"processes must be at least 1, got {processes}")
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if params is not None and params < TINY_MODEL_PARAMS:
        return 1
    return max(1, cpu_count() // processes)


def set_threads(threads: int | None, *, processes: int = 1, params: int | None = None) -> int:
    """Set torch's intra-op threads (``threads``, or :func:`default_threads`); return it."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    n = threads if threads is not None else default_threads(processes=processes, params=params)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def manifest(
    *, device: torch.device | str, dtype: torch.dtype | str, seed: int | None, **extra: Any
) -> dict[str, Any]:
    """Versions, device, dtype and seed: enough to reproduce a result."""
    from . import __version__

    device = torch.device(device)
    name = str(device)
    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    return {
        "flatcli": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": sys.platform,
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        **extra,
    }
