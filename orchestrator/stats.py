"""Statistics beside mean ± std for an ablation table: bootstrap CIs, probability of improvement, Holm, seeds needed.

Five seeds per row is little data; these say how little. Every function takes plain arrays of per-seed values and
returns NaN where the data cannot support an answer (fewer than 2 seeds), never a made-up number.

- `bootstrap_ci` / `bootstrap_delta_ci`: 95% percentile bootstrap (scipy.stats.bootstrap) of a row's mean and of
  the difference of two rows' means (each row resampled on its own: seeds are not paired across rows). Seeded, so a
  table renders the same twice. Percentile, not BCa: with 3-5 values BCa's jackknife acceleration is unstable and
  scipy returns NaN for it on ties, which seeds that all land on one number produce.
- `probability_of_improvement`: P(X > Y) over all seed pairs, ties counted half, as rliable defines it
  (Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice": the Mann-Whitney U statistic / (n m)).
- `holm`: Holm's step-down adjustment of the p-values of several rows tested against one baseline row.
- `seeds_needed`: per-row seeds for a two-sided two-sample t-test to detect a given difference with power 0.8 at
  alpha 0.05 (equal seeds per row, common spread), from the noncentral t distribution (no normal approximation).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
ALPHA, POWER = 0.05, 0.8
MAX_SEEDS = 10_000        # seeds_needed stops looking here (a difference that small is reported as > MAX_SEEDS)


def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return x[np.isfinite(x)]


def bootstrap_ci(x, seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) of a percentile bootstrap CI of mean(x); NaNs with fewer than 2 values; (v, v) when all equal."""
    x = _finite(x)
    if len(x) < 2:
        return math.nan, math.nan
    if np.ptp(x) == 0:          # every resample has the same mean; scipy warns of a degenerate distribution
        return float(x[0]), float(x[0])
    res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=N_RESAMPLES, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean_difference(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def bootstrap_delta_ci(x, y, seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) of a percentile bootstrap CI of mean(x) - mean(y), x and y resampled independently."""
    x, y = _finite(x), _finite(y)
    if len(x) < 2 or len(y) < 2:
        return math.nan, math.nan
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        d = float(x[0] - y[0])
        return d, d
    res = stats.bootstrap((x, y), _mean_difference, confidence_level=confidence, n_resamples=N_RESAMPLES,
                          method="percentile", paired=False, vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def probability_of_improvement(x, y, mode: str = "max") -> float:
    """P(X > Y) + P(X = Y) / 2 over all pairs of a value of x and a value of y (P(X < Y) ... when mode is "min":
    lower is better); NaN when either side is empty."""
    x, y = _finite(x), _finite(y)
    if not len(x) or not len(y):
        return math.nan
    if mode == "min":
        x, y = -x, -y
    diff = x[:, None] - y[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Welch t-test p-value of samples a vs b; NaN when either has fewer than 2 values.

    scipy returns NaN when both samples have zero variance (t = x/0); seeds that all land on the
    same number are common for deterministic rows, so decide that case by the means instead.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():     # nearly equal seeds: scipy warns of precision loss; the p it returns stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values, same order as given; NaN entries (untested rows) stay NaN and do not count.

    Sort the m p-values ascending, multiply the i-th (0-based) by m - i, take the running maximum, cap at 1."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    m = len(tested)
    if m == 0:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adjusted
    return out


def t_test_power(n: int, effect_size: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided two-sample t-test with n values per group at standardized difference d = delta / sd:
    P(|T| > t_{1-alpha/2, 2n-2}) with T noncentral t, df 2n - 2, noncentrality d sqrt(n / 2)."""
    df = 2 * n - 2
    nc = abs(effect_size) * math.sqrt(n / 2)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(delta: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest seeds per row (>= 2) for which a two-sided two-sample t-test detects a true difference `delta`
    between two rows of common standard deviation `sd` with the given power. NaN when delta or sd is not finite;
    inf when delta is 0 or more than MAX_SEEDS would be needed; 2 when sd is 0 (any seeds show a difference)."""
    if not (np.isfinite(delta) and np.isfinite(sd)):
        return math.nan
    if delta == 0:
        return math.inf
    if sd == 0:
        return 2.0
    d = abs(delta) / sd
    # power grows with n: double to bracket, then bisect
    lo, hi = 1, 2
    while t_test_power(hi, d, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > MAX_SEEDS:
            return math.inf
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if t_test_power(mid, d, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return float(max(hi, 2))


def pooled_sd(x, y) -> float:
    """sqrt((s_x^2 + s_y^2) / 2), ddof 1: the common spread of two rows; NaN unless both have 2 values."""
    x, y = _finite(x), _finite(y)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    return float(math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2))


def row_statistics(values: list[np.ndarray], papers: list[float], mode: str = "max",
                   refs: list[int] | None = None) -> dict[str, list[float]]:
    """The statistics columns of an ablation table: per row, against its baseline: row refs[i] (default: the first
    row for every row; a row that is its own reference is a baseline).

    values: per row, its seeds' metric values; papers: per row, the paper's number (NaN when absent).
    Returns columns ci_low, ci_high (bootstrap CI of the mean), delta_ci_low, delta_ci_high (CI of the difference
    to the baseline), p_improve (probability of improvement over the baseline), p_holm (Holm-adjusted Welch p over
    the rows tested against the baseline), seeds_needed (to detect the paper's difference between this row and the
    baseline row at the pooled spread of the two rows). The baseline row has NaN in every column against itself.
    """

    refs = [0] * len(values) if refs is None else refs
    out: dict[str, list[float]] = {k: [] for k in ("ci_low", "ci_high", "delta_ci_low", "delta_ci_high", "p_improve",
                                                   "p_holm", "seeds_needed")}
    welch = []
    for i, v in enumerate(values):
        lo, hi = bootstrap_ci(v)
        out["ci_low"].append(lo)
        out["ci_high"].append(hi)
        ref = values[refs[i]]
        baseline = refs[i] == i
        dlo, dhi = (math.nan, math.nan) if baseline else bootstrap_delta_ci(v, ref)
        out["delta_ci_low"].append(dlo)
        out["delta_ci_high"].append(dhi)
        out["p_improve"].append(math.nan if baseline else probability_of_improvement(v, ref, mode))
        welch.append(math.nan if baseline else welch_p(v, ref))
        paper_delta = papers[i] - papers[refs[i]] if papers else math.nan
        out["seeds_needed"].append(math.nan if baseline else seeds_needed(paper_delta, pooled_sd(v, ref)))
    out["p_holm"] = list(holm(welch))
    return out
