"""The resumable state of a fine-tuning run: one ``torch.save`` file per run, rewritten
atomically after every completed epoch.

It holds the model, optimizer, scheduler, every RNG state and the history. RNG states are
stored as tensors, so it loads with ``weights_only=True``; everything in it is checked
(:func:`check_state`) before any of it is used. On the CPU, a resumed run ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import Dataset
from ..errors import FlatcliError, UsageError
from ..finetune_report import LOG_COLUMNS, EpochRecord
from ..io import atomic_write, check_archive_size, sidecar
from ..measures.estimate import Estimate
from ..training import load_optimizer_state
from ..untrusted import check_tensors

if TYPE_CHECKING:
    from .setup import Training

STATE_FORMAT = "flatcli.finetune-state/1"


@dataclass(frozen=True)
class Restored:
    """What a state file gives back to a resumed run.

    Attributes:
        epoch: Completed epochs.
        history: Their records.
        before: The starting model's measures.
        fam_lambda_used: The λ the run uses.
        fam_step_ratio: The relative step R at step 0 (None for Adam or λ = 0).
    """

    epoch: int
    history: tuple[EpochRecord, ...]
    before: Mapping[str, Estimate]
    fam_lambda_used: float
    fam_step_ratio: float | None


def default_state_path(out: Path | None) -> Path | None:
    """The state file beside the output checkpoint (none beside a stream such as
    ``/dev/null``)."""
    return None if out is None else sidecar(out, ".state.pt")


def data_sha256(ds: Dataset) -> str:
    """sha256 of the training tensors (dtype, shape and values): what a resume must match."""
    h = hashlib.sha256()
    xs = [ds.x[k] for k in sorted(ds.x)] if isinstance(ds.x, Mapping) else [ds.x]
    for t in (*xs, ds.y):
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def estimates_dict(found: Mapping[str, Estimate]) -> dict[str, dict[str, Any]]:
    """Estimates as plain JSON-able dicts (the state file and the log's manifest)."""
    return {
        k: {"value": e.value, "stderr": e.stderr, "method": e.method, "details": dict(e.details)}
        for k, e in found.items()
    }


def save_state(
    tr: Training, *, epoch: int, history: list[EpochRecord], before: Mapping[str, Estimate]
) -> None:
    """Atomically write the state of run ``tr`` after ``epoch`` completed epochs."""
    path, device = tr.state_file, tr.device
    assert path is not None
    state = {
        "format": STATE_FORMAT,
        "epoch": epoch,
        "data_sha256": tr.data_sha256,
        "hparams": dict(tr.hparams),
        "parent_sha256": tr.checkpoint.sha256,
        "model": tr.net.state_dict(),
        "optimizer": tr.opt.state_dict(),
        "scheduler": tr.sched.state_dict() if tr.sched is not None else None,
        "rng": {
            "shuffle": tr.shuffle.get_state(),
            "probes": tr.reg.generator.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        },
        "history": [r.to_row() for r in history],
        "before": estimates_dict(before),
    }
    atomic_write(path, lambda p: torch.save(state, p))


def load_state(path: Path, device: torch.device) -> dict[str, Any] | None:
    """The state file's contents (None when there is no file), not yet checked."""
    if not path.is_file():
        return None
    check_archive_size(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FlatcliError(f"cannot read the state file {path}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FlatcliError(f"{path} is not a flatcli finetune state file")
    check_tensors(state, f"the state file {path}")
    if isinstance(state.get("rng"), dict):
        state["rng"] = {
            k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state["rng"].items()
        }
    return state


def restore(state: Mapping[str, Any], tr: Training) -> Restored:
    """Load a checked state into run ``tr``: its model, optimizer, scheduler and generators.

    Raises:
        FlatcliError: The state does not fit them (a damaged file).
    """
    path, device = tr.state_file, tr.device
    try:
        tr.net.load_state_dict(state["model"])
        load_optimizer_state(tr.opt, state["optimizer"])
        if tr.sched is not None:
            tr.sched.load_state_dict(state["scheduler"])
        tr.shuffle.set_state(state["rng"]["shuffle"])
        tr.reg.generator.set_state(state["rng"]["probes"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        return Restored(
            epoch=state["epoch"],
            history=tuple(EpochRecord(**row) for row in state["history"]),
            before={k: Estimate(**v) for k, v in state["before"].items()},
            fam_lambda_used=state["hparams"]["fam_lambda_used"],
            fam_step_ratio=state["hparams"]["fam_step_ratio"],
        )
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FlatcliError(f"the state file {path} is damaged: {first}") from None


def check_resumable(
    state: Mapping[str, Any],
    hparams: Mapping[str, Any],
    parent_sha256: str,
    epochs: int,
    data_sha: str,
) -> None:
    """Refuse a state file from another checkpoint, other settings (``epochs`` may grow
    under a ``constant`` schedule), more epochs than asked for, or other training data."""
    if state.get("parent_sha256") != parent_sha256:
        raise FlatcliError("the state file belongs to a run from another checkpoint")
    saved = state["hparams"]
    ignore = {"epochs"} if hparams["schedule"] == "constant" else set()
    differ = [k for k in hparams if k not in ignore and saved.get(k) != hparams[k]]
    if differ:
        listed = ", ".join(f"{k} {saved.get(k)!r} → {hparams[k]!r}" for k in differ)
        raise UsageError(
            f"cannot resume: the state file was written with other settings ({listed})"
        )
    if state["epoch"] > epochs:
        raise UsageError(
            f"cannot resume: the state file has {state['epoch']} completed epochs, "
            f"more than --epochs {epochs}"
        )
    if state["data_sha256"] != data_sha:
        raise FlatcliError(
            "cannot resume: the training data differs from the data the state file "
            "was trained on (a changed file?); start again without --resume"
        )


def check_state(state: Mapping[str, Any], path: Path, schedule: str) -> None:
    """Check a state file's schema, types and ranges before anything of it is used.

    Raises:
        FlatcliError: A missing key, a wrong type, or a value out of range.
    """

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise FlatcliError(f"the state file {path} is damaged: {what}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any, optional: bool = False) -> bool:
        return (v is None and optional) or (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        )

    keys = ("epoch", "data_sha256", "hparams", "parent_sha256", "model", "optimizer")
    missing = [k for k in (*keys, "scheduler", "rng", "history", "before") if k not in state]
    need(not missing, f"missing {', '.join(missing)}")
    epoch = state["epoch"]
    need(is_int(epoch) and epoch >= 1, f"epoch must be a positive integer, got {epoch!r}")
    need(isinstance(state["data_sha256"], str), "data_sha256 is not a string")
    need(isinstance(state["parent_sha256"], str), "parent_sha256 is not a string")
    need(isinstance(state["hparams"], dict), "hparams is not a dict")
    model = state["model"]
    need(
        isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values()),
        "model is not a state dict",
    )
    need(_all_finite(model.values()), "model weights contain NaN or Inf")
    opt = state["optimizer"]
    need(
        isinstance(opt, dict)
        and isinstance(opt.get("state"), dict)
        and isinstance(opt.get("param_groups"), list)
        and all(isinstance(g, dict) for g in opt["param_groups"]),
        "optimizer is not an optimizer state",
    )
    moments = [v for per in opt["state"].values() if isinstance(per, dict) for v in per.values()]
    need(_all_finite(moments), "optimizer state contains NaN or Inf")
    need(
        isinstance(state["scheduler"], dict) if schedule == "cosine" else True,
        "scheduler is not a scheduler state",
    )
    rng = state["rng"]
    need(isinstance(rng, dict), "rng is not a dict")
    for k in ("shuffle", "probes", "torch"):
        t = rng.get(k)
        need(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1,
            f"rng {k} is not a generator state",
        )
    history = state["history"]
    need(
        isinstance(history, list) and len(history) == epoch,
        f"history must list {epoch} epochs",
    )
    for i, row in enumerate(history, start=1):
        need(isinstance(row, dict) and set(row) == set(LOG_COLUMNS), f"history row {i} malformed")
        need(is_int(row["epoch"]) and row["epoch"] == i, f"history row {i}: epoch {row['epoch']!r}")
        for k in ("lr", "train_loss", "kappa", "seconds"):
            need(is_num(row[k]), f"history row {i}: {k} is not a finite number")
        for k in set(LOG_COLUMNS) - {"epoch", "lr", "train_loss", "kappa", "seconds"}:
            need(is_num(row[k], optional=True), f"history row {i}: {k} is not a number")
    before = state["before"]
    need(isinstance(before, dict), "before is not a dict")
    for k, v in before.items():
        need(
            isinstance(v, dict)
            and set(v) == {"value", "stderr", "method", "details"}
            and is_num(v["value"], optional=True)
            and is_num(v["stderr"], optional=True)
            and isinstance(v["method"], str)
            and isinstance(v["details"], dict),
            f"before {k!r} is not a measure result",
        )


def _all_finite(values: Any) -> bool:
    """No floating-point tensor among ``values`` holds NaN or Inf."""
    return all(
        bool(torch.isfinite(v).all())
        for v in values
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )
