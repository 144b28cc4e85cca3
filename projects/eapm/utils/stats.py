"""Paired comparisons of training runs over seeds, in pure Python (no scipy): Student's t
quantiles, the t and percentile-bootstrap confidence intervals of a mean difference, and the
number of seeds a paired comparison needs to detect an effect at a given spread.

Used by ``tools/ablation.py``'s report; checked against tabulated values in
``tests/utils/test_stats.py``."""

from __future__ import annotations

import math
import random
import statistics
from typing import Dict, Optional, Sequence, Tuple

__all__ = ["t_cdf", "t_quantile", "t_interval", "bootstrap_interval", "seeds_needed", "paired"]


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # fmt: skip
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (``t_cdf`` inverted by bisection)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Optional[Tuple[float, float]]:
    """The t confidence interval of the mean of ``values`` (None under two values)."""
    n = len(values)
    if n < 2:
        return None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 10000, seed: int = 0
) -> Optional[Tuple[float, float]]:
    """The percentile-bootstrap confidence interval of the mean of ``values``: ``resamples``
    resamples with replacement from a fixed ``seed`` (the same report every time); None under two
    values. With few values it is narrower than the t interval (it cannot see beyond the values'
    range): read both."""
    n = len(values)
    if n < 2:
        return None
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    lo_q, hi_q = (1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0
    return means[int(lo_q * (resamples - 1))], means[int(math.ceil(hi_q * (resamples - 1)))]


def seeds_needed(
    sd: float, effect: float = 1.0, alpha: float = 0.05, power: float = 0.8, limit: int = 10000
) -> Optional[int]:
    """The smallest number of paired seeds n (>= 2) at which a two-sided paired t test of level
    ``alpha`` detects a mean difference of ``effect`` with probability ``power``, for paired
    differences of standard deviation ``sd``: n >= ((t_{1-alpha/2, n-1} + t_{power, n-1}) *
    sd / effect)^2. None if ``sd`` is unknown or more than ``limit`` seeds would be needed."""
    if sd is None or math.isnan(sd):
        return None
    if effect <= 0:
        raise ValueError(f"effect must be > 0, got {effect}")
    # t quantiles exceed the normal's: the normal approximation's n is a lower bound to start at
    z = statistics.NormalDist()
    start = max(2, int(((z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * sd / effect) ** 2))
    for n in range(start, limit + 1):
        df = n - 1
        need = ((t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * sd / effect) ** 2
        if n >= need:
            return n
    return None


def paired(diffs: Sequence[float], confidence: float = 0.95, effect: float = 1.0) -> Dict:
    """A paired comparison's summary from its per-seed differences: n, mean, sample std, the t
    and bootstrap intervals, and the seeds needed to detect ``effect`` at the observed std."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else None
    sd = statistics.stdev(diffs) if n > 1 else None
    return {
        "n": n,
        "mean": mean,
        "std": sd,
        "t_ci": t_interval(diffs, confidence),
        "bootstrap_ci": bootstrap_interval(diffs, confidence),
        "seeds_needed": seeds_needed(sd, effect) if sd is not None else None,
        "effect": effect,
        "confidence": confidence,
    }
