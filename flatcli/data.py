"""Datasets and batching.

Every measure consumes a :class:`Batches`: a re-iterable stream of ``(x, y)``
batches already on the right device and dtype. Measures accumulate per-sample
sums over it and never hold all samples at once, so peak memory depends on the
batch size only (and a future ``torch.distributed`` path shards the stream and
all-reduces the sums).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import FlatcliError, UsageError, warn
from .io import check_archive_size, check_regular_file, sha256_file

BUNDLED = {"digits": "digits.npz"}
"""Bundled real datasets, by name (UCI handwritten digits, 8×8 images scaled to [0, 1])."""


@dataclass(frozen=True)
class Dataset:
    """An in-memory labelled dataset.

    Attributes:
        x: Inputs, first dimension the sample.
        y: Labels: class indices (int64) or regression targets (float).
        source: Where it came from (a path or a bundled name).
        split: ``"train"`` or ``"test"``.
    """

    x: torch.Tensor
    y: torch.Tensor
    source: str
    split: str

    def __len__(self) -> int:
        return int(self.x.shape[0])


class Batches:
    """A re-iterable stream of ``(x, y)`` batches on one device and dtype.

    Args:
        make_iter: Returns a fresh iterator of ``(x, y)`` pairs each time it is called.
        n_samples: Number of samples in one pass, when known up front.
        device: Device the batches are moved to.
        dtype: Floating dtype the inputs (and float targets) are cast to.
        source, split: Provenance for reports.
    """

    def __init__(
        self,
        make_iter: Callable[[], Iterable[Any]],
        *,
        n_samples: int | None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str = "<memory>",
        split: str = "train",
    ) -> None:
        self._make_iter = make_iter
        self.n_samples = n_samples
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self.split = split

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for item in self._make_iter():
            x, y = _unpack(item)
            x = x.to(self.device, self.dtype if x.is_floating_point() else None)
            y = y.to(self.device, self.dtype if y.is_floating_point() else None)
            yield x, y

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch (raises a clear error on an empty stream)."""
        for xy in self:
            return xy
        raise FlatcliError("the dataset is empty")

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Batches:
        """The same stream on another device or dtype."""
        return Batches(
            self._make_iter,
            n_samples=self.n_samples,
            device=self.device if device is None else device,
            dtype=self.dtype if dtype is None else dtype,
            source=self.source,
            split=self.split,
        )


def _unpack(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, dict):
        return torch.as_tensor(item["x"]), torch.as_tensor(item["y"])
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return torch.as_tensor(item[0]), torch.as_tensor(item[1])
    raise FlatcliError("each batch must be an (x, y) pair")


def as_batches(
    data: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Batches:
    """Turn what a user has into :class:`Batches`.

    Args:
        data: A :class:`Batches`, a :class:`Dataset`, an ``(x, y)`` pair of tensors or
            arrays, or any re-iterable of ``(x, y)`` batches such as a ``DataLoader``.
        batch_size: Batch size when ``data`` holds all samples in memory.
        device: Device for the batches (default: where the tensors are, else CPU).
        dtype: Floating dtype (default: float32, or the tensors' own floating dtype).
    """
    if isinstance(data, Batches):
        return data.to(device, dtype)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if isinstance(data, Dataset):
        x, y, source, split = data.x, data.y, data.source, data.split
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
        source, split = "<memory>", "train"
    elif isinstance(data, Iterable):
        n = _len_or_none(data)
        return Batches(
            lambda: data,
            n_samples=n,
            device=device or "cpu",
            dtype=dtype or torch.float32,
            source=type(data).__name__,
        )
    else:
        raise UsageError(f"cannot use {type(data).__name__} as data; pass (x, y) or a DataLoader")
    if x.shape[0] != y.shape[0]:
        raise FlatcliError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.float32
    n = int(x.shape[0])

    def make_iter() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, n, batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]

    return Batches(
        make_iter, n_samples=n, device=device or x.device, dtype=dtype, source=source, split=split
    )


def _len_or_none(data: Iterable[Any]) -> int | None:
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


# --------------------------------------------------------------------------- loading


def load_data(
    spec: str,
    *,
    split: str = "train",
    target: str | None = None,
    max_samples: int | None = None,
    base_dir: Path | None = None,
) -> Dataset:
    """Load a dataset from a bundled name, ``.npz``, ``.pt`` or ``.csv`` file.

    Args:
        spec: A bundled name (``digits``) or a path. ``.npz`` and ``.pt`` hold ``x``, ``y``
            and optionally ``x_test``, ``y_test``; ``.pt`` is loaded with ``weights_only=True``.
            ``.csv`` needs ``target``, the label column; the other columns are the inputs.
        split: ``train`` or ``test``.
        target: Label column of a CSV file.
        max_samples: Keep only the first N samples.
        base_dir: Directory relative paths are resolved against (e.g. a checkpoint's).

    Raises:
        FlatcliError: Missing or unreadable file, missing arrays, empty data, NaN/Inf.
    """
    if split not in ("train", "test"):
        raise UsageError(f"--split must be train or test, got {split!r}")
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"--max-samples must be at least 1, got {max_samples}")
    arrays, source = _read_arrays(spec, target=target, base_dir=base_dir)
    kx, ky = ("x", "y") if split == "train" else ("x_test", "y_test")
    if kx not in arrays or ky not in arrays:
        have = ", ".join(sorted(arrays)) or "nothing"
        raise FlatcliError(
            f"{source} has no {split} split (needs arrays {kx!r} and {ky!r}; found {have})"
        )
    x = _to_tensor(arrays[kx], f"{source}:{kx}")
    y = _to_tensor(arrays[ky], f"{source}:{ky}")
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise FlatcliError(
            f"{source}: {kx} has shape {tuple(x.shape)} but {ky} has shape "
            f"{tuple(y.shape)}; they need the same number of samples"
        )
    if max_samples is not None:
        x, y = x[:max_samples], y[:max_samples]
    if x.shape[0] == 0:
        raise FlatcliError(f"{source}: the {split} split is empty")
    for name, t in ((kx, x), (ky, y)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FlatcliError(f"{source}: {name} contains NaN or Inf values")
    return Dataset(x=x, y=y, source=source, split=split)


def _to_tensor(a: Any, name: str) -> torch.Tensor:
    try:
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a, copy=True))
    except (TypeError, ValueError) as e:
        raise FlatcliError(f"{name} is not a numeric array ({e})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise FlatcliError(f"{name} is not a numeric array")
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    if not t.is_floating_point():
        t = t.long()
    return t


def _read_arrays(
    spec: str, *, target: str | None, base_dir: Path | None
) -> tuple[dict[str, Any], str]:
    if spec in BUNDLED:
        ref = resources.files("flatcli") / "_bundled" / BUNDLED[spec]
        with resources.as_file(ref) as p, np.load(p) as z:
            return {k: z[k] for k in z.files}, spec
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    if not path.exists():
        names = ", ".join(BUNDLED)
        raise FlatcliError(f"data file not found: {spec} (bundled datasets: {names})")
    check_regular_file(path, "data file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}, str(path)
        if suffix in (".pt", ".pth"):
            check_archive_size(path)
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise FlatcliError(f"{path}: expected a dict of tensors with keys x, y")
            return dict(obj), str(path)
        if suffix == ".csv":
            return _read_csv(path, target), str(path)
    except FlatcliError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file to the user
        raise FlatcliError(f"cannot read data file {path}: {_first_line(e)}") from None
    raise FlatcliError(
        f"unsupported data format {suffix or '(none)'} for {path}; use .npz, .pt or .csv"
    )


def _read_csv(path: Path, target: str | None) -> dict[str, Any]:
    import pandas as pd

    if target is None:
        raise UsageError(f"{path} is a CSV file: say which column holds the labels with --target")
    df = pd.read_csv(path)
    if target not in df.columns:
        raise FlatcliError(f"{path} has no column {target!r}; columns: {', '.join(df.columns)}")
    features = df.drop(columns=[target])
    non_numeric = [
        str(c)
        for c in features.columns
        if not pd.api.types.is_numeric_dtype(features[c]) or pd.api.types.is_bool_dtype(features[c])
    ]
    if non_numeric:
        raise FlatcliError(
            f"{path}: non-numeric input column(s) {', '.join(non_numeric)}; "
            "encode them as numbers or drop them"
        )
    y = df[target].to_numpy()
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    return {"x": features.to_numpy(dtype=np.float32), "y": y}


def metadata_data(spec: str, checkpoint: Path) -> str:
    """The data a checkpoint's ``flatcli.data`` metadata may name: a bundled set, or a plain
    file name resolved in the checkpoint's own folder (never a path: anything else must be
    the user's ``--data``).

    Returns:
        The bundled name, or the path of the file next to ``checkpoint``.

    Raises:
        FlatcliError: The metadata names a path or an unusable name.
    """
    if spec in BUNDLED:
        return spec
    plain = (
        spec not in ("", ".", "..")
        and not any(c in spec for c in "/\\:")
        and not spec.startswith("~")
        and spec.isprintable()
    )
    if not plain:
        shown = repr(spec if len(spec) <= 40 else spec[:40] + "…")
        raise FlatcliError(
            f"{checkpoint.name} names its data as {shown}; a checkpoint may only name a "
            f"bundled dataset ({', '.join(BUNDLED)}) or a file in its own folder: pass --data"
        )
    return str(checkpoint.parent / spec)


def data_sha256(spec: str, *, base_dir: Path | None = None) -> str:
    """Hex sha256 of the file a data spec names (a bundled set: of its bundled file).

    It identifies the data's content in cache keys, manifests and resume state files.
    """
    if spec in BUNDLED:
        ref = resources.files("flatcli") / "_bundled" / BUNDLED[spec]
        with resources.as_file(ref) as p:
            return sha256_file(p)
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    return sha256_file(check_regular_file(path, "data file"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --------------------------------------------------------------------------- fitting to a model


def fit_inputs(
    x: torch.Tensor, model: nn.Module, input_shape: tuple[int, ...] | None
) -> torch.Tensor:
    """Reshape inputs to what the model expects, only when that is unambiguous.

    ``input_shape`` (per sample) comes from checkpoint metadata when known. Otherwise the
    first module decides: an ``nn.Linear`` takes flattened inputs; an ``nn.Conv2d`` with
    ``c`` input channels takes ``(c, s, s)`` images when the per-sample size is ``c·s²``.
    """
    n = x.shape[0]
    per_sample = math.prod(x.shape[1:])
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if first is not None and not x.is_floating_point():
        warn(
            f"the inputs x are {str(x.dtype).removeprefix('torch.')} numbers; they are cast "
            "to the model's floating-point dtype (values unchanged, not rescaled)"
        )
        x = x.float()
    if input_shape is not None:
        if math.prod(input_shape) != per_sample:
            raise FlatcliError(
                f"data does not fit the model: {per_sample} values per sample, but it "
                f"expects inputs of shape {tuple(input_shape)}"
            )
        return x.reshape(n, *input_shape)
    if isinstance(first, nn.Linear) and x.ndim > 2 and per_sample == first.in_features:
        return x.reshape(n, per_sample)
    if isinstance(first, nn.Conv2d) and x.ndim == 2:
        c = first.in_channels
        side = math.isqrt(per_sample // c) if per_sample % c == 0 else 0
        if side > 0 and c * side * side == per_sample:
            return x.reshape(n, c, side, side)
    return x


def check_fits(model: nn.Module, batches: Batches, *, loss: str) -> int:
    """Run the model on the first batch and check outputs and labels fit.

    Returns:
        The model's output dimension.

    Raises:
        FlatcliError: The forward pass fails, the output is not ``(n, d)``, labels are
            out of range for cross-entropy, or the output is not finite.
    """
    x, y = batches.first()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - a shape mismatch surfaces as any of several types
        raise FlatcliError(
            f"data of shape {tuple(x.shape[1:])} per sample does not fit the "
            f"model: {_first_line(e)}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FlatcliError(f"the model must return (batch, outputs) logits; it returned {shape}")
    d = int(out.shape[1])
    if loss == "cross_entropy":
        if y.is_floating_point() or y.ndim != 1:
            raise FlatcliError(
                "cross-entropy needs integer class labels of shape (n,); "
                "use --loss mse for regression targets"
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= d:
            raise FlatcliError(f"labels range over [{lo}, {hi}] but the model has {d} outputs")
    elif y.is_floating_point() and y.reshape(y.shape[0], -1).shape[1] != d:
        raise FlatcliError(
            f"regression targets have {y.reshape(y.shape[0], -1).shape[1]} "
            f"values per sample but the model has {d} outputs"
        )
    elif not y.is_floating_point() and (int(y.min()) < 0 or int(y.max()) >= d):
        raise FlatcliError(
            f"labels range over [{int(y.min())}, {int(y.max())}] but the model has {d} outputs"
        )
    if not torch.isfinite(out).all():
        raise FlatcliError("the model's output contains NaN or Inf on this data")
    check_labels(batches, d)
    return d


def check_labels(data: Batches | torch.Tensor, classes: int) -> None:
    """Check every integer label lies in ``[0, classes)``, over the whole data.

    Cross-entropy would silently ignore a label of -100 (and fail on other out-of-range
    labels at an arbitrary batch), so all labels are checked once, up front. Floating-point
    (regression) targets are not labels and pass.

    Args:
        data: All labels as one tensor, or the batches (whose labels are read in order).
        classes: The model's number of outputs.

    Raises:
        FlatcliError: The first label out of range, with its sample index.
    """
    chunks = (data,) if isinstance(data, torch.Tensor) else (y for _, y in data)
    offset = 0
    for y in chunks:
        if y.is_floating_point():
            return
        per_sample = max(y[0].numel(), 1) if y.ndim > 1 and y.shape[0] else 1
        flat = y.reshape(-1)
        bad = (flat < 0) | (flat >= classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            source = data.source if isinstance(data, Batches) else "data"
            raise FlatcliError(
                f"{source}: label {int(flat[i])} of sample {offset + i // per_sample} is outside "
                f"[0, {classes}) for a model with {classes} outputs"
            )
        offset += int(y.shape[0])
