"""The page of each kind of result: its title, facts and sections of blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import FlatcliError
from . import blocks as b

GAP_TITLES = {
    "gap_loss": "Generalization gap in loss (test loss − train loss)",
    "gap_acc": "Generalization gap in accuracy (train accuracy − test accuracy)",
}


def measure_page(r: Mapping[str, Any]) -> dict[str, Any]:
    ck, layer, data = r["checkpoint"], r["layer"], r["data"]
    facts = [
        ("checkpoint", ck.get("path")),
        ("layer", b.layer_text(layer)),
        ("data", b.data_text(data)),
    ]
    if r.get("config", {}).get("loss"):
        facts.append(("loss", r["config"]["loss"]))
    table = _measures_table(r["measures"], id="measures")
    return {
        "title": f"{b.file_name(ck.get('path'))} · layer {layer.get('name')}",
        "facts": facts,
        "sections": [{"title": "Measures", "id": "measures-section", "blocks": [table]}],
    }


def audit_page(r: Mapping[str, Any]) -> dict[str, Any]:
    ck, layer, data = r["checkpoint"], r["layer"], r["data"]
    reps = r["reparameterizations"]
    settings = r.get("audit") or {}
    blocks: list[dict[str, Any]] = [_invariance_table(r["measures"], reps, settings)]
    note = _dead_unit_note(r["measures"], reps)
    if note:
        blocks.append(b.paragraph("Note: " + note.removeprefix("note: "), cls="note"))
    if not r["measures"]:
        blocks.append(b.paragraph("Nothing was measured: every reparameterization was refused."))
    for line in r.get("theorem4") or []:
        blocks.append(b.paragraph(f"Theorem 4: {line}", cls="note"))
    for rep in reps:
        blocks += _reparameterization_blocks(rep)
    sections = [
        {"title": "Invariance", "id": "invariance-section", "blocks": blocks},
        {"title": "Function-preservation check", "id": "function-check-section",
         "blocks": [_function_check_table(reps)]},
    ]  # fmt: skip
    skipped = r.get("skipped") or {}
    if skipped:
        table = b.table(
            ["measure", "why"],
            [[b.text_cell(k, cls="name"), b.text_cell(v)] for k, v in skipped.items()],
            caption="Measures not computed: the audit runs every measure once per model "
            "(original and each reparameterization) and plans to fit its time budget.",
            id="skipped",
        )
        sections.append({"title": "Skipped measures", "id": "skipped-section", "blocks": [table]})
    sections.append(
        {"title": "Measures of the original model", "id": "measures-section",
         "blocks": [_measures_table(r["measures"], id="original-measures")]}
    )  # fmt: skip
    facts = [
        ("checkpoint", ck.get("path")),
        ("layer", b.layer_text(layer)),
        ("data", b.data_text(data)),
    ]
    if isinstance(settings.get("seconds"), (int, float)):
        budget = settings.get("time_budget")
        facts.append(
            ("wall time", f"{settings['seconds']:.1f} s"
             + (f" (time budget {budget:g} s)" if isinstance(budget, (int, float)) else ""))
        )  # fmt: skip
    return {
        "title": f"{b.file_name(ck.get('path'))} · layer {layer.get('name')} · invariance audit",
        "facts": facts,
        "sections": sections,
    }


def _invariance_table(
    measures: Mapping[str, Any], reps: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """One row per measure: its original value, and per applied reparameterization the
    relative change and the verdict."""
    done = [rep for rep in reps if not rep.get("refused")]
    columns: list[Any] = ["measure", ("original", "num")]
    for rep in done:
        columns += [(f"{rep['kind']}: relative change", "num"), f"{rep['kind']}: invariant"]
    by_kind = [{row["measure"]: row for row in rep["rows"]} for rep in done]
    rows = []
    for name, est in measures.items():
        row = [b.text_cell(name, cls="name"), b.num(est.get("value"))]
        for lookup in by_kind:
            hit = lookup.get(name)
            row += [
                b.num(None if hit is None else hit["relative_change"], fmt=b.sci),
                b.invariant(None if hit is None else hit["invariant"]),
            ]
        rows.append(row)
    tolerance = settings.get("tolerance")
    return b.table(
        columns,
        rows,
        caption="Relative change of each measure under each function-preserving "
        "reparameterization; “invariant” when below the tolerance"
        + (f" ({tolerance:g})." if isinstance(tolerance, (int, float)) else "."),
        id="invariance",
    )


def _function_check_table(reps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per reparameterization: applied or refused, where, and how far the outputs moved."""
    rows = []
    for rep in reps:
        change, tol = rep.get("max_output_change"), rep.get("tolerance")
        status = "refused" if rep.get("refused") else "applied"
        rows.append(
            [
                b.text_cell(rep["kind"], cls="name"),
                b.text_cell(status),
                b.int_cell(len(rep.get("sites") or rep.get("pairs") or [])),
                b.int_cell(len(rep.get("refused_sites") or [])),
                b.num(change, fmt=b.sci),
                b.num(tol, fmt=b.sci),
                b.text_cell(rep.get("refused") or rep.get("description") or ""),
            ]
        )
    return b.table(
        ["reparameterization", "status", "sites", "sites left out",
         ("max |Δ output|", "num"), ("tolerance", "num"), "what, or why refused"],
        rows,
        caption="Each reparameterization is applied to a copy of the model and its outputs "
        "compared with the original's on every sample; above the tolerance it is refused.",
        id="function-check",
    )  # fmt: skip


def _reparameterization_blocks(rep: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A heading, what was done (or why not), the before/after table, the sites left out."""
    out: list[dict[str, Any]] = [{"kind": "h3", "text": f"{rep['kind']} reparameterization"}]
    left_out = rep.get("refused_sites") or []
    if rep.get("refused"):
        out.append(b.paragraph(f"Refused: {rep['refused']}"))
    else:
        pairs = ", ".join(f"{x} → {y}" if y else x for x, y in rep.get("pairs", []))
        alphas = [a for a in rep.get("alphas", []) if a is not None]
        span = "no random factors"
        if alphas:
            span = f"{len(alphas)} factor(s) α in [{min(alphas):.3g}, {max(alphas):.3g}]"
        change = rep.get("max_output_change")
        what = f"{rep['description']}. " if rep.get("description") else ""
        out.append(
            b.paragraph(
                f"{what}Layers {pairs}; {span}; largest change of any output: "
                f"{b.sci(change) if change is not None else 'n/a'}."
            )
        )
        if rep.get("unmeasured"):
            out.append(b.paragraph(str(rep["unmeasured"]).capitalize() + "."))
        out.append(
            b.table(
                ["measure", ("original", "num"), ("reparameterized", "num"),
                 ("relative change", "num"), "invariant"],
                [
                    [
                        b.text_cell(row["measure"], cls="name"),
                        b.num(row.get("original")),
                        b.num(row.get("reparameterized")),
                        b.num(row.get("relative_change"), fmt=b.sci),
                        b.invariant(row.get("invariant")),
                    ]
                    for row in rep["rows"]
                ],
                id=f"before-after-{rep['kind']}",
            )
        )  # fmt: skip
    if left_out:
        out.append(
            {"kind": "details", "summary": f"{len(left_out)} site(s) left out",
             "blocks": [{"kind": "list", "items": [str(x) for x in left_out]}]}
        )  # fmt: skip
    return out


def _measures_table(measures: Mapping[str, Any], *, id: str) -> dict[str, Any]:  # noqa: A002
    """Value, standard error, method (with its details) and flags of each measure."""
    rows = [
        [
            b.text_cell(name, cls="name"),
            b.num(est.get("value")),
            b.stderr_cell(est),
            b.cell(est.get("method"), cls="method", more=b.details(est)),
            b.cell(None, flags=b.flags(est), text_if_empty="none"),
        ]
        for name, est in measures.items()
    ]
    n_flagged = sum(1 for row in rows if row[-1]["flags"])
    return b.table(
        ["measure", ("value", "num"), ("± stderr", "num"), "method", "flags"],
        rows,
        caption=f"{len(rows)} measures, {n_flagged} flagged. “exact” in the standard error "
        "column: the value is computed, not estimated from random draws.",
        id=id,
    )


def _dead_unit_note(measures: Mapping[str, Any], reps: Sequence[Any]) -> str | None:
    """The terminal's explanation of a moved κ̃ (:func:`flatcli.audit.dead_unit_note`)."""
    from ..audit import Reparameterization, Row, dead_unit_note
    from ..measures.estimate import Estimate

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


def correlate_page(
    r: Mapping[str, Any], *, color_by: str | None, log_x: bool
) -> dict[str, Any]:
    import pandas as pd

    from ..plots import GAP_LABELS, scatter_grid_figure, tau_bar_figure

    df = pd.DataFrame(r["checkpoints"])
    stats = pd.DataFrame(r["correlations"])
    if df.empty or stats.empty:
        raise FlatcliError("the correlate result has no checkpoints or no correlations")
    for col in stats.columns:
        if col not in ("measure", "gap", "bootstrap_degenerate", "note"):
            stats[col] = pd.to_numeric(stats[col], errors="coerce")
    perm = "kendall_perm_p" in stats and bool(stats["kendall_perm_p"].notna().any())
    gap_notes = r.get("gap_notes") or {}
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
                f"{m}: {b.corr(v)}" for m, v in zip(rows_gap["measure"], rows_gap["kendall_tau_b"],
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
        columns, rows = _correlation_rows(rows_gap, gap, perm, hparams, granulated)
        title = GAP_TITLES.get(gap, f"Correlation with {gap}")
        blocks: list[dict[str, Any]] = []
        if gap in gap_notes:
            blocks.append(b.paragraph(f"n/a: {gap_notes[gap]}.", cls="note"))
        blocks += [
            b.svg_figure(bars, alt=bar_alt, caption="Kendall τ-b per measure with its bootstrap "
                    "confidence interval: blue when the interval lies above 0, red below, "
                    "grey when it includes 0; white and hatched when no interval counts "
                    "(fewer than 10 checkpoints, or every resample gave the same value)."),
            b.table(
                columns,
                rows,
                caption="Correlation of each measure with the gap over checkpoints, with its "
                "percentile bootstrap confidence interval below (“no CI”: every resample "
                "gave the same value)"
                + ("; perm. p: the permutation p-value of τ-b" if perm else "")
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
            b.svg_figure(scatter, alt=scatter_alt, caption=f"Each checkpoint's measure against the "
                    f"gap{colored}.", wide=True),
        ]
        sections.append({"title": title, "id": f"section-{gap}", "blocks": blocks})

    if r.get("warnings"):
        warnings = {"kind": "list", "items": [str(w) for w in r["warnings"]]}
        sections.insert(0, {"title": "Warnings", "id": "warnings", "blocks": [warnings]})
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
                else b.paragraph("None: every file given was measured.", cls="none")
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


def _correlation_rows(
    rows_gap: Any, gap: str, perm: bool, hparams: Sequence[str], granulated: Mapping[str, Any]
) -> tuple[list[Any], list[list[dict[str, Any]]]]:
    """The header and rows of one gap's correlation table."""
    columns: list[Any] = [
        "measure", ("n", "num"), ("Kendall τ-b", "num"),
        *([("perm. p", "num")] if perm else []), ("Kendall τ-a", "num"),
        ("Spearman ρ", "num"), ("Pearson r", "num"),
    ]
    if hparams:
        columns.append(("Ψ", "num"))
        columns += [(f"ψ {hp.removeprefix('hp_')}", "num") for hp in hparams]
    rows = []
    for _, row in rows_gap.iterrows():
        cells = [b.text_cell(row["measure"], cls="name"), b.int_cell(row.get("n")),
                 b.corr_cell(row, "kendall_tau_b")]
        if perm:
            cells.append(b.num(b.nan_none(row.get("kendall_perm_p")), fmt=lambda x: f"{x:.2g}"))
        for stat in ("kendall_tau_a", "spearman_rho", "pearson_r"):
            cells.append(b.corr_cell(row, stat))
        if hparams:
            g = granulated.get(gap, {}).get(row["measure"], {})
            cells.append(b.num(g.get("Psi"), fmt=b.corr))
            psi = g.get("psi") or {}
            groups = g.get("groups") or {}
            for hp in hparams:
                cell = b.num(psi.get(hp), fmt=b.corr)
                if hp in groups:
                    cell["title"] = f"{groups[hp]} group(s)"
                cells.append(cell)
        rows.append(cells)
    return columns, rows


def finetune_page(r: Mapping[str, Any]) -> dict[str, Any]:
    from ..finetune_report import EpochRecord, history_figure
    from ..measures.estimate import Estimate

    h = r.get("hparams") or {}
    before, after = r.get("before") or {}, r.get("after") or {}
    matched = r.get("temperature_matched")
    history = [EpochRecord(**row) for row in r["history"]]
    kappa_key = "layerwise_flatness" if h.get("fam_variant") == "layerwise" else "relative_flatness"
    sections = []
    if r.get("warnings"):
        sections.append(
            {"title": "Warnings", "id": "warnings", "blocks": [
                {"kind": "list", "items": [str(w) for w in r["warnings"]]}]}
        )
    columns: list[Any] = ["measure", ("before", "num"), ("after", "num"), ("change", "num")]
    if matched is not None:
        columns += [("T-matched", "num"), ("change vs T-matched", "num")]
    columns.append("method")
    rows = []
    for name, est in after.items():
        was = (before.get(name) or {}).get("value")
        now = est.get("value")
        row = [b.text_cell(name, cls="name"), b.num(was), b.num(now), _change(now, was)]
        if matched is not None:
            t = (matched.get(name) or {}).get("value")
            row += [b.num(t), _change(now, t)]
        rows.append([*row, b.cell(est.get("method"), cls="method")])
    caption = (
        "The layer's measures and test metrics before and after fine-tuning (measures on "
        "the training data)."
    )
    if matched is not None and r.get("temperature_c") is not None:
        caption += (
            f" T-matched: the starting model with its logits scaled by "
            f"{r['temperature_c']:.4g}, at the fine-tuned train loss."
        )
    compare = [b.table(columns, rows, caption=caption, id="before-after")]
    if matched is None and r.get("temperature_note"):
        compare.append(
            b.paragraph(f"No temperature-matched baseline: {r['temperature_note']}", cls="note")
        )
    if h.get("fam_step_ratio") is not None:
        compare.append(
            b.paragraph(f"Relative step at step 0: R = {h['fam_step_ratio']:.3g}.", cls="note")
        )
    sections.append({"title": "Before and after", "id": "before-after-section",
                     "blocks": compare})
    curves: list[dict[str, Any]] = []
    if history:
        start = {
            k: Estimate(v.get("value"), v.get("stderr"), v.get("method", ""))
            for k, v in before.items()
            if v.get("value") is not None
        }
        fig = history_figure(history, start=start, kappa_key=kappa_key)
        curves.append(
            b.svg_figure(
                fig,
                alt="Line charts over epochs, from the starting model at epoch 0: training "
                "loss on the whole training set and as batch means, test loss, the FAM "
                "penalty κ the same two ways, and test accuracy (when there is one).",
                caption="Per-epoch curves: loss (log scale), κ and test accuracy. Solid "
                "lines: the whole training set in eval mode, the starting model at epoch 0 "
                "and the weights at the end of each epoch after it. Dashed lines: the "
                "train-mode means over each epoch's batches (dropout on, before each "
                "update), not comparable with epoch 0.",
                wide=True,
            )
        )
    curves.append(_epochs_table(r))
    sections.append({"title": "Training curves", "id": "curves", "blocks": curves})
    if h:
        sections.append(
            {
                "title": "Hyperparameters",
                "id": "hparams",
                "blocks": [b.kv_table(h.items(), "hyperparameter")],
            }
        )
    files = [(what, p) for what, p in (r.get("files") or {}).items() if p]
    if files:
        sections.append({"title": "Files", "id": "files", "blocks": [
            {"kind": "list", "items": files}]})
    lam, asked = h.get("fam_lambda_used", h.get("fam_lambda")), h.get("fam_lambda")
    objective = None
    if isinstance(lam, (int, float)):
        objective = f"E + λκ with λ = {lam:.4g}" + (f" ({asked})" if asked == "auto" else "")
    opt = h.get("optimizer")
    facts = [
        ("FAM layer", r.get("layer")),
        ("κ computed by", r.get("fam_method")),
        ("objective", objective),
        ("gradient", h.get("fam_gradient")),
        ("optimizer", f"{opt} · lr {h.get('lr')} ({h.get('schedule')}) · batch "
         f"{h.get('batch_size')} · {len(history)} epoch(s)" if opt else None),
        ("output", (r.get("checkpoint") or {}).get("output")),
    ]
    out = (r.get("checkpoint") or {}).get("output")
    return {
        "title": f"FAM fine-tuning · {b.file_name(out) if out else r.get('layer')}",
        "facts": [(k, v) for k, v in facts if v is not None],
        "sections": sections,
    }


def _epochs_table(r: Mapping[str, Any]) -> dict[str, Any]:
    """One row per epoch: the whole-set values, the batch means, the test metrics."""
    return b.table(
        [("epoch", "num"), ("lr", "num"), ("train loss", "num"), ("κ", "num"),
         ("batch loss", "num"), ("batch κ", "num"),
         ("‖W‖²", "num"), ("test loss", "num"), ("test acc", "num"),
         ("seconds", "num")],
        [
            [
                b.int_cell(row["epoch"]),
                b.num(row.get("lr"), fmt=lambda x: f"{x:.3g}"),
                b.num(row.get("full_train_loss")),
                b.num(row.get("full_kappa")),
                b.num(row.get("train_loss")),
                b.num(row.get("kappa")),
                b.num(row.get("weight_sq_norm")),
                b.num(row.get("test_loss")),
                b.num(row.get("test_accuracy")),
                b.num(row.get("seconds"), fmt=lambda x: f"{x:.1f}"),
            ]
            for row in r["history"]
        ],
        caption="One row per epoch. Train loss and κ: the whole training set in eval "
        "mode at the end of the epoch; batch: train-mode means over its batches"
        + (f"; epochs 1–{r['resumed_from']} were restored from the state file"
           if r.get("resumed_from") else "")
        + ".",
        id="epochs",
        layout="scroll",
    )


def _change(now: float | None, was: float | None) -> dict[str, Any]:
    change = now / was - 1 if now is not None and was not in (None, 0) else None
    return b.num(change, fmt=lambda x: f"{x:+.1%}")


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
        numeric = col != "checkpoint" and b.is_numeric(df[col])
        label = col.removeprefix("hp_") + " (hp)" if col.startswith("hp_") else col
        header.append((label, "num") if numeric else label)
    rows = []
    for rec in df.to_dict(orient="records"):
        cells = []
        for col in columns:
            v = rec.get(col)
            if col == "checkpoint":
                cells.append(b.text_cell(v, cls="name", title=rec.get("path")))
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or v is None:
                cells.append(b.text_cell(None if b.missing(v) else str(v)))
            elif isinstance(v, int):
                cells.append(b.int_cell(v))
            else:
                cells.append(b.num(b.nan_none(v)))
        rows.append(cells)
    return b.table(header, rows, caption=f"{len(rows)} checkpoints: measures, losses, "
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
