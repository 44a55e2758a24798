"""Machine-readable results (JSON/CSV with the run manifest) and terminal tables."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .io import atomic_write_text
from .measures.estimate import Estimate, warnings_of

MEASURE_SCHEMA = "flatcli.measure/1"
FORMATS = ("table", "json", "csv")


def measure_report(
    *,
    checkpoint: Mapping[str, Any],
    layer: Mapping[str, Any],
    data: Mapping[str, Any],
    measures: Mapping[str, Estimate],
    manifest: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The stable JSON shape of ``flatcli measure`` (schema ``flatcli.measure/1``).

    Every measure carries a ``warnings`` list (empty when its value can be read as a
    plain number); a failed measure has ``value`` null and an ``error`` line.
    """
    report = {
        "schema": MEASURE_SCHEMA,
        "checkpoint": dict(checkpoint),
        "layer": dict(layer),
        "data": dict(data),
        "measures": {k: {**v.to_dict(), "warnings": warnings_of(v)} for k, v in measures.items()},
        "manifest": dict(manifest),
    }
    if config is not None:
        report["config"] = dict(config)
    return report


def to_json(obj: Any) -> str:
    """Pretty JSON with non-finite floats written as null."""
    return json.dumps(_finite(obj), indent=2, sort_keys=False) + "\n"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def measures_csv(measures: Mapping[str, Estimate]) -> str:
    """One row per measure: ``measure,value,stderr,method,warnings`` (``; ``-joined)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["measure", "value", "stderr", "method", "warnings"])
    for name, est in measures.items():
        d = est.to_dict()
        row = [name, _cell(d["value"]), _cell(d["stderr"]), est.method]
        writer.writerow([*row, "; ".join(warnings_of(est))])
    return buf.getvalue()


def _cell(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def write_output(path: str | Path, text: str) -> Path:
    """Atomically write ``text``: readers never see a partial file."""
    return atomic_write_text(path, text)


def write_csv_output(path: str | Path, text: str, provenance: Mapping[str, Any]) -> Path:
    """Atomically write a CSV file and its provenance beside it, as ``STEM.manifest.json``.

    A CSV has no place for the run manifest (versions, device, seed, checkpoint sha256),
    so it goes into the sidecar; both are written atomically, the sidecar first.
    """
    write_manifest_beside(path, provenance)
    return atomic_write_text(path, text)


def write_manifest_beside(path: str | Path, provenance: Mapping[str, Any]) -> Path | None:
    """Atomically write ``provenance`` as JSON to ``STEM.manifest.json`` next to ``path``
    (not beside a stream such as ``/dev/null``: see :func:`write_beside`)."""
    return write_beside(path, ".manifest.json", to_json(provenance))


def write_beside(path: str | Path, suffix: str, text: str) -> Path | None:
    """Atomically write ``text`` to the sidecar ``STEM<suffix>`` of the output ``path``.

    An output that is a stream (a device, a FIFO, stdout) gets no sidecar: it would land
    beside it, in ``/dev``. A ``warning:`` line says what was left out.

    Returns:
        The sidecar written, or None.
    """
    from .errors import warn
    from .io import sidecar

    side = sidecar(path, suffix)
    if side is None:
        name = f"{Path(path).stem}{suffix}"
        warn(f"{path} is not a regular file: its sidecar {name} is not written beside it")
        return None
    return atomic_write_text(side, text)


def format_value(x: float | None) -> str:
    """Compact human number: 4 significant digits, scientific when far from 1."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    ax = abs(x)
    if ax != 0 and (ax >= 1e5 or ax < 1e-3):
        return f"{x:.4e}"
    return f"{x:.6g}"


def bound_hit(details: Mapping[str, Any]) -> bool:
    """Whether a bisection search (PAC-Bayes σ', sharpness α') ended at an end of its
    range: the value is then only a bound, and has no standard error to show."""
    if details.get("hit_sigma_max") or details.get("hit_alpha_max"):
        return True
    bracket = details.get("bracket")
    return isinstance(bracket, (list, tuple)) and len(bracket) == 2 and bracket[0] == 0


def stderr_text(stderr: float | None, details: Mapping[str, Any]) -> str:
    """The standard error column's text: ``bound hit`` for a search at the end of its
    range, ``exact`` for a computed value (no stderr), else the number."""
    if bound_hit(details):
        return "bound hit"
    return "exact" if stderr is None else format_value(stderr)


FLAG = "⚠"
"""Marks a value that should not be read as a plain number (its warnings say why)."""


def measures_table(measures: Mapping[str, Estimate], *, title: str | None = None):  # noqa: ANN201
    """A rich Table of measures with value, standard error and method (values with
    warnings marked :data:`FLAG`; the CLI prints :func:`flatcli.cli.render.measures_table`)."""
    from rich.table import Table

    from .text import markup_safe

    table = Table(title=markup_safe(title) if title else None, title_justify="left")
    table.add_column("measure", style="bold")
    table.add_column("value", justify="right")
    table.add_column("± stderr", justify="right")
    table.add_column("method")
    for name, est in measures.items():
        se = stderr_text(est.stderr, est.details)
        value = format_value(est.value) + (f" {FLAG}" if warnings_of(est) else "")
        table.add_row(markup_safe(name), value, se, markup_safe(est.method))
    return table
