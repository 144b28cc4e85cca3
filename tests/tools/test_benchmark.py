"""The benchmark tool (tools/benchmark.py): its harness (eapm.utils.benchmark: interleaved
rounds, ratios of medians, per-round ratios and their quantiles, the printed reports) on a
fake clock against hand-computed values, its command line, and smoke runs of its sections
on tiny inputs. No timing is asserted: the ratios of real runs are only checked to be
printed, finite and positive."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from eapm.utils.benchmark import Reporter, interleaved, quantile, ratio_stats
from tests.helpers import REPO, TOOLS

TOOL = os.path.join(REPO, "tools", "benchmark.py")
RATIO = re.compile(r"^  ratio (.+?): (\S+)x")


def run_benchmark(tmp_path, *args, timeout=600):
    """Runs tools/benchmark.py on the CPU (one thread: the smoke test checks that it runs,
    and on a busy machine two OpenMP threads per process wait on each other): its stdout,
    its --json reports, [(label, value) of every printed "ratio" line]."""
    out_json = str(tmp_path / "bench.json")
    cmd = [sys.executable, TOOL, "--device", "cpu", *args, "--json", out_json]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    matches = [RATIO.match(line) for line in proc.stdout.splitlines()]
    ratios = [(m.group(1), float(m.group(2))) for m in matches if m]
    with open(out_json) as f:
        return proc.stdout, json.load(f), ratios


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


# ----------------------------------------------------------------------------
# the command line and the sections
# ----------------------------------------------------------------------------
SECTION_NAMES = (
    "focal", "box", "step", "sampler", "bfp", "ghm", "guards", "resume", "recipe", "train"
)  # fmt: skip


def test_benchmark_help_lists_the_sections_in_run_order():
    proc = subprocess.run(
        [sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    epilog = proc.stdout.split("Sections (--only; default: all but train on cpu, all on cuda):\n")
    assert len(epilog) == 2, proc.stdout
    entries = [line.split()[0] for line in epilog[1].splitlines() if re.match(r"  \w", line)]
    assert entries == list(SECTION_NAMES)
    assert "  focal    EAPM focal loss fwd+bwd vs fvcore's sigmoid_focal_loss_jit" in epilog[1]
    assert "in this order: focal box step sampler" in proc.stdout


@pytest.mark.slow
def test_benchmark_smoke_train_on_cpu(tmp_path):
    """The GPU check (section train) runs end to end on tiny CPU images with bfloat16
    autocast, so that a lent GPU's minutes are not spent on a script error: the three
    variants train with finite losses (the tool raises otherwise), the ratios are printed."""
    stdout, reports, ratios = run_benchmark(
        tmp_path, "--only", "train", "--batch", "1", "--height", "64", "--width", "64",
        "--repeats", "2", "--warmup", "1",
    )  # fmt: skip
    (title,) = reports
    assert title.startswith("[train] training step, RetinaNet R-50-FPN, 1 x 64x64")
    base = "RetinaNet (detectron2 losses)"
    names = [f"RetinaNet + EAPM mu 1.5 ({kind})" for kind in ("compiled", "eager")]
    assert sorted(reports[title]["ratios"]) == names
    assert sorted(label for label, _ in ratios) == [f"{n} / {base}" for n in names]
    assert all(math.isfinite(r) and r > 0 for _, r in ratios), ratios
    assert all(math.isfinite(t) and t > 0 for t in reports[title]["median_s"].values())
    losses = [line for line in stdout.splitlines() if line.startswith("  loss (last step) ")]
    assert len(losses) == 3 and all(math.isfinite(float(x.rsplit(": ", 1)[1])) for x in losses)
    assert "_focal_sum: compiled" in stdout or "_focal_sum: failed (eager)" in stdout


@pytest.mark.slow
def test_benchmark_smoke_loss_and_sampler_sections_on_cpu(tmp_path):
    """Sections focal, box and sampler run (2 timed rounds; the sampler 40) and print
    finite, positive ratios for every comparison."""
    stdout, reports, ratios = run_benchmark(
        tmp_path, "--only", "focal", "box", "sampler", "--repeats", "2", "--warmup", "1"
    )
    sections = [t.split("]")[0] + "]" for t in reports]
    assert sections == ["[focal]", "[focal]", "[box]", "[sampler]", "[sampler]"], list(reports)
    labels = [label for label, _ in ratios]
    assert len(labels) == 2 * 2 + 2 + 1 + 1, ratios  # focal at 2 sizes, box, sampler 2 ways
    assert all(math.isfinite(r) and r > 0 for _, r in ratios), ratios
    assert labels.count("eapm focal (compiled) / d2 fvcore sigmoid_focal_loss_jit") == 2
    assert "eapm balanced L1 (eager) / d2 smooth_l1_loss" in labels
    assert "sampled negatives per IoU bin" in stdout


def test_benchmark_smoke_ghm_section_on_cpu(tmp_path):
    """Section ghm runs on tiny logits: finite ratios of GHM-C and the per-bin loop to
    fvcore's focal loss, and the host synchronisations per call: none for GHMC / GHMR,
    one per bin and more for mmdetection's loop (the counter counts)."""
    stdout, reports, ratios = run_benchmark(
        tmp_path, "--only", "ghm", "--ghm-anchors", "400", "--repeats", "2", "--warmup", "1"
    )
    assert list(reports) == [
        "[ghm] GHM-C fwd+bwd, 400 x 80, cpu",
        "[ghm] host synchronisations per call",
    ]
    assert sorted(label for label, _ in ratios) == [
        "GHM-C per-bin loop / d2 fvcore sigmoid_focal_loss_jit",
        "eapm GHMC / d2 fvcore sigmoid_focal_loss_jit",
    ]
    assert all(math.isfinite(r) and r > 0 for _, r in ratios), ratios
    syncs = reports["[ghm] host synchronisations per call"]["syncs"]
    assert syncs["eapm GHMC"] == 0 and syncs["eapm GHMR"] == 0
    assert syncs["GHM-C per-bin loop"] > 30
    assert "  syncs eapm GHMC: 0" in stdout


# ------------------------------------------- the recipe section (tools/benchmarks/recipe.py)


def test_interleaved_trainings_rotate_and_run_every_training_to_its_end(monkeypatch):
    """tools/benchmarks/recipe.py --recipe-train: one iteration of each training in turn, the
    first of a round rotating over those with iterations left; each runs exactly its
    max_iter; the times are the clock's differences around each step."""
    monkeypatch.syspath_prepend(TOOLS)  # tools/benchmarks, as tools/benchmark.py imports it
    from benchmarks.recipe import _interleaved_trainings

    log, clock = [], [0.0]

    class Fake:
        def __init__(self, name, max_iter, cost):
            self.name, self.max_iter, self.cost, self.next_iter = name, max_iter, cost, 0

        def step(self):
            log.append((self.name, self.next_iter))
            clock[0] += self.cost
            self.next_iter += 1

    times = _interleaved_trainings(
        {"a": Fake("a", 3, 0.5), "b": Fake("b", 2, 0.25)}, clock=lambda: clock[0]
    )
    assert log == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2)]
    assert times == {"a": [0.5, 0.5, 0.5], "b": [0.25, 0.25]}


@pytest.mark.slow
def test_benchmark_recipe_section_trains_both_recipes(tmp_path):
    """tools/benchmark.py --only recipe: both quickstart recipes take training steps on the
    embedded dataset (tiny batches here) and the ratios are printed and finite."""
    from eapm.data import shapes

    root = shapes.ensure_generated(str(tmp_path / "data" / "eapm_shapes"))
    stdout, reports, ratios = run_benchmark(
        tmp_path, "--only", "recipe", "--recipe-iters", "2", "--warmup", "1",
        "--recipe-opts", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.EMBEDDED_ROOT", root,
    )  # fmt: skip
    labels = [label for label, _ in ratios]
    new, old = "quickstart/eapm_retinanet.yaml", "quickstart/eapm_retinanet_0.5.yaml"
    assert labels == [f"{new} / {old}"], stdout
    assert all(math.isfinite(r) and r > 0 for _, r in ratios), ratios
    assert f"training time {new} / {old}: " in stdout
    total = reports["[recipe] training time"]
    assert math.isfinite(total["ratio"]) and total["ratio"] > 0
    assert os.path.isdir(root)


@pytest.mark.slow
def test_benchmark_recipe_train_prints_time_and_ap_side_by_side(tmp_path):
    """tools/benchmark.py --only recipe --recipe-train: both recipes train to their end (2
    iterations here), are evaluated, and the report has each one's time, AP and the ratio."""
    from eapm.data import shapes

    root = shapes.ensure_generated(str(tmp_path / "data" / "eapm_shapes"))
    stdout, reports, _ = run_benchmark(
        tmp_path, "--only", "recipe", "--recipe-train",
        "--recipe-opts", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
        "TEST.DETECTIONS_PER_IMAGE", "5", "DATASETS.EMBEDDED_ROOT", root,
    )  # fmt: skip
    new, old = "quickstart/eapm_retinanet.yaml", "quickstart/eapm_retinanet_0.5.yaml"
    report = reports["[recipe] whole trainings"]
    assert set(report) == {new, old}
    for r in report.values():
        assert r["iters"] == 2 and r["train_s"] > 0 and r["eval_s"] > 0
        assert 1.0 < r["mean_mf"] <= 1 + math.tanh(1.5)  # both train EAPM focal mu 1.5
    assert report[old]["train_ratio"] == 1.0
    assert report[new]["train_ratio"] == pytest.approx(
        report[new]["train_s"] / report[old]["train_s"]
    )
    assert f"training time {new} / {old}: " in stdout
