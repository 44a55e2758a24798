"""Figures: both formats written, deterministic, readable errors, matplotlib stays lazy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flatcli.errors import FlatcliError
from flatcli.plots import scatter_grid, tau_bar_chart
from flatcli.stats import correlation_table

MEASURES = ["sharp", "norm", "noise", "constant"]


def zoo_like_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 24
    gap = rng.uniform(0.03, 0.1, size=n)
    return pd.DataFrame(
        {
            "gap_loss": gap,
            "sharp": np.exp(20 * gap + 0.3 * rng.normal(size=n)),
            "norm": 10 - 30 * gap + rng.normal(size=n),
            "noise": rng.normal(size=n),
            "constant": np.ones(n),  # its statistics are NaN: must still plot
            "lr": np.tile([0.01, 0.1], n // 2),
            "train_loss": rng.uniform(0.005, 0.01, size=n),
        }
    )


def assert_png_and_svg(paths: list[Path], stem: Path) -> None:
    assert paths == [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    png, svg = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert b"<svg" in svg[:2000] and len(svg) > 10_000
    assert not list(stem.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    "color_by, log_x",
    [(None, False), ("lr", True), ("train_loss", False)],
    ids=["plain", "categorical-log", "continuous"],
)
def test_scatter_grid_writes_png_and_svg(tmp_path: Path, color_by: str | None, log_x: bool) -> None:
    df = zoo_like_table()
    stats = correlation_table(df, MEASURES, ["gap_loss"], bootstrap=50)
    stem = tmp_path / "scatter"
    paths = scatter_grid(
        df, MEASURES, "gap_loss", color_by=color_by, log_x=log_x, stats=stats, path_stem=stem
    )
    assert_png_and_svg(paths, stem)


def test_scatter_grid_computes_statistics_when_not_given(tmp_path: Path) -> None:
    paths = scatter_grid(zoo_like_table(), ["sharp"], "gap_loss", path_stem=tmp_path / "one")
    assert all(p.stat().st_size > 0 for p in paths)


def test_tau_bar_chart_writes_png_and_svg_deterministically(tmp_path: Path) -> None:
    stats = correlation_table(zoo_like_table(), MEASURES, ["gap_loss"], bootstrap=50)
    first = tau_bar_chart(stats, "gap_loss", path_stem=tmp_path / "a")
    second = tau_bar_chart(stats, "gap_loss", path_stem=tmp_path / "b")
    assert_png_and_svg(first, tmp_path / "a")
    for p, q in zip(first, second, strict=True):
        assert p.read_bytes() == q.read_bytes()


@pytest.mark.parametrize(
    "call, needle",
    [
        (
            lambda s, d, t: scatter_grid(
                d, ["sharp", "flatness"], "gap_loss", stats=s, path_stem=t
            ),
            "flatness",
        ),
        (lambda s, d, t: scatter_grid(d, ["sharp"], "gap_acc", path_stem=t), "gap_acc"),
        (
            lambda s, d, t: scatter_grid(
                d, ["sharp"], "gap_loss", color_by="width", stats=s, path_stem=t
            ),
            "width",
        ),
        (
            lambda s, d, t: tau_bar_chart(
                s.drop(columns="kendall_tau_b_hi"), "gap_loss", path_stem=t
            ),
            "kendall_tau_b_hi",
        ),
        (lambda s, d, t: tau_bar_chart(s, "gap_acc", path_stem=t), "gap_acc"),
    ],
    ids=["measure", "gap", "color-by", "stats-column", "stats-gap"],
)
def test_missing_column_is_a_one_line_flatcli_error(tmp_path: Path, call, needle: str) -> None:
    df = zoo_like_table()
    stats = correlation_table(df, ["sharp"], ["gap_loss"], bootstrap=0)
    with pytest.raises(FlatcliError) as info:
        call(stats, df, tmp_path / "fig")
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_importing_plots_does_not_import_matplotlib() -> None:
    code = "import sys, flatcli.plots; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the plot functions save, captured (artists intact) before saving."""
    import flatcli.plots

    captured: list = []
    save = flatcli.plots._save

    def keep(fig, path_stem):  # noqa: ANN001, ANN202
        captured.append(fig)
        return save(fig, path_stem)

    monkeypatch.setattr(flatcli.plots, "_save", keep)
    return captured


@pytest.mark.parametrize("statistic", ["kendall_tau_b", "pearson_r"])
def test_tau_bars_show_the_tables_values_and_intervals(
    tmp_path: Path, figures: list, statistic: str
) -> None:
    stats = correlation_table(zoo_like_table(), MEASURES, ["gap_loss"], bootstrap=100)
    tau_bar_chart(stats, "gap_loss", path_stem=tmp_path / "t", statistic=statistic)
    (ax,) = figures[0].axes
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(names) == sorted(MEASURES)
    table = stats.set_index("measure")
    bars = ax.patches
    assert len(bars) == len(MEASURES)
    drawn = {}
    for name, bar in zip(names, bars, strict=True):
        assert bar.get_y() + bar.get_height() / 2 == pytest.approx(names.index(name))
        drawn[name] = bar.get_x() + bar.get_width()  # bars start at 0
        assert bar.get_x() == 0.0
    for name in MEASURES:
        want = table.loc[name, statistic]
        assert drawn[name] == pytest.approx(0.0 if np.isnan(want) else want, abs=1e-12), name
    assert sum(np.isnan(table[statistic])) == 1  # the constant measure: an empty bar
    # Sorted from the most negative (bottom, y = 0 after the undefined one) to the most
    # positive (top).
    defined = [drawn[n] for n in names if not np.isnan(table.loc[n, statistic])]
    assert defined == sorted(defined) and names[0] == "constant"
    # Error bars: one horizontal segment per defined measure, from lo to hi.
    (lines,) = [c for c in ax.collections if len(c.get_segments()) == len(MEASURES)]
    for name, seg in zip(names, lines.get_segments(), strict=True):
        lo, hi = table.loc[name, f"{statistic}_lo"], table.loc[name, f"{statistic}_hi"]
        if np.isnan(lo):
            assert seg.size == 0 or np.isnan(seg).any()  # no error bar
        else:
            assert sorted(seg[:, 0]) == pytest.approx([lo, hi], abs=1e-12), name
    # Value labels and colors (blue: CI above 0, red: below, grey: includes 0).
    labels = {round(t.get_position()[1]): t.get_text() for t in ax.texts}
    colors = {"#1f77b4": "above", "#d62728": "below", "#9e9e9e": "includes"}
    from matplotlib.colors import to_hex

    for y, name in enumerate(names):
        v, lo, hi = (table.loc[name, s] for s in (statistic, f"{statistic}_lo", f"{statistic}_hi"))
        assert labels[y] == ("undefined" if np.isnan(v) else f"{v:+.2f}")
        side = "above" if lo > 0 else "below" if hi < 0 else "includes"
        assert colors[to_hex(bars[y].get_facecolor())] == side, name
    assert {"above", "below"} <= {colors[to_hex(b.get_facecolor())] for b in bars}


def test_scatter_panels_plot_the_tables_points_and_statistics(
    tmp_path: Path, figures: list
) -> None:
    df = zoo_like_table()
    df.loc[3, "sharp"] = np.nan  # left out of its panel only
    stats = correlation_table(df, MEASURES, ["gap_loss"], bootstrap=50)
    scatter_grid(df, MEASURES, "gap_loss", stats=stats, path_stem=tmp_path / "s")
    axes = [ax for ax in figures[0].axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in axes] == MEASURES
    for ax, measure in zip(axes, MEASURES, strict=True):
        (points,) = ax.collections
        ok = df[measure].notna()
        want = np.column_stack([df.loc[ok, measure], df.loc[ok, "gap_loss"]])
        np.testing.assert_array_equal(np.asarray(points.get_offsets()), want)
        row = stats[stats["measure"] == measure].iloc[0]
        title = ax.get_title(loc="left")
        for s, label in (("kendall_tau_b", "Kendall τ-b"), ("pearson_r", "Pearson r")):
            if np.isnan(row[s]):
                assert f"{label}: n/a" in title
            else:
                text = f"{label} = {row[s]:+.2f}  [{row[f'{s}_lo']:+.2f}, {row[f'{s}_hi']:+.2f}]"
                assert text in title, (measure, title)
        assert f"n = {row['n']}" in title
    assert axes[0].get_ylabel() == "generalization gap (test loss − train loss)"


def test_legend_labels_and_gap_error_message(tmp_path: Path, figures: list) -> None:
    df = zoo_like_table().assign(lr=np.tile([1 / 3, 0.1], 12), opt=np.tile(["sgd", "adam"], 12))
    for column, labels in (("lr", ["0.1", "0.333333"]), ("opt", ["adam", "sgd"])):
        scatter_grid(df, ["sharp"], "gap_loss", color_by=column, path_stem=tmp_path / column)
        (legend,) = figures[-1].legends
        assert legend.get_title().get_text() == column
        assert [t.get_text() for t in legend.get_texts()] == labels
    stats = correlation_table(df, ["sharp"], ["gap_loss"], bootstrap=0)
    with pytest.raises(FlatcliError) as info:
        tau_bar_chart(stats, "gap_acc", path_stem=tmp_path / "t")
    message = "the statistics table has no rows for gap 'gap_acc' (it has: gap_loss)"
    assert str(info.value) == message


def test_an_interval_touching_zero_counts_as_including_it(tmp_path: Path, figures: list) -> None:
    from matplotlib.colors import to_hex

    stats = pd.DataFrame(
        {
            "measure": ["a", "b", "c"],
            "gap": "gap_loss",
            "n": 10,
            "kendall_tau_b": [0.3, -0.3, 0.5],
            "kendall_tau_b_lo": [0.0, -0.6, 0.1],
            "kendall_tau_b_hi": [0.6, 0.0, 0.9],
        }
    )
    tau_bar_chart(stats, "gap_loss", path_stem=tmp_path / "t")
    (ax,) = figures[0].axes
    names = [t.get_text() for t in ax.get_yticklabels()]
    colors = {n: to_hex(bar.get_facecolor()) for n, bar in zip(names, ax.patches, strict=True)}
    assert colors == {"a": "#9e9e9e", "b": "#9e9e9e", "c": "#1f77b4"}
