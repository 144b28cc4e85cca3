"""eapm.utils.stats: Student's t against tabulated quantiles, the intervals of a paired mean
difference, and the seeds a paired comparison needs (the ablation report's figures)."""

import math
import statistics

import pytest

from eapm.utils import stats


# two-sided 95% (0.975) and one-sided 0.8 quantiles of Student's t, from the standard tables
@pytest.mark.parametrize(
    "df, q975, q80",
    [(1, 12.7062, 1.3764), (2, 4.3027, 1.0607), (4, 2.7764, 0.9410), (9, 2.2622, 0.8834),
     (30, 2.0423, 0.8538), (1000, 1.9623, 0.8420)],
)  # fmt: skip
def test_t_quantiles_match_the_tables(df, q975, q80):
    assert stats.t_quantile(0.975, df) == pytest.approx(q975, abs=1e-4)
    assert stats.t_quantile(0.8, df) == pytest.approx(q80, abs=1e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-q975, abs=1e-4)


def test_t_cdf_closed_forms():
    # df 1 is the Cauchy distribution: F(x) = 1/2 + atan(x) / pi; df 2: 1/2 + x / (2 sqrt(2 + x^2))
    for x in (-7.0, -1.0, 0.0, 0.3, 2.5, 40.0):
        assert stats.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-12)
        assert stats.t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-12)
    with pytest.raises(ValueError, match="df"):
        stats.t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="p must be"):
        stats.t_quantile(1.0, 3)


def test_t_interval_of_a_paired_mean():
    diffs = [1.0, 1.5, 0.5]  # mean 1, std 0.5: 1 -/+ 4.302653 * 0.5 / sqrt(3)
    lo, hi = stats.t_interval(diffs)
    assert (lo, hi) == pytest.approx((1 - 1.242069, 1 + 1.242069), abs=1e-5)
    assert stats.t_interval([2.0]) is None and stats.t_interval([]) is None


def test_bootstrap_interval_is_reproducible_and_inside_the_values():
    diffs = [0.4, -1.2, 2.0, 0.9, 1.3, -0.1]
    ci = stats.bootstrap_interval(diffs)
    assert ci == stats.bootstrap_interval(diffs)  # fixed seed: the same report every time
    assert min(diffs) <= ci[0] < statistics.fmean(diffs) < ci[1] <= max(diffs)
    assert ci != stats.bootstrap_interval(diffs, seed=1)
    # equal differences: no spread, the interval is the point
    assert stats.bootstrap_interval([0.7] * 5) == pytest.approx((0.7, 0.7))
    # wider confidence, wider interval
    ci80 = stats.bootstrap_interval(diffs, confidence=0.8)
    assert ci[0] <= ci80[0] and ci80[1] <= ci[1]
    assert stats.bootstrap_interval([1.0]) is None


def test_seeds_needed_closed_form():
    # n >= ((t(0.975, n-1) + t(0.8, n-1)) * sd / effect)^2, smallest n:
    # sd 1: n = 10 ((2.2622 + 0.8834)^2 = 9.89), n = 9 gives (2.3060 + 0.8889)^2 = 10.21 > 9
    assert stats.seeds_needed(1.0) == 10
    # sd 0.5: n = 5 ((2.7764 + 0.9410) * 0.5)^2 = 3.45; n = 4: ((3.1824 + 0.9785) * 0.5)^2 = 4.33
    assert stats.seeds_needed(0.5) == 5
    assert stats.seeds_needed(0.0) == 2  # no spread: a pair of seeds suffices
    assert stats.seeds_needed(2.0, effect=2.0) == stats.seeds_needed(1.0)  # only sd / effect
    assert stats.seeds_needed(1e6) is None  # beyond the limit
    assert stats.seeds_needed(float("nan")) is None
    with pytest.raises(ValueError, match="effect"):
        stats.seeds_needed(1.0, effect=0.0)


def test_paired_summary():
    s = stats.paired([1.0, 1.5, 0.5])
    assert (s["n"], s["mean"], s["std"], s["seeds_needed"]) == (3, 1.0, 0.5, 5)
    assert s["t_ci"] == pytest.approx((-0.242069, 2.242069), abs=1e-5)
    assert s["bootstrap_ci"] == (0.5, 1.5)  # 3 values: resamples reach both extremes
    one = stats.paired([0.3])
    assert (one["n"], one["mean"], one["std"], one["t_ci"], one["seeds_needed"]) == (
        1, 0.3, None, None, None
    )  # fmt: skip
