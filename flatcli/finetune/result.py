"""What :func:`flatcli.finetune.finetune` returns (:class:`FinetuneResult`, which owns its
JSON shape, :data:`SCHEMA`) and raises when the guard fires (:class:`Diverged`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import FlatcliError
from ..finetune_report import LOG_COLUMNS, EpochRecord
from ..measures.estimate import Estimate

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = "flatcli.finetune/1"
"""Schema id of :meth:`FinetuneResult.to_dict`: the whole run, as a ``--report`` page
embeds it. (The CSV log's manifest has its own: :data:`~flatcli.finetune_report.LOG_SCHEMA`.)"""


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: The fine-tuned model, in eval mode.
        history: One record per epoch, including epochs restored from a state file.
        before: Layer measures and test metrics of the starting model.
        after: The same measures and metrics after fine-tuning.
        layer: The FAM layer.
        fam_method: How κ was computed, in words.
        hparams: Every hyperparameter of the run, as recorded in the checkpoint metadata.
            ``fam_lambda_used`` is the λ the run used (``fam_lambda`` is the request:
            a number, a fraction with ``fam_scale="relative"``, or ``"auto"``), and
            ``fam_step_ratio`` the relative step R at step 0 (None for Adam or λ = 0).
        resumed_from: Completed epochs found in the state file (0 for a fresh run).
        out_path: The written checkpoint, or None.
        out_sha256: Its sha256, or None.
        log_path: The CSV log, or None.
        plot_path: The PNG of the curves, or None.
        state_path: The resumable state file, or None.
        parent_sha256: The starting checkpoint's sha256 (empty for an in-memory module).
        temperature_matched: The same measures as ``before`` and ``after`` for the starting
            model with its logits layer scaled by ``temperature_c``, so that its train loss
            equals the fine-tuned model's; None when there is no such model.
        temperature_c: That scale ``c`` (a softmax temperature ``1/c``), or None.
        temperature_note: Why there is no temperature-matched baseline, or None.
        warnings: Warnings of the run, one line each (a large step ratio R).
        manifest: The run manifest (:func:`flatcli.runtime.manifest`: versions, device,
            dtype, seed); the CLI adds the command line (``argv``).
    """

    model: nn.Module
    history: tuple[EpochRecord, ...]
    before: Mapping[str, Estimate]
    after: Mapping[str, Estimate]
    layer: str
    fam_method: str
    hparams: Mapping[str, Any]
    resumed_from: int = 0
    out_path: Path | None = None
    out_sha256: str | None = None
    log_path: Path | None = None
    plot_path: Path | None = None
    state_path: Path | None = None
    parent_sha256: str | None = None
    temperature_matched: Mapping[str, Estimate] | None = None
    temperature_c: float | None = None
    temperature_note: str | None = None
    warnings: tuple[str, ...] = ()
    manifest: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The run as JSON-able data (schema :data:`SCHEMA`): what ``flatcli finetune
        --format json`` writes and a ``--report`` page embeds."""
        return {
            "schema": SCHEMA,
            "checkpoint": {
                "parent_sha256": self.parent_sha256,
                "output": None if self.out_path is None else str(self.out_path),
                "output_sha256": self.out_sha256,
            },
            "layer": self.layer,
            "fam_method": self.fam_method,
            "hparams": dict(self.hparams),
            "resumed_from": self.resumed_from,
            "history": [r.to_row() for r in self.history],
            "before": _estimates(self.before),
            "after": _estimates(self.after),
            "temperature_matched": None
            if self.temperature_matched is None
            else _estimates(self.temperature_matched),
            "temperature_c": self.temperature_c,
            "temperature_note": self.temperature_note,
            "warnings": list(self.warnings),
            "files": {
                what: None if p is None else str(p)
                for what, p in (
                    ("log", self.log_path),
                    ("plot", self.plot_path),
                    ("state", self.state_path),
                )
            },
            "manifest": dict(self.manifest),
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per epoch, the columns of the CSV log
        (:data:`~flatcli.finetune_report.LOG_COLUMNS`)."""
        import pandas as pd

        return pd.DataFrame([r.to_row() for r in self.history], columns=list(LOG_COLUMNS))


def _estimates(found: Mapping[str, Estimate]) -> dict[str, dict[str, Any]]:
    return {k: v.to_dict() for k, v in found.items()}


class Diverged(FlatcliError):
    """The run diverged or saturated; the last good epoch's weights were written.

    Attributes:
        epoch: The epoch in which the guard fired.
        good_epoch: The epoch whose weights were restored (0: the starting model).
        reason: What the guard saw, in words.
    """

    def __init__(self, message: str, *, epoch: int, good_epoch: int, reason: str) -> None:
        super().__init__(message)
        self.epoch, self.good_epoch, self.reason = epoch, good_epoch, reason
