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


# --------------------------------------------------------------------------- what the
# figures say, read back from their artists (each assertion here failed under a mutant of
# plots.py that left the earlier tests passing: bench/mutation.sh plots)


def _rgba(c) -> tuple:  # noqa: ANN001
    from matplotlib.colors import to_rgba

    return tuple(round(float(v), 6) for v in to_rgba(c))


@pytest.mark.parametrize("k, geometry", [(1, (1, 1)), (2, (1, 2)), (4, (2, 3))])
def test_scatter_grid_layout_labels_and_titles(k: int, geometry: tuple) -> None:
    from flatcli.plots import scatter_grid_figure

    df = zoo_like_table().assign(my_gap=lambda d: d["gap_loss"])
    df.loc[0, "my_gap"] = np.nan  # 23 checkpoints with a gap
    df.loc[df["my_gap"].idxmax(), "noise"] = np.nan  # its panel alone would end lower
    measures = MEASURES[:k]
    fig = scatter_grid_figure(df, measures, "my_gap")  # statistics computed: no intervals
    axes = fig.axes
    rows, cols = geometry
    assert len(axes) == rows * cols
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in axes} == {geometry}
    assert [ax.get_visible() for ax in axes] == [i < k for i in range(rows * cols)]
    assert [ax.get_ylabel() for ax in axes] == [
        "my_gap" if i % cols == 0 else "" for i in range(rows * cols)
    ]  # an unknown gap is labelled by its name, on the first column only
    assert len({ax.get_ylim() for ax in axes}) == 1  # one shared gap axis
    assert all(ax.get_xscale() == "linear" for ax in axes)  # log_x is off by default
    assert fig.get_suptitle() == "Each measure against the my_gap (23 checkpoints)"
    want = correlation_table(df, measures, ["my_gap"], bootstrap=0).set_index("measure")
    for ax, m in zip(axes, measures, strict=False):
        tau, r = want.loc[m, "kendall_tau_b"], want.loc[m, "pearson_r"]
        first = "Kendall τ-b: n/a" if np.isnan(tau) else f"Kendall τ-b = {tau:+.2f}"
        second = "Pearson r: n/a" if np.isnan(r) else f"Pearson r = {r:+.2f}"
        n = want.loc[m, "n"]
        assert n == (22 if m == "noise" else 23)
        assert ax.get_title(loc="left") == f"{first}\n{second}    n = {n}"


def test_scatter_grid_log_axes(tmp_path: Path, figures: list) -> None:
    df = zoo_like_table().assign(
        small=lambda d: d["gap_loss"],  # in (0, 1): log
        zero=lambda d: np.where(np.arange(len(d)) == 0, 0.0, d["sharp"]),  # a 0: symlog
        negative=lambda d: d["norm"] - 20,  # below 0: symlog
    )
    measures = ["sharp", "small", "zero", "negative"]
    scatter_grid(df, measures, "gap_loss", log_x=True, path_stem=tmp_path / "log")
    scales = [ax.get_xscale() for ax in figures[0].axes[:4]]
    assert scales == ["log", "log", "symlog", "symlog"]
    scatter_grid(df, measures, "gap_loss", path_stem=tmp_path / "lin")
    assert {ax.get_xscale() for ax in figures[1].axes} == {"linear"}
    assert figures[1].get_suptitle() == (
        "Each measure against the generalization gap (test loss − train loss) (24 checkpoints)"
    )


def test_non_numeric_cells_are_left_out_of_their_panel() -> None:
    from flatcli.plots import scatter_grid_figure

    df = zoo_like_table().astype({"sharp": object})
    df.loc[5, "sharp"] = "n/a"
    (points,) = scatter_grid_figure(df, ["sharp"], "gap_loss").axes[0].collections
    assert len(points.get_offsets()) == len(df) - 1


def test_point_colors_follow_the_categories_and_their_legend() -> None:
    from matplotlib import colormaps

    from flatcli.plots import _POSITIVE, scatter_grid_figure

    tab10 = colormaps["tab10"]
    df = zoo_like_table()
    (plain,) = scatter_grid_figure(df, ["sharp"], "gap_loss").axes[0].collections
    assert {_rgba(c)[:3] for c in plain.get_facecolors()} == {_rgba(_POSITIVE)[:3]}
    # Mixed types sort by type, then value; an 11th category reuses the first color; a
    # missing value is grey and not in the legend.
    labels = [1, 2, *"abcdefghi"]  # 11 categories
    df = df.assign(kind=pd.Series([labels[i % 11] for i in range(len(df))], dtype=object))
    df.loc[23, "kind"] = None
    fig = scatter_grid_figure(df, ["sharp"], "gap_loss", color_by="kind")
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [str(v) for v in labels]
    handle_colors = [_rgba(h.get_color()) for h in legend.legend_handles]
    assert handle_colors == [_rgba(tab10(i % 10)) for i in range(11)]
    assert all(h.get_marker() == "o" and h.get_linestyle() == "None" for h in legend.legend_handles)
    (points,) = fig.axes[0].collections
    got = [_rgba(c)[:3] for c in points.get_facecolors()]
    for i, v in enumerate(df["kind"]):
        want = (0.6, 0.6, 0.6) if v is None else handle_colors[labels.index(v)][:3]
        assert got[i] == want, (i, v)


@pytest.mark.parametrize(
    "values, legend",
    [
        ([0.1 * k for k in range(8)], True),  # 8 numeric values: categories
        ([0.1 * k for k in range(8)] + [np.nan], True),  # a missing value is not one
        ([0.1 * k for k in range(9)], False),  # 9: a continuous scale
    ],
    ids=["eight", "eight-and-nan", "nine"],
)
def test_up_to_eight_numeric_values_get_a_legend(values: list, legend: bool) -> None:
    from flatcli.plots import scatter_grid_figure

    df = zoo_like_table().assign(hp=[values[i % len(values)] for i in range(24)])
    fig = scatter_grid_figure(df, ["sharp"], "gap_loss", color_by="hp")
    assert len(fig.legends) == (1 if legend else 0)
    assert len(fig.axes) == (1 if legend else 2)  # a colorbar adds an axis
    if legend:
        assert len(fig.legends[0].get_texts()) == 8


@pytest.mark.parametrize(
    "low, high, log",
    [
        (0.01, 1.0, False),  # max/min = 100: linear
        (0.01, 1.005, True),  # just over 100: logarithmic
        (0.5, 150.0, True),  # (max · min = 75 would say linear)
        (0.0, 5.0, False),  # a zero: linear
        (-3.0, 5.0, False),
    ],
)
def test_a_wide_positive_hyperparameter_gets_a_log_color_scale(
    low: float, high: float, log: bool
) -> None:
    from matplotlib.colors import LogNorm

    from flatcli.plots import scatter_grid_figure

    values = np.linspace(low, high, 24)
    df = zoo_like_table().assign(width=values)
    fig = scatter_grid_figure(df, ["sharp"], "gap_loss", color_by="width")
    (points,) = fig.axes[0].collections
    assert isinstance(points.norm, LogNorm) == log
    assert (points.norm.vmin, points.norm.vmax) == (low, high)
    assert points.get_cmap().name == "viridis"
    np.testing.assert_array_equal(points.get_array(), values)
    colorbar = fig.axes[1]
    assert colorbar.get_ylabel() == "width"
    assert colorbar.get_yscale() == ("log" if log else "linear")
    assert colorbar.get_ylim() == pytest.approx((low, high), rel=1e-12)
    assert colorbar.collections[0].get_cmap().name == "viridis"


def test_scatter_titles_show_only_complete_intervals() -> None:
    from flatcli.plots import scatter_grid_figure

    df = zoo_like_table()
    stats = correlation_table(df, ["sharp", "norm"], ["gap_loss"], bootstrap=50)
    stats.loc[stats["measure"] == "norm", "pearson_r_lo"] = np.nan
    titles = [
        ax.get_title(loc="left")
        for ax in scatter_grid_figure(df, ["sharp", "norm"], "gap_loss", stats=stats).axes
    ]
    assert titles[0].count("[") == 2 and titles[1].count("[") == 1
    no_hi = stats.drop(columns=[c for c in stats if c.endswith("_hi")])  # a user's table
    titles = [
        ax.get_title(loc="left")
        for ax in scatter_grid_figure(df, ["sharp"], "gap_loss", stats=no_hi).axes
    ]
    assert "[" not in titles[0]
    no_intervals = stats.drop(columns=[c for c in stats if c.endswith(("_lo", "_hi"))])
    fig = scatter_grid_figure(df, ["sharp"], "gap_loss", stats=no_intervals)
    row = stats.iloc[0]
    assert fig.axes[0].get_title(loc="left") == (
        f"Kendall τ-b = {row['kendall_tau_b']:+.2f}\nPearson r = {row['pearson_r']:+.2f}    n = 24"
    )


def test_error_messages_say_what_is_missing() -> None:
    from flatcli.errors import UsageError
    from flatcli.plots import scatter_grid_figure, tau_bar_figure

    df = zoo_like_table()
    with pytest.raises(UsageError) as info:
        scatter_grid_figure(df, [], "gap_loss")
    assert str(info.value) == "scatter_grid needs at least one measure to plot"
    with pytest.raises(FlatcliError) as info:
        scatter_grid_figure(df[["gap_loss"]], ["a", "b"], "gap_loss")
    assert str(info.value) == "missing column(s) a, b in the table (it has: gap_loss)"
    with pytest.raises(FlatcliError) as info:
        scatter_grid_figure(pd.DataFrame(), ["a"], "g")
    assert str(info.value) == "missing column(s) a, g in the table (it has: none)"
    stats = correlation_table(df, ["sharp"], ["gap_loss"], bootstrap=0)
    with pytest.raises(FlatcliError) as info:
        scatter_grid_figure(df, ["sharp"], "gap_loss", stats=stats[["measure", "gap"]])
    assert str(info.value) == (
        "missing column(s) n, kendall_tau_b, pearson_r in the statistics table "
        "(it has: measure, gap)"
    )
    with pytest.raises(FlatcliError) as info:
        scatter_grid_figure(df, ["norm"], "gap_loss", stats=stats)
    assert str(info.value) == (
        "the statistics table has no row for measure 'norm' and gap 'gap_loss'"
    )
    with pytest.raises(FlatcliError) as info:
        tau_bar_figure(stats[["measure", "gap", "n"]], "gap_loss")
    assert str(info.value).startswith(
        "missing column(s) kendall_tau_b, kendall_tau_b_lo, kendall_tau_b_hi in the "
        "statistics table (it has: "
    )
    two = correlation_table(df.assign(gap_acc=df["gap_loss"]), ["sharp"], ["gap_loss", "gap_acc"])
    with pytest.raises(FlatcliError) as info:
        tau_bar_figure(two, "gap_x")
    assert str(info.value).endswith("(it has: gap_loss, gap_acc)")
    with pytest.raises(FlatcliError) as info:
        tau_bar_figure(two.iloc[:0], "gap_x")
    assert str(info.value).endswith("(it has: none)")


def test_tau_bar_axes_lines_labels_and_legend() -> None:
    from matplotlib.colors import to_hex

    from flatcli.plots import tau_bar_figure

    stats = correlation_table(zoo_like_table(), MEASURES, ["gap_loss"], bootstrap=100)
    fig = tau_bar_figure(stats, "gap_loss")  # the default statistic is Kendall τ-b
    (ax,) = fig.axes
    assert ax.get_xlim() == (-1.0, 1.25)
    assert ax.get_xlabel() == (
        "Kendall τ-b with the gap (+1: the measure ranks checkpoints exactly as the gap)"
    )
    # The zero line is the only drawn line: error bars draw no line through the values
    # (their caps are markers).
    (zero,) = [line for line in ax.lines if line.get_linestyle() != "None"]
    assert list(zero.get_xdata()) == [0.0, 0.0] and _rgba(zero.get_color()) == _rgba("black")
    (bars,) = [c for c in ax.collections if len(c.get_segments()) == len(MEASURES)]
    assert {_rgba(c) for c in bars.get_colors()} == {_rgba("black")}
    table = stats.set_index("measure")
    names = [t.get_text() for t in ax.get_yticklabels()]
    for text in ax.texts:  # each value just right of its bar, interval and zero
        name = names[round(text.get_position()[1])]
        v, hi = table.loc[name, "kendall_tau_b"], table.loc[name, "kendall_tau_b_hi"]
        right = max([0.0, *(u for u in (v, hi) if not np.isnan(u))])
        assert text.get_position()[0] == pytest.approx(right + 0.03, abs=1e-12), name
    assert fig.get_suptitle() == (
        "Which measure predicts the generalization gap (test loss − train loss)?\n"
        "Kendall τ-b per measure, n = 24 checkpoints, error bars: 95% bootstrap CI"
    )
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "CI above 0: larger measure, larger gap",
        "CI below 0: larger measure, smaller gap",
        "CI includes 0: no reliable relation",
    ]
    assert [to_hex(p.get_facecolor()) for p in legend.legend_handles] == [
        "#1f77b4",
        "#d62728",
        "#9e9e9e",
    ]


def _stats(**columns) -> pd.DataFrame:  # noqa: ANN003
    base = {"measure": ["a", "b", "c"], "gap": "gap_loss", "n": 12}
    return pd.DataFrame({**base, **columns})


def test_tau_bar_titles_without_bootstrap_or_level_and_with_unequal_n() -> None:
    from flatcli.plots import tau_bar_figure

    nan = np.nan
    plain = _stats(my_stat=[0.1, 0.2, 0.3], my_stat_lo=nan, my_stat_hi=nan)
    fig = tau_bar_figure(plain, "gap_loss", statistic="my_stat")
    assert fig.get_suptitle().startswith(
        "Which measure predicts the generalization gap (test loss − train loss)?\n"
    )
    mine = tau_bar_figure(plain.assign(gap="my_gap"), "my_gap", statistic="my_stat")
    assert mine.get_suptitle().startswith("Which measure predicts the my_gap?\nmy_stat per")
    assert fig.get_suptitle().endswith(
        "my_stat per measure, n = 12 checkpoints, error bars: none (no bootstrap)"
    )
    assert fig.axes[0].get_xlabel().startswith("my_stat with the gap")
    half = _stats(my_stat=[0.1, 0.2, 0.3], my_stat_lo=nan, my_stat_hi=[0.2, 0.3, 0.4])
    half["n"] = [10, 12, 11]
    fig = tau_bar_figure(half, "gap_loss", statistic="my_stat")  # no attrs: no level
    assert fig.get_suptitle().endswith("n = 10–12 checkpoints, error bars: bootstrap CI")
    half.attrs["confidence"] = 0.9
    fig = tau_bar_figure(half, "gap_loss", statistic="my_stat")
    assert fig.get_suptitle().endswith("error bars: 90% bootstrap CI")


def test_tau_bars_from_a_table_with_missing_values_as_none() -> None:
    """A table read back from JSON holds None, not NaN: an object column."""
    from flatcli.plots import tau_bar_figure

    table = _stats(
        kendall_tau_b=pd.Series([0.3, None, -0.2], dtype=object),
        kendall_tau_b_lo=pd.Series([0.1, None, -0.4], dtype=object),
        kendall_tau_b_hi=pd.Series([0.5, None, 0.1], dtype=object),
    )
    (ax,) = tau_bar_figure(table, "gap_loss").axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["b", "c", "a"]
    assert sorted(t.get_text() for t in ax.texts) == ["+0.30", "-0.20", "undefined"]


def test_tied_bars_keep_the_tables_order() -> None:
    from flatcli.plots import tau_bar_figure

    names = [f"m{i:02d}" for i in range(40)]
    values = [0.5 if i % 2 else -0.25 for i in range(40)]
    table = pd.DataFrame(
        {"measure": names, "gap": "gap_loss", "n": 9, "kendall_tau_b": values}
    ).assign(kendall_tau_b_lo=np.nan, kendall_tau_b_hi=np.nan)
    (ax,) = tau_bar_figure(table, "gap_loss").axes
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert shown == names[0::2] + names[1::2]


def test_figure_bytes_are_the_written_files(tmp_path: Path) -> None:
    from flatcli.plots import _save, figure_bytes, tau_bar_figure

    stats = correlation_table(zoo_like_table(), MEASURES, ["gap_loss"], bootstrap=20)
    fig = tau_bar_figure(stats, "gap_loss")
    png, svg = _save(fig, tmp_path / "t")
    assert figure_bytes(fig) == svg.read_bytes()  # SVG by default
    assert figure_bytes(fig, "png") == png.read_bytes()
    assert b"matplotlib" not in png.read_bytes()  # no Software tag: the same bytes each time
    assert b"<dc:date>" not in svg.read_bytes()


def test_few_checkpoints_are_never_coloured_as_a_ci_above_0() -> None:
    """The issue's n = 4: τ-b = +1 on every resample is no interval. Its bar is not the
    "CI above 0" blue; it is hatched, says its permutation p-value, and the legend and
    title say why."""
    from matplotlib.colors import to_hex

    from flatcli.correlate import analyse
    from flatcli.plots import tau_bar_figure

    from .results import small_zoo

    stats = analyse(small_zoo(), measures=["relative_flatness", "weight_norm"], bootstrap=200,
                    seed=0)["correlations"]
    fig = tau_bar_figure(stats, "gap_loss")
    (ax,) = fig.axes
    names = [t.get_text() for t in ax.get_yticklabels()]
    bar = ax.patches[names.index("relative_flatness")]
    assert to_hex(bar.get_facecolor()) == "#ffffff" and bar.get_hatch() == "///"
    assert not any(to_hex(b.get_facecolor()) == "#1f77b4" for b in ax.patches)
    labels = {names[round(t.get_position()[1])]: t.get_text() for t in ax.texts}
    assert labels["relative_flatness"] == "+1.00 (p = 0.083)"
    (legend,) = fig.legends
    assert legend.get_texts()[-1].get_text() == (
        "no reliable CI: n < 10, or every resample agreed"
    )
    assert fig.get_suptitle().endswith(
        "fewer than 10 checkpoints: no interval is reliable; p: permutation p-value of τ-b"
    )


def test_a_degenerate_bootstrap_is_hatched_at_any_n() -> None:
    from matplotlib.colors import to_hex

    from flatcli.plots import tau_bar_figure

    nan = np.nan
    stats = _stats(
        kendall_tau_b=[1.0, 0.5, -0.4],
        kendall_tau_b_lo=[nan, 0.2, -0.7],
        kendall_tau_b_hi=[nan, 0.8, -0.1],
        bootstrap_degenerate=["kendall_tau_b,spearman_rho", "", "pearson_r"],
    )
    fig = tau_bar_figure(stats, "gap_loss")
    (ax,) = fig.axes
    names = [t.get_text() for t in ax.get_yticklabels()]
    colors = {n: to_hex(b.get_facecolor()) for n, b in zip(names, ax.patches, strict=True)}
    assert colors == {"a": "#ffffff", "b": "#1f77b4", "c": "#d62728"}
    assert "fewer than" not in fig.get_suptitle()
