"""tools/ablation.py: the variants (one-stage, two-stage, the gradient-scale controls), the
schedule and the dry run, the report (means, paired deltas with their intervals, the control
section, AP-vs-iteration curves), interrupted runs resumed, parallel streams, and a smoke run
that resumes and reports (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import eapm
from tests.helpers import EAPM_TAGS, REPO, TOOLS, config_yaml, copypaste_log, event_tags, load_tool


def test_ablation_schedule_and_dry_run(tmp_path, capsys):
    tool = load_tool("ablation")
    base = {"MAX_ITER": 1500, "STEPS": [1100, 1350], "WARMUP_ITERS": 100}
    assert tool.schedule_opts(base, None) == []
    assert tool.schedule_opts(base, 300) == [
        "SOLVER.MAX_ITER",
        "300",
        "SOLVER.STEPS",
        "(220,270,)",
        "SOLVER.WARMUP_ITERS",
        "20",
    ]
    assert tool.schedule_opts(base, 3) == [
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.STEPS",
        "(2,)",
        "SOLVER.WARMUP_ITERS",
        "1",
    ]
    assert tool.parse_seeds("3") == [1, 2, 3] and tool.parse_seeds("4,7") == [4, 7]
    assert tool.main(["--out", str(tmp_path), "--seeds", "2", "--iters", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("train_net.py") == 2 * len(tool.VARIANTS)
    assert "SEED 2" in out and "SOLVER.MAX_ITER 30" in out
    # every variant's reference differs from it in one group of keys, and exists
    for name, v in tool.VARIANTS.items():
        assert v.reference is None or v.reference in tool.VARIANTS
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path), "--opts", "SEED", "3"])


def test_ablation_two_stage_variants(tmp_path, capsys):
    tool = load_tool("ablation")
    two = [
        "faster_rcnn",
        "faster_rcnn_eapm_mu1.0",
        "faster_rcnn_eapm_mu1.5",
        "faster_rcnn_eapm_mu2.0",
    ]
    assert list(tool.TWO_STAGE_VARIANTS) == two
    assert tool.expand_variants("two_stage") == two
    assert tool.expand_variants("retinanet,two_stage,faster_rcnn") == ["retinanet"] + two
    assert tool.expand_variants("one_stage") == list(tool.VARIANTS)
    with pytest.raises(ValueError, match="unknown variants \\['nope'\\]"):
        tool.expand_variants("faster_rcnn,nope")
    for name in two[1:]:
        v = tool.ALL_VARIANTS[name]
        assert v.reference == "faster_rcnn" and v.opts == ("MODEL.EAPM.CLS.MU", name[-3:])
        # the variant's config (with its opts) is valid and differs from the reference in mu
        cfg = eapm.load_config(os.path.join(REPO, v.config), list(v.opts))
        assert cfg.MODEL.EAPM.CLS.ENABLED and cfg.MODEL.EAPM.CLS.MU == float(name[-3:])
    assert tool.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "[two_stage]" in out and all(n in out for n in two)
    args = ["--out", str(tmp_path), "--seeds", "2", "--iters", "50", "--dry-run"]
    assert tool.main(args + ["--variants", "two_stage"]) == 0
    out = capsys.readouterr().out
    assert out.count("train_net.py") == 2 * 4 and out.count("faster_rcnn_eapm_mu1.5.yaml") == 6
    assert "MODEL.EAPM.CLS.MU 2.0" in out and "SOLVER.MAX_ITER 50" in out
    # the default is still the one-stage set
    assert tool.main(args) == 0
    assert capsys.readouterr().out.count("train_net.py") == 2 * len(tool.VARIANTS)


def test_ablation_scale_controls_differ_from_the_baseline_in_the_weight_only():
    """Each EAPM focal variant has its gradient-scale control: the baseline's config with
    MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT set to MEAN_MF at that mu (a weight within MF's range
    1 .. 1 + tanh(mu)), compared with the baseline; the EAPM variant is compared with both."""
    tool = load_tool("ablation")
    base = tool.VARIANTS["retinanet"]
    for mu in ("1.0", "1.5", "2.0"):
        eapm = tool.VARIANTS[f"eapm_mu{mu}"]
        control = tool.VARIANTS[eapm.controls[0]]
        assert eapm.reference == "retinanet" and eapm.controls == (f"scale_mu{mu}",)
        assert control.config == base.config == eapm.config and control.reference == "retinanet"
        assert control.opts == ("MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT", tool.MEAN_MF[mu])
        assert 1.0 < float(tool.MEAN_MF[mu]) <= 1 + math.tanh(float(mu))
        assert ("MODEL.EAPM.CLS.MU", mu) == eapm.opts[2:]
    for v in tool.ALL_VARIANTS.values():
        assert all(c in tool.ALL_VARIANTS for c in v.controls)


def test_ablation_report_means_stds_and_paired_deltas(tmp_path):
    tool = load_tool("ablation")
    aps = {"retinanet": {1: 30.0, 2: 32.0, 3: 34.0}, "eapm_mu1.5": {1: 31.0, 2: 33.5, 3: 34.5}}
    for v, by_seed in aps.items():
        for s, ap in by_seed.items():
            d = tmp_path / v / f"seed{s}"
            d.mkdir(parents=True)
            d.joinpath("config.yaml").write_text(config_yaml(str(d), test=("eapm_shapes_val",)))
            d.joinpath("log.txt").write_text(
                copypaste_log([("eapm_shapes_val", [ap, ap + 20, ap + 5, 1, 2, 3])])
            )
            d.joinpath("ablation_run.json").write_text(
                json.dumps({"wall_s": 100.0 * s, "returncode": 0})
            )
    seeds = [1, 2, 3, 4]  # seed 4 was never run
    text = tool.write_report(str(tmp_path), ["retinanet", "eapm_mu1.5"], seeds, 300, [])
    row = {}
    for line in text.split("\n## ")[0].splitlines():  # the summary table
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in aps:
            row[cells[0]] = cells
    assert row["retinanet"][3:9] == [
        "3/4",
        "32.00 ± 2.00",
        "52.00 ± 2.00",
        "37.00 ± 2.00",
        "—",
        "200",
    ]
    # paired over seeds 1-3: differences 1.0, 1.5, 0.5
    assert row["eapm_mu1.5"][2:9] == [
        "retinanet",
        "3/4",
        "33.00 ± 1.80",
        "53.00 ± 1.80",
        "38.00 ± 1.80",
        "+1.00 ± 0.50",
        "200",
    ]
    assert "on eapm_shapes_val" in text and "| retinanet | 4 | — |" in text
    # the paired comparison: t interval 1 -/+ t(0.975, 2) 0.5 / sqrt(3) = 1 -/+ 4.302653 * 0.288675;
    # the bootstrap's cannot leave the values' range [0.5, 1.5]; seeds to detect 1 AP at std 0.5:
    # n = 5 ((2.7764 + 0.9410) * 0.5)^2 = 3.45 <= 5; n = 4: ((3.1824 + 0.9785) * 0.5)^2 = 4.33 > 4
    section = text.split("## Paired comparisons")[1].split("\n## ")[0]
    assert (
        "| eapm_mu1.5 | retinanet | 3 | +1.00, +1.50, +0.50 | +1.00 ± 0.50 | [-0.24, +2.24] |"
        " [+0.50, +1.50] | 5 |" in section
    )
    summary = json.loads((tmp_path / "ablation.json").read_text())
    delta = summary["variants"]["eapm_mu1.5"]["delta_AP"]
    assert (delta["mean"], delta["std"], delta["n"], delta["seeds_needed"]) == (1.0, 0.5, 3, 5)
    assert delta["t_ci"] == pytest.approx(
        [1 - 4.302653 * 0.5 / 3**0.5, 1 + 4.302653 * 0.5 / 3**0.5]
    )
    assert delta["per_seed"] == {"1": 1.0, "2": 1.5, "3": 0.5}


def test_ablation_mean_mf_and_the_control_section(tmp_path, capsys):
    """--mean-mf: the mean of eapm/cls_mf over a finished run's metrics.json records (other
    records and keys ignored); the report pairs an EAPM variant with its reference and its control.
    """
    tool = load_tool("ablation")
    aps = {"retinanet": (30.0, 32.0), "eapm_mu1.5": (31.0, 34.0), "scale_mu1.5": (30.5, 32.5)}
    for v, by_seed in aps.items():
        for s, ap in enumerate(by_seed, 1):
            d = tmp_path / v / f"seed{s}"
            d.mkdir(parents=True)
            d.joinpath("config.yaml").write_text(config_yaml(str(d), test=("eapm_shapes_val",)))
            d.joinpath("log.txt").write_text(
                copypaste_log([("eapm_shapes_val", [ap, 50, 40, 1, 2, 3])])
            )
            if v == "eapm_mu1.5":
                recs = [{"iteration": 19, "eapm/cls_mf": 1.8 + 0.01 * s},
                        {"iteration": 39, "eapm/cls_mf": 1.9 + 0.01 * s, "loss_cls": 0.5},
                        {"iteration": 39, "bbox/AP": ap}]  # fmt: skip
                d.joinpath("metrics.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    unfinished = tmp_path / "eapm_mu2.0" / "seed1"  # metrics but no results yet: not printed
    unfinished.mkdir(parents=True)
    unfinished.joinpath("metrics.json").write_text(json.dumps({"eapm/cls_mf": 1.9}) + "\n")
    assert tool.mean_mf(str(tmp_path / "eapm_mu1.5" / "seed1")) == pytest.approx(1.86)
    assert tool.mean_mf(str(tmp_path / "retinanet" / "seed1")) is None
    assert tool.main(["--out", str(tmp_path), "--seeds", "2", "--mean-mf"]) == 0
    out = capsys.readouterr().out
    assert "eapm_mu1.5: mean MF 1.8650 (seed 1 1.8600, seed 2 1.8700)" in out
    assert "eapm_mu2.0" not in out
    assert tool.main(["--out", str(tmp_path / "none"), "--seeds", "1", "--mean-mf"]) == 1
    text = tool.write_report(str(tmp_path), list(aps), [1, 2], None, [])
    section = text.split("## EAPM against its gradient-scale control")[1].split("## Runs")[0]
    # eapm - retinanet: +1, +2; eapm - control: +0.5, +1.5; control - retinanet: +0.5, +0.5
    assert (
        "| eapm_mu1.5 | retinanet | scale_mu1.5 | +1.50 ± 0.71 | +1.00 ± 0.71 | +0.50 ± 0.00 |"
        in section
    )
    summary = json.loads((tmp_path / "ablation.json").read_text())
    control = summary["variants"]["eapm_mu1.5"]["delta_AP_controls"]["scale_mu1.5"]
    assert (control["mean"], control["n"]) == (1.0, 2)
    assert control["std"] == pytest.approx(0.7071, abs=1e-4)
    assert control["per_seed"] == {"1": 0.5, "2": 1.5}
    # one bbox/AP record per run (the eapm_mu1.5 runs), no other variant has a curve: no figure
    assert "## AP against iteration" not in text and summary["curves"]["eapm_mu1.5"]["n"] == 2


def test_ablation_curves_and_interrupted_runs(tmp_path, capsys):
    """--curve-points K sets TEST.EVAL_PERIOD to iterations / K; the report draws each
    compared variant's AP-vs-iteration curve (mean and std over the finished seeds, from the
    bbox/AP records of metrics.json); a run whose record says "running" is unfinished even when
    a periodic evaluation left results in its log, and is resumed, not skipped."""
    tool = load_tool("ablation")
    base = {"MAX_ITER": 600, "STEPS": [450, 540], "WARMUP_ITERS": 30}
    assert tool.curve_opts(base, None, 4) == ["TEST.EVAL_PERIOD", "150"]
    assert tool.curve_opts(base, 1000, 3) == ["TEST.EVAL_PERIOD", "334"]
    assert tool.curve_opts(base, None, 0) == []
    with pytest.raises(ValueError, match="curve-points"):
        tool.curve_opts(base, None, -1)
    curves = {"retinanet": {1: (10.0, 20.0), 2: (12.0, 24.0)},
              "eapm_mu1.5": {1: (11.0, 23.0), 2: (13.0, 25.0)}}  # fmt: skip
    for v, by_seed in curves.items():
        for s, (ap150, ap300) in by_seed.items():
            d = tmp_path / v / f"seed{s}"
            d.mkdir(parents=True)
            cfg = config_yaml(str(d), test=("eapm_shapes_val",))
            # the final evaluation: logged after training, at SOLVER.MAX_ITER (300), by the
            # retinanet runs (whose config says so); at index 299 by the others
            final = 299
            if v == "retinanet":
                cfg, final = cfg + "SOLVER:\n  MAX_ITER: 300\n", 300
            d.joinpath("config.yaml").write_text(cfg)
            d.joinpath("log.txt").write_text(
                copypaste_log([("eapm_shapes_val", [ap150, 1, 1, 1, 1, 1]),
                               ("eapm_shapes_val", [ap300, 1, 1, 1, 1, 1])])  # fmt: skip
            )
            recs = [{"iteration": 149, "bbox/AP": ap150}, {"iteration": 199, "loss_cls": 0.3},
                    {"iteration": final, "bbox/AP": ap300}]  # fmt: skip
            d.joinpath("metrics.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
            d.joinpath("ablation_run.json").write_text(json.dumps({"status": "done"}))
    # seed 3 of eapm_mu1.5 was interrupted after its first periodic evaluation
    d = tmp_path / "eapm_mu1.5" / "seed3"
    d.mkdir()
    d.joinpath("config.yaml").write_text(config_yaml(str(d), test=("eapm_shapes_val",)))
    d.joinpath("log.txt").write_text(copypaste_log([("eapm_shapes_val", [99.0, 1, 1, 1, 1, 1])]))
    d.joinpath("metrics.json").write_text(json.dumps({"iteration": 149, "bbox/AP": 99.0}) + "\n")
    cmd = tool.run_command("eapm_mu1.5", 3, str(d), None, [], curve_points=2)
    d.joinpath("ablation_run.json").write_text(json.dumps({"status": "running", "command": cmd}))
    d.joinpath("last_checkpoint").write_text("model_0000149.pth")
    assert not tool.finished(str(d)) and tool.finished(str(tmp_path / "retinanet" / "seed1"))
    rec = tool.execute("eapm_mu1.5", 3, str(tmp_path), None, [], dry_run=True, curve_points=2)
    assert rec["command"] == cmd and "--resume" in capsys.readouterr().out
    text = tool.write_report(str(tmp_path), ["retinanet", "eapm_mu1.5"], [1, 2, 3], None, [])
    summary = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["status"] for r in summary["runs"] if r["seed"] == 3] == ["missing", "running"]
    assert summary["curves"]["eapm_mu1.5"] == {
        "n": 2, "iterations": [150, 300], "mean": [12.0, 24.0],
        "std": [pytest.approx(2**0.5), pytest.approx(2**0.5)],
    }  # fmt: skip
    assert summary["curves"]["retinanet"]["mean"] == [11.0, 22.0]
    assert summary["curves"]["retinanet"]["iterations"] == [150, 300]
    assert "![eapm_mu1.5](curves/eapm_mu1.5.png)" in text
    png = tmp_path / "curves" / "eapm_mu1.5.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "curves" / "retinanet.png").exists()  # it has nothing to compare


def test_ablation_streams(tmp_path, monkeypatch):
    """--jobs N runs the queue N at a time, each run with CPUs / N threads unless --threads is
    given, and reports the failed runs."""
    tool = load_tool("ablation")
    calls = []

    def fake_execute(variant, seed, threads=None, **kwargs):
        calls.append((variant, seed, threads))
        return {"returncode": 1 if (variant, seed) == ("eapm_mu1.5", 2) else 0}

    monkeypatch.setattr(tool, "execute", fake_execute)
    queue = [(v, s) for s in (1, 2) for v in ("retinanet", "eapm_mu1.5")]
    failed = tool.run_all(queue, jobs=2, out=str(tmp_path))
    assert failed == ["eapm_mu1.5 seed 2"]
    assert sorted(c[:2] for c in calls) == sorted(queue)
    assert {c[2] for c in calls} == {max(1, (os.cpu_count() or 1) // 2)}
    calls.clear()
    assert tool.run_all(queue[:1], jobs=1, out=str(tmp_path)) == []
    assert calls == [("retinanet", 1, None)]  # one stream: the threads are inherited
    calls.clear()
    tool.run_all(queue[:2], jobs=2, threads=3, out=str(tmp_path))
    assert {c[2] for c in calls} == {3}
    with pytest.raises(ValueError, match="jobs"):
        tool.run_all(queue, jobs=0)


@pytest.mark.slow
def test_ablation_smoke_run_resumes_and_reports(tiny_coco, tmp_path):
    js, imgs = tiny_coco
    out = tmp_path / "abl"
    cmd = [
        sys.executable, os.path.join(TOOLS, "ablation.py"), "--out", str(out),
        "--seeds", "1", "--iters", "3",
        "--variants", "retinanet,eapm_mu1.5_theta1.0", "--opts",
        "MODEL.RETINANET.NUM_CONVS", "1", "MODEL.FPN.OUT_CHANNELS", "32",
        "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0", "DATASETS.EMBEDDED_ROOT", str(tmp_path / "shapes"),
        "DATASETS.COCO_JSON", f"[['tiny', '{js}', '{imgs}']]", "DATASETS.TRAIN", "('tiny',)",
        "DATASETS.TEST", "('tiny',)", "TEST.DETECTIONS_PER_IMAGE", "10",
        "MODEL.EAPM.HISTOGRAM_PERIOD", "1",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "ablation.md").read_text()
    for v in ("retinanet", "eapm_mu1.5_theta1.0"):
        assert f"| {v} |" in md
        rec = json.loads((out / v / "seed1" / "ablation_run.json").read_text())
        assert rec["returncode"] == 0 and rec["wall_s"] > 0 and "SOLVER.MAX_ITER" in rec["command"]
        assert (out / v / "seed1" / "log.txt").is_file()
    assert md.count("| 1/2 |") == 0 and md.count(" | 1/1 | ") == 2
    summary = json.loads((out / "ablation.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["done", "done"]
    assert not (tmp_path / "shapes").exists()  # the embedded dataset was never generated
    # the EAPM run's diagnostics: histograms in TensorBoard, means in metrics.json
    tags = event_tags(out / "eapm_mu1.5_theta1.0" / "seed1")
    assert {(t, "histograms") for t in EAPM_TAGS} <= tags
    metrics = (out / "eapm_mu1.5_theta1.0" / "seed1" / "metrics.json").read_text()
    assert all(t in metrics for t in EAPM_TAGS)
    # resumable: a second call skips both runs
    proc = subprocess.run(
        cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.count("results exist, skipped") == 2, (
        proc.stdout + proc.stderr
    )
