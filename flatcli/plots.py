"""Figures for ``flatcli correlate``: measure-vs-gap scatter plots and a τ bar chart.

matplotlib is imported inside the functions, so importing this module stays cheap. The
figures are built as :class:`matplotlib.figure.Figure` objects drawn by the Agg
canvas, never through ``pyplot``, so no global figure or backend state is touched. Each
figure is written as PNG and SVG, atomically (:func:`flatcli.io.atomic_write`), with
fixed metadata and SVG ids so that the same inputs give the same files.

References:
    Jiang, Neyshabur, Mobahi, Krishnan, Bengio (2020). Fantastic generalization
    measures and where to find them. ICLR. https://arxiv.org/abs/1912.02178

    Dziugaite, Drouin, Neal, Rajkumar, Caballero, Wang, Mitliagkas, Roy (2020).
    In search of robust measures of generalization. NeurIPS.
    https://arxiv.org/abs/2010.11924
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FlatcliError, UsageError
from .io import atomic_write

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GAP_LABELS = {
    "gap_loss": "generalization gap (test loss − train loss)",
    "gap_acc": "generalization gap (train acc − test acc)",
}
"""Axis labels of the gaps :func:`flatcli.stats.add_gaps` adds; other gaps show their name."""

STAT_LABELS = {
    "kendall_tau_b": "Kendall τ-b",
    "kendall_tau_a": "Kendall τ-a",
    "spearman_rho": "Spearman ρ",
    "pearson_r": "Pearson r",
}

MAX_CATEGORIES = 8
"""``color_by`` columns with at most this many distinct values get a legend, not a colorbar."""

_POSITIVE, _NEGATIVE, _UNSURE = "#1f77b4", "#d62728", "#9e9e9e"
_NO_CI = "#ffffff"  # hatched, edged in _UNSURE: too few checkpoints, or a degenerate bootstrap


def scatter_grid(
    df: pd.DataFrame,
    measures: Sequence[str],
    gap: str,
    *,
    color_by: str | None = None,
    log_x: bool = False,
    stats: pd.DataFrame | None = None,
    path_stem: Path,
) -> list[Path]:
    """One scatter panel per measure against the gap, annotated with τ-b and r.

    The figure of :func:`scatter_grid_figure`, written as PNG and SVG; see there for
    the arguments and errors.

    Args:
        path_stem: Output path without suffix; ``.png`` and ``.svg`` are written.

    Returns:
        The PNG and SVG paths.
    """
    fig = scatter_grid_figure(df, measures, gap, color_by=color_by, log_x=log_x, stats=stats)
    return _save(fig, path_stem)


def scatter_grid_figure(
    df: pd.DataFrame,
    measures: Sequence[str],
    gap: str,
    *,
    color_by: str | None = None,
    log_x: bool = False,
    stats: pd.DataFrame | None = None,
) -> Figure:
    """One scatter panel per measure against the gap, annotated with τ-b and r.

    Args:
        df: One row per checkpoint, holding the measure and gap columns.
        measures: Columns to plot, one panel each, in this order.
        gap: Column on the y axis of every panel.
        color_by: Column (a hyperparameter) that colors the points: a legend when it
            has at most :data:`MAX_CATEGORIES` distinct values or is not numeric, else a
            colorbar.
        log_x: Logarithmic x axes (symmetric-log for a measure with values ≤ 0).
        stats: A :func:`flatcli.stats.correlation_table`; each panel shows its τ-b and
            Pearson r with their intervals. Without it, point estimates are computed
            here (no intervals).

    Returns:
        The figure (drawn by the Agg canvas, not registered with ``pyplot``).

    Raises:
        FlatcliError: A named column is missing, or ``stats`` has no row for a measure.
        UsageError: ``measures`` is empty.
    """
    if not measures:
        raise UsageError("scatter_grid needs at least one measure to plot")
    _require(df, [*measures, gap, *([color_by] if color_by else [])], "the table")
    if stats is None:
        from .stats import correlation_table

        stats = correlation_table(df, measures, [gap], bootstrap=0)
    _require(stats, ["measure", "gap", "n", "kendall_tau_b", "pearson_r"], "the statistics table")

    import numpy as np

    ncols = min(len(measures), 3)
    nrows = math.ceil(len(measures) / ncols)
    fig = _figure(figsize=(4.2 * ncols, 3.6 * nrows + 0.9))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    colors = _point_colors(df, color_by)
    for ax, measure in zip(axes, measures, strict=False):
        x, y = _numeric(df, measure), _numeric(df, gap)
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(
            x[ok],
            y[ok],
            c=colors["values"][ok],
            s=22,
            alpha=0.85,
            linewidths=0,
            **colors["scatter"],
        )
        if log_x:
            ax.set_xscale("log" if ok.any() and (x[ok] > 0).all() else "symlog")
        ax.set_xlabel(measure)
        ax.grid(True, alpha=0.3)
        # Above the panel rather than inside it, where it would hide points.
        ax.set_title(_annotation(stats, measure, gap), fontsize=8.5, loc="left")
    for ax in axes[::ncols]:
        ax.set_ylabel(GAP_LABELS.get(gap, gap), fontsize=9)
    for ax in axes[len(measures) :]:
        ax.set_visible(False)
    n = int(np.isfinite(_numeric(df, gap)).sum())
    fig.suptitle(f"Each measure against the {GAP_LABELS.get(gap, gap)} ({n} checkpoints)")
    if color_by is not None:
        _color_key(fig, axes[: len(measures)], colors, color_by)
    return fig


def tau_bar_chart(
    stats: pd.DataFrame,
    gap: str,
    *,
    path_stem: Path,
    statistic: str = "kendall_tau_b",
) -> list[Path]:
    """Horizontal bars of each measure's correlation with the gap, with its CI.

    The figure of :func:`tau_bar_figure`, written as PNG and SVG; see there for the
    arguments and errors.

    Args:
        path_stem: Output path without suffix; ``.png`` and ``.svg`` are written.

    Returns:
        The PNG and SVG paths.
    """
    return _save(tau_bar_figure(stats, gap, statistic=statistic), path_stem)


def tau_bar_figure(stats: pd.DataFrame, gap: str, *, statistic: str = "kendall_tau_b") -> Figure:
    """Horizontal bars of each measure's correlation with the gap, with its CI.

    Bars are sorted from the most positive (top) to the most negative, with measures
    whose statistic is undefined (NaN) at the bottom; they are drawn around a zero line
    and colored
    by whether the interval lies above zero, below zero, or includes it, so the chart
    alone says which measures predict the gap and how surely. Dziugaite et al. (2020)
    found that no measure is robust everywhere, which is why the intervals are shown.
    Below :data:`~flatcli.stats.SMALL_N` checkpoints, or when every bootstrap resample
    agreed (``bootstrap_degenerate``), no interval counts: the bar is white and hatched,
    and a τ-b bar shows its permutation p-value (``kendall_perm_p``) instead.

    Args:
        stats: A :func:`flatcli.stats.correlation_table`.
        gap: Which gap's rows to plot.
        statistic: Column to plot, with its ``_lo``/``_hi`` interval columns.

    Returns:
        The figure (drawn by the Agg canvas, not registered with ``pyplot``).

    Raises:
        FlatcliError: ``stats`` lacks a needed column or has no row for ``gap``.
    """
    _require(
        stats,
        ["measure", "gap", "n", statistic, f"{statistic}_lo", f"{statistic}_hi"],
        "the statistics table",
    )
    rows = stats[stats["gap"] == gap]
    if rows.empty:
        have = ", ".join(map(str, stats["gap"].unique())) or "none"
        raise FlatcliError(f"the statistics table has no rows for gap {gap!r} (it has: {have})")
    rows = rows.sort_values(statistic, na_position="first", kind="stable")

    import numpy as np
    from matplotlib.patches import Patch

    value = rows[statistic].to_numpy(dtype=float)
    lo = rows[f"{statistic}_lo"].to_numpy(dtype=float)
    hi = rows[f"{statistic}_hi"].to_numpy(dtype=float)
    shown = np.nan_to_num(value)
    unreliable = _unreliable(rows, statistic)
    color = np.where(lo > 0, _POSITIVE, np.where(hi < 0, _NEGATIVE, _UNSURE))
    color = np.where(unreliable, _NO_CI, color)
    ypos = np.arange(len(rows))
    fig = _figure(figsize=(8.0, 2.2 + 0.42 * len(rows)))
    ax = fig.subplots()
    err = np.vstack([shown - lo, hi - shown])  # NaN where there is no interval: no error bar
    bars = ax.barh(ypos, shown, color=color, height=0.65)
    for bar, no_ci in zip(bars, unreliable, strict=True):
        if no_ci:
            bar.set(edgecolor=_UNSURE, hatch="///")
    ax.errorbar(shown, ypos, xerr=err, fmt="none", ecolor="black", elinewidth=1, capsize=3)
    ax.axvline(0.0, color="black", linewidth=0.9)
    perm = _perm_p(rows, statistic)
    for y, v, right in zip(ypos, value, np.fmax(np.fmax(hi, shown), 0.0), strict=True):
        text = "undefined" if math.isnan(v) else f"{v:+.2f}"
        if unreliable[y] and not math.isnan(perm[y]) and not math.isnan(v):
            text += f" (p = {perm[y]:.2g})"
        ax.text(right + 0.03, y, text, va="center", fontsize=8)
    ax.set_yticks(ypos, labels=[str(m) for m in rows["measure"]])
    ax.set_xlim(-1.0, 1.25)
    label = STAT_LABELS.get(statistic, statistic)
    ax.set_xlabel(f"{label} with the gap (+1: the measure ranks checkpoints exactly as the gap)")
    ax.grid(True, axis="x", alpha=0.3)
    level = stats.attrs.get("confidence")
    if np.isnan(lo).all() and np.isnan(hi).all():
        ci = "none (no bootstrap)"
    else:
        ci = f"{level:.0%} bootstrap CI" if level else "bootstrap CI"
    ns = rows["n"].astype(int)
    n = f"n = {ns.min()}" if ns.min() == ns.max() else f"n = {ns.min()}–{ns.max()}"
    from .stats import SMALL_N

    few = ""
    if ns.min() < SMALL_N:
        few = f"\nfewer than {SMALL_N} checkpoints: no interval is reliable"
        few += "; p: permutation p-value of τ-b" if (~np.isnan(perm)).any() else ""
    fig.suptitle(
        f"Which measure predicts the {GAP_LABELS.get(gap, gap)}?\n"
        f"{label} per measure, {n} checkpoints, error bars: {ci}{few}",
        fontsize=10,
    )
    handles = [
        Patch(color=_POSITIVE, label="CI above 0: larger measure, larger gap"),
        Patch(color=_NEGATIVE, label="CI below 0: larger measure, smaller gap"),
        Patch(color=_UNSURE, label="CI includes 0: no reliable relation"),
    ]
    if unreliable.any():
        handles.append(
            Patch(
                facecolor=_NO_CI,
                edgecolor=_UNSURE,
                hatch="///",
                label=f"no reliable CI: n < {SMALL_N}, or every resample agreed",
            )
        )
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=2,
        fontsize=8,
        frameon=False,
    )
    return fig


# --------------------------------------------------------------------------- helpers


def _unreliable(rows: pd.DataFrame, statistic: str) -> np.ndarray:
    """Rows whose interval does not count: too few checkpoints, or a degenerate bootstrap."""
    import numpy as np

    from .stats import SMALL_N

    few = rows["n"].to_numpy(dtype=float) < SMALL_N
    if "bootstrap_degenerate" not in rows:
        return few
    listed = rows["bootstrap_degenerate"].fillna("").astype(str).str.split(",")
    return few | np.array([statistic in names for names in listed], dtype=bool)


def _perm_p(rows: pd.DataFrame, statistic: str) -> np.ndarray:
    """The permutation p-value of each row's τ-b (NaN for other statistics or none)."""
    import numpy as np
    import pandas as pd

    if statistic != "kendall_tau_b" or "kendall_perm_p" not in rows:
        return np.full(len(rows), np.nan)
    return pd.to_numeric(rows["kendall_perm_p"], errors="coerce").to_numpy(dtype=float)


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if missing:
        have = ", ".join(map(str, df.columns)) or "none"
        raise FlatcliError(f"missing column(s) {', '.join(missing)} in {what} (it has: {have})")


def _numeric(df: pd.DataFrame, column: str) -> np.ndarray:
    """A column as float64, with anything not a number as NaN (left out of the plot)."""
    import pandas as pd

    return pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)


def _figure(*, figsize: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _annotation(stats: pd.DataFrame, measure: str, gap: str) -> str:
    row = stats[(stats["measure"] == measure) & (stats["gap"] == gap)]
    if row.empty:
        raise FlatcliError(
            f"the statistics table has no row for measure {measure!r} and gap {gap!r}"
        )
    r = row.iloc[0]
    lines = []
    for s in ("kendall_tau_b", "pearson_r"):
        text = (
            f"{STAT_LABELS[s]} = {r[s]:+.2f}" if not math.isnan(r[s]) else f"{STAT_LABELS[s]}: n/a"
        )
        lo, hi = r.get(f"{s}_lo", math.nan), r.get(f"{s}_hi", math.nan)
        if not (math.isnan(lo) or math.isnan(hi)):
            text += f"  [{lo:+.2f}, {hi:+.2f}]"
        lines.append(text)
    lines[-1] += f"    n = {int(r['n'])}"
    return "\n".join(lines)


def _point_colors(df: pd.DataFrame, color_by: str | None) -> dict[str, Any]:
    """Per-point colors and how to explain them (categories or a continuous scale)."""
    import numpy as np
    import pandas as pd
    from matplotlib import colormaps

    if color_by is None:
        return {"values": np.full(len(df), _POSITIVE, dtype=object), "scatter": {}}
    col = df[color_by]
    numeric = pd.api.types.is_numeric_dtype(col)
    if not numeric or col.nunique(dropna=True) <= MAX_CATEGORIES:
        categories = sorted(col.dropna().unique(), key=lambda v: (str(type(v)), v))
        cmap = colormaps["tab10"]
        lookup = {c: cmap(i % 10) for i, c in enumerate(categories)}
        values = np.empty(len(df), dtype=object)
        values[:] = [lookup.get(v, (0.6, 0.6, 0.6, 1.0)) for v in col]
        return {"values": values, "scatter": {}, "categories": lookup}
    values = col.to_numpy(dtype=float)
    positive = np.nanmin(values) > 0
    wide = positive and np.nanmax(values) / np.nanmin(values) > 100
    from matplotlib.colors import LogNorm, Normalize

    norm = LogNorm() if wide else Normalize()
    norm.autoscale_None(values[np.isfinite(values)])
    return {"values": values, "scatter": {"cmap": "viridis", "norm": norm}, "norm": norm}


def _color_key(fig: Figure, axes: Sequence[Axes], colors: dict[str, Any], color_by: str) -> None:
    if "categories" in colors:
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], marker="o", linestyle="", color=c, label=_fmt(v))
            for v, c in colors["categories"].items()
        ]
        fig.legend(handles=handles, title=color_by, loc="outside right upper", fontsize=8)
    else:
        from matplotlib.cm import ScalarMappable

        fig.colorbar(
            ScalarMappable(norm=colors["norm"], cmap="viridis"), ax=list(axes), label=color_by
        )


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def figure_bytes(fig: Figure, fmt: str = "svg") -> bytes:
    """The figure as SVG or PNG bytes, with the same fixed metadata as the written files."""
    import io

    from matplotlib import rc_context

    buf = io.BytesIO()
    with rc_context(_SAVE_RC):
        fig.savefig(buf, format=fmt, dpi=150, metadata=_SAVE_META[fmt])
    return buf.getvalue()


_SAVE_RC = {"svg.hashsalt": "flatcli", "svg.fonttype": "path"}
_SAVE_META: dict[str, dict[str, None]] = {"png": {"Software": None}, "svg": {"Date": None}}


def _save(fig: Figure, path_stem: Path) -> list[Path]:
    from matplotlib import rc_context

    stem = Path(path_stem)
    paths = []
    with rc_context(_SAVE_RC):
        for fmt, meta in _SAVE_META.items():
            target = stem.with_name(f"{stem.name}.{fmt}")
            atomic_write(
                target,
                lambda p, fmt=fmt, meta=meta: fig.savefig(p, format=fmt, dpi=150, metadata=meta),
            )
            paths.append(target)
    return paths
