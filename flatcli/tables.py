"""Rendering results to the terminal (rich), shared by the commands."""

from __future__ import annotations

import math
from typing import Any

from .text import markup_safe


def name_column(table: Any, header: str, names: Any) -> None:
    """A first column that shows every name in full, never cut: the table shrinks others."""
    longest = max((len(str(n)) for n in names), default=len(header))
    table.add_column(header, style="bold", no_wrap=True, min_width=max(longest, len(header)))


def measures_table(measures: Any, *, title: str | None = None) -> None:
    """Print measures with value and standard error; their methods as numbered notes.

    Full measure names at any width (piped output and 80 columns included). A method
    string is long and often shared by several measures, so the table names it by a
    note number and the notes follow the table (``--format json`` has them per measure).
    A failed measure shows ``failed`` (its note is the error); a value with warnings is
    marked ⚠ and its warnings follow the notes.
    """
    from rich.console import Console
    from rich.table import Table

    from .measures.estimate import warnings_of
    from .report import FLAG, format_value, stderr_text

    console = Console()
    notes: dict[str, int] = {}
    table = Table(title=markup_safe(title) if title else None, title_justify="left")
    name_column(table, "measure", measures)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("± stderr", justify="right", no_wrap=True)
    table.add_column("method", justify="right", no_wrap=True)
    flags: list[str] = []
    for name, est in measures.items():
        number = notes.setdefault(est.method, len(notes) + 1)
        if "error" in est.details:  # a failed or interrupted measure: its row, its error
            table.add_row(markup_safe(name), "failed", "", f"\\[{number}]")
            continue
        se = stderr_text(est.stderr, est.details)
        warnings = warnings_of(est)
        value = format_value(est.value) + (f" {FLAG}" if warnings else "")
        table.add_row(markup_safe(name), value, se, f"\\[{number}]")
        flags += [f"{FLAG} {name}: {w}" for w in warnings]
    console.print(table)
    for method, number in notes.items():
        console.print(f"[{number}] {method}", highlight=False, markup=False)
    for line in flags:
        console.print(line, highlight=False, markup=False)


def inspect_table(ck: Any, info: dict) -> None:
    """Print :func:`flatcli.inspection.describe`'s result as a table.

    Layer names are never cut. When the type, shape and parameter columns do not fit
    beside the longest name, they share one wrapped column with the measures.
    """
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"{markup_safe(ck.path.name)} ({info['checkpoint']['format']}, "
        f"{info['parameters']:,} parameters)",
        title_justify="left",
    )
    names = [row["name"] + (" *" if row["name"] == info["default_layer"] else "")
             for row in info["layers"]]
    cells = [
        (markup_safe(row["type"]), str(row["weight_shape"] or ""), f"{row['parameters']:,}")
        for row in info["layers"]
    ]
    widths = [max((len(c[i]) for c in cells), default=0) for i in range(3)]
    room = max((len(n) for n in names), default=5) + sum(widths) + 30 + 16  # measures, rules
    name_column(table, "layer", names)
    if console.width >= room:
        for col in ("type", "weight shape", "parameters", "measures"):
            table.add_column(col, justify="right" if col == "parameters" else "left")
        for name, (kind, shape, count), row in zip(names, cells, info["layers"], strict=True):
            table.add_row(markup_safe(name), kind, shape, count, markup_safe(row["measures"]))
    else:
        table.add_column("type · weight shape · parameters · measures")
        for name, (kind, shape, count), row in zip(names, cells, info["layers"], strict=True):
            about = " · ".join(t for t in (kind, shape, count, markup_safe(row["measures"])) if t)
            table.add_row(markup_safe(name), about)
    console.print(table)
    console.print(f"* default feature layer: {markup_safe(info['default_layer'])}")
    console.print(f"model-wide measures: {markup_safe(info['model_measures'])}")
    console.print(f"sha256: {info['checkpoint']['sha256']}")
    for key, value in info["metadata"].items():
        console.print(f"metadata {markup_safe(key)}: {markup_safe(value)}", highlight=False)


def audit_tables(result: Any) -> None:
    """Print one invariance table per reparameterization (with its function check), what
    was refused or skipped and why, Theorem 4's lines and the dead-unit note."""
    from rich.console import Console
    from rich.table import Table

    from .audit import dead_unit_note
    from .report import format_value

    console = Console()
    reps = result.reparameterizations
    for rep in reps:
        if rep.refused:
            console.print(
                f"[bold]{rep.kind}[/]: refused: {markup_safe(rep.refused)}", highlight=False
            )
            _print_some(console, "left out", rep.refused_sites)
            continue
        where = rep.sites or [f"{a}→{b}" for a, b in rep.pairs]
        check = f"max |Δ output| = {rep.max_output_change:.2e}"
        if rep.tolerance is not None:
            check += f" ≤ {rep.tolerance:.1e}"
        table = Table(
            title=f"{rep.kind} reparameterization ({len(where)} site(s); {check})",
            title_justify="left",
        )
        name_column(table, "measure", [row.measure for row in rep.rows])
        for col in ("original", "reparameterized", "relative change", "invariant"):
            table.add_column(col, justify="right")
        for row in rep.rows:
            mark = "[green]yes[/]" if row.invariant else "[red]no[/]"
            table.add_row(
                markup_safe(row.measure),
                format_value(row.original),
                format_value(row.reparameterized),
                f"{row.relative_change:.1e}",
                mark,
            )
        console.print(table)
        if rep.unmeasured:
            console.print(f"  {markup_safe(rep.unmeasured)}", highlight=False)
        if rep.description:
            console.print(f"  what: {markup_safe(rep.description)}", highlight=False)
        _print_some(console, "site", where)
        _print_some(console, "left out", rep.refused_sites)
    if not result.measures:
        console.print("nothing measured: every reparameterization was refused")
    for name, why in result.skipped.items():
        console.print(f"skipped {markup_safe(name)}: {markup_safe(why)}", highlight=False)
    for line in result.theorem4:
        console.print(f"Theorem 4: {markup_safe(line)}", highlight=False)
    explain = dead_unit_note(result.measures, reps)
    if explain:
        console.print(markup_safe(explain), highlight=False)
    console.print(f"audit took {result.seconds:.1f} s", highlight=False)


def _print_some(console: Any, label: str, lines: Any, most: int = 3) -> None:
    """The first ``most`` of ``lines``, then how many more (all are in JSON and HTML)."""
    for line in lines[:most]:
        console.print(f"  {label}: {markup_safe(line)}", highlight=False)
    if len(lines) > most:
        console.print(
            f"  … and {len(lines) - most} more (all in --format json and --report)",
            highlight=False,
        )


def correlations(table, result, n, run) -> None:  # noqa: ANN001
    """Print the correlation tables of :func:`flatcli.correlate.analyse`.

    A degenerate bootstrap (every resample gave the same value) shows ``[no CI]``, not an
    interval; a gap that is constant gets its reason under its table; the warnings
    (too few checkpoints) go to stderr.
    """
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a file or pipe: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 120))
    # A CI beside its value when there is room, else below it (wrapped at its space).
    sep = " " if console.width >= 120 else "\n"
    notes = result.get("gap_notes") or {}
    perm = "kendall_perm_p" in table and table["kendall_perm_p"].notna().any()
    degenerate = False
    for gap, label in (("gap_loss", "test_loss − train_loss"), ("gap_acc", "train_acc − test_acc")):
        t = Table(
            title=f"correlation with the generalization gap {label} ({n} checkpoints, "
            "95% bootstrap CIs)",
            title_justify="left",
            pad_edge=False,  # with the CIs wrapped below the values, 80 columns suffice
            collapse_padding=True,
        )
        rows = table[table["gap"] == gap].sort_values("kendall_tau_b", ascending=False)
        name_column(t, "measure", rows["measure"])
        headers = ["Kendall τ-b", *(["perm. p"] if perm else []), "τ-a", "Spearman ρ",
                   "Pearson r", "Ψ"]
        for col in headers:
            # Narrow enough for 80 columns, wide enough for each word of the header.
            t.add_column(col, justify="right", min_width=max(map(len, col.split())))
        for _, r in rows.iterrows():
            psi = result["granulated"].get(gap, {}).get(r["measure"], {}).get("Psi")
            degenerate = degenerate or bool(_degenerate(r))
            t.add_row(
                markup_safe(r["measure"]),
                _ci(r, "kendall_tau_b", sep),
                *([_p(r["kendall_perm_p"])] if perm else []),
                _num(r["kendall_tau_a"]),
                _ci(r, "spearman_rho", sep),
                _ci(r, "pearson_r", sep),
                _num(psi),
            )
        console.print(t)
        if gap in notes:
            console.print(f"n/a: {markup_safe(notes[gap])}", highlight=False)
    if degenerate:
        console.print(
            "[no CI]: every bootstrap resample gave the same value, a degenerate bootstrap "
            "(too few checkpoints to resample), not certainty", highlight=False, markup=False
        )
    if perm:
        console.print(
            "perm. p: two-sided permutation p-value of τ-b, exact over every ordering for "
            "up to 7 checkpoints", highlight=False
        )
    if result["hparams"]:
        console.print(f"Ψ: granulated Kendall over {markup_safe(', '.join(result['hparams']))}")
    if run is not None:
        console.print(
            f"{run.computed} checkpoint(s) measured now, "
            f"{n - run.computed} from the cache, {len(run.skipped)} skipped"
        )
    for line in result.get("warnings", []):
        if line not in notes.values():
            Console(stderr=True).print(
                f"[bold yellow]warning:[/] {markup_safe(line)}", highlight=False, soft_wrap=True
            )


def _num(x) -> str:  # noqa: ANN001
    import math

    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def _p(x) -> str:  # noqa: ANN001
    return "n/a" if x is None or x != x else f"{x:.2g}"  # NaN-safe


def _degenerate(r) -> list[str]:  # noqa: ANN001
    found = r.get("bootstrap_degenerate")
    return found.split(",") if isinstance(found, str) and found else []


def _ci(r, stat: str, sep: str = " ") -> str:  # noqa: ANN001
    lo, hi = r[f"{stat}_lo"], r[f"{stat}_hi"]
    bounds = "" if lo != lo or hi != hi else f"{sep}[{lo:+.2f}, {hi:+.2f}]"  # NaN-safe
    if stat in _degenerate(r):
        bounds = f"{sep}\\[no CI]"  # rich markup: a literal [
    return f"{_num(r[stat])}{bounds}"



def finetune_tables(result) -> None:  # noqa: ANN001 - a FinetuneResult, imported lazily
    """Print the per-epoch table and the before/after table of a fine-tuning run."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from .report import format_value
    console = Console()
    h = result.hparams
    lam = h["fam_lambda_used"]
    how = "" if h["fam_lambda"] == lam else f" ({h['fam_lambda']} {h['fam_scale']})"
    if h["fam_lambda"] == "auto":
        how = " (auto)"
    clip = "off" if h["clip_grad_norm"] is None else f"{h['clip_grad_norm']:g}"
    epochs = Table(
        title=markup_safe(
            f"FAM on {result.layer} · λ = {lam:.4g}{how} · {h['fam_gradient']} gradient · "
            f"{h['optimizer']} lr {h['lr']:g} ({h['schedule']}) · clip {clip} · "
            f"{result.fam_method}"
        ),
        title_justify="left",
        box=box.SIMPLE_HEAD,  # ten columns of numbers in 80 columns, none cut
        pad_edge=False,
        collapse_padding=True,
    )
    columns = ("epoch", "lr", "train loss", "κ", "batch loss", "batch κ", "‖W‖²",
               "test loss", "test acc")  # seconds: in the progress lines and the log
    rows = []
    for r in result.history:
        values = (r.full_train_loss, r.full_kappa, r.train_loss, r.kappa, r.weight_sq_norm,
                  r.test_loss, r.test_accuracy)
        rows.append(
            [str(r.epoch), f"{r.lr:.3g}", *("n/a" if v is None else f"{v:.4g}" for v in values)]
        )
    for i, col in enumerate(columns):  # the headers wrap; a number is never cut
        widest = max((len(row[i]) for row in rows), default=1)
        epochs.add_column(col, justify="right", min_width=widest, overflow="fold")
    for row in rows:
        epochs.add_row(*row)
    epochs.caption = (
        "train loss, κ: the whole training set in eval mode at the end of the epoch, as "
        "`before`; batch: train-mode means over the epoch's batches"
    )
    epochs.caption_justify = "left"
    console.print(epochs)
    matched = result.temperature_matched
    title = "before → after (κ etc. on the training data)"
    if matched is not None:
        title += (
            f"; T-matched: the start with logits × {result.temperature_c:.4g}, "
            "at the fine-tuned train loss"
        )
    compare = Table(title=title, title_justify="left")
    cols = ["measure", "before", "after", "change"]
    if matched is not None:
        cols += ["T-matched", "change"]
    widest = max(len(name) for name in result.after)
    compare.add_column("measure", justify="left", no_wrap=True, min_width=widest)
    for col in cols[1:]:
        compare.add_column(col, justify="right")
    for name, after in result.after.items():
        before = result.before.get(name)
        b = before.value if before is not None else None
        row = [markup_safe(name), format_value(b), format_value(after.value)]
        row.append(_change(after.value, b))
        if matched is not None:
            t = matched.get(name)
            t_value = t.value if t is not None else None
            row += [format_value(t_value), _change(t_value, b)]
        compare.add_row(*row)
    console.print(compare)
    if matched is None and result.temperature_note:
        note = result.temperature_note
        console.print(f"no temperature-matched baseline: {markup_safe(note)}", highlight=False)
    if h.get("fam_step_ratio") is not None:
        console.print(f"relative step at step 0: R = {h['fam_step_ratio']:.3g}", highlight=False)
    for line in result.warnings:
        Console(stderr=True).print(
            f"[bold yellow]warning:[/] {markup_safe(line)}", highlight=False, soft_wrap=True
        )
    if result.resumed_from:
        console.print(f"resumed after epoch {result.resumed_from}", highlight=False)
    for what, path in (
        ("checkpoint", result.out_path),
        ("log", result.log_path),
        ("plot", result.plot_path),
        ("state", result.state_path),
    ):
        if path is not None:
            console.print(f"{what}: {markup_safe(path)}", highlight=False)
    console.print(f"sha256: {result.out_sha256}", highlight=False)


def robustness_table(result: Any, *, title: str) -> None:
    """Print :func:`flatcli.robustness.feature_robustness`'s result: one row per δ."""
    from rich.console import Console
    from rich.table import Table

    from .report import format_value

    console = Console()
    table = Table(
        title=markup_safe(
            f"{title} · layer {result.layer} · κ = {format_value(result.kappa)}, "
            f"m = {result.m}, n = {result.n}, {result.probes} antithetic pairs"
        ),
        title_justify="left",
    )
    cols = ["δ", "E_F(δ)", "± stderr", "δ²κ/(2m)", "ratio"]
    changing = result.points and result.points[0].label_change is not None
    if changing:
        cols += ["E_F, NN labels", "± stderr", "labels changed"]
    kinked = any(p.kinks for p in result.points)
    if kinked:
        cols.append("flag")
    for col in cols:
        table.add_column(col, justify="right")
    for p in result.points:
        flag = "⚠ below resolution"  # rounding, not the model, may set it: no number
        row = [
            f"{p.delta:g}",
            flag if p.below_resolution else format_value(p.feature_robustness),
            "" if p.below_resolution else format_value(p.stderr),
            format_value(p.predicted),
            "⚠" if p.below_resolution else format_value(p.ratio),
        ]
        if changing:
            row += [
                format_value(p.label_change),
                format_value(p.label_change_stderr),
                f"{100 * p.labels_changed:.1f}%",
            ]
        if kinked:
            row.append("kinks" if p.kinks else "")
        table.add_row(*row)
    console.print(table)
    for line in result.warnings:
        console.print(f"⚠ {markup_safe(line)}", highlight=False)
    for line in result.notes:
        console.print(f"note: {markup_safe(line)}", highlight=False)


def bound_table(terms: Any, *, title: str) -> None:
    """Print :func:`flatcli.bound.bound_terms`'s terms, the approximation and the gap."""
    from rich.console import Console
    from rich.table import Table

    from .report import format_value

    console = Console()
    table = Table(
        title=markup_safe(f"{title} · layer {terms.layer} (Theorem 6)"), title_justify="left"
    )
    for col in ("term", "value", "± stderr"):
        table.add_column(col, justify="left" if col == "term" else "right")
    se = terms.representativeness_stderr
    rows = [
        ("|S|^(−2/(4+m))", terms.sample_term, None),
        (f"κ/(2m)  (κ = {format_value(terms.kappa)}, m = {terms.m})", terms.flatness_term, None),
        ("feature robustness term |S|^(−2/(4+m))·κ/(2m)", terms.robustness_term, None),
    ]
    if terms.measured_robustness is not None:
        rows.append(
            (
                f"measured E_F at δ = |S|^(−1/(4+m)) = {terms.robustness_delta:.3g} "
                f"({terms.robustness_probes} Haar pairs)",
                terms.measured_robustness,
                terms.measured_robustness_stderr,
            )
        )
    rows += [
        (
            f"representativeness (KDE, {terms.splits} splits, bandwidth factor "
            f"{terms.bandwidth:.3g} {terms.bandwidth_rule})",
            terms.representativeness,
            se,
        ),
        ("estimate (an approximation, NOT a bound)", terms.estimate, se),
        ("train loss", terms.train_loss, None),
    ]
    if terms.gap is not None:
        rows += [
            ("test loss", terms.test_loss, None),
            ("actual gap (test − train)", terms.gap, None),
        ]
    for name, value, err in rows:
        table.add_row(name, format_value(value), format_value(err))
    console.print(table)
    if terms.gap is None:
        console.print("no test split: the actual gap is not shown", highlight=False)
    for line in terms.notes:
        console.print(f"note: {markup_safe(line)}", highlight=False)


def _change(value: float | None, base: float | None) -> str:
    if value is None or base in (None, 0) or not math.isfinite(value):
        return ""
    return f"{value / base - 1:+.1%}"  # type: ignore[operator]
