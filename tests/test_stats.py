"""orchestrator.stats against scipy, textbook tables and hand computations."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats

from orchestrator import stats as rs
from orchestrator.tables import render_csv, summarize


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_is_scipys_percentile_bootstrap_with_the_fixed_seed():
    x = np.array([66.0, 67.5, 68.0, 69.2, 70.1])
    expected = stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=9999, method="percentile",
                               rng=np.random.default_rng(0)).confidence_interval
    assert rs.bootstrap_ci(x) == (expected.low, expected.high)
    assert rs.bootstrap_ci(x) == rs.bootstrap_ci(x)          # seeded: a table renders the same twice
    lo, hi = rs.bootstrap_ci(x)
    assert x.min() < lo < x.mean() < hi < x.max()


def test_bootstrap_ci_of_two_values_by_hand():
    # resampling [0, 1] with replacement: the mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5th
    # and 97.5th percentiles of ~10^4 resampled means are 0 and 1
    assert rs.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)


def test_bootstrap_delta_ci_is_scipys_unpaired_bootstrap_of_the_difference():
    x, y = np.array([76.0, 77.5, 78.0, 79.0]), np.array([66.0, 67.0, 68.0, 69.0, 70.0])
    expected = stats.bootstrap((x, y), lambda a, b, axis: a.mean(axis) - b.mean(axis), paired=False,
                               vectorized=True, method="percentile", n_resamples=9999,
                               rng=np.random.default_rng(0)).confidence_interval
    assert rs.bootstrap_delta_ci(x, y) == pytest.approx((expected.low, expected.high), rel=1e-12)
    lo, hi = rs.bootstrap_delta_ci(x, y)
    assert lo < x.mean() - y.mean() < hi


def test_bootstrap_needs_two_values_and_takes_ties_as_they_are():
    assert all(math.isnan(v) for v in rs.bootstrap_ci([1.0]))
    assert all(math.isnan(v) for v in rs.bootstrap_delta_ci([1.0, 2.0], [3.0]))
    assert rs.bootstrap_ci([5.0, 5.0, 5.0]) == (5.0, 5.0)
    assert rs.bootstrap_delta_ci([5.0, 5.0], [3.0, 3.0]) == (2.0, 2.0)


# --------------------------------------------------------------------------- probability of improvement


def test_probability_of_improvement_by_hand_and_as_rliable_computes_it():
    x, y = [1.0, 2.0, 3.0], [2.0, 2.0, 0.0]
    # pairs x > y: 1>0, 2>0, 3>2, 3>2, 3>0 = 5; ties 2=2 twice count half: (5 + 1) / 9
    assert rs.probability_of_improvement(x, y) == pytest.approx(6 / 9)
    # rliable: Mann-Whitney U of x vs y over n * m
    u = stats.mannwhitneyu(x, y, alternative="greater").statistic
    assert rs.probability_of_improvement(x, y) == pytest.approx(u / 9)
    # lower is better: the reverse comparison
    assert rs.probability_of_improvement(x, y, mode="min") == pytest.approx(1 - 6 / 9)
    assert math.isnan(rs.probability_of_improvement([], y))


# --------------------------------------------------------------------------- Holm


def test_holm_on_a_hand_case():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max 0.02, 0.03, 0.06, 0.06
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    np.testing.assert_allclose(rs.holm(p), [0.03, 0.06, 0.06, 0.02, math.nan])


def test_holm_caps_at_one_and_leaves_a_single_test_alone():
    np.testing.assert_allclose(rs.holm([0.6, 0.7]), [1.0, 1.0])
    np.testing.assert_allclose(rs.holm([math.nan, 0.2]), [math.nan, 0.2])


# --------------------------------------------------------------------------- seeds needed


def power_by_integration(n: int, d: float, alpha: float = 0.05) -> float:
    """Power of the two-sided two-sample t-test without scipy's noncentral t: T = (Z + nc) / sqrt(V / df), V ~ chi2;
    P(|T| > c) = E_V[P(Z > c sqrt(V/df) - nc) + P(Z < -c sqrt(V/df) - nc)]."""
    df, nc = 2 * n - 2, d * math.sqrt(n / 2)
    c = stats.t.ppf(1 - alpha / 2, df)

    def given_v(v):
        s = c * math.sqrt(v / df)
        return (stats.norm.sf(s - nc) + stats.norm.cdf(-s - nc)) * stats.chi2.pdf(v, df)

    # over the chi2's bulk (quad over [0, inf) misses the narrow peak at large df)
    lo, hi = stats.chi2.ppf(1e-13, df), stats.chi2.isf(1e-13, df)
    return integrate.quad(given_v, lo, hi, points=[df], limit=200)[0]


@pytest.mark.parametrize("d, n", [(0.2, 394), (0.5, 64), (0.8, 26), (1.0, 17), (2.0, 6)])
def test_seeds_needed_matches_cohens_table(d, n):
    # Cohen (1988) Table 2.4.1 / G*Power: per-group n for a two-sided two-sample t-test, alpha 0.05, power 0.8
    assert rs.seeds_needed(d, 1.0) == n
    assert rs.seeds_needed(-d * 3.0, 3.0) == n                   # only |delta| / sd matters
    assert power_by_integration(n, d) >= 0.8 > power_by_integration(n - 1, d)
    assert rs.t_test_power(n, d) == pytest.approx(power_by_integration(n, d), abs=1e-6)


def test_seeds_needed_edges():
    assert math.isnan(rs.seeds_needed(math.nan, 1.0)) and math.isnan(rs.seeds_needed(1.0, math.nan))
    assert rs.seeds_needed(0.0, 1.0) == math.inf
    assert rs.seeds_needed(1.0, 0.0) == 2
    assert rs.seeds_needed(1e-3, 1.0) == math.inf           # more than MAX_SEEDS


# --------------------------------------------------------------------------- in the table


def test_summary_carries_the_statistics_against_the_first_row():
    base, row = [66.0, 67.0, 68.0, 69.0, 70.0], [76.0, 77.0, 79.5, 80.0]
    other = [67.0, 69.5, 68.2, 71.0]
    trials = pd.DataFrame([{"row": r, "seed": s, "status": "ok", "val/mIoU": v}
                           for r, vals in (("FCN", base), ("r_IoU", row), ("other", other))
                           for s, v in enumerate(vals)])
    rows = [{"name": "FCN", "paper": 67.8}, {"name": "r_IoU", "paper": 77.1}, {"name": "other", "paper": None}]
    s = summarize(trials, "val/mIoU", rows).set_index("row")
    assert s.loc["r_IoU", ["ci_low", "ci_high"]].tolist() == list(rs.bootstrap_ci(row))
    assert s.loc["r_IoU", ["delta_ci_low", "delta_ci_high"]].tolist() == pytest.approx(rs.bootstrap_delta_ci(row, base))
    assert s.loc["r_IoU", "p_improve"] == 1.0
    welch = [stats.ttest_ind(v, base, equal_var=False).pvalue for v in (row, other)]
    assert s.loc[["r_IoU", "other"], "p_holm"].tolist() == pytest.approx(list(rs.holm(welch)))
    # the paper's delta 77.1 - 67.8 at the pooled sd of the two rows
    pooled = math.sqrt((np.var(row, ddof=1) + np.var(base, ddof=1)) / 2)
    assert s.loc["r_IoU", "seeds_needed"] == rs.seeds_needed(9.3, pooled) == 3
    # d = 9.3 / 1.76 = 5.3: with 2 seeds the t-test has df 2 (critical t 4.30) and too little power, with 3 enough
    assert power_by_integration(2, 9.3 / pooled) < 0.8 <= power_by_integration(3, 9.3 / pooled)
    assert math.isnan(s.loc["other", "seeds_needed"])      # no paper number: nothing to detect
    for column in ["delta_ci_low", "p_improve", "p_holm", "seeds_needed"]:
        assert math.isnan(s.loc["FCN", column])            # the baseline is not tested against itself
    back = pd.read_csv(__import__("io").StringIO(render_csv(s.reset_index())))
    assert back.loc[1, "ci_low"] == pytest.approx(s.loc["r_IoU", "ci_low"], rel=1e-12)
