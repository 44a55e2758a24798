"""Datasets and batching.

Every measure consumes a :class:`Batches`: a re-iterable stream of ``(x, y)``
batches already on the right device and dtype. Measures accumulate per-sample
sums over it and never hold all samples at once, so peak memory depends on the
batch size only (and a future ``torch.distributed`` path shards the stream and
all-reduces the sums).

``x`` is a tensor, or a dict of tensors that the model takes as keyword arguments
(``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values``, ...: a Hugging
Face model). A sample is a row of the first dimension: a whole sequence, never a token,
so padded positions are not samples; the model itself keeps them out of its output
through ``attention_mask``, and every measure is a function of that output only.
Labels come under ``y`` or ``labels``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import FlatcliError, UsageError, warn
from .features import ModelInput, batch_len, logits_of
from .io import check_archive_size, check_regular_file, sha256_file
from .untrusted import check_npz, check_tensors

LABEL_KEYS = ("y", "labels")
"""Names labels go by in a dict batch or a data file (flatcli's, Hugging Face's)."""
TEST_SUFFIX = "_test"
"""Suffix of a data file's test-split arrays (``x_test``, ``input_ids_test``, ...)."""

BUNDLED = {"digits": "digits.npz"}
"""Bundled real datasets, by name (UCI handwritten digits, 8×8 images scaled to [0, 1])."""


class MissingSplit(FlatcliError):
    """The data has no such split (no ``x_test``, ...); any other problem with a split that
    is there (NaN, a bad shape) is a plain :class:`~flatcli.errors.FlatcliError`."""


@dataclass(frozen=True)
class Dataset:
    """An in-memory labelled dataset.

    Attributes:
        x: Inputs, first dimension the sample: a tensor, or a dict of tensors passed to
            the model as keyword arguments.
        y: Labels: class indices (int64) or regression targets (float).
        source: Where it came from (a path or a bundled name).
        split: ``"train"`` or ``"test"``.
    """

    x: ModelInput
    y: torch.Tensor
    source: str
    split: str

    def __len__(self) -> int:
        return batch_len(self.x)


class Batches:
    """A re-iterable stream of ``(x, y)`` batches on one device and dtype.

    Args:
        make_iter: Returns a fresh iterator of ``(x, y)`` pairs each time it is called.
        n_samples: Number of samples in one pass, when known up front.
        device: Device the batches are moved to.
        dtype: Floating dtype the inputs (and float targets) are cast to.
        source, split: Provenance for reports.
        batch_size: Rows per batch (the last may be shorter), when known.
        select: ``(lo, hi, size) -> Batches`` of samples ``lo..hi`` in batches of ``size``,
            for data held in memory (:meth:`rows` then slices instead of streaming).
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
        batch_size: int | None = None,
        select: Callable[[int, int, int], Batches] | None = None,
    ) -> None:
        self._make_iter = make_iter
        self.n_samples = n_samples
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self.split = split
        self.batch_size = batch_size
        self._select = select

    def __iter__(self) -> Iterator[tuple[ModelInput, torch.Tensor]]:
        for item in self._make_iter():
            x, y = _unpack(item)
            yield inputs_to(x, self.device, self.dtype), inputs_to(y, self.device, self.dtype)

    def first(self) -> tuple[ModelInput, torch.Tensor]:
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
            batch_size=self.batch_size,
            select=self._select,
        )

    def count(self) -> int:
        """The number of samples: ``n_samples``, or one pass over the stream to count them."""
        if self.n_samples is not None:
            return self.n_samples
        return sum(batch_len(x) for x, _ in self._pairs())

    def rows(self, lo: int, hi: int, batch_size: int | None = None) -> Batches:
        """Samples ``lo..hi`` of the stream (in its order), in batches of ``batch_size``.

        ``batch_size`` defaults to this stream's (or, unknown, the rows of its first
        batch). Data held in memory is sliced; any other stream is read up to sample ``hi``
        and its batches are cut and joined. Used to shard the data by samples
        (:func:`flatcli.distributed.shard`) and to split batches to fit a memory budget.
        """
        if not 0 <= lo <= hi:
            raise ValueError(f"bad sample range {lo}..{hi}")
        size = batch_size or self.batch_size
        if self._select is not None and size is not None:
            return self._select(lo, hi, size).to(self.device, self.dtype)
        if size is None:
            size = batch_len(_unpack(next(iter(self._make_iter())))[0]) if hi > lo else 1
        return Batches(
            lambda: _rebatch(self._pairs(), lo, hi, size),
            n_samples=hi - lo,
            device=self.device,
            dtype=self.dtype,
            source=self.source,
            split=self.split,
            batch_size=size,
        )

    def _pairs(self) -> Iterator[tuple[ModelInput, torch.Tensor]]:
        """The raw ``(x, y)`` pairs, on their own device and dtype."""
        for item in self._make_iter():
            yield _unpack(item)


def _rebatch(
    pairs: Iterable[tuple[ModelInput, torch.Tensor]], lo: int, hi: int, size: int
) -> Iterator[tuple[ModelInput, torch.Tensor]]:
    """Samples ``lo..hi`` of a stream of batches, in batches of ``size`` rows."""
    pending: list[tuple[ModelInput, torch.Tensor]] = []
    have = start = 0
    for x, y in pairs:
        n = batch_len(x)
        a, b = max(lo - start, 0), min(hi - start, n)
        start += n
        if a < b:
            pending.append((take(x, slice(a, b)), y[a:b]))
            have += b - a
            while have >= size:
                x_out, y_out, pending = _split_rows(pending, size)
                have -= size
                yield x_out, y_out
        if start >= hi:
            break
    if have:
        x_out, y_out, _ = _split_rows(pending, have)
        yield x_out, y_out


def _split_rows(
    pieces: list[tuple[ModelInput, torch.Tensor]], size: int
) -> tuple[ModelInput, torch.Tensor, list[tuple[ModelInput, torch.Tensor]]]:
    """The first ``size`` rows of ``pieces`` joined into one batch, and the pieces left."""
    out, rest, need = [], [], size
    for x, y in pieces:
        n = batch_len(x)
        if need >= n:
            out.append((x, y))
        elif need > 0:
            out.append((take(x, slice(0, need)), y[:need]))
            rest.append((take(x, slice(need, n)), y[need:]))
        else:
            rest.append((x, y))
        need -= n
    xs = [x for x, _ in out]
    if isinstance(xs[0], Mapping):
        x_cat: ModelInput = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}  # type: ignore[index]
    else:
        x_cat = torch.cat(xs)  # type: ignore[arg-type]
    return x_cat, torch.cat([y for _, y in out]), rest


def _unpack(item: Any) -> tuple[ModelInput, torch.Tensor]:
    if isinstance(item, Mapping):
        return split_labels(item)
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return as_inputs(item[0]), torch.as_tensor(item[1])
    raise FlatcliError(
        "each batch must be an (x, y) pair or a dict with labels under 'y' or 'labels'"
    )


def split_labels(batch: Mapping[str, Any]) -> tuple[ModelInput, torch.Tensor]:
    """``(inputs, labels)`` of a dict batch.

    Labels are under ``y`` or ``labels``. The inputs are ``x`` when there is one, else
    every other entry, as a dict of keyword arguments for the model.
    """
    found = [k for k in LABEL_KEYS if k in batch]
    if len(found) != 1:
        what = "both 'y' and 'labels'" if found else f"none of {', '.join(batch)}"
        raise FlatcliError(f"a dict batch needs its labels under 'y' or 'labels'; found {what}")
    y = torch.as_tensor(batch[found[0]])
    if "x" in batch:
        return as_inputs(batch["x"]), y
    rest = {k: v for k, v in batch.items() if k != found[0]}
    if not rest:
        raise FlatcliError("a dict batch holds labels but no inputs")
    return as_inputs(rest), y


def as_inputs(x: Any) -> ModelInput:
    """A tensor, or a dict of tensors (model keyword arguments), from arrays or tensors."""
    if isinstance(x, Mapping):
        return {str(k): torch.as_tensor(v) for k, v in x.items()}
    return torch.as_tensor(x)


def inputs_to(x: ModelInput, device: torch.device | str, dtype: torch.dtype) -> ModelInput:
    """Move inputs to ``device``; floating tensors (not ids or masks) also to ``dtype``."""
    if isinstance(x, Mapping):
        return {k: inputs_to(v, device, dtype) for k, v in x.items()}  # type: ignore[misc]
    return x.to(device, dtype if x.is_floating_point() else None)


def take(x: ModelInput, index: slice | torch.Tensor) -> ModelInput:
    """Rows ``index`` of a batch of inputs (every entry of a dict batch alike)."""
    if isinstance(x, Mapping):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def describe_inputs(x: ModelInput) -> str:
    """Per-sample shape(s) of a batch, for messages."""
    if isinstance(x, Mapping):
        return ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in x.items())
    return str(tuple(x.shape[1:]))


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
            arrays (``x`` may be a dict of model keyword arguments), a dict of tensors
            with labels under ``y`` or ``labels``, or any re-iterable of such batches,
            such as a ``DataLoader`` yielding ``(x, y)`` pairs or dicts.
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
        x, y = as_inputs(data[0]), torch.as_tensor(data[1])
        source, split = "<memory>", "train"
    elif isinstance(data, Mapping):
        x, y = split_labels(data)
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
    n = check_same_length(x, y)
    first = next(iter(x.values())) if isinstance(x, Mapping) else x
    if dtype is None:
        values = list(x.values()) if isinstance(x, Mapping) else [x]
        floats = [t for t in values if t.is_floating_point()]
        dtype = floats[0].dtype if floats else torch.float32

    def make_iter() -> Iterator[tuple[ModelInput, torch.Tensor]]:
        for i in range(0, n, batch_size):
            yield take(x, slice(i, i + batch_size)), y[i : i + batch_size]

    def select(lo: int, hi: int, size: int) -> Batches:
        return as_batches(Dataset(take(x, slice(lo, hi)), y[lo:hi], source, split), batch_size=size)

    return Batches(
        make_iter,
        n_samples=n,
        device=device or first.device,
        dtype=dtype,
        source=source,
        split=split,
        batch_size=batch_size,
        select=select,
    )


def check_same_length(x: ModelInput, y: torch.Tensor) -> int:
    """The number of samples, checking that inputs (every entry) and labels agree."""
    entries = list(x.items()) if isinstance(x, Mapping) else [("x", x)]
    if not entries:
        raise FlatcliError("a dict batch holds no inputs")
    if y.ndim == 0:
        raise FlatcliError("labels must hold one value per sample, got a scalar")
    n = int(y.shape[0])
    for name, t in entries:
        n_x = int(t.shape[0]) if t.ndim else 0
        if n_x != n:
            raise FlatcliError(f"{name} has {n_x} samples but y has {n}")
    return n


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
            Instead of ``x`` they may hold named model inputs (``input_ids``,
            ``attention_mask``, ``token_type_ids``, ``pixel_values``, ...), which become a
            dict of keyword arguments, with labels under ``y`` or ``labels``; the test split
            is the same names with the suffix ``_test``.
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
    if "x" not in arrays and "x_test" not in arrays and any(
        k.removesuffix(TEST_SUFFIX) in LABEL_KEYS for k in arrays
    ):
        return _named_inputs(arrays, source, split, max_samples)
    kx, ky = ("x", "y") if split == "train" else ("x_test", "y_test")
    if kx not in arrays or ky not in arrays:
        have = ", ".join(sorted(arrays)) or "nothing"
        raise MissingSplit(
            f"{source} has no {split} split (needs arrays {kx!r} and {ky!r}; found {have})"
        )
    x = _to_tensor(arrays[kx], f"{source}:{kx}", keep_int=True)
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


def _named_inputs(
    arrays: Mapping[str, Any], source: str, split: str, max_samples: int | None
) -> Dataset:
    """A data file of named model inputs (``input_ids``, ...) and ``y``/``labels``."""
    test = split == "test"
    mine = {
        k.removesuffix(TEST_SUFFIX): v
        for k, v in arrays.items()
        if k.endswith(TEST_SUFFIX) == test
    }
    labels = [k for k in LABEL_KEYS if k in mine]
    inputs = {k: _to_tensor(v, f"{source}:{k}") for k, v in mine.items() if k not in LABEL_KEYS}
    if len(labels) != 1 or not inputs:
        suffix = TEST_SUFFIX if test else ""
        have = ", ".join(sorted(arrays)) or "nothing"
        raise MissingSplit(
            f"{source} has no {split} split (needs named inputs and one of "
            f"'y{suffix}', 'labels{suffix}'; found {have})"
        )
    y = _to_tensor(mine[labels[0]], f"{source}:{labels[0]}")
    if y.ndim == 0:
        raise FlatcliError(f"{source}: {labels[0]} must hold one label per sample")
    n = check_same_length(inputs, y)
    if max_samples is not None:
        inputs, y = take(inputs, slice(0, max_samples)), y[:max_samples]  # type: ignore[assignment]
        n = int(y.shape[0])
    if n == 0:
        raise FlatcliError(f"{source}: the {split} split is empty")
    for name, t in [*inputs.items(), (labels[0], y)]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FlatcliError(f"{source}: {name} contains NaN or Inf values")
    return Dataset(x=inputs, y=y, source=source, split=split)


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _to_tensor(a: Any, name: str, *, keep_int: bool = False) -> torch.Tensor:
    """A numeric tensor: floats as float32/64; integers as int64, or (``keep_int``, for
    inputs ``x``) as stored, so that a cast to float can name the stored type."""
    try:
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a, copy=True))
    except (TypeError, ValueError) as e:
        raise FlatcliError(f"{name} is not a numeric array ({e})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise FlatcliError(f"{name} is not a numeric array")
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    if not t.is_floating_point() and not (keep_int and t.dtype in _INTEGERS):
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
            check_npz(path)
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}, str(path)
        if suffix in (".pt", ".pth"):
            check_archive_size(path)
            obj = torch.load(path, map_location="cpu", weights_only=True)
            return _tensor_dict(obj, path), str(path)
        if suffix == ".csv":
            return _read_csv(path, target), str(path)
    except FlatcliError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file to the user
        raise FlatcliError(f"cannot read data file {path}: {_first_line(e)}") from None
    raise FlatcliError(
        f"unsupported data format {suffix or '(none)'} for {path}; use .npz, .pt or .csv"
    )


def _tensor_dict(obj: Any, path: Path) -> dict[str, Any]:
    """The arrays of a ``.pt`` data file: a dict of named tensors, checked before use."""
    if not isinstance(obj, dict):
        raise FlatcliError(f"{path}: expected a dict of tensors with keys x, y")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise FlatcliError(f"{path}: keys must be names (strings), found {type(k).__name__}")
        if not isinstance(v, (torch.Tensor, np.ndarray)):
            raise FlatcliError(f"{path}: {k[:40]!r} is a {type(v).__name__}, not a tensor")
    check_tensors(obj, f"data file {path.name}")
    return dict(obj)


def _read_csv(path: Path, target: str | None) -> dict[str, Any]:
    import pandas as pd

    if target is None:
        raise UsageError(f"{path} is a CSV file: say which column holds the labels with --target")
    df = pd.read_csv(path)
    if df.empty:
        raise FlatcliError(f"{path} has no rows of data (only a header?)")
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
    x: ModelInput, model: nn.Module, input_shape: tuple[int, ...] | None
) -> ModelInput:
    """Reshape inputs to what the model expects, only when that is unambiguous.

    ``input_shape`` (per sample) comes from checkpoint metadata when known. Otherwise the
    first module decides: an ``nn.Linear`` takes flattened inputs; an ``nn.Conv2d`` with
    ``c`` input channels takes ``(c, s, s)`` images when the per-sample size is ``c·s²``.
    Named inputs (a dict) are passed as they are.
    """
    if isinstance(x, Mapping):
        return x
    n = x.shape[0]
    per_sample = math.prod(x.shape[1:])
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    embeds = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())
    if first is not None and not embeds and not x.is_floating_point():
        warn(
            f"the inputs x are {str(x.dtype).removeprefix('torch.')} numbers; they are cast "
            "to the model's floating-point dtype (values unchanged, not rescaled)"
        )
        x = x.float()
    elif not x.is_floating_point() and x.dtype not in (torch.int32, torch.int64):
        x = x.long()  # ids for an embedding
    if input_shape is not None:
        if math.prod(input_shape) != per_sample:
            raise FlatcliError(
                f"data does not fit the model: {per_sample} values per sample, but it "
                f"expects inputs of shape {tuple(input_shape)}"
            )
        shape = tuple(input_shape)
        last = (*shape[1:], shape[0]) if len(shape) == 3 else None
        if x.ndim == 4 and tuple(x.shape[1:]) == last and last != shape:
            raise FlatcliError(  # a reshape would scramble channels-last images silently
                f"data of shape {tuple(x.shape[1:])} per sample look channels-last; the model "
                f"expects images of shape (n, {shape[0]}, H, W) = (n, {', '.join(map(str, shape))})"
                ": store x.transpose(0, 3, 1, 2) (numpy) or x.permute(0, 3, 1, 2) (torch)"
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


def _layout_hint(model: nn.Module, x: ModelInput) -> str:
    """For images whose channels come last, the shape the first ``nn.Conv2d`` expects."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if not isinstance(first, nn.Conv2d) or isinstance(x, Mapping) or x.ndim != 4:
        return ""
    c = first.in_channels
    if x.shape[-1] != c or x.shape[1] == c:
        return ""
    _, h, w, _ = x.shape
    return (
        f". The model expects images of shape (n, {c}, H, W), channels first; these look "
        f"channels-last, (n, {h}, {w}, {c}): store x.transpose(0, 3, 1, 2) (numpy) or "
        "x.permute(0, 3, 1, 2) (torch)"
    )


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
            raw = model(**x) if isinstance(x, Mapping) else model(x)
    except Exception as e:  # noqa: BLE001 - a shape mismatch surfaces as any of several types
        what = "inputs" if isinstance(x, Mapping) else "data of shape"
        raise FlatcliError(
            f"{what} {describe_inputs(x)} per sample does not fit the model: {_first_line(e)}"
            + _layout_hint(model, x)
        ) from None
    out = logits_of(raw)
    if out.ndim != 2:
        raise FlatcliError(
            f"the model must return (batch, outputs) logits; it returned {tuple(out.shape)} "
            "(per-token outputs are not supported: a sample is a whole sequence)"
        )
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
