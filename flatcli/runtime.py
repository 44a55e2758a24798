"""Device and dtype choice, and the run manifest every machine-readable output carries."""

from __future__ import annotations

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
