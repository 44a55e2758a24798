r"""How well a measure predicts the generalization gap, across many checkpoints.

Pure statistics on :class:`pandas.DataFrame` tables with one row per checkpoint: the
correlation coefficients are scipy's, the tables are pandas'. Nothing here knows about
models; :mod:`flatcli.correlate` builds the table.

Kendall's τ comes in two forms (docs/measures.md). With :math:`C` concordant and :math:`D`
discordant pairs among :math:`n_0 = n(n-1)/2`, and :math:`n_x`, :math:`n_y` the pairs
tied in the measure and in the gap,

.. math::

    \tau_a = \frac{C - D}{n_0}, \qquad
    \tau_b = \frac{C - D}{\sqrt{(n_0 - n_x)(n_0 - n_y)}},

so :math:`\tau_a = \tau_b \sqrt{(n_0 - n_x)(n_0 - n_y)} / n_0`. τ-b is scipy's default
(:func:`scipy.stats.kendalltau`, which offers only the variants ``'b'`` and ``'c'``);
τ-a is Jiang et al.'s definition, which counts a tied pair as zero agreement. They are
equal when there are no ties.

References:
    Jiang, Neyshabur, Mobahi, Krishnan, Bengio (2020). Fantastic generalization
    measures and where to find them. ICLR. https://arxiv.org/abs/1912.02178

    Dziugaite, Drouin, Neal, Rajkumar, Caballero, Wang, Mitliagkas, Roy (2020).
    In search of robust measures of generalization. NeurIPS.
    https://arxiv.org/abs/2010.11924

    Efron, Tibshirani (1993). An Introduction to the Bootstrap, ch. 13 (percentile
    intervals). Chapman & Hall.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from .errors import FlatcliError, UsageError

STATISTICS = ("kendall_tau_b", "kendall_tau_a", "spearman_rho", "pearson_r")
"""The statistics :func:`correlation_table` reports, in column order."""

P_VALUES = {"kendall_tau_b": "kendall_p", "spearman_rho": "spearman_p", "pearson_r": "pearson_p"}
"""scipy's two-sided p-value column for each statistic that has one.

τ-a shares ``kendall_p``: for a fixed tie pattern both τ's are the same multiple of
:math:`C - D`, which is what scipy's test is about. These are asymptotic: at small n they
overstate the evidence (n = 4 ranked alike gives scipy's ``spearman_p`` = 0 and
``pearson_p`` ≈ 0.003, where the exact permutation p-value of each is 1/12); read
:data:`PERMUTATION_P` there.
"""

PERMUTATION_P = {
    "kendall_tau_b": "kendall_perm_p",
    "spearman_rho": "spearman_perm_p",
    "pearson_r": "pearson_perm_p",
}
"""The permutation p-value column of each statistic that has one (:func:`correlation_table`)."""

GAPS = ("gap_loss", "gap_acc")
"""The gap columns :func:`add_gaps` adds."""

MIN_N = 3
"""Fewest complete rows for which :func:`correlation_table` reports anything."""

SMALL_N = 10
"""Below this many checkpoints, the results carry a warning (:func:`small_n_warning`) and
no bootstrap interval counts as evidence: a percentile bootstrap over so few rows is not a
reliable interval, and it is degenerate when every resample agrees (n = 4 checkpoints
ranked alike give τ-b = +1 on every resample). The permutation p-value is the honest
summary there: at n = 4 even a perfect ranking has p = 1/12."""

PERMUTATIONS = 9999
"""Random orderings behind ``kendall_perm_p`` when there are more than this many
orderings in all (n ≥ 8); for n ≤ 7 every one of the n! orderings is used."""

PERM_MAX_N = 20
"""Largest n for which ``kendall_perm_p`` is computed (0.05 s a pair at n = 20); above it
scipy's ``kendall_p`` is accurate, and finer than 9,999 orderings can resolve."""


def add_gaps(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with the two generalization gaps of docs/measures.md added.

    ``gap_loss = test_loss − train_loss`` (mean cross-entropy) and
    ``gap_acc = train_acc − test_acc``. Both are positive when the model does worse
    on unseen data.

    Args:
        df: One row per checkpoint with columns ``train_loss``, ``test_loss``,
            ``train_acc`` and ``test_acc``.

    Returns:
        A new table; ``df`` is not modified.

    Raises:
        FlatcliError: A needed column is missing.
    """
    _require_columns(df, ("train_loss", "test_loss", "train_acc", "test_acc"))
    return df.assign(
        gap_loss=df["test_loss"] - df["train_loss"],
        gap_acc=df["train_acc"] - df["test_acc"],
    )


def correlation_table(
    df: pd.DataFrame,
    measures: Sequence[str],
    gaps: Sequence[str],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Rank and linear correlation of each measure with each gap, with bootstrap CIs.

    For each (measure, gap) pair the rows where either is NaN are dropped (``n`` says
    how many remain). The point estimates are scipy's: τ-b from
    :func:`scipy.stats.kendalltau`, τ-a from τ-b by the tie correction in the module
    docstring, ρ from :func:`scipy.stats.spearmanr`, r from :func:`scipy.stats.pearsonr`
    (Petzka et al.'s Fig. 5 statistic; unlike that figure, no checkpoints are dropped).

    Confidence intervals are percentile bootstrap intervals over checkpoints: the
    ``n`` rows are resampled with replacement ``bootstrap`` times, by a
    :class:`numpy.random.Generator` seeded with ``seed`` afresh for every pair, so a
    pair's interval does not depend on which other pairs are in the table, and pairs
    with the same rows see the same resamples. All statistics of a pair use the same
    resamples. Resamples on which a statistic is undefined (a constant column) are left
    out of its interval. Resampling duplicates checkpoints, and a duplicated pair is a
    tie, so τ-a's resampled values lean slightly towards zero (by about ``1/n``).

    An interval whose resamples all gave the same value (a perfect ranking of few
    checkpoints) is no interval: it is left NaN, and the statistic is named in
    ``bootstrap_degenerate``. ``kendall_perm_p``, ``spearman_perm_p`` and
    ``pearson_perm_p`` are the two-sided permutation p-values of τ-b, ρ and r (twice the
    smaller one-sided one, at most 1),
    :func:`scipy.stats.permutation_test` over the orderings of the gap (exact, over
    all n! of them, for n ≤ 7; :data:`PERMUTATIONS` seeded random ones above; NaN above
    :data:`PERM_MAX_N`). It is valid at any n and with ties.

    Degenerate pairs, with fewer than 3 complete rows or a constant column, get NaN
    throughout; ``note`` says why.

    Args:
        df: One row per checkpoint.
        measures: Columns holding the measures.
        gaps: Columns holding generalization gaps (see :func:`add_gaps`).
        bootstrap: Number of bootstrap resamples; 0 leaves the intervals NaN.
        seed: Seed of the resampling.
        confidence: Coverage of the intervals, in (0, 1).

    Returns:
        One row per (measure, gap), measures outermost, with columns ``measure``,
        ``gap``, ``n``, then for each statistic ``s`` in :data:`STATISTICS` the columns
        ``s``, ``s_lo``, ``s_hi``, scipy's p-values of :data:`P_VALUES`, then the
        permutation p-values of :data:`PERMUTATION_P`, ``bootstrap_degenerate`` (the
        statistics whose resamples all agreed, comma-separated) and ``note`` (why the
        statistics are NaN, or empty). Its ``attrs`` record ``bootstrap``, ``seed`` and
        ``confidence``.

    Raises:
        FlatcliError: A named column is missing.
        UsageError: ``bootstrap`` is negative or ``confidence`` is not in (0, 1).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"m": [1.0, 2.0, 3.0, 4.0], "gap": [0.1, 0.3, 0.2, 0.4]})
        >>> row = correlation_table(df, ["m"], ["gap"], bootstrap=0).iloc[0]
        >>> float(row["kendall_tau_b"]), int(row["n"])
        (0.6666666666666669, 4)
    """
    _require_columns(df, [*measures, *gaps])
    if bootstrap < 0:
        raise UsageError(f"bootstrap must be a non-negative number of resamples, got {bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise UsageError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    rows = []
    for measure in measures:
        for gap in gaps:
            pair = df[[measure, gap]].apply(pd.to_numeric, errors="coerce").dropna()
            x = pair[measure].to_numpy(dtype=np.float64)
            y = pair[gap].to_numpy(dtype=np.float64)
            row: dict[str, Any] = {"measure": measure, "gap": gap, "n": len(x)}
            row.update(_pair_statistics(x, y, bootstrap=bootstrap, seed=seed, conf=confidence))
            row["note"] = _why_undefined({measure: x, gap: y})
            rows.append(row)
    columns = ["measure", "gap", "n"]
    for s in STATISTICS:
        columns += [s, f"{s}_lo", f"{s}_hi"]
    columns += [*P_VALUES.values(), *PERMUTATION_P.values(), "bootstrap_degenerate", "note"]
    table = pd.DataFrame(rows, columns=columns).astype({"n": "int64"})
    table.attrs.update(bootstrap=bootstrap, seed=seed, confidence=confidence)
    return table


def small_n_warning(n: int) -> str | None:
    """The warning for results over ``n`` checkpoints, below :data:`SMALL_N`; else None."""
    if n >= SMALL_N:
        return None
    smallest = 2 / math.factorial(n) if n >= 2 else 1.0
    return (
        f"only {n} checkpoints (fewer than {SMALL_N}): the bootstrap intervals are not "
        f"reliable, and no correlation is significant on its own (even a perfect ranking "
        f"has permutation p = {smallest:.2g}); read kendall_perm_p, and measure more "
        "checkpoints"
    )


def constant_gaps(df: pd.DataFrame, gaps: Sequence[str]) -> dict[str, str]:
    """Why each constant gap has no correlations, in words, keyed by gap.

    The parts of the gap are named when they are constant too: a ``gap_acc`` of 0 in
    every checkpoint because every train and test accuracy is 1, for example.
    """
    parts = {"gap_loss": ("test_loss", "train_loss"), "gap_acc": ("train_acc", "test_acc")}
    notes = {}
    for gap in gaps:
        if gap not in df.columns:
            continue
        values = pd.to_numeric(df[gap], errors="coerce").dropna().to_numpy(dtype=np.float64)
        if len(values) < 2 or not np.all(values == values[0]):
            continue
        why = f"{gap} is {values[0]:g} in all {len(values)} checkpoints"
        fixed = [
            f"{c} is {df[c].iloc[0]:g}"
            for c in parts.get(gap, ())
            if c in df.columns and df[c].nunique(dropna=False) == 1
        ]
        if fixed:
            why += f" (every {' and every '.join(fixed)})"
        notes[gap] = why + ": a constant gap ranks no checkpoint above another, so its "
        notes[gap] += "correlations are n/a"
    return notes


def granulated_kendall(
    df: pd.DataFrame,
    measure: str,
    gap: str,
    hparams: Sequence[str],
) -> dict[str, Any]:
    r"""Jiang et al.'s granulated Kendall coefficient Ψ (their Eq. 4).

    For each hyperparameter :math:`k`, the checkpoints are grouped by the values of all
    *other* hyperparameters in ``hparams``, so the members of a group differ only in
    :math:`k` (hyperparameters not listed, such as a seed, are ignored, so replicates
    share a group). Then

    .. math::

        \psi_k = \frac{1}{m_k} \sum_{\text{groups } G} \tau_a(G), \qquad
        \Psi = \frac{1}{K} \sum_k \psi_k,

    where :math:`m_k` counts the groups with at least two distinct values of :math:`k`
    (others are skipped). τ-a is used, as in Jiang et al.'s Eq. 2: in a group of two, a
    tie in the measure is common (a measure that ignores :math:`k`), and τ-a scores it
    as 0, where τ-b would be undefined. A group whose measure or gap is constant thus
    contributes 0. Rows with NaN in the measure, the gap or any hyperparameter are
    dropped first. A hyperparameter without any group gets :math:`\psi_k` = NaN and is
    left out of Ψ (``groups`` shows 0); Ψ is NaN when every :math:`\psi_k` is.

    Args:
        df: One row per checkpoint.
        measure: Column holding the measure.
        gap: Column holding the generalization gap.
        hparams: Columns holding the hyperparameters that were varied.

    Returns:
        ``{"psi": {k: ψ_k}, "Psi": Ψ, "groups": {k: m_k}}``.

    Raises:
        FlatcliError: A named column is missing.
        UsageError: ``hparams`` is empty or names a column twice.
    """
    hparams = list(hparams)
    if not hparams:
        raise UsageError("granulated Kendall needs at least one hyperparameter column")
    if len(set(hparams)) != len(hparams):
        raise UsageError(f"hyperparameter columns repeat: {', '.join(hparams)}")
    _require_columns(df, [measure, gap, *hparams])
    table = df[[measure, gap, *hparams]].copy()
    table[[measure, gap]] = table[[measure, gap]].apply(pd.to_numeric, errors="coerce")
    table = table.dropna()
    psi: dict[str, float] = {}
    groups: dict[str, int] = {}
    for k in hparams:
        others = [h for h in hparams if h != k]
        grouped = table.groupby(others, sort=True) if others else [((), table)]
        taus = [
            _tau_a_with_ties_as_zero(g[measure].to_numpy(float), g[gap].to_numpy(float))
            for _, g in grouped
            if g[k].nunique() >= 2
        ]
        groups[k] = len(taus)
        psi[k] = float(np.mean(taus)) if taus else math.nan
    defined = [v for v in psi.values() if not math.isnan(v)]
    return {"psi": psi, "Psi": float(np.mean(defined)) if defined else math.nan, "groups": groups}


# --------------------------------------------------------------------------- helpers


def _require_columns(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if missing:
        have = ", ".join(map(str, df.columns)) or "none"
        raise FlatcliError(f"missing column(s) {', '.join(missing)} (the table has: {have})")


def _tied_pairs(a: np.ndarray) -> int:
    """Number of pairs with equal values, Σ t(t−1)/2 over groups of t equal values."""
    counts = np.unique(a, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())


def _tau_a_from_tau_b(tau_b: float, x: np.ndarray, y: np.ndarray) -> float:
    n0 = len(x) * (len(x) - 1) // 2
    nx, ny = _tied_pairs(x), _tied_pairs(y)
    if nx == 0 and ny == 0:
        return tau_b  # exactly, not up to rounding
    return tau_b * math.sqrt((n0 - nx) * (n0 - ny)) / n0


def _tau_a_with_ties_as_zero(x: np.ndarray, y: np.ndarray) -> float:
    # A constant column ties every pair: C = D = 0, so τ-a is 0 though τ-b is undefined.
    if len(x) < 2:
        return math.nan
    if np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    return _tau_a_from_tau_b(float(sps.kendalltau(x, y).statistic), x, y)


def _is_degenerate(x: np.ndarray, y: np.ndarray) -> bool:
    return len(x) < MIN_N or bool(np.all(x == x[0]) or np.all(y == y[0]))


def _why_undefined(columns: dict[str, np.ndarray]) -> str:
    """Why a pair's statistics are NaN (too few rows, a constant column), or ``""``."""
    n = min(len(v) for v in columns.values())
    if n < MIN_N:
        return f"only {n} complete rows (at least {MIN_N} needed)"
    for name, v in columns.items():
        if np.all(v == v[0]):
            return f"{name} is constant ({v[0]:g} in all {n} checkpoints)"
    return ""


def _permutation_p(x: np.ndarray, y: np.ndarray, statistic: str, *, seed: int) -> float:
    """Two-sided permutation p-value of ``statistic``, over orderings of ``y``.

    Under a permutation of ``y`` the tie counts, the means and the spreads stay, so each
    statistic is a fixed increasing function of a sum tested here: τ-b of
    ``S = Σ_{i<j} sign(x_i − x_j) sign(y_i − y_j)``, r of ``Σ (x_i − x̄) y_i``, ρ of the same
    sum over (average) ranks.
    """
    if len(x) > PERM_MAX_N:
        return math.nan
    if statistic == "kendall_tau_b":
        sx = np.sign(x[:, None] - x[None, :])

        def s_statistic(yp: np.ndarray, axis: int = -1) -> np.ndarray:
            return (sx * np.sign(yp[..., :, None] - yp[..., None, :])).sum((-2, -1)) / 2

    else:
        if statistic == "spearman_rho":
            x, y = sps.rankdata(x), sps.rankdata(y)
        xc = x - x.mean()

        def s_statistic(yp: np.ndarray, axis: int = -1) -> np.ndarray:
            return (yp * xc).sum(-1)

    found = sps.permutation_test(
        (y,),
        s_statistic,
        permutation_type="pairings",
        n_resamples=PERMUTATIONS,
        vectorized=True,
        batch=max(1, 2_000_000 // len(x) ** 2),
        alternative="two-sided",
        random_state=np.random.default_rng(seed),
    )
    return float(found.pvalue)


def _pair_statistics(
    x: np.ndarray, y: np.ndarray, *, bootstrap: int, seed: int, conf: float
) -> dict[str, Any]:
    out: dict[str, Any] = {
        name: math.nan for s in STATISTICS for name in (s, f"{s}_lo", f"{s}_hi")
    }
    out.update(dict.fromkeys(P_VALUES.values(), math.nan))
    out.update(dict.fromkeys(PERMUTATION_P.values(), math.nan), bootstrap_degenerate="")
    if _is_degenerate(x, y):
        return out
    tau = sps.kendalltau(x, y)
    rho = sps.spearmanr(x, y)
    r = sps.pearsonr(x, y)
    tau_b = float(tau.statistic)
    out.update(
        kendall_tau_b=tau_b,
        kendall_tau_a=_tau_a_from_tau_b(tau_b, x, y),
        spearman_rho=float(rho.statistic),
        pearson_r=float(r.statistic),
        kendall_p=float(tau.pvalue),
        spearman_p=float(rho.pvalue),
        pearson_p=float(r.pvalue),
    )
    out.update({p: _permutation_p(x, y, s, seed=seed) for s, p in PERMUTATION_P.items()})
    if bootstrap == 0:
        return out
    resampled = _bootstrap_statistics(x, y, resamples=bootstrap, seed=seed)
    tail = (1.0 - conf) / 2.0
    degenerate = []
    for s, values in resampled.items():
        values = values[np.isfinite(values)]
        if len(values) and np.ptp(values) <= 1e-12:  # rounding: r = 1 ± 2e-16
            degenerate.append(s)  # every resample agrees: no interval, not certainty
        elif len(values):
            out[f"{s}_lo"], out[f"{s}_hi"] = (
                float(q) for q in np.quantile(values, [tail, 1 - tail])
            )
    out["bootstrap_degenerate"] = ",".join(degenerate)
    return out


def _bootstrap_statistics(
    x: np.ndarray, y: np.ndarray, *, resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Each statistic on ``resamples`` paired resamples of the rows (NaN where undefined)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    xb, yb = x[idx], y[idx]
    with warnings.catch_warnings():
        # Some resamples have a constant column: scipy warns and returns NaN, which we want.
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        tau_b = np.asarray(sps.kendalltau(xb, yb, axis=1).statistic, dtype=np.float64)
        # Spearman's ρ is Pearson's r of the ranks (ties get average ranks), row by row.
        rho = sps.pearsonr(sps.rankdata(xb, axis=1), sps.rankdata(yb, axis=1), axis=1).statistic
        r = sps.pearsonr(xb, yb, axis=1).statistic
    tau_a = np.array([_tau_a_from_tau_b(t, a, b) for t, a, b in zip(tau_b, xb, yb, strict=True)])
    return {
        "kendall_tau_b": tau_b,
        "kendall_tau_a": tau_a,
        "spearman_rho": np.asarray(rho, dtype=np.float64),
        "pearson_r": np.asarray(r, dtype=np.float64),
    }
