"""Rendering results to the terminal (rich), shared by the commands."""

from __future__ import annotations

from typing import Any


def inspect_table(ck: Any, info: dict) -> None:
    """Print :func:`flatcli.inspection.describe`'s result as a table."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"{ck.path.name} ({info['checkpoint']['format']}, {info['parameters']:,} parameters)",
        title_justify="left",
    )
    for col in ("layer", "type", "weight shape", "parameters", "measures"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for row in info["layers"]:
        name = row["name"] + (" *" if row["name"] == info["default_layer"] else "")
        table.add_row(
            name,
            row["type"],
            str(row["weight_shape"] or ""),
            f"{row['parameters']:,}",
            row["measures"],
        )
    console.print(table)
    console.print(f"* default feature layer: {info['default_layer']}")
    console.print(f"model-wide measures: {info['model_measures']}")
    console.print(f"sha256: {info['checkpoint']['sha256']}")
    for key, value in info["metadata"].items():
        console.print(f"metadata {key}: {value}", highlight=False)


def audit_tables(original: Any, reps: Any) -> None:
    """Print one invariance table per reparameterization, and the dead-unit note."""
    from rich.console import Console
    from rich.table import Table

    from ..audit import dead_unit_note
    from ..report import format_value


    console = Console()
    for rep in reps:
        if rep.refused:
            console.print(f"[bold]{rep.kind}[/]: refused: {rep.refused}", highlight=False)
            continue
        pairs = ", ".join(f"{a}→{b}" for a, b in rep.pairs)
        table = Table(
            title=f"{rep.kind} reparameterization ({pairs}; max |Δ output| = "
            f"{rep.max_output_change:.2e})",
            title_justify="left",
        )
        for col in ("measure", "original", "reparameterized", "relative change", "invariant"):
            table.add_column(
                col, justify="left" if col == "measure" else "right", no_wrap=col == "measure"
            )
        for row in rep.rows:
            mark = "[green]yes[/]" if row.invariant else "[red]no[/]"
            table.add_row(
                row.measure,
                format_value(row.original),
                format_value(row.reparameterized),
                f"{row.relative_change:.1e}",
                mark,
            )
        console.print(table)
    explain = dead_unit_note(original, reps)
    if explain:
        console.print(explain, highlight=False)



def correlations(table, result, n, run) -> None:  # noqa: ANN001
    """Print the correlation tables of :func:`flatcli.correlate.analyse`."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a file or pipe: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 120))
    for gap, label in (("gap_loss", "test_loss − train_loss"), ("gap_acc", "train_acc − test_acc")):
        t = Table(
            title=f"correlation with the generalization gap {label} ({n} checkpoints, "
            "95% bootstrap CIs)",
            title_justify="left",
        )
        for col in ("measure", "Kendall τ-b", "τ-a", "Spearman ρ", "Pearson r", "Ψ"):
            t.add_column(col, justify="left" if col == "measure" else "right", no_wrap=True)
        rows = table[table["gap"] == gap].sort_values("kendall_tau_b", ascending=False)
        for _, r in rows.iterrows():
            psi = result["granulated"].get(gap, {}).get(r["measure"], {}).get("Psi")
            t.add_row(
                r["measure"],
                _ci(r, "kendall_tau_b"),
                _num(r["kendall_tau_a"]),
                _ci(r, "spearman_rho"),
                _ci(r, "pearson_r"),
                _num(psi),
            )
        console.print(t)
    if result["hparams"]:
        console.print(f"Ψ: granulated Kendall over {', '.join(result['hparams'])}")
    if run is not None:
        console.print(
            f"{run.computed} checkpoint(s) measured now, "
            f"{n - run.computed} from the cache, {len(run.skipped)} skipped"
        )


def _num(x) -> str:  # noqa: ANN001
    import math

    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def _ci(r, stat: str) -> str:  # noqa: ANN001
    lo, hi = r[f"{stat}_lo"], r[f"{stat}_hi"]
    bounds = "" if lo != lo or hi != hi else f" [{lo:+.2f},{hi:+.2f}]"  # NaN-safe
    return f"{_num(r[stat])}{bounds}"



def finetune_tables(result) -> None:  # noqa: ANN001 - a FinetuneResult, imported lazily
    """Print the per-epoch table and the before/after table of a fine-tuning run."""
    from rich.console import Console
    from rich.table import Table

    from ..report import format_value

    console = Console()
    h = result.hparams
    epochs = Table(
        title=f"FAM on {result.layer} · λ = {h['fam_lambda']:g} · {h['optimizer']} "
        f"lr {h['lr']:g} ({h['schedule']}) · {result.fam_method}",
        title_justify="left",
    )
    for col in ("epoch", "lr", "train loss", "κ (batches)", "test loss", "test acc", "s"):
        epochs.add_column(col, justify="right")
    for r in result.history:
        epochs.add_row(
            str(r.epoch),
            f"{r.lr:.3g}",
            format_value(r.train_loss),
            format_value(r.kappa),
            format_value(r.test_loss),
            format_value(r.test_accuracy),
            f"{r.seconds:.1f}",
        )
    console.print(epochs)
    compare = Table(title="before → after (κ etc. on the training data)", title_justify="left")
    for col in ("measure", "before", "after", "change"):
        compare.add_column(col, justify="left" if col == "measure" else "right")
    for name, after in result.after.items():
        before = result.before.get(name)
        b = before.value if before is not None else None
        change = f"{after.value / b - 1:+.1%}" if b not in (None, 0) else ""
        compare.add_row(name, format_value(b), format_value(after.value), change)
    console.print(compare)
    if result.resumed_from:
        console.print(f"resumed after epoch {result.resumed_from}", highlight=False)
    for what, path in (
        ("checkpoint", result.out_path),
        ("log", result.log_path),
        ("plot", result.plot_path),
        ("state", result.state_path),
    ):
        if path is not None:
            console.print(f"{what}: {path}", highlight=False)
    console.print(f"sha256: {result.out_sha256}", highlight=False)

