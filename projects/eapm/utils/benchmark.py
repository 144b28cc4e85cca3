"""The measuring and reporting harness of ``tools/benchmark.py`` (its sections live in
``tools/benchmarks/``, one module each).

Every comparison is timed in interleaved rounds: each round runs every variant once, in an
order that rotates from round to round, so that the machine's slow phases hit all sides
alike (``interleaved``). A report prints the ratios of the medians to a reference variant
first, then (with 5 rounds or more) the spread of the per-round ratios: their median, their
10% and 90% quantiles and in how many rounds the variant was faster, then the absolute
medians (``Reporter.timings``). The computations are separate from the printing
(``ratio_stats``, ``quantile``) and take the clock as an argument, so the tests check them
on a fake clock against hand-computed values.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

__all__ = [
    "make_sync",
    "interleaved",
    "quantile",
    "RatioStats",
    "ratio_stats",
    "Reporter",
    "kernel_states",
]

PER_ROUND_MIN = 5  # rounds needed before the spread of the per-round ratios is printed


def make_sync(device: str) -> Callable[[], None]:
    """What to call before reading the clock: ``torch.cuda.synchronize`` (waits for the
    GPU's queued work) on ``"cuda"``, a no-op on any other device."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def interleaved(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    sync: Optional[Callable[[], None]] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, List[float]]:
    """Times every callable of ``fns`` in ``repeats`` rounds after ``warmup`` untimed ones.

    Every round runs each callable once; round ``r`` starts at the ``r % len(fns)``-th
    callable (in ``fns``' order) and wraps around, so no callable always runs first (after
    the others' memory has been freed) or last. The warm-up rounds run in ``fns``' order
    and read no clock. ``sync`` (e.g. ``torch.cuda.synchronize``) is called right before
    each of the two clock readings around a call. ``clock`` returns seconds
    (``time.perf_counter``; the tests pass a fake one).

    Returns ``{name: [seconds of that callable in round 0, 1, ..., repeats - 1]}``: the
    lists are aligned by round, so ``times[a][r] / times[b][r]`` is a per-round ratio.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for f in fns.values():
            f()
    names = list(fns)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = clock()
            fns[k]()
            sync()
            times[k].append(clock() - t0)
    return times


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 <= q <= 1) of ``values`` by linear interpolation between the
    sorted values at the positions around ``q * (len(values) - 1)`` (numpy's default
    "linear" method). Raises ``IndexError`` on an empty sequence."""
    v = sorted(values)
    i = q * (len(v) - 1)
    lo = int(i)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (i - lo)


class RatioStats(NamedTuple):
    """One variant against the reference (times in the same unit, ratios unitless)."""

    ratio: float  # median of the variant's times / median of the reference's
    per_round: List[float]  # the variant's time / the reference's, round by round
    median: float  # median of ``per_round``
    p10: float  # 10% quantile of ``per_round`` (``quantile``)
    p90: float  # 90% quantile of ``per_round``
    below_one: int  # rounds in which the variant was faster than the reference


def ratio_stats(times: Dict[str, List[float]], ref: str) -> Dict[str, RatioStats]:
    """``{name: RatioStats}`` of every variant of ``times`` (as ``interleaved`` returns
    them) but ``ref``, in ``times``' order. Raises ``KeyError`` if ``ref`` is not in
    ``times``, ``ZeroDivisionError`` if a reference time (or their median) is 0."""
    med_ref = statistics.median(times[ref])
    stats = {}
    for k, v in times.items():
        if k == ref:
            continue
        paired = [a / b for a, b in zip(v, times[ref])]
        stats[k] = RatioStats(
            ratio=statistics.median(v) / med_ref,
            per_round=paired,
            median=statistics.median(paired),
            p10=quantile(paired, 0.1),
            p90=quantile(paired, 0.9),
            below_one=sum(r < 1 for r in paired),
        )
    return stats


class Reporter:
    """Prints the reports of one benchmark run to ``sys.stdout`` (flushed after each) and
    keeps them in ``results``, by title: what ``tools/benchmark.py --json`` writes. A
    section with a report of its own kind prints it and adds an entry to ``results``."""

    def __init__(self):
        self.results: Dict[str, dict] = {}

    def timings(self, title: str, times: Dict[str, List[float]], ref: str) -> Dict[str, float]:
        """Prints ``## title``, the ratio of each variant's median time to ``ref``'s, with
        ``PER_ROUND_MIN`` rounds or more also the spread of the per-round ratios, then the
        median of every variant in ms. ``times``: seconds, as ``interleaved`` returns them.
        Keeps ``{"ratios", "median_s", "rounds"}`` under ``title``; returns the ratios of
        the medians, ``{name: ratio}`` (``ref`` left out)."""
        print(f"\n## {title}")
        stats = ratio_stats(times, ref)
        for k, s in stats.items():
            line = f"  ratio {k} / {ref}: {s.ratio:.3f}x"
            if len(times[k]) >= PER_ROUND_MIN:
                line += (
                    f"   (per-round ratios: median {s.median:.3f}x,"
                    f" 10-90% {s.p10:.3f}-{s.p90:.3f}x,"
                    f" below 1 in {s.below_one} of {len(s.per_round)} rounds)"
                )
            print(line)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"  {k:<46s} {v * 1e3:10.3f} ms (median of {len(times[k])})")
        ratios = {k: s.ratio for k, s in stats.items()}
        self.results[title] = {"ratios": ratios, "median_s": med, "rounds": len(times[ref])}
        sys.stdout.flush()
        return ratios

    def values(
        self,
        title: str,
        values: Dict[str, float],
        ref: str,
        unit: str,
        notes: Sequence[str] = (),
    ) -> Dict[str, float]:
        """Like ``timings`` for one number per variant (a memory figure, in ``unit``):
        prints ``## title``, the ratio of each value to ``ref``'s (NaN if ``ref``'s is 0),
        then ``notes`` (extra lines), then the values. Keeps ``{"ratios", "values",
        "unit"}`` under ``title``; returns ``{name: ratio}`` (``ref`` left out)."""
        print(f"\n## {title}")
        ratios = {
            k: v / values[ref] if values[ref] else math.nan for k, v in values.items() if k != ref
        }
        for k, r in ratios.items():
            print(f"  ratio {k} / {ref}: {r:.3f}x")
        for line in notes:
            print(f"  {line}")
        for k, v in values.items():
            print(f"  {k:<46s} {v:10.2f} {unit}")
        self.results[title] = {"ratios": ratios, "values": dict(values), "unit": unit}
        sys.stdout.flush()
        return ratios


def kernel_states() -> str:
    """What became of EAPM's compiled loss kernels in this process, one ``name: state``
    per kernel (``eapm.losses.compiled_kernel_state``), for the benchmarks' notes."""
    from eapm import losses

    names = ("_focal_sum", "_focal_terms", "_bl1_kernel")
    return ", ".join(f"{n}: {losses.compiled_kernel_state(n)}" for n in names)
