"""Checkpoint + data + device, made ready for measuring: what every command starts with."""

from __future__ import annotations

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
    check_fits,
    fit_inputs,
    load_data,
    metadata_data,
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
) -> Prepared:
    """Load a checkpoint and its data, check they fit, and move both to the device.

    ``data`` and ``loss`` default to the checkpoint's metadata (flatcli's own files);
    relative data paths in metadata resolve against the checkpoint's directory.

    Raises:
        FlatcliError: Anything the user can fix: files, names, shapes, labels, NaNs.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    ck = load_checkpoint(checkpoint, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code)
    check_finite(ck.model)
    model = eval_mode(ck.model.to(device=dev, dtype=dt))
    spec = data
    if spec is None and ck.metadata.get("data") is not None:
        spec = metadata_data(ck.metadata["data"], ck.path)
    if spec is None:
        raise UsageError(
            f"{ck.path.name} does not name its data: pass --data FILE (.npz, .pt, "
            ".csv) or a bundled dataset name (digits)"
        )
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
    x = fit_inputs(ds.x, model, ck.input_shape)
    fitted = Dataset(x=x, y=ds.y, source=ds.source, split=ds.split)
    return as_batches(fitted, batch_size=batch_size, device=device, dtype=dtype)
