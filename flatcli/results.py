"""The typed results of the commands, each the owner of its JSON schema and CSV rows.

:func:`flatcli.measure`, :func:`flatcli.audit_checkpoint`, :func:`flatcli.correlate`,
:func:`flatcli.robustness` and :func:`flatcli.bound` return them; ``flatcli COMMAND --format
json`` writes exactly ``result.to_dict()`` and ``--format csv`` writes
``result.to_frame()``.

Every result offers:

- ``to_dict()``: the stable JSON shape (schema id, inputs, numbers, run manifest);
- ``to_frame()``: the CSV rows, a :class:`pandas.DataFrame`;
- ``provenance()``: what a CSV file has no place for, written beside it as
  ``STEM.manifest.json``;
- ``render()``: the terminal tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import pandas as pd

    from .audit import Reparameterization
    from .bound import BoundTerms
    from .measures.estimate import Estimate
    from .robustness import Robustness


class Result:
    """What every command result offers (see the module docstring)."""

    schema: ClassVar[str]
    table_output: ClassVar[str] = "json"
    """What ``--output`` holds when the terminal gets a table: ``json`` or ``csv``."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_frame(self) -> pd.DataFrame:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        """The JSON shape less the keys whose values are the CSV rows."""
        return {k: v for k, v in self.to_dict().items() if k not in self._row_keys()}

    def _row_keys(self) -> tuple[str, ...]:
        return ()

    def to_csv(self) -> str:
        """:meth:`to_frame` as CSV text (what ``--output`` holds with ``--format csv``)."""
        return self.to_frame().to_csv(index=False)

    def sidecars(self) -> dict[str, str]:
        """Further CSV files written beside ``--output``, by suffix (``STEM<suffix>``)."""
        return {}

    def stdout_csv(self) -> str:
        """What ``--format csv`` prints (the CSV rows, unless a result says otherwise)."""
        return self.to_csv()

    def page_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`flatcli.html.write_html` for this result."""
        return {}

    def render(self) -> None:
        """Print the result's tables to the terminal."""
        raise NotImplementedError


def _checkpoint(path: Path | str, sha256: str) -> dict[str, str]:
    return {"path": str(path), "sha256": sha256}


@dataclass(frozen=True)
class MeasureResult(Result):
    """The measures of one checkpoint (schema ``flatcli.measure/1``).

    Attributes:
        checkpoint: ``{"path", "sha256"}`` of the checkpoint.
        layer: ``{"name", "type", "shape"}`` of the feature layer.
        data: ``{"source", "split", "n_samples"}``.
        measures: Name -> :class:`Estimate` (a failed one has ``details["error"]``).
        manifest: The run manifest (:func:`flatcli.runtime.manifest`).
        config: Every option the measures read (:class:`flatcli.registry.MeasureConfig`).
    """

    schema: ClassVar[str] = "flatcli.measure/1"
    checkpoint: dict[str, Any]
    layer: dict[str, Any]
    data: dict[str, Any]
    measures: dict[str, Estimate]
    manifest: dict[str, Any]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        from .report import measure_report

        return measure_report(
            checkpoint=self.checkpoint,
            layer=self.layer,
            data=self.data,
            measures=self.measures,
            manifest=self.manifest,
            config=self.config,
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per measure: ``measure, value, stderr, method, warnings``."""
        import pandas as pd

        from .measures.estimate import warnings_of

        rows = []
        for name, est in self.measures.items():
            d = est.to_dict()
            rows.append(
                {
                    "measure": name,
                    "value": d["value"],
                    "stderr": d["stderr"],
                    "method": est.method,
                    "warnings": "; ".join(warnings_of(est)),
                }
            )
        return pd.DataFrame(rows, columns=["measure", "value", "stderr", "method", "warnings"])

    def to_csv(self) -> str:
        from .report import measures_csv

        return measures_csv(self.measures)

    def _row_keys(self) -> tuple[str, ...]:
        return ("measures",)

    def render(self) -> None:
        from .tables import measures_table

        title = (
            f"{Path(self.checkpoint['path']).name} · layer {self.layer['name']} · "
            f"{self.data['source']} {self.data['split']} (n={self.data['n_samples']}) · "
            f"{self.config['loss']}"
        )
        measures_table(self.measures, title=title)


@dataclass(frozen=True)
class AuditResult(Result):
    """Which measures survive function-preserving reparameterizations (``flatcli.audit/1``).

    Attributes:
        checkpoint, layer, data, manifest, config: As in :class:`MeasureResult`.
        measures: The measures of the original model.
        reparameterizations: One :class:`flatcli.audit.Reparameterization` per kind.
        skipped: Measures not computed, each with why (the time budget).
        theorem4: Lines on Theorem 4's normalized κ̃: where it was shown invariant, and
            where the theorem's conditions fail here.
        tolerance: Relative change below which a measure reads invariant.
        alpha_range: ``(low, high)`` of the random rescaling factors.
        time_budget: Seconds for the whole audit (None: no limit).
        max_memory: Bytes each measure may use (None: half the free memory).
        seconds: Wall time of the audit.
    """

    schema: ClassVar[str] = "flatcli.audit/1"
    checkpoint: dict[str, Any]
    layer: dict[str, Any]
    data: dict[str, Any]
    measures: dict[str, Estimate]
    reparameterizations: list[Reparameterization]
    skipped: dict[str, str]
    theorem4: list[str]
    manifest: dict[str, Any]
    config: dict[str, Any]
    tolerance: float
    alpha_range: tuple[float, float]
    time_budget: float | None
    max_memory: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "checkpoint": self.checkpoint,
            "layer": self.layer,
            "data": self.data,
            "measures": {k: v.to_dict() for k, v in self.measures.items()},
            "reparameterizations": [r.to_dict() for r in self.reparameterizations],
            "skipped": self.skipped,
            "theorem4": self.theorem4,
            "manifest": self.manifest,
            "config": self.config,
            "audit": {
                "tolerance": self.tolerance,
                "alpha_range": list(self.alpha_range),
                "time_budget": self.time_budget,
                "max_memory": self.max_memory,
                "seconds": round(self.seconds, 3),
            },
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per reparameterization and measure."""
        import pandas as pd

        reps = self.reparameterizations
        rows = [{"reparameterization": r.kind, **row.__dict__} for r in reps for row in r.rows]
        return pd.DataFrame(rows)

    def provenance(self) -> dict[str, Any]:
        keep = ("schema", "checkpoint", "layer", "data", "manifest", "config")
        report = self.to_dict()
        return {k: report[k] for k in keep}

    def render(self) -> None:
        from .tables import audit_tables

        audit_tables(self)


@dataclass(frozen=True)
class RobustnessResult(Result):
    """Feature robustness beside Theorem 5's prediction (schema ``flatcli.robustness/1``).

    Attributes:
        checkpoint: ``{"path", "sha256"}``.
        data: ``{"source", "split", "n_samples"}``.
        loss: The loss's name.
        robustness: The :class:`flatcli.robustness.Robustness` computed.
        manifest: The run manifest.
    """

    schema: ClassVar[str] = "flatcli.robustness/1"
    checkpoint: dict[str, Any]
    data: dict[str, Any]
    loss: str
    robustness: Robustness
    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "checkpoint": self.checkpoint,
            "data": self.data,
            "loss": self.loss,
            **self.robustness.to_dict(),
            "manifest": self.manifest,
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per δ."""
        import pandas as pd

        return pd.DataFrame(self.to_dict()["deltas"])

    def _row_keys(self) -> tuple[str, ...]:
        return ("deltas",)

    def render(self) -> None:
        from .tables import robustness_table

        title = f"{Path(self.checkpoint['path']).name} · {self.data['source']} {self.data['split']}"
        robustness_table(self.robustness, title=title)


@dataclass(frozen=True)
class BoundResult(Result):
    """Theorem 6's terms and the actual gap (schema ``flatcli.bound/1``).

    Attributes:
        checkpoint: ``{"path", "sha256"}``.
        data: ``{"source", "n_train", "has_test"}``.
        loss: The loss's name.
        terms: The :class:`flatcli.bound.BoundTerms` computed.
        manifest: The run manifest.
    """

    schema: ClassVar[str] = "flatcli.bound/1"
    checkpoint: dict[str, Any]
    data: dict[str, Any]
    loss: str
    terms: BoundTerms
    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "checkpoint": self.checkpoint,
            "data": self.data,
            "loss": self.loss,
            **self.terms.to_dict(),
            "manifest": self.manifest,
        }

    def _row(self) -> dict[str, Any]:
        return {k: v for k, v in self.terms.to_dict().items() if k != "notes"}

    def to_frame(self) -> pd.DataFrame:
        """One row: every term (the notes go to :meth:`provenance`)."""
        import pandas as pd

        return pd.DataFrame([self._row()])

    def _row_keys(self) -> tuple[str, ...]:
        return tuple(self._row())

    def render(self) -> None:
        from .tables import bound_table

        title = f"{Path(self.checkpoint['path']).name} · {self.data['source']} train"
        bound_table(self.terms, title=title)


@dataclass(frozen=True)
class CorrelateResult(Result):
    """Which measure predicts the generalization gap (schema ``flatcli.correlate/1``).

    Attributes:
        checkpoints: One row per checkpoint (measures, losses, gaps, hyperparameters).
        analysis: :func:`flatcli.correlate.analyse`'s result (``correlations`` table,
            ``granulated``, ``hparams``, ``warnings``, ``gap_notes``).
        skipped: ``{"checkpoint", "reason"}`` of each checkpoint that was not measured.
        computed: Checkpoints measured in this run (the rest came from the cache).
        source: The per-checkpoint CSV the result was recomputed from (``flatcli plot``).
        manifest: The run manifest.
        color_by, log_x: How the HTML page draws its scatter plots.
        measures: The measures correlated (the table's columns that are measures).
    """

    schema: ClassVar[str] = "flatcli.correlate/1"
    table_output: ClassVar[str] = "csv"
    checkpoints: pd.DataFrame
    analysis: dict[str, Any]
    skipped: list[dict[str, Any]]
    computed: int
    source: str | None
    manifest: dict[str, Any]
    color_by: str | None = None
    log_x: bool = False
    measures: tuple[str, ...] = ()

    @property
    def correlations(self) -> pd.DataFrame:
        """One row per measure and gap: the rank correlations and their intervals."""
        return self.analysis["correlations"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "checkpoints": self.checkpoints.to_dict(orient="records"),
            "correlations": self.correlations.to_dict(orient="records"),
            "granulated_kendall": self.analysis["granulated"],
            "hparams": self.analysis["hparams"],
            "warnings": self.analysis["warnings"],
            "gap_notes": self.analysis["gap_notes"],
            "skipped": self.skipped,
            "computed": self.computed,
            "source": self.source,
            "manifest": self.manifest,
        }

    def to_frame(self) -> pd.DataFrame:
        """The per-checkpoint table (``flatcli plot`` reads it back)."""
        return self.checkpoints

    def provenance(self) -> dict[str, Any]:
        out = {k: v for k, v in self.to_dict().items() if k not in ("checkpoints", "correlations")}
        df = self.checkpoints
        if {"checkpoint", "sha256"} <= set(df.columns):
            out["sha256"] = df[["checkpoint", "sha256"]].to_dict(orient="records")
        return out

    def sidecars(self) -> dict[str, str]:
        return {".correlations.csv": self.correlations.to_csv(index=False)}

    def stdout_csv(self) -> str:
        return self.correlations.to_csv(index=False)

    def page_options(self) -> dict[str, Any]:
        return {"color_by": self.color_by, "log_x": self.log_x}

    def render(self) -> None:
        from .tables import correlations

        run = self if self.source is None else None  # a recomputation measured nothing
        correlations(self.correlations, self.analysis, len(self.checkpoints), run)
