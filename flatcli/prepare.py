"""Checkpoint + data + device, made ready for measuring: what every command starts with."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import Checkpoint, check_finite, eval_mode, load_checkpoint
from .data import (
    Batches,
    Dataset,
    MissingSplit,
    as_batches,
    as_inputs,
    check_fits,
    check_same_length,
    fit_inputs,
    load_data,
    metadata_data,
    split_labels,
)
from .errors import UsageError
from .losses import check_loss
from .runtime import resolve_device, resolve_dtype


@dataclass(frozen=True)
class Prepared:
    """A loaded model on its device and dtype, with its data as batches.

    Attributes:
        checkpoint: The loaded checkpoint (path, sha256, metadata).
        model: The model on ``device`` in ``dtype``, eval mode.
        batches: The chosen split as a stream of batches.
        loss: The loss the measures use.
        data_spec: The dataset name or path the data came from.
        device: Where everything runs.
        dtype: Floating dtype of model and data.
    """

    checkpoint: Checkpoint
    model: nn.Module
    batches: Batches
    loss: str
    data_spec: str
    device: torch.device
    dtype: torch.dtype
    target: str | None = None
    max_samples: int | None = None
    batch_size: int = 256

    def split(self, split: str) -> Batches:
        """Another split (``train``/``test``) of the same data, prepared the same way, with
        its labels checked against the model's outputs."""
        batches = self._split(split)
        check_fits(self.model, batches, loss=self.loss)
        return batches

    def _split(self, split: str) -> Batches:
        return _batches(
            self.checkpoint,
            self.model,
            self.data_spec,
            split=split,
            target=self.target,
            max_samples=self.max_samples,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self.dtype,
        )

    def has_split(self, split: str) -> bool:
        """Whether the data has ``split``."""
        try:
            self._split(split)
        except MissingSplit:  # any other problem with the split is the user's to see
            return False
        return True


def parse_json_object(text: str | None, option: str) -> dict[str, Any] | None:
    """Parse a JSON object given on the command line (``--arch-kwargs``)."""
    if text is None:
        return None
    from .untrusted import parse_json

    value = parse_json(text, option, error=UsageError)
    if not isinstance(value, Mapping):
        raise UsageError(f"{option} must be a JSON object like '{{\"width\": 64}}'")
    return dict(value)


def prepare(
    checkpoint: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_code: bool = False,
    data: str | None = None,
    split: str = "train",
    target: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    dtype: str = "float32",
    loss: str | None = None,
    layer: str | None = None,
) -> Prepared:
    """Load a checkpoint and its data, check they fit, and move both to the device.

    ``data`` and ``loss`` default to the checkpoint's metadata (flatcli's own files);
    relative data paths in metadata resolve against the checkpoint's directory. A
    ``layer`` is checked against the weight names first (:func:`check_layer_name`), before
    the model is built.

    Raises:
        FlatcliError: Anything the user can fix: files, names, shapes, labels, NaNs, a
            Hugging Face encoder without a head.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if layer is not None:
        check_layer_name(checkpoint, layer)
    ck = load_checkpoint(checkpoint, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code)
    from .hf import check_has_head

    check_has_head(ck.model, ck.path)
    check_finite(ck.model)
    model = eval_mode(ck.model.to(device=dev, dtype=dt))
    spec, _ = data_source(ck, data)
    loss_name = check_loss(loss or ck.metadata.get("loss") or "cross_entropy")
    batches = _batches(
        ck,
        model,
        spec,
        split=split,
        target=target,
        max_samples=max_samples,
        batch_size=batch_size,
        device=dev,
        dtype=dt,
    )
    check_fits(model, batches, loss=loss_name)
    return Prepared(
        checkpoint=ck,
        model=model,
        batches=batches,
        loss=loss_name,
        data_spec=spec,
        device=dev,
        dtype=dt,
        target=target,
        max_samples=max_samples,
        batch_size=batch_size,
    )


_WRAPPERS = ("module.", "_orig_mod.")  # prefixes the loader removes (DataParallel, compile)


def weight_names(checkpoint: str | Path) -> list[str] | None:
    """The tensor names a checkpoint stores, read from safetensors headers without loading
    a tensor: a ``.safetensors`` file, or a Hugging Face folder's ``model.safetensors`` (or
    its index). None for other formats, or when the files cannot be read (the load that
    follows says why)."""
    from safetensors import safe_open

    from .hf import config_path, read_config
    from .io import file_in_folder

    path = Path(checkpoint).expanduser()
    config = config_path(path)
    try:
        if config is not None:
            index = config.parent / "model.safetensors.index.json"
            if index.is_file():
                return [str(k) for k in read_config(index)["weight_map"]]
            path = file_in_folder(config.parent, "model.safetensors", "weights")
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())  # noqa: SIM118 - safe_open API
    except Exception:  # noqa: BLE001 - the full load reports a bad file in its own words
        return None
    for prefix in _WRAPPERS:
        names = [n.removeprefix(prefix) for n in names]
    return names


def check_layer_name(checkpoint: str | Path, layer: str) -> None:
    """Refuse ``--layer`` before the model is built when the weight names show it is wrong.

    A name is accepted when a module path of the weights is ``layer``, also up to a first
    component that a Hugging Face class adds or drops (``bert.``). A module whose weights
    are all inside it (``bert.pooler``) is refused with those parts suggested. An unknown
    name is refused when a weight-owning module has a close name; otherwise (a tied
    weight, stored once, has no name of its own) the loaded model decides.
    """
    names = weight_names(checkpoint)
    if not names:
        return
    from .features import parts_with_weight

    modules = {n.rsplit(".", 1)[0] for n in names if "." in n}
    paths = {p for m in modules for p in _prefixes(m)}
    rest = layer.split(".", 1)[1] if "." in layer else None
    match = next(
        (p for p in sorted(paths) if p == layer or p == rest or p.endswith(f".{layer}")), None
    )
    where = Path(checkpoint).name
    if match is not None:
        inside = [layer + n[len(match) :] for n in names if n.startswith(f"{match}.")]
        if f"{match}.weight" not in names and (parts := parts_with_weight(layer, inside)):
            raise UsageError(f"layer {layer!r} has no weight in {where}{parts}")
        return
    owners = sorted(n.removesuffix(".weight") for n in names if n.endswith(".weight"))
    close = difflib.get_close_matches(layer, owners, n=3, cutoff=0.5)
    if close:
        raise UsageError(
            f"no layer with a weight named {layer!r} in {where}; did you mean {', '.join(close)}?"
        )


def _prefixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _batches(
    ck: Checkpoint,
    model: nn.Module,
    spec: str,
    *,
    split: str,
    target: str | None,
    max_samples: int | None,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Batches:
    ds = load_data(
        spec, split=split, target=target, max_samples=max_samples, base_dir=ck.path.parent
    )
    fitted = fit_dataset(ds, model, ck)
    return as_batches(fitted, batch_size=batch_size, device=device, dtype=dtype)


DataLike = str | Dataset | tuple[torch.Tensor, torch.Tensor]
"""Data as the library takes it: a bundled name or a file, a dataset, or an ``(x, y)`` pair."""


def data_source(ck: Checkpoint, data: str | None) -> tuple[str, str]:
    """The data to load, and the name to record: ``data``, else the checkpoint's ``data``
    metadata (loaded relative to the checkpoint's folder, recorded as written).

    Raises:
        UsageError: Neither names any data.
    """
    if data is not None:
        return data, data
    named = ck.metadata.get("data")
    if named is None:
        raise UsageError(
            f"{ck.path.name} does not name its data: pass --data FILE (.npz, .pt, "
            ".csv) or a bundled dataset name (digits)"
        )
    return (metadata_data(named, ck.path) if ck.sha256 else named), named


def training_data(
    ck: Checkpoint,
    model: nn.Module,
    data: DataLike | None,
    test_data: DataLike | None = None,
    *,
    target: str | None = None,
    max_samples: int | None = None,
) -> tuple[str | None, Dataset, Dataset | None]:
    """The training set and the test set, whole, with inputs shaped for ``model``.

    ``data`` defaults to the checkpoint's metadata (:func:`data_source`). The test set is
    ``test_data``, else the ``test`` split of a named ``data``, when it has one.

    Returns:
        The recorded data name (None for data given as tensors), the training set and the
        test set (or None).
    """
    spec: str | None = None
    base = ck.path.parent if ck.sha256 else None  # an in-memory module has no folder
    if data is None or isinstance(data, str):
        data, spec = data_source(ck, data)
    test: Dataset | None = None
    if isinstance(data, str):
        train = load_data(data, target=target, max_samples=max_samples, base_dir=base)
        if test_data is None:
            with contextlib.suppress(MissingSplit):
                test = load_data(
                    data, split="test", target=target, max_samples=max_samples, base_dir=base
                )
    else:
        train = as_dataset(data, "train")
    if test_data is not None:
        test = (
            load_data(test_data, split="test", target=target, base_dir=base)
            if isinstance(test_data, str)
            else as_dataset(test_data, "test")
        )
    train = fit_dataset(train, model, ck)
    return spec, train, None if test is None else fit_dataset(test, model, ck)


def as_dataset(data: Any, split: str) -> Dataset:
    """A :class:`~flatcli.data.Dataset` from one, a ``{"x": …, "y": …}`` mapping or an
    ``(x, y)`` pair."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Mapping):
        x, y = split_labels(data)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = as_inputs(data[0]), torch.as_tensor(data[1])
    else:
        x = None
    if x is not None:
        check_same_length(x, y)
        return Dataset(x=x, y=y, source="<memory>", split=split)
    raise UsageError(f"cannot use {type(data).__name__} as data; pass a name, a file or (x, y)")


def fit_dataset(ds: Dataset, model: nn.Module, ck: Checkpoint) -> Dataset:
    """``ds`` with its inputs shaped for ``model`` (:func:`~flatcli.data.fit_inputs`)."""
    return Dataset(fit_inputs(ds.x, model, ck.input_shape), ds.y, ds.source, ds.split)
