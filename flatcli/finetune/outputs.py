"""What a fine-tuning run writes, each file atomically, and the checks that run before any
training: every output can be written, none is an input, no two are the same file.

* ``out_path``: a flatcli safetensors checkpoint (a ``save_pretrained`` folder for a
  Hugging Face model). Its metadata gives the architecture, the data, the hyperparameters
  including λ, and the parent checkpoint's sha256.
* ``log_path``: the per-epoch CSV log, with its manifest beside it
  (:data:`~flatcli.finetune_report.LOG_SCHEMA`).
* ``plot_path``: a PNG of the curves from epoch 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import Checkpoint, save_checkpoint
from ..data import metadata_data
from ..errors import FlatcliError, UsageError
from ..finetune_report import EpochRecord, plot_history, write_log, write_log_manifest
from ..io import check_distinct, check_output, is_stream, sha256_file
from ..measures.estimate import Estimate
from ..untrusted import parse_json
from .state import default_state_path, estimates_dict


def check_outputs(
    out_path: str | Path | None,
    log_path: str | Path | None,
    plot_path: str | Path | None,
    state_path: str | Path | None,
    *,
    folder: bool,
) -> None:
    """Check every output can be written before any training (not after it). ``folder``:
    the model is saved as a Hugging Face folder, not a file."""
    if out_path is not None and folder:
        out = Path(out_path)
        if out.suffix in (".safetensors", ".pt", ".pth"):
            raise UsageError(
                f"a Hugging Face model is saved as a folder: pass --out DIR, not {out.name}"
            )
        if out.exists() and not out.is_dir():
            raise FlatcliError(f"cannot write --out {out}: it exists and is not a folder")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise FlatcliError(f"cannot write --out {out}: directory {parent} does not exist")
    elif out_path is not None:
        check_output(out_path, suffixes=(".safetensors", ".pt", ".pth"), option="--out")
    if log_path is not None:
        check_output(log_path, option="--log")
    if plot_path is not None:
        check_output(plot_path, suffixes=(".png",), option="--plot")
    state = (
        state_path
        if state_path is not None
        else default_state_path(Path(out_path) if out_path is not None else None)
    )
    if state is not None:
        check_output(state, option="the state file")


def check_not_inputs(
    ck: Checkpoint,
    data: list[Any],
    outputs: tuple[str | Path | None, ...],
    *,
    overwrite_input: bool,
) -> None:
    """Refuse an output (``out, log, plot, state``) that is an input (the checkpoint, unless
    ``overwrite_input`` and it is ``--out``; a data file) or another output
    (:func:`flatcli.io.check_distinct`)."""
    from ..data import BUNDLED

    out_path, log_path, plot_path, state_path = outputs
    if data[0] is None and ck.sha256 and ck.metadata.get("data") is not None:
        with contextlib.suppress(FlatcliError):  # loading the data reports why
            data = [metadata_data(ck.metadata["data"], ck.path), *data[1:]]
    files = [("a data file", Path(d)) for d in data if isinstance(d, str) and d not in BUNDLED]
    checkpoint = [("the input checkpoint", ck.path)] if ck.sha256 else []
    if state_path is None and out_path is not None:
        state_path = default_state_path(Path(out_path))
    named = [("--out", out_path), ("--log", log_path), ("--plot", plot_path)]
    named.append(("the state file", state_path))
    if not overwrite_input:
        try:
            check_distinct(named[:1], checkpoint)
        except UsageError:
            raise UsageError(
                f"--out {named[0][1]} is the input checkpoint: pass --overwrite-input to "
                "replace it, or name another file"
            ) from None
    check_distinct(named, files)
    check_distinct(named[1:], checkpoint)  # only --out may replace the checkpoint


def save_output(
    net: nn.Module,
    out: Path,
    ck: Checkpoint,
    hparams: Mapping[str, Any],
    data_spec: str | None,
    loss: str,
) -> str | None:
    """Write the fine-tuned model; returns the sha256 a later load reports for it (None
    for a stream such as ``/dev/null``)."""
    meta = ck.metadata
    model = net if next(net.parameters()).device.type == "cpu" else copy.deepcopy(net).cpu()
    from ..hf import is_pretrained_model

    if is_pretrained_model(model):
        from ..hf import folder_sha256, save_pretrained

        if out.suffix in (".safetensors", ".pt", ".pth"):
            raise UsageError(
                f"a Hugging Face model is saved as a folder: pass --out DIR, not {out.name}"
            )
        flat_meta = {
            "data": data_spec or meta.get("data"),
            "loss": loss,
            "hparams": json.dumps({**hparams, "finetuned_from": ck.path.name}, sort_keys=True),
            "parent_sha256": ck.sha256 or None,
        }
        save_pretrained(model, out, {k: v for k, v in flat_meta.items() if v is not None})
        return folder_sha256(out)
    arch = meta.get("arch") or f"{type(ck.model).__module__}:{type(ck.model).__qualname__}"
    kwargs_text = meta.get("arch_kwargs")
    arch_kwargs = parse_json(kwargs_text, "flatcli.arch_kwargs") if kwargs_text else {}
    save_checkpoint(
        model,
        out,
        arch=arch,
        arch_kwargs=arch_kwargs,
        data=data_spec or meta.get("data"),
        loss=loss,
        input_shape=ck.input_shape,
        hparams={**hparams, "finetuned_from": ck.path.name},
        parent_sha256=ck.sha256 or None,
    )
    return None if is_stream(out) else sha256_file(out)  # a FIFO cannot be read back


def title(layer: str, lam: float) -> str:
    """The plot's title."""
    return f"FAM on {layer}, λ = {lam:.4g}"


def write_outputs(
    net: nn.Module,
    ck: Checkpoint,
    *,
    hparams: Mapping[str, Any],
    history: list[EpochRecord],
    measured: Mapping[str, Any],
    before: Mapping[str, Estimate],
    paths: tuple[Path | None, str | Path | None, str | Path | None],
    kappa_key: str,
    data_spec: str | None,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint_hparams: Mapping[str, Any] | None = None,
) -> str | None:
    """Write the checkpoint (its metadata records ``checkpoint_hparams``, default
    ``hparams``), the log and its manifest (with ``measured``), and the plot, in that
    order; returns the checkpoint's sha256 (None when none was written)."""
    out, log_path, plot_path = paths
    out_sha = None
    if out is not None:
        meta = hparams if checkpoint_hparams is None else checkpoint_hparams
        out_sha = save_output(net, out, ck, meta, data_spec, hparams["loss"])
    if log_path is not None:
        write_log(log_path, history)
        seed = int(hparams["seed"])
        write_log_manifest(log_path, hparams, ck.sha256, out_sha, device, dtype, seed, measured)
    if plot_path is not None:
        lam = float(hparams["fam_lambda_used"])
        diverged = measured.get("diverged")
        name = title(str(hparams["layer"]), lam)
        if diverged is not None:
            name += f": diverged in epoch {diverged['epoch']}"
        plot_history(history, plot_path, title=name, start=before, kappa_key=kappa_key)
    return out_sha


def measured_dict(
    before: Mapping[str, Estimate],
    after: Mapping[str, Estimate],
    matched: Mapping[str, Estimate] | None,
    c: float | None,
) -> dict[str, Any]:
    """The measures the log's manifest records."""
    measured: dict[str, Any] = {"before": estimates_dict(before), "after": estimates_dict(after)}
    if matched is not None:
        measured["temperature_matched"] = {"c": c, **estimates_dict(matched)}
    return measured
