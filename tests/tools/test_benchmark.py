"""The benchmark tool's harness (eapm.utils.benchmark: interleaved rounds, ratios of
medians, per-round ratios and their quantiles, the printed reports) on a fake clock against
hand-computed values."""

from __future__ import annotations

import math

import pytest

from eapm.utils.benchmark import Reporter, interleaved, quantile, ratio_stats


# ----------------------------------------------------------------------------
# the harness, on a fake clock
# ----------------------------------------------------------------------------
class FakeClock:
    """A clock that the timed callables advance by the durations they are given (binary
    fractions: the differences of its readings are exact); ``log`` records every reading,
    sync and call in order."""

    def __init__(self):
        self.now = 100.0
        self.log = []

    def __call__(self) -> float:
        self.log.append("clock")
        return self.now

    def sync(self) -> None:
        self.log.append("sync")

    def callable(self, name, durations):
        durations = list(durations)

        def f():
            self.log.append(name)
            self.now += durations.pop(0)

        return f


def test_interleaved_times_each_call_on_the_clock_in_rotating_rounds():
    clock = FakeClock()
    fns = {
        "a": clock.callable("a", [64.0, 1.0, 2.0, 4.0]),  # the first call is the warm-up
        "b": clock.callable("b", [64.0, 0.5, 0.25, 0.125]),
        "c": clock.callable("c", [64.0, 8.0, 8.0, 8.0]),
    }
    times = interleaved(fns, repeats=3, warmup=1, sync=clock.sync, clock=clock)
    # the warm-up's durations (64 s each) are in no round; the lists are aligned by round
    assert times == {"a": [1.0, 2.0, 4.0], "b": [0.5, 0.25, 0.125], "c": [8.0, 8.0, 8.0]}
    calls = [e for e in clock.log if e in fns]
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # the order rotates
    # the warm-up reads no clock; every timed call: sync, clock, call, sync, clock
    timed = clock.log[3:]
    assert clock.log[:3] == list("abc")
    assert timed == [e for k in "abcbcacab" for e in ("sync", "clock", k, "sync", "clock")]


def test_interleaved_without_sync_or_warmup():
    clock = FakeClock()
    fns = {"a": clock.callable("a", [3.0, 5.0]), "b": clock.callable("b", [7.0, 11.0])}
    assert interleaved(fns, repeats=2, warmup=0, clock=clock) == {"a": [3.0, 5.0], "b": [7.0, 11.0]}
    assert [e for e in clock.log if e != "clock"] == ["a", "b", "b", "a"]


def test_quantile_interpolates_linearly_between_sorted_values():
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([10.0, 20.0], 0.25) == 12.5  # position 0.25: 10 + 0.25 * (20 - 10)
    assert quantile([5.0, 1.0, 4.0, 2.0, 3.0], 0.0) == 1.0
    assert quantile([5.0, 1.0, 4.0, 2.0, 3.0], 1.0) == 5.0
    assert quantile([0.5, 4.0, 1.0, 3.0, 1.5], 0.1) == pytest.approx(0.7)  # 0.5 + 0.4 * 0.5
    assert quantile([0.5, 4.0, 1.0, 3.0, 1.5], 0.9) == pytest.approx(3.6)  # 3 + 0.6 * 1
    assert quantile([7.0], 0.9) == 7.0
    with pytest.raises(IndexError):
        quantile([], 0.5)


# reference: median 2; x: median 4; per round x / ref = 0.5, 1.5, 1, 3, 4
FIVE_ROUNDS = {"ref": [2.0, 4.0, 2.0, 2.0, 1.0], "x": [1.0, 6.0, 2.0, 6.0, 4.0]}


def test_ratio_stats_hand_computed():
    (name, s), *rest = ratio_stats(FIVE_ROUNDS, "ref").items()
    assert name == "x" and not rest
    assert s.ratio == 2.0  # 4 / 2: the ratio of the medians, not the median of the ratios
    assert s.per_round == [0.5, 1.5, 1.0, 3.0, 4.0]
    assert s.median == 1.5
    assert s.p10 == pytest.approx(0.7) and s.p90 == pytest.approx(3.6)
    assert s.below_one == 1  # 1.0 is not below 1
    with pytest.raises(KeyError):
        ratio_stats(FIVE_ROUNDS, "nope")


def test_reporter_timings_prints_ratios_then_medians(capsys):
    rep = Reporter()
    assert rep.timings("t", FIVE_ROUNDS, "ref") == {"x": 2.0}
    assert capsys.readouterr().out.splitlines() == [
        "",
        "## t",
        "  ratio x / ref: 2.000x   (per-round ratios: median 1.500x, 10-90% 0.700-3.600x,"
        " below 1 in 1 of 5 rounds)",
        "  ref" + " " * 44 + "  2000.000 ms (median of 5)",
        "  x" + " " * 46 + "  4000.000 ms (median of 5)",
    ]
    assert rep.results["t"] == {
        "ratios": {"x": 2.0},
        "median_s": {"ref": 2.0, "x": 4.0},
        "rounds": 5,
    }
    # fewer than 5 rounds: the ratio of the medians only
    four = {"ref": [1.0] * 4, "x": [2.0, 2.0, 4.0, 2.0], "y": [0.5] * 4}
    assert rep.timings("u", four, "ref") == {"x": 2.0, "y": 0.5}
    out = capsys.readouterr().out
    assert "  ratio x / ref: 2.000x\n  ratio y / ref: 0.500x\n" in out
    assert "per-round" not in out and out.index("ratio y") < out.index("1000.000 ms")
    assert list(rep.results) == ["t", "u"]


def test_reporter_values_prints_ratios_notes_values(capsys):
    rep = Reporter()
    ratios = rep.values("m", {"ref": 4.0, "y": 1.0}, "ref", "MiB", ["a note"])
    assert ratios == {"y": 0.25}
    assert capsys.readouterr().out.splitlines() == [
        "",
        "## m",
        "  ratio y / ref: 0.250x",
        "  a note",
        "  ref" + " " * 44 + "      4.00 MiB",
        "  y" + " " * 46 + "      1.00 MiB",
    ]
    assert rep.results["m"] == {
        "ratios": {"y": 0.25},
        "values": {"ref": 4.0, "y": 1.0},
        "unit": "MiB",
    }
    assert math.isnan(rep.values("z", {"ref": 0.0, "y": 1.0}, "ref", "GiB")["y"])  # no 0 / 0 error
