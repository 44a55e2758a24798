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
