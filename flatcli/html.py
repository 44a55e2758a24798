"""One self-contained HTML page per result: ``measure``, ``audit``, ``correlate``, ``finetune``.

The page is rendered from the same result dict the command writes with ``--format json``
(:func:`render_html`), so ``flatcli report results.json`` and a command's ``--report``
give the same page. It is a single file that loads nothing: figures are matplotlib SVGs
(PNG for the fine-tuning curves) inlined as ``data:`` URIs with alt text, the CSS and the
few lines of JavaScript that sort the tables are inlined, and a Content-Security-Policy
forbids any other load. The page reads without JavaScript and prints cleanly. The result's
JSON is embedded too, so the page can be rendered again (:func:`load_result` reads it).

Everything taken from the result (file names, checkpoint metadata, measure names) is
escaped by Jinja2's autoescaping: a result is treated as untrusted input.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FlatcliError
from .io import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .finetune import FinetuneResult

SCHEMAS = {
    "flatcli.measure/1": "measure",
    "flatcli.audit/1": "audit",
    "flatcli.correlate/1": "correlate",
    "flatcli.finetune/1": "finetune",
}
"""Result schemas a page can be rendered from, and the command that writes each."""

FINETUNE_SCHEMA = "flatcli.finetune/1"
RESULT_ELEMENT_ID = "flatcli-result"
"""``id`` of the ``<script type="application/json">`` element holding the result."""

GAP_TITLES = {
    "gap_loss": "Generalization gap in loss (test loss − train loss)",
    "gap_acc": "Generalization gap in accuracy (train accuracy − test accuracy)",
}
RELATIVE_STDERR_FLAG = 0.1
"""A measure whose standard error exceeds this fraction of its value is flagged."""


# --------------------------------------------------------------------------- public API


def render_html(
    result: Mapping[str, Any], *, color_by: str | None = None, log_x: bool = False
) -> str:
    """The page of one result, as an HTML string.

    Args:
        result: A result dict as written by ``--format json`` (``schema`` one of
            :data:`SCHEMAS`), or by :func:`finetune_result`.
        color_by: For ``correlate``: the column (a hyperparameter, with or without its
            ``hp_`` prefix) that colors the scatter points. Default: the first varied
            hyperparameter.
        log_x: For ``correlate``: logarithmic measure axes in the scatter grids.

    Returns:
        The complete page.

    Raises:
        FlatcliError: The result has no known schema or lacks what its page needs.
    """
    kind = _kind(result)
    # Render what the JSON holds (NaN as null, numpy numbers as plain ones): a page from
    # --report and one from its saved JSON are then the same, byte for byte.
    from .report import to_json

    result = json.loads(to_json(result))
    try:
        if kind == "measure":
            page = _measure_page(result)
        elif kind == "audit":
            page = _audit_page(result)
        elif kind == "correlate":
            page = _correlate_page(result, color_by=color_by, log_x=log_x)
        else:
            page = _finetune_page(result)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FlatcliError(
            f"the {kind} result is incomplete or malformed ({type(e).__name__}: {e})"
        ) from None
    return _render(result, kind, page)


def write_html(
    path: str | Path,
    result: Mapping[str, Any],
    *,
    color_by: str | None = None,
    log_x: bool = False,
) -> Path:
    """Render :func:`render_html` and write it atomically to ``path``."""
    return atomic_write_text(path, render_html(result, color_by=color_by, log_x=log_x))


def load_result(path: str | Path) -> dict[str, Any]:
    """A saved result: a ``--format json`` file, or a page written by flatcli.

    Raises:
        FlatcliError: The file is missing, unreadable, not JSON (nor a flatcli page), or
            has no known schema.
    """
    path = Path(path)
    if not path.is_file():
        raise FlatcliError(f"result file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FlatcliError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if text.lstrip()[:1] == "<":
        text = _embedded_json(text)
        if text is None:
            raise FlatcliError(f"{path} is an HTML file without an embedded flatcli result")
    try:
        result = json.loads(text)
    except json.JSONDecodeError as e:
        raise FlatcliError(f"{path} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(result, dict):
        raise FlatcliError(f"{path} does not hold a flatcli result (a JSON object)")
    _kind(result, source=str(path))
    return result


def finetune_result(result: FinetuneResult, *, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON shape (schema ``flatcli.finetune/1``) of a fine-tuning run, for its page.

    Args:
        result: What :func:`flatcli.finetune.finetune` returned.
        manifest: The run manifest (:func:`flatcli.runtime.manifest`).
    """
    return {
        "schema": FINETUNE_SCHEMA,
        "checkpoint": {
            "parent_sha256": result.parent_sha256,
            "output": None if result.out_path is None else str(result.out_path),
            "output_sha256": result.out_sha256,
        },
        "layer": result.layer,
        "fam_method": result.fam_method,
        "hparams": dict(result.hparams),
        "resumed_from": result.resumed_from,
        "history": [r.to_row() for r in result.history],
        "before": {k: v.to_dict() for k, v in result.before.items()},
        "after": {k: v.to_dict() for k, v in result.after.items()},
        "files": {
            what: None if p is None else str(p)
            for what, p in (
                ("log", result.log_path),
                ("plot", result.plot_path),
                ("state", result.state_path),
            )
        },
        "manifest": dict(manifest),
    }


def command_line(argv: Sequence[str] | str | None) -> str | None:
    """The shell command line of a recorded ``argv`` (None when not recorded)."""
    if argv is None:
        return None
    if isinstance(argv, str):
        return argv
    return shlex.join(str(a) for a in argv)


# --------------------------------------------------------------------------- page models
# A page is a title, a list of facts and sections of blocks (paragraphs, tables,
# figures, lists, collapsible details), rendered by templates/blocks.html.j2.


def _measure_page(r: Mapping[str, Any]) -> dict[str, Any]:
    ck, layer, data = r["checkpoint"], r["layer"], r["data"]
    facts = [
        ("checkpoint", ck.get("path")),
        ("layer", _layer_text(layer)),
        ("data", _data_text(data)),
    ]
    if r.get("config", {}).get("loss"):
        facts.append(("loss", r["config"]["loss"]))
    table = _measures_table(r["measures"], id="measures")
    return {
        "title": f"{_name(ck.get('path'))} · layer {layer.get('name')}",
        "facts": facts,
        "sections": [{"title": "Measures", "id": "measures-section", "blocks": [table]}],
    }


def _audit_page(r: Mapping[str, Any]) -> dict[str, Any]:
    ck, layer, data = r["checkpoint"], r["layer"], r["data"]
    reps = r["reparameterizations"]
    done = [rep for rep in reps if not rep.get("refused")]
    columns: list[Any] = ["measure", ("original", "num")]
    for rep in done:
        columns += [(f"{rep['kind']}: relative change", "num"), f"{rep['kind']}: invariant"]
    by_kind = [{row["measure"]: row for row in rep["rows"]} for rep in done]
    rows = []
    for name, est in r["measures"].items():
        row = [_text(name, cls="name"), _num(est.get("value"))]
        for lookup in by_kind:
            hit = lookup.get(name)
            row += [
                _num(None if hit is None else hit["relative_change"], fmt=_sci),
                _invariant(None if hit is None else hit["invariant"]),
            ]
        rows.append(row)
    settings = r.get("audit") or {}
    tolerance = settings.get("tolerance")
    summary = _table(
        columns,
        rows,
        caption="Relative change of each measure under each function-preserving "
        "reparameterization; “invariant” when below the tolerance"
        + (f" ({tolerance:g})." if isinstance(tolerance, (int, float)) else "."),
        id="invariance",
    )
    blocks: list[dict[str, Any]] = [summary]
    note = _dead_unit_note(r["measures"], reps)
    if note:
        blocks.append(_p("Note: " + note.removeprefix("note: "), cls="note"))
    for rep in reps:
        blocks.append({"kind": "h3", "text": f"{rep['kind']} reparameterization"})
        if rep.get("refused"):
            blocks.append(_p(f"Refused: {rep['refused']}"))
            continue
        pairs = ", ".join(f"{a} → {b}" for a, b in rep.get("pairs", []))
        alphas = [a for a in rep.get("alphas", []) if a is not None]
        span = ""
        if alphas:
            span = f"{len(alphas)} factor(s) α in [{min(alphas):.3g}, {max(alphas):.3g}]"
        change = rep.get("max_output_change")
        blocks.append(
            _p(
                f"Layers {pairs}; {span}; largest change of any output: "
                f"{_sci(change) if change is not None else 'n/a'}."
            )
        )
        blocks.append(
            _table(
                ["measure", ("original", "num"), ("reparameterized", "num"),
                 ("relative change", "num"), "invariant"],
                [
                    [
                        _text(row["measure"], cls="name"),
                        _num(row.get("original")),
                        _num(row.get("reparameterized")),
                        _num(row.get("relative_change"), fmt=_sci),
                        _invariant(row.get("invariant")),
                    ]
                    for row in rep["rows"]
                ],
            )
        )
    measures = [_measures_table(r["measures"], id="original-measures")]
    return {
        "title": f"{_name(ck.get('path'))} · layer {layer.get('name')} · invariance audit",
        "facts": [
            ("checkpoint", ck.get("path")),
            ("layer", _layer_text(layer)),
            ("data", _data_text(data)),
        ],
        "sections": [
            {"title": "Invariance", "id": "invariance-section", "blocks": blocks},
            {"title": "Measures of the original model", "id": "measures-section",
             "blocks": measures},
        ],
    }


def _measures_table(measures: Mapping[str, Any], *, id: str) -> dict[str, Any]:  # noqa: A002
    """Value, standard error, method (with its details) and flags of each measure."""
    rows = [
        [
            _text(name, cls="name"),
            _num(est.get("value")),
            _stderr_cell(est),
            _cell(est.get("method"), cls="method", more=_details(est)),
            _cell(None, flags=_flags(est), text_if_empty="none"),
        ]
        for name, est in measures.items()
    ]
    n_flagged = sum(1 for row in rows if row[-1]["flags"])
    return _table(
        ["measure", ("value", "num"), ("± stderr", "num"), "method", "flags"],
        rows,
        caption=f"{len(rows)} measures, {n_flagged} flagged. “exact” in the standard error "
        "column: the value is computed, not estimated from random draws.",
        id=id,
    )


def _dead_unit_note(measures: Mapping[str, Any], reps: Sequence[Any]) -> str | None:
    """The terminal's explanation of a moved κ̃ (:func:`flatcli.audit.dead_unit_note`)."""
    from .audit import Reparameterization, Row, dead_unit_note
    from .measures.estimate import Estimate

    original = {
        name: Estimate(
            est.get("value"),
            est.get("stderr"),
            est.get("method", ""),
            {k: v for k, v in est.items() if k not in ("value", "stderr", "method")},
        )
        for name, est in measures.items()
    }
    objects = [
        Reparameterization(
            kind=rep["kind"],
            refused=rep.get("refused"),
            rows=[Row(**row) for row in rep.get("rows", [])],
        )
        for rep in reps
    ]
    return dead_unit_note(original, objects)


def _correlate_page(
    r: Mapping[str, Any], *, color_by: str | None, log_x: bool
) -> dict[str, Any]:
    import pandas as pd

    from .plots import GAP_LABELS, scatter_grid_figure, tau_bar_figure

    df = pd.DataFrame(r["checkpoints"])
    stats = pd.DataFrame(r["correlations"])
    if df.empty or stats.empty:
        raise FlatcliError("the correlate result has no checkpoints or no correlations")
    for col in stats.columns:
        if col not in ("measure", "gap"):
            stats[col] = pd.to_numeric(stats[col], errors="coerce")
    measures = list(dict.fromkeys(stats["measure"]))
    gaps = list(dict.fromkeys(stats["gap"]))
    hparams = list(r.get("hparams") or [])
    granulated = r.get("granulated_kendall") or {}
    color = _color_column(df, color_by, hparams)

    sections = []
    for gap in gaps:
        rows_gap = stats[stats["gap"] == gap].sort_values(
            "kendall_tau_b", ascending=False, na_position="last", kind="stable"
        )
        bars = tau_bar_figure(stats, gap)
        bar_alt = (
            f"Bar chart of Kendall τ-b between each measure and the {GAP_LABELS.get(gap, gap)}, "
            f"with bootstrap confidence intervals; "
            + "; ".join(
                f"{m}: {_corr(v)}" for m, v in zip(rows_gap["measure"], rows_gap["kendall_tau_b"],
                                                  strict=True)
            )
            + "."
        )
        scatter = scatter_grid_figure(df, measures, gap, color_by=color, log_x=log_x, stats=stats)
        colored = f", colored by {color.removeprefix('hp_')}" if color else ""
        scatter_alt = (
            f"Scatter plots of each measure ({', '.join(measures)}) against the "
            f"{GAP_LABELS.get(gap, gap)}, one point per checkpoint{colored}."
        )
        columns: list[Any] = [
            "measure", ("n", "num"), ("Kendall τ-b", "num"), ("Kendall τ-a", "num"),
            ("Spearman ρ", "num"), ("Pearson r", "num"),
        ]
        if hparams:
            columns.append(("Ψ", "num"))
            columns += [(f"ψ {hp.removeprefix('hp_')}", "num") for hp in hparams]
        rows = []
        for _, row in rows_gap.iterrows():
            cells = [_text(row["measure"], cls="name"), _int(row.get("n"))]
            for stat in ("kendall_tau_b", "kendall_tau_a", "spearman_rho", "pearson_r"):
                cells.append(_corr_cell(row, stat))
            if hparams:
                g = granulated.get(gap, {}).get(row["measure"], {})
                cells.append(_num(g.get("Psi"), fmt=_corr))
                psi = g.get("psi") or {}
                groups = g.get("groups") or {}
                for hp in hparams:
                    cell = _num(psi.get(hp), fmt=_corr)
                    if hp in groups:
                        cell["title"] = f"{groups[hp]} group(s)"
                    cells.append(cell)
            rows.append(cells)
        title = GAP_TITLES.get(gap, f"Correlation with {gap}")
        blocks: list[dict[str, Any]] = [
            _figure(bars, alt=bar_alt, caption="Kendall τ-b per measure with its bootstrap "
                    "confidence interval: blue when the interval lies above 0, red below, "
                    "grey when it includes 0."),
            _table(
                columns,
                rows,
                caption="Correlation of each measure with the gap over checkpoints, with its "
                "percentile bootstrap confidence interval below"
                + (
                    "; Ψ is Jiang et al.'s granulated Kendall over "
                    + ", ".join(h.removeprefix("hp_") for h in hparams)
                    + ", ψ per hyperparameter"
                    if hparams
                    else ""
                )
                + ".",
                id=f"correlations-{gap}",
                layout="scroll",
            ),
            _figure(scatter, alt=scatter_alt, caption=f"Each checkpoint's measure against the "
                    f"gap{colored}.", wide=True),
        ]
        sections.append({"title": title, "id": f"section-{gap}", "blocks": blocks})

    sections.append(
        {
            "title": "Checkpoints",
            "id": "checkpoints-section",
            "blocks": [_checkpoint_table(df, measures)],
        }
    )
    skipped = r.get("skipped") or []
    sections.append(
        {
            "title": f"Skipped files ({len(skipped)})",
            "id": "skipped",
            "blocks": [
                {"kind": "list", "items": [(s.get("checkpoint"), s.get("reason")) for s in skipped]}
                if skipped
                else _p("None: every file given was measured.", cls="none")
            ],
        }
    )
    computed = r.get("computed")
    facts = [("checkpoints", f"{len(df)} measured" + (
        f" ({computed} now, {len(df) - computed} from the cache)"
        if isinstance(computed, int) else ""
    ) + (f", {len(skipped)} skipped" if skipped else ""))]
    facts.append(("measures", ", ".join(measures)))
    if hparams:
        facts.append(("hyperparameters", ", ".join(h.removeprefix("hp_") for h in hparams)))
    if r.get("source"):
        facts.append(("recomputed from", r["source"]))
    return {
        "title": f"Which measure predicts generalization? {len(df)} checkpoints",
        "facts": facts,
        "sections": sections,
    }


def _finetune_page(r: Mapping[str, Any]) -> dict[str, Any]:
    from .finetune import EpochRecord

    h = r.get("hparams") or {}
    history = [EpochRecord(**row) for row in r["history"]]
    blocks: list[dict[str, Any]] = []
    if history:
        blocks.append(
            _png_figure(
                _history_png(history),
                alt="Three line charts over epochs: training and test loss, the FAM "
                "penalty κ, and test accuracy.",
                caption="Per-epoch curves: loss (log scale), κ averaged over the epoch's "
                "batches, and test accuracy.",
                size=(11 * 96, 3.4 * 96),
            )
        )
    blocks.append(
        _table(
            [("epoch", "num"), ("lr", "num"), ("train loss", "num"), ("κ (batches)", "num"),
             ("test loss", "num"), ("test acc", "num"), ("seconds", "num")],
            [
                [
                    _int(row["epoch"]),
                    _num(row.get("lr"), fmt=lambda x: f"{x:.3g}"),
                    _num(row.get("train_loss")),
                    _num(row.get("kappa")),
                    _num(row.get("test_loss")),
                    _num(row.get("test_accuracy")),
                    _num(row.get("seconds"), fmt=lambda x: f"{x:.1f}"),
                ]
                for row in r["history"]
            ],
            caption="One row per epoch"
            + (f"; epochs 1–{r['resumed_from']} were restored from the state file"
               if r.get("resumed_from") else "")
            + ".",
            id="epochs",
            layout="scroll",
        )
    )
    before, after = r.get("before") or {}, r.get("after") or {}
    rows = []
    for name, est in after.items():
        b = (before.get(name) or {}).get("value")
        a = est.get("value")
        change = a / b - 1 if a is not None and b not in (None, 0) else None
        rows.append(
            [
                _text(name, cls="name"),
                _num(b),
                _num(a),
                _num(change, fmt=lambda x: f"{x:+.1%}"),
                _cell(est.get("method"), cls="method"),
            ]
        )
    compare = _table(
        ["measure", ("before", "num"), ("after", "num"), ("change", "num"), "method"],
        rows,
        caption="The layer's measures and test metrics before and after fine-tuning "
        "(measures on the training data).",
        id="before-after",
    )
    lam = h.get("fam_lambda")
    opt = h.get("optimizer")
    facts = [
        ("FAM layer", r.get("layer")),
        ("κ computed by", r.get("fam_method")),
        ("objective", f"E + λκ with λ = {lam:g}" if isinstance(lam, (int, float)) else None),
        ("optimizer", f"{opt} · lr {h.get('lr')} ({h.get('schedule')}) · batch "
         f"{h.get('batch_size')} · {len(history)} epoch(s)" if opt else None),
        ("output", (r.get("checkpoint") or {}).get("output")),
    ]
    files = [(what, p) for what, p in (r.get("files") or {}).items() if p]
    sections = [
        {"title": "Before and after", "id": "before-after-section", "blocks": [compare]},
        {"title": "Training curves", "id": "curves", "blocks": blocks},
    ]
    if h:
        sections.append(
            {
                "title": "Hyperparameters",
                "id": "hparams",
                "blocks": [_kv_table(h.items(), "hyperparameter")],
            }
        )
    if files:
        sections.append({"title": "Files", "id": "files", "blocks": [
            {"kind": "list", "items": files}]})
    out = (r.get("checkpoint") or {}).get("output")
    return {
        "title": f"FAM fine-tuning · {_name(out) if out else r.get('layer')}",
        "facts": [(k, v) for k, v in facts if v is not None],
        "sections": sections,
    }


# --------------------------------------------------------------------------- pieces


def _render(result: Mapping[str, Any], kind: str, page: Mapping[str, Any]) -> str:
    from markupsafe import Markup

    from . import __version__

    env = _environment()
    script = env.loader.get_source(env, "report.js")[0]  # type: ignore[union-attr]
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    manifest = result.get("manifest") or {}
    return env.get_template("page.html.j2").render(
        kind=kind,
        schema=result.get("schema"),
        version=__version__,
        command=command_line(manifest.get("argv")),
        manifest_blocks=_manifest_blocks(result),
        result_json=Markup(_script_json(result)),
        script=Markup(script),
        script_hash=f"sha256-{digest}",
        **page,
    )


def _environment():  # noqa: ANN202 - a jinja2.Environment, imported lazily
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("flatcli", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["wbr"] = _wbr
    return env


def _wbr(text: Any) -> Any:
    """Escape ``text`` and allow line breaks after underscores (long measure names)."""
    from markupsafe import Markup, escape

    return Markup("_<wbr>").join(escape(str(text)).split("_"))


def _manifest_blocks(r: Mapping[str, Any]) -> list[dict[str, Any]]:
    # argv is the command line above; the JSON at the end has it as recorded.
    manifest = {k: v for k, v in (r.get("manifest") or {}).items() if k != "argv"}
    blocks: list[dict[str, Any]] = [
        _kv_table(manifest.items(), "manifest", caption="Versions, device, dtype and seed.")
    ]
    sums = _checksums(r)
    if sums:
        blocks.append(
            _table(
                ["file", "role", "sha256"],
                [[_text(f, cls="name"), _text(role), _text(s, cls="mono")] for f, role, s in sums],
                caption="Checksums of every file the result depends on.",
                id="checksums",
                sortable=False,
            )
        )
    for key in ("config", "hparams", "audit"):
        if isinstance(r.get(key), Mapping) and r[key]:
            blocks.append(_kv_table(r[key].items(), "option", caption=f"Options ({key})."))
    blocks.append({"kind": "details", "summary": "The whole manifest as JSON",
                   "blocks": [{"kind": "pre", "text": _json_text(r.get("manifest") or {})}]})
    return blocks


def _checksums(r: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    ck = r.get("checkpoint")
    if isinstance(ck, Mapping):
        if ck.get("sha256"):
            out.append((str(ck.get("path")), "checkpoint", str(ck["sha256"])))
        if ck.get("parent_sha256"):
            out.append(("(the starting checkpoint)", "input", str(ck["parent_sha256"])))
        if ck.get("output_sha256"):
            out.append((str(ck.get("output")), "output", str(ck["output_sha256"])))
    for row in r.get("checkpoints") or []:
        if isinstance(row, Mapping) and row.get("sha256"):
            out.append((str(row.get("path") or row.get("checkpoint")), "checkpoint",
                        str(row["sha256"])))
    return out


def _checkpoint_table(df: Any, measures: Sequence[str]) -> dict[str, Any]:
    skip = {"path", "sha256"}
    stderr_cols = {f"{m}_stderr" for m in measures}
    columns = []
    for col in df.columns:
        if col in skip:
            continue
        if col in stderr_cols and df[col].isna().all():
            continue
        columns.append(col)
    header: list[Any] = []
    for col in columns:
        numeric = col != "checkpoint" and _is_numeric(df[col])
        label = col.removeprefix("hp_") + " (hp)" if col.startswith("hp_") else col
        header.append((label, "num") if numeric else label)
    rows = []
    for rec in df.to_dict(orient="records"):
        cells = []
        for col in columns:
            v = rec.get(col)
            if col == "checkpoint":
                cells.append(_text(v, cls="name", title=rec.get("path")))
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or v is None:
                cells.append(_text(None if _missing(v) else str(v)))
            elif isinstance(v, int):
                cells.append(_int(v))
            else:
                cells.append(_num(_nan_none(v)))
        rows.append(cells)
    return _table(header, rows, caption=f"{len(rows)} checkpoints: measures, losses, "
                  "accuracies, gaps and hyperparameters.",
                  id="checkpoints", layout="scroll")


def _color_column(df: Any, color_by: str | None, hparams: Sequence[str]) -> str | None:
    if color_by is not None:
        for col in (color_by, f"hp_{color_by}"):
            if col in df.columns:
                return col
        hps = ", ".join(c.removeprefix("hp_") for c in df.columns if c.startswith("hp_"))
        raise FlatcliError(
            f"--color-by {color_by!r} is not a column; hyperparameters: {hps or 'none'}"
        )
    for hp in hparams:
        if hp in df.columns and df[hp].nunique(dropna=True) > 1:
            return hp
    return None


def _figure(fig: Figure, *, alt: str, caption: str, wide: bool = False) -> dict[str, Any]:
    from .plots import figure_bytes

    w, h = fig.get_size_inches()
    data = base64.b64encode(figure_bytes(fig, "svg")).decode("ascii")
    return {
        "kind": "figure",
        "src": f"data:image/svg+xml;base64,{data}",
        "alt": alt,
        "caption": caption,
        "width": round(w * 96),
        "height": round(h * 96),
        "wide": wide,
    }


def _png_figure(png: bytes, *, alt: str, caption: str, size: tuple[float, float]) -> dict[str, Any]:
    return {
        "wide": True,
        "kind": "figure",
        "src": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
        "alt": alt,
        "caption": caption,
        "width": round(size[0]),
        "height": round(size[1]),
    }


def _history_png(history: Sequence[Any]) -> bytes:
    """The fine-tuning curves as PNG bytes, drawn by :func:`flatcli.finetune.plot_history`."""
    import tempfile

    from .finetune import plot_history

    with tempfile.TemporaryDirectory(prefix="flatcli-html-") as tmp:
        path = plot_history(history, Path(tmp) / "curves.png")
        return path.read_bytes()


def _table(
    columns: Sequence[str | tuple[str, str]],
    rows: list[list[dict[str, Any]]],
    *,
    caption: str | None = None,
    id: str | None = None,  # noqa: A002 - the HTML attribute
    sortable: bool = True,
    layout: str = "stack",
) -> dict[str, Any]:
    """A table block; ``layout`` on a phone: ``stack`` (a card per row) or ``scroll``."""
    cols = [
        {"label": c, "cls": None, "title": None}
        if isinstance(c, str)
        else {"label": c[0], "cls": c[1], "title": None}
        for c in columns
    ]
    return {"kind": "table", "columns": cols, "rows": rows, "caption": caption, "id": id,
            "sortable": sortable and len(rows) > 1, "layout": layout}


def _kv_table(items: Iterable[tuple[Any, Any]], what: str, caption: str | None = None) -> dict:
    return _table(
        [what, "value"],
        [[_text(str(k), cls="name"), _text(_plain(v), cls="mono")] for k, v in items],
        caption=caption,
        sortable=False,
        layout="kv",
    )


def _cell(
    text: Any,
    *,
    value: Any = None,
    cls: str | None = None,
    title: str | None = None,
    flags: Sequence[str] = (),
    more: Sequence[tuple[str, str]] = (),
    sub: str | None = None,
    text_if_empty: str | None = None,
) -> dict[str, Any]:
    if (text is None or text == "") and not flags and text_if_empty is not None:
        text, cls = text_if_empty, "none"
    return {"text": text, "value": value, "cls": cls, "title": title, "flags": list(flags),
            "more": list(more), "sub": sub}


def _p(text: str, *, cls: str | None = None) -> dict[str, Any]:
    return {"kind": "p", "text": text, "cls": cls}


def _text(text: Any, *, cls: str | None = None, title: str | None = None) -> dict[str, Any]:
    return _cell(None if text is None else str(text), cls=cls, title=title)


def _num(x: float | None, *, fmt: Any = None) -> dict[str, Any]:
    """A numeric cell: the formatted number, with the exact value in ``data-value``."""
    from .report import format_value

    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return _cell("n/a", value="", cls="num none")
    return _cell((fmt or format_value)(x), value=repr(float(x)), cls="num")


def _int(x: Any) -> dict[str, Any]:
    if _missing(x):
        return _cell("n/a", value="", cls="num none")
    return _cell(str(int(x)), value=str(int(x)), cls="num")


def _stderr_cell(est: Mapping[str, Any]) -> dict[str, Any]:
    if est.get("stderr") is None:
        return _cell("exact", value="", cls="num none")
    return _num(est["stderr"])


def _corr_cell(row: Any, stat: str) -> dict[str, Any]:
    """A correlation and, on a second line, its confidence interval."""
    cell = _num(_nan_none(row.get(stat)), fmt=_corr)
    lo, hi = _nan_none(row.get(f"{stat}_lo")), _nan_none(row.get(f"{stat}_hi"))
    if lo is not None and hi is not None:
        cell["sub"] = f"[{_corr(lo)}, {_corr(hi)}]"
        cell["title"] = f"CI {lo!r} to {hi!r}"
    return cell


def _invariant(flag: bool | None) -> dict[str, Any]:
    if flag is None:
        return _cell("n/a", cls="none")
    return _cell("yes" if flag else "no", cls="yes" if flag else "no")


def _flags(est: Mapping[str, Any]) -> list[str]:
    """Degenerate or doubtful values, in words: what a reader should not take at face value."""
    flags = [str(w) for w in est.get("warnings") or []]
    value, stderr = est.get("value"), est.get("stderr")
    if value is None:
        flags.append("no finite value (NaN or infinite)")
    elif value == 0:
        flags.append("exactly 0")
    elif stderr is not None and abs(stderr) > RELATIVE_STDERR_FLAG * abs(value):
        flags.append(f"stderr is {abs(stderr / value):.0%} of the value")
    if est.get("converged") is False:
        flags.append("did not converge")
    if est.get("hit_sigma_max"):
        flags.append("σ′ hit the search bound")
    if est.get("dead_units"):
        handling = est.get("dead_unit_handling")
        flags.append(f"{est['dead_units']} dead unit(s)" + (f", {handling}" if handling else ""))
    return flags


def _details(est: Mapping[str, Any]) -> list[tuple[str, str]]:
    keep = ("value", "stderr", "method", "warnings")
    return [(str(k), _plain(v)) for k, v in est.items() if k not in keep]


def _kind(result: Mapping[str, Any], *, source: str = "the result") -> str:
    schema = result.get("schema") if isinstance(result, Mapping) else None
    if schema not in SCHEMAS:
        known = ", ".join(SCHEMAS)
        raise FlatcliError(
            f"{source} has schema {schema!r}; a page can be rendered from: {known}"
        )
    return SCHEMAS[schema]


def _script_json(result: Mapping[str, Any]) -> str:
    """The result as JSON that is safe inside a ``<script>`` element."""
    from .report import to_json

    text = to_json(result)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


class _ResultFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.found: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script" and ("id", RESULT_ELEMENT_ID) in attrs and self.found is None:
            self.inside, self.found = True, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.inside = False

    def handle_data(self, data: str) -> None:
        if self.inside and self.found is not None:
            self.found.append(data)


def _embedded_json(text: str) -> str | None:
    finder = _ResultFinder()
    finder.feed(text)
    finder.close()
    return None if finder.found is None else "".join(finder.found)


def _json_text(obj: Any) -> str:
    from .report import to_json

    return to_json(obj).rstrip("\n")


def _plain(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v, ensure_ascii=False)


def _corr(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _sci(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def _nan_none(x: Any) -> float | None:
    if _missing(x):
        return None
    return float(x)


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _is_numeric(col: Any) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(col)) and not pd.api.types.is_bool_dtype(col)


def _name(path: Any) -> str:
    return Path(str(path)).name if path else "result"


def _layer_text(layer: Mapping[str, Any]) -> str:
    text = str(layer.get("name"))
    if layer.get("type"):
        text += f" ({layer['type']}"
        if layer.get("shape"):
            text += ", weight " + " × ".join(str(s) for s in layer["shape"])
        text += ")"
    return text


def _data_text(data: Mapping[str, Any]) -> str:
    return f"{data.get('source')}, {data.get('split')} split, n = {data.get('n_samples')}"
