"""Correlation statistics: scipy's values, τ-a's tie correction, granulated Ψ, bootstrap."""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

import flatcli.stats
from flatcli.errors import FlatcliError, UsageError
from flatcli.stats import (
    P_VALUES,
    PERMUTATION_P,
    STATISTICS,
    _bootstrap_statistics,
    add_gaps,
    correlation_table,
    granulated_kendall,
)


def brute_force_tau_a(x: np.ndarray, y: np.ndarray) -> float:
    """Jiang et al.'s Eq. 2: mean of sign(x_i − x_j)·sign(y_i − y_j) over pairs."""
    pairs = list(itertools.combinations(range(len(x)), 2))
    return sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs) / len(pairs)


def fixed_table() -> pd.DataFrame:
    rng = np.random.default_rng(1234)
    gap = rng.normal(size=30)
    return pd.DataFrame(
        {
            "gap": gap,
            "good": gap + 0.5 * rng.normal(size=30),  # no ties
            "tied": np.round(gap + rng.normal(size=30)),  # few distinct values
            "noise": rng.normal(size=30),
        }
    )


@pytest.mark.parametrize("measure", ["good", "tied", "noise"])
def test_point_estimates_are_scipys(measure: str) -> None:
    df = fixed_table()
    row = correlation_table(df, [measure], ["gap"], bootstrap=0).iloc[0]
    x, y = df[measure].to_numpy(), df["gap"].to_numpy()
    tau, rho, r = sps.kendalltau(x, y), sps.spearmanr(x, y), sps.pearsonr(x, y)
    assert row["n"] == 30
    assert row["kendall_tau_b"] == tau.statistic and row["kendall_p"] == tau.pvalue
    assert row["spearman_rho"] == rho.statistic and row["spearman_p"] == rho.pvalue
    assert row["pearson_r"] == r.statistic and row["pearson_p"] == r.pvalue
    assert row["kendall_tau_a"] == pytest.approx(brute_force_tau_a(x, y), abs=1e-14)


def test_table_layout_one_row_per_pair_measures_outermost() -> None:
    table = correlation_table(fixed_table(), ["good", "noise"], ["gap", "tied"], bootstrap=0)
    assert list(zip(table["measure"], table["gap"], strict=True)) == [
        ("good", "gap"),
        ("good", "tied"),
        ("noise", "gap"),
        ("noise", "tied"),
    ]
    for s in STATISTICS:
        assert {s, f"{s}_lo", f"{s}_hi"} <= set(table.columns)
    assert set(P_VALUES.values()) <= set(table.columns)
    assert table.attrs == {"bootstrap": 0, "seed": 0, "confidence": 0.95}


@pytest.mark.parametrize(
    "x, y, tied",
    [
        ([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5], False),
        ([0.3, -1, 2, 7, 5, 4.5], [1, 9, 3, 4, 2, 8], False),
        ([1, 1, 2, 3, 4, 5], [2, 1, 4, 3, 6, 5], True),  # ties in the measure
        ([1, 2, 3, 4, 5, 6], [1, 1, 1, 3, 6, 5], True),  # ties in the gap
        ([1, 1, 2, 2, 3, 3], [1, 1, 2, 3, 3, 2], True),  # ties in both, some shared
    ],
    ids=["no-ties", "no-ties-unsorted", "ties-x", "ties-y", "ties-both"],
)
def test_tau_a_equals_tau_b_exactly_iff_no_ties(x: list[float], y: list[float], tied: bool) -> None:
    df = pd.DataFrame({"m": x, "g": y}, dtype=float)
    row = correlation_table(df, ["m"], ["g"], bootstrap=0).iloc[0]
    if tied:
        assert row["kendall_tau_a"] != row["kendall_tau_b"]
        assert abs(row["kendall_tau_a"]) < abs(row["kendall_tau_b"])
    else:
        assert row["kendall_tau_a"] == row["kendall_tau_b"]
    assert row["kendall_tau_a"] == pytest.approx(brute_force_tau_a(np.array(x), np.array(y)))


def test_nan_rows_dropped_per_pair() -> None:
    df = fixed_table()
    df.loc[[2, 5], "good"] = np.nan
    df.loc[[7], "gap"] = np.nan
    table = correlation_table(df, ["good", "noise"], ["gap"], bootstrap=50)
    assert table["n"].tolist() == [27, 29]
    clean = df[["good", "gap"]].dropna().reset_index(drop=True)
    expected = correlation_table(clean, ["good"], ["gap"], bootstrap=50)
    pd.testing.assert_series_equal(table.iloc[0], expected.iloc[0], check_names=False)


@pytest.mark.parametrize(
    "m, g",
    [
        ([1.0, 2.0], [3.0, 1.0]),  # n < 3
        ([1.0, np.nan, 2.0, 3.0], [1.0, 2.0, np.nan, 3.0]),  # n = 2 after dropping NaN
        ([2.0, 2.0, 2.0, 2.0], [1.0, 3.0, 2.0, 4.0]),  # constant measure
        ([1.0, 3.0, 2.0, 4.0], [5.0, 5.0, 5.0, 5.0]),  # constant gap
    ],
    ids=["n2", "n2-after-nan", "constant-measure", "constant-gap"],
)
def test_degenerate_pairs_give_nan_without_warning(m: list[float], g: list[float]) -> None:
    # filterwarnings = error: scipy's ConstantInputWarning would fail this test.
    row = correlation_table(pd.DataFrame({"m": m, "g": g}), ["m"], ["g"], bootstrap=100).iloc[0]
    values = row.drop(["measure", "gap", "n", "bootstrap_degenerate", "note"]).astype(float)
    assert values.isna().all()
    assert row["note"]  # and says why


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    df = fixed_table()
    a = correlation_table(df, ["good", "tied"], ["gap"], bootstrap=400, seed=7)
    b = correlation_table(df, ["good", "tied"], ["gap"], bootstrap=400, seed=7)
    c = correlation_table(df, ["good", "tied"], ["gap"], bootstrap=400, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["kendall_tau_b_lo"].equals(c["kendall_tau_b_lo"])
    for s in STATISTICS:
        assert (a[f"{s}_lo"] <= a[s]).all() and (a[s] <= a[f"{s}_hi"]).all()
        assert (a[f"{s}_lo"] < a[f"{s}_hi"]).all()


def test_a_pairs_interval_does_not_depend_on_the_other_pairs() -> None:
    df = fixed_table()
    alone = correlation_table(df, ["tied"], ["gap"], bootstrap=200)
    together = correlation_table(df, ["good", "tied", "noise"], ["gap"], bootstrap=200)
    pd.testing.assert_series_equal(alone.iloc[0], together.iloc[1], check_names=False)


def test_lower_confidence_gives_a_nested_interval() -> None:
    df = fixed_table()
    wide = correlation_table(df, ["good"], ["gap"], bootstrap=400, confidence=0.95).iloc[0]
    narrow = correlation_table(df, ["good"], ["gap"], bootstrap=400, confidence=0.5).iloc[0]
    for s in STATISTICS:
        assert wide[f"{s}_lo"] < narrow[f"{s}_lo"] <= narrow[f"{s}_hi"] < wide[f"{s}_hi"]


def test_vectorized_bootstrap_matches_scipy_per_resample() -> None:
    df = fixed_table()
    x, y = df["tied"].to_numpy(), df["gap"].to_numpy()
    got = _bootstrap_statistics(x, y, resamples=20, seed=3)
    idx = np.random.default_rng(3).integers(0, len(x), size=(20, len(x)))
    for i, rows in enumerate(idx):
        xb, yb = x[rows], y[rows]
        assert got["kendall_tau_b"][i] == pytest.approx(sps.kendalltau(xb, yb).statistic, abs=1e-12)
        assert got["kendall_tau_a"][i] == pytest.approx(brute_force_tau_a(xb, yb), abs=1e-12)
        assert got["spearman_rho"][i] == pytest.approx(sps.spearmanr(xb, yb).statistic, abs=1e-12)
        assert got["pearson_r"][i] == pytest.approx(sps.pearsonr(xb, yb).statistic, abs=1e-12)


def test_granulated_kendall_matches_hand_computation() -> None:
    # Hyperparameters a ∈ {1, 2}, b ∈ {0, 1, 2}; the (a=2, b=2) network is missing.
    df = pd.DataFrame(
        {
            "a": [1, 2, 1, 2, 1],
            "b": [0, 0, 1, 1, 2],
            "m": [1.0, 2.0, 5.0, 5.0, 3.0],
            "g": [0.1, 0.2, 0.4, 0.3, 0.5],
            "seed": [0, 0, 0, 0, 0],  # not listed as a hyperparameter: ignored
        }
    )
    # ψ_a: groups by b.
    #   b=0: (m 1→2, g .1→.2) concordant: τ-a = +1
    #   b=1: (m 5→5, g .4→.3) tie in m: τ-a = 0
    #   b=2: one network only: skipped
    #   ψ_a = (1 + 0) / 2 = 0.5 over 2 groups.
    # ψ_b: groups by a.
    #   a=1: m (1, 5, 3), g (.1, .4, .5): pairs (1,5)/(.1,.4) +, (1,3)/(.1,.5) +,
    #        (5,3)/(.4,.5) −  → τ-a = (2 − 1)/3 = 1/3
    #   a=2: m (2, 5), g (.2, .3): +  → τ-a = 1
    #   ψ_b = (1/3 + 1) / 2 = 2/3 over 2 groups.
    # Ψ = (0.5 + 2/3) / 2 = 7/12.
    result = granulated_kendall(df, "m", "g", ["a", "b"])
    assert result["psi"] == pytest.approx({"a": 0.5, "b": 2 / 3})
    assert result["Psi"] == pytest.approx(7 / 12)
    assert result["groups"] == {"a": 2, "b": 2}


def test_granulated_kendall_skips_nan_rows_and_constant_hyperparameters() -> None:
    df = pd.DataFrame(
        {
            "a": [1, 2, 1, 2],
            "fixed": [0, 0, 0, 0],
            "m": [1.0, 2.0, 4.0, np.nan],
            "g": [0.1, 0.2, 0.5, 0.3],
        }
    )
    result = granulated_kendall(df, "m", "g", ["a", "fixed"])
    # a: the one group (fixed = 0) holds rows 0, 1, 2 → m (1, 2, 4), g (.1, .2, .5): τ-a = 1.
    assert result["psi"]["a"] == 1.0 and result["groups"]["a"] == 1
    # fixed never varies: no group, ψ = NaN, left out of Ψ.
    assert math.isnan(result["psi"]["fixed"]) and result["groups"]["fixed"] == 0
    assert result["Psi"] == 1.0


def test_add_gaps() -> None:
    df = pd.DataFrame(
        {
            "train_loss": [0.01, 0.02],
            "test_loss": [0.1, 0.05],
            "train_acc": [1.0, 0.99],
            "test_acc": [0.97, 0.98],
        }
    )
    out = add_gaps(df)
    assert out["gap_loss"].tolist() == pytest.approx([0.09, 0.03])
    assert out["gap_acc"].tolist() == pytest.approx([0.03, 0.01])
    assert "gap_loss" not in df.columns


def test_missing_columns_and_bad_options_are_one_line_errors() -> None:
    df = fixed_table()
    for call in (
        lambda: correlation_table(df, ["nope"], ["gap"]),
        lambda: granulated_kendall(df, "good", "gap", ["width"]),
        lambda: add_gaps(df),
    ):
        with pytest.raises(FlatcliError, match="missing column") as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="confidence"):
        correlation_table(df, ["good"], ["gap"], confidence=1.5)
    with pytest.raises(UsageError, match="bootstrap"):
        correlation_table(df, ["good"], ["gap"], bootstrap=-1)
    with pytest.raises(UsageError, match="hyperparameter"):
        granulated_kendall(df, "good", "gap", [])


def test_docstring_examples_run() -> None:
    assert doctest.testmod(flatcli.stats, raise_on_error=False).failed == 0


def test_granulated_kendall_uses_tau_a_on_tied_non_constant_groups() -> None:
    # One hyperparameter k with three values per group; the measure ties within each group
    # but is not constant, so τ-a and τ-b differ (τ-b would be 2/√6 ≈ 0.816 and 1/√3).
    df = pd.DataFrame(
        {
            "k": [1, 2, 3, 1, 2, 3],
            "other": [0, 0, 0, 1, 1, 1],
            "m": [1.0, 1.0, 2.0, 5.0, 6.0, 6.0],
            "g": [0.1, 0.2, 0.3, 0.3, 0.1, 0.2],
        }
    )
    # other=0: m (1, 1, 2), g (.1, .2, .3): pairs 0 (tie), +, +  → τ-a = 2/3.
    # other=1: m (5, 6, 6), g (.3, .1, .2): pairs −, −, 0 (tie)  → τ-a = −2/3.
    # (other varies only together with nothing: ψ_other has groups by k, each of 2 rows:
    #  k=1: m (1, 5), g (.1, .3) +1; k=2: m (1, 6), g (.2, .1) −1; k=3: m (2, 6), g (.3, .2) −1.)
    result = granulated_kendall(df, "m", "g", ["k", "other"])
    for _, group in df.groupby("other"):
        x, y = group["m"].to_numpy(), group["g"].to_numpy()
        assert sps.kendalltau(x, y).statistic != pytest.approx(brute_force_tau_a(x, y))
    assert result["psi"]["k"] == pytest.approx((2 / 3 - 2 / 3) / 2, abs=1e-15)
    assert result["psi"]["other"] == pytest.approx(-1 / 3)
    assert result["Psi"] == pytest.approx(-1 / 6)
    # One group alone, so a mean over groups cannot hide the τ variant.
    alone = granulated_kendall(df[df["other"] == 0], "m", "g", ["k", "other"])
    assert alone["psi"]["k"] == pytest.approx(2 / 3, rel=1e-14)  # τ-b would give 0.816
    assert alone["groups"] == {"k": 1, "other": 0}


def test_bootstrap_interval_is_the_percentile_interval_at_the_asked_level() -> None:
    # An independent recomputation: the same resamples (a fresh default_rng(seed)), scipy's
    # statistic on each, and numpy's quantiles at (1 − c)/2 and (1 + c)/2.
    df = fixed_table()
    x, y = df["tied"].to_numpy(), df["gap"].to_numpy()
    idx = np.random.default_rng(11).integers(0, len(x), size=(300, len(x)))
    reference = {
        "kendall_tau_b": [sps.kendalltau(x[i], y[i]).statistic for i in idx],
        "kendall_tau_a": [brute_force_tau_a(x[i], y[i]) for i in idx],
        "spearman_rho": [sps.spearmanr(x[i], y[i]).statistic for i in idx],
        "pearson_r": [sps.pearsonr(x[i], y[i]).statistic for i in idx],
    }
    for conf in (0.95, 0.8):
        row = correlation_table(df, ["tied"], ["gap"], bootstrap=300, seed=11, confidence=conf)
        row = row.iloc[0]
        for s, values in reference.items():
            lo, hi = np.quantile(values, [(1 - conf) / 2, (1 + conf) / 2])
            assert row[f"{s}_lo"] == pytest.approx(lo, abs=1e-12), (s, conf)
            assert row[f"{s}_hi"] == pytest.approx(hi, abs=1e-12), (s, conf)


def test_bootstrap_95_interval_covers_the_true_correlation_about_95_percent() -> None:
    # Bivariate normal with ρ = 0.6: Pearson's r estimates ρ, Kendall's τ estimates
    # (2/π) arcsin ρ. Percentile intervals at n = 40 cover a little under the nominal level.
    # The mean width is the sharper check: a 90% interval is 16% narrower (1.645/1.96).
    rho, n, reps = 0.6, 40, 50
    truth = {"pearson_r": rho, "kendall_tau_b": 2 / math.pi * math.asin(rho)}
    rng = np.random.default_rng(2024)
    covered = {s: 0 for s in truth}
    widths = []
    for rep in range(reps):
        x = rng.normal(size=n)
        y = rho * x + math.sqrt(1 - rho**2) * rng.normal(size=n)
        row = correlation_table(
            pd.DataFrame({"m": x, "g": y}), ["m"], ["g"], bootstrap=100, seed=rep
        ).iloc[0]
        for s, value in truth.items():
            covered[s] += row[f"{s}_lo"] <= value <= row[f"{s}_hi"]
        widths.append(row["pearson_r_hi"] - row["pearson_r_lo"])
    for s in truth:
        assert 0.84 <= covered[s] / reps <= 1.0, (s, covered[s])
    # The normal-theory width of a 95% interval for r, 2 · 1.96 (1 − ρ²)/√n ≈ 0.40; the mean
    # over 50 draws has a standard error of about 3%.
    assert np.mean(widths) == pytest.approx(2 * 1.96 * (1 - rho**2) / math.sqrt(n), rel=0.08)


# --------------------------------------------------------------------------- mutation survivors


def test_defaults_and_the_edges_of_the_options() -> None:
    df = fixed_table()
    assert correlation_table(df, ["good"], ["gap"]).attrs["bootstrap"] == 1000
    for bad in (0.0, 1.0):
        with pytest.raises(UsageError, match="strictly between 0 and 1"):
            correlation_table(df, ["good"], ["gap"], confidence=bad)
    # One resample agrees with itself: a degenerate bootstrap (not "no bootstrap").
    row = correlation_table(df, ["good"], ["gap"], bootstrap=1).iloc[0]
    assert row["bootstrap_degenerate"].split(",") == list(STATISTICS)
    none = correlation_table(df, ["good"], ["gap"], bootstrap=0).iloc[0]
    assert none["bootstrap_degenerate"] == ""


def test_three_rows_are_enough() -> None:
    df = pd.DataFrame({"m": [1.0, 2.0, 3.0], "g": [0.1, 0.3, 0.2]})
    row = correlation_table(df, ["m"], ["g"], bootstrap=0).iloc[0]
    assert row["n"] == 3 and row["kendall_tau_b"] == pytest.approx(1 / 3)


def test_non_numeric_entries_count_as_missing() -> None:
    # A CSV written by hand may hold "n/a" or an empty string where a measure failed.
    df = fixed_table()
    df["good"] = df["good"].astype(object)
    df.loc[[1, 4], "good"] = ["n/a", ""]
    row = correlation_table(df, ["good"], ["gap"], bootstrap=0).iloc[0]
    clean = correlation_table(df.drop(index=[1, 4]).astype({"good": float}), ["good"], ["gap"])
    assert row["n"] == 28 and row["kendall_tau_b"] == clean.iloc[0]["kendall_tau_b"]
    hp = pd.DataFrame({"k": [1, 2, 3, 4], "m": [1.0, "n/a", 3.0, 2.0], "g": [1, 2, 3, 4]})
    assert granulated_kendall(hp, "m", "g", ["k"])["psi"]["k"] == pytest.approx(1 / 3)


def test_degenerate_p_values_are_float_nan() -> None:
    df = pd.DataFrame({"m": [2.0, 2.0, 2.0, 2.0], "g": [1.0, 3.0, 2.0, 4.0]})
    table = correlation_table(df, ["m"], ["g"], bootstrap=0)
    for col in P_VALUES.values():
        assert table[col].dtype == np.float64 and math.isnan(table[col].iloc[0])


def test_granulated_kendall_with_one_hyperparameter_and_ties_in_the_gap() -> None:
    # One hyperparameter: a single group, the whole table. The gap ties (0.2 twice) and the
    # measure does not: τ-a counts the tied pair as 0 (τ-b would not).
    df = pd.DataFrame({"k": [1, 2, 3, 4], "m": [1.0, 2.0, 3.0, 4.0], "g": [0.1, 0.2, 0.2, 0.5]})
    result = granulated_kendall(df, "m", "g", ["k"])
    assert result == {
        "psi": {"k": pytest.approx(5 / 6)},
        "Psi": pytest.approx(5 / 6),
        "groups": {"k": 1},
    }
    # A group whose gap is constant contributes 0 (and warns about nothing).
    flat = df.assign(g=0.3)
    assert granulated_kendall(flat, "m", "g", ["k"])["psi"]["k"] == 0.0


def test_granulated_kendall_without_any_group_is_nan_without_a_warning() -> None:
    df = pd.DataFrame({"k": [1, 1, 1], "j": [0, 0, 0], "m": [1.0, 2.0, 3.0], "g": [3, 2, 1]})
    result = granulated_kendall(df, "m", "g", ["k", "j"])
    assert math.isnan(result["Psi"]) and result["groups"] == {"k": 0, "j": 0}


def test_granulated_kendall_errors_name_the_problem() -> None:
    df = fixed_table().assign(k=1)
    with pytest.raises(UsageError) as info:
        granulated_kendall(df, "good", "gap", [])
    assert str(info.value) == "granulated Kendall needs at least one hyperparameter column"
    with pytest.raises(UsageError) as info:
        granulated_kendall(df, "good", "gap", ["k", "k"])
    assert str(info.value) == "hyperparameter columns repeat: k, k"


def test_column_order_and_an_empty_table() -> None:
    columns = ["measure", "gap", "n"]
    for s in STATISTICS:
        columns += [s, f"{s}_lo", f"{s}_hi"]
    columns += [*P_VALUES.values(), *PERMUTATION_P.values(), "bootstrap_degenerate", "note"]
    assert list(correlation_table(fixed_table(), ["good"], ["gap"], bootstrap=0)) == columns
    empty = correlation_table(fixed_table(), [], ["gap"])
    assert list(empty) == columns and len(empty) == 0


def test_missing_column_message_lists_what_the_table_has() -> None:
    df = pd.DataFrame({"x": [1.0], "y": [2.0]})
    with pytest.raises(FlatcliError) as info:
        correlation_table(df, ["a", "b"], ["y"])
    assert str(info.value) == "missing column(s) a, b (the table has: x, y)"
    with pytest.raises(FlatcliError) as info:
        add_gaps(pd.DataFrame())
    assert str(info.value).endswith("(the table has: none)")


def test_constant_bootstrap_resamples_are_nan_quietly() -> None:
    """A small zoo with repeated values: some resamples are constant (scipy warns and gives
    NaN there); the interval comes from the others, and no warning escapes."""
    import warnings

    df = pd.DataFrame(
        {"m": [1.0, 1, 1, 1, 1, 2, 3], "gap_loss": [0.1, 0.3, 0.2, 0.5, 0.4, 0.7, 0.9]}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = correlation_table(df, ["m"], ["gap_loss"], bootstrap=300, seed=0)
    row = table.iloc[0]
    for s in ("kendall_tau_b", "pearson_r", "spearman_rho"):
        assert row[f"{s}_lo"] <= row[s] <= row[f"{s}_hi"], s


# --------------------------------------------------------------------------- small n


ORACLE_STATISTICS = {
    "kendall_tau_b": lambda a, b: sps.kendalltau(a, b).statistic,
    "spearman_rho": lambda a, b: sps.spearmanr(a, b).statistic,
    "pearson_r": lambda a, b: sps.pearsonr(a, b).statistic,
}


def all_orderings_p(x: np.ndarray, y: np.ndarray, statistic: str = "kendall_tau_b") -> float:
    """Two-sided permutation p-value of ``statistic`` (scipy's own function on every
    ordering of ``y``): twice the smaller one-sided p-value, at most 1 (scipy's definition
    of two-sided)."""
    f = ORACLE_STATISTICS[statistic]
    observed = f(x, y)
    values = np.array([f(x, np.array(p)) for p in itertools.permutations(y)])
    above, below = np.mean(values >= observed - 1e-12), np.mean(values <= observed + 1e-12)
    return float(min(1.0, 2 * min(above, below)))


def test_four_checkpoints_ranked_alike_are_not_certainty() -> None:
    """The issue's n = 4: τ-b = +1 on every resample is a degenerate bootstrap, not a CI of
    [+1, +1]; the permutation p-value says what four points can show, 1/12 at best."""
    df = pd.DataFrame({"m": [1.0, 2.0, 3.0, 4.0], "gap": [0.1, 0.2, 0.35, 0.4]})
    row = correlation_table(df, ["m"], ["gap"], bootstrap=1000).iloc[0]
    assert row["kendall_tau_b"] == 1.0
    assert math.isnan(row["kendall_tau_b_lo"]) and math.isnan(row["kendall_tau_b_hi"])
    assert "kendall_tau_b" in row["bootstrap_degenerate"].split(",")
    assert row["kendall_perm_p"] == pytest.approx(1 / 12, abs=1e-15)
    # scipy's asymptotic p-values claim near-certainty; the permutation ones do not
    assert row["spearman_p"] < 1e-6 and row["pearson_p"] < 0.05
    assert row["spearman_perm_p"] == pytest.approx(1 / 12, abs=1e-15)
    assert row["pearson_perm_p"] == pytest.approx(1 / 12, abs=1e-15)
    assert row["note"] == ""
    warning = flatcli.stats.small_n_warning(4)
    assert warning is not None and "only 4 checkpoints" in warning and "p = 0.083" in warning
    assert flatcli.stats.small_n_warning(flatcli.stats.SMALL_N) is None


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.3, 0.1, 0.4, 0.6, 0.5, 0.9]),
        ([1.0, 1.0, 2.0, 3.0, 3.0, 4.0, 5.0], [0.2, 0.1, 0.1, 0.4, 0.3, 0.3, 0.7]),  # ties
    ],
    ids=["no-ties", "ties"],
)
def test_permutation_p_is_exact_over_all_orderings(x: list[float], y: list[float]) -> None:
    xa, ya = np.array(x), np.array(y)
    row = correlation_table(pd.DataFrame({"m": xa, "g": ya}), ["m"], ["g"], bootstrap=0).iloc[0]
    for statistic, column in PERMUTATION_P.items():
        expected = all_orderings_p(xa, ya, statistic)
        assert row[column] == pytest.approx(expected, abs=1e-12), statistic
    if len(set(x)) == len(x):  # scipy's exact null distribution, without ties
        exact = sps.kendalltau(xa, ya, method="exact").pvalue
        assert row["kendall_perm_p"] == pytest.approx(exact, rel=1e-9)


def test_a_constant_gap_says_why_its_section_is_empty() -> None:
    df = add_gaps(
        pd.DataFrame(
            {
                "train_loss": [0.01, 0.02, 0.03, 0.04],
                "test_loss": [0.02, 0.05, 0.04, 0.09],
                "train_acc": [1.0] * 4,
                "test_acc": [1.0] * 4,
                "m": [1.0, 2.0, 3.0, 4.0],
            }
        )
    )
    notes = flatcli.stats.constant_gaps(df, ["gap_loss", "gap_acc"])
    assert list(notes) == ["gap_acc"]
    assert notes["gap_acc"].startswith(
        "gap_acc is 0 in all 4 checkpoints (every train_acc is 1 and every test_acc is 1)"
    )
    row = correlation_table(df, ["m"], ["gap_acc"], bootstrap=10).iloc[0]
    assert row["note"] == "gap_acc is constant (0 in all 4 checkpoints)"
