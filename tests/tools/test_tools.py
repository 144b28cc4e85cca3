"""Research tools: gradient figures (tools/plot_gradients.py), result tables
(tools/collect_results.py), the ablation runner (tools/ablation.py), the visualizer
(tools/visualize.py), and the diagnostics' way to TensorBoard / metrics.json."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import REPO, TOOLS, load_tool, make_batch, tiny_cfg

EAPM_TAGS = (
    "eapm/cls_dif_pos",
    "eapm/cls_dif_neg",
    "eapm/cls_mf_pos",
    "eapm/cls_mf_neg",
    "eapm/reg_gos",
    "eapm/reg_mf",
)


def event_tags(folder):
    """{(tag, plugin)} of every summary in the folder's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = set()
    for f in glob.glob(os.path.join(str(folder), "events.out.tfevents.*")):
        for ev in EventFileLoader(f).Load():
            for v in ev.summary.value:
                tags.add((v.tag, v.metadata.plugin_data.plugin_name))
    return tags


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """A 4-image COCO-json dataset (64 px, one or two boxes each): (json, image_root)."""
    import cv2

    from eapm.data import shapes

    root = tmp_path_factory.mktemp("tiny_coco")
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(4):
        img = rng.integers(60, 120, size=(64, 64, 3), dtype=np.uint8)
        for j in range(1 + i % 2):
            x, y = int(rng.integers(2, 30)), int(rng.integers(2, 30))
            w, h = int(rng.integers(8, 30)), int(rng.integers(4, 30))
            img[y : y + h, x : x + w] = (40 + 60 * j, 200, 240)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + (i + j) % 4,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
        cv2.imwrite(str(imgs / f"img{i}.png"), img)
        images.append({"id": i + 1, "file_name": f"img{i}.png", "width": 64, "height": 64})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(shapes.CLASSES)]
    js = root / "instances.json"
    js.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(js), str(imgs)


# ----------------------------------------------------------------------------
# plot_gradients
# ----------------------------------------------------------------------------
def test_plot_gradients_writes_figures_and_the_properties_hold(tmp_path):
    tool = load_tool("plot_gradients")
    props = tool.main(["--out", str(tmp_path)])
    for name in tool.FIGURES:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 200_000
    assert json.loads((tmp_path / "properties.json").read_text())["claims"] == props["claims"]
    assert "Claims:" in (tmp_path / "properties.txt").read_text()
    assert all(props["claims"].values()), props["claims"]

    f = props["focal"]
    assert f["alpha"] < 0 and f["gamma"] == 2.0  # alpha disabled: positives == negatives
    for mu, parts in f["mu"].items():
        assert parts["pos"]["ratio_at"] == parts["neg"]["ratio_at"]
        p = parts["pos"]
        # (a) easy examples: the absolute change is negligible (< 1% of the largest focal
        # gradient), although the *ratio* there is large (the focal gradient is ~0)
        assert p["easy_max_abs_change_rel_to_max_grad"] < 0.01
        assert p["ratio_at"]["0.01"] > 4
        # very hard examples: nearly unchanged (slightly below 1: the focal gradient peaks
        # at Dif ~ 0.95 and the modulation moves past the peak)
        assert abs(p["ratio_at"]["0.99"] - 1) < 0.03 and p["hard_max_rel_change"] < 0.05
        # medium difficulty: raised
        assert p["mid_min_ratio"] > 1.1 and p["ratio_at"]["0.5"] > 1.5
        assert 0.4 < p["max_abs_increase_at_dif"] < 0.7
    # (b) mu shifts the up-weighting towards easier examples
    r = {mu: f["mu"][mu]["pos"]["ratio_at"] for mu in ("1.0", "1.5", "2.0")}
    assert r["1.0"]["0.01"] < r["1.5"]["0.01"] < r["2.0"]["0.01"]
    assert r["1.0"]["0.7"] > r["1.5"]["0.7"] > r["2.0"]["0.7"]
    assert f["semantics_max_rel_diff"] < 1e-6

    g = props["regression"]
    assert g["shape_sum"] == 1.5 and g["bl1_over_smooth_l1_min_ratio_inliers"] > 1.4
    for theta, t in g["theta"].items():
        assert t["inlier_min_ratio"] > 1.0 and t["ratio_at_error"]["0.3"] > 1.15
        assert t["outlier_max_rel_change"] < 1e-9 and t["ratio_at_error"]["1.2"] == 1.0
        by_sum = t["ratio_at_fixed_error_by_shape_sum"]
        assert by_sum["0.3"] == pytest.approx(1.0) and by_sum["0.4"] < 1.06 < 1.15 < by_sum["1.5"]
    assert g["semantics_max_rel_diff"] < 1e-9


def test_committed_figures_are_small_pngs():
    for name in (
        "eapm_focal_gradient.png",
        "eapm_balanced_l1_gradient.png",
        "eapm_cross_entropy_gradient.png",
    ):
        path = os.path.join(REPO, "docs", "figures", name)
        assert os.path.isfile(
            path
        ), f"run: python tools/plot_gradients.py --out docs/figures ({name} missing)"
        assert os.path.getsize(path) < 200_000


# ----------------------------------------------------------------------------
# diagnostics: storage -> TensorBoard / metrics.json
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("period", [0, 1])
def test_eapm_histograms_reach_tensorboard_scalars_reach_metrics_json(tmp_path, period):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage, JSONWriter, TensorboardXWriter

    cfg = tiny_cfg("quickstart/eapm_retinanet.yaml", "MODEL.EAPM.HISTOGRAM_PERIOD", period)
    model = build_model(cfg)
    model.train()
    torch.manual_seed(0)
    tb = TensorboardXWriter(str(tmp_path))
    js = JSONWriter(str(tmp_path / "metrics.json"))
    with EventStorage(0) as storage:
        for it in range(2):
            storage.iter = it
            sum(model(make_batch(2, num_boxes=(3, 2), seed=it)).values()).backward()
            storage.step()
        tb.write()
        js.write()
    tb.close()
    js.close()
    tags = event_tags(tmp_path)
    hist = {t for t, plugin in tags if plugin == "histograms"}
    scalars = {t for t, plugin in tags if plugin == "scalars"}
    assert set(EAPM_TAGS) <= scalars
    assert hist == (set(EAPM_TAGS) if period else set())
    # metrics.json takes the scalars only (detectron2's JSONWriter ignores histograms)
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert all(k in lines[-1] for k in EAPM_TAGS)
    assert all(isinstance(v, (int, float)) for line in lines for v in line.values())


# ----------------------------------------------------------------------------
# collect_results
# ----------------------------------------------------------------------------
def _log(blocks):
    lines = ["[11/29 05:43:03 detectron2]: Rank of current process: 0. World size: 1"]
    for ds, vals in blocks:
        lines += [
            f"[11/29 05:45:06 d2.engine.defaults]: Evaluation results for {ds} in csv format:",
            "[11/29 05:45:06 d2.evaluation.testing]: copypaste: Task: bbox",
            "[11/29 05:45:06 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl",
            "[11/29 05:45:06 d2.evaluation.testing]: copypaste: "
            + ",".join(f"{v:.4f}" for v in vals),
        ]
    return "\n".join(lines) + "\n"


def _config_yaml(output_dir, test=("coco_2017_val",)):
    return (
        "DATASETS:\n  TEST:\n"
        + "".join(f"  - {t}\n" for t in test)
        + f"OUTPUT_DIR: {output_dir}\nSEED: 1\n"
    )


@pytest.fixture
def fake_runs(tmp_path):
    # 1) log.txt with an old and a newer evaluation, config.yaml naming the config
    a = tmp_path / "retinanet_R_50_FPN_1x"
    a.mkdir()
    a.joinpath("config.yaml").write_text(
        _config_yaml("./output/COCO-Detection/retinanet_R_50_FPN_1x")
    )
    a.joinpath("log.txt").write_text(
        _log(
            [
                ("coco_2017_val", [1, 2, 3, 4, 5, 6]),
                ("coco_2017_val", [35.5123, 55.01, 38.3, 20.04, 39.6, 46.8]),
            ]
        )
    )
    # 2) metrics.json only; the folder name says nothing, config.yaml's OUTPUT_DIR does
    b = tmp_path / "job_42"
    b.mkdir()
    b.joinpath("config.yaml").write_text(_config_yaml("/ckpt/retinanet_R_50_FPN_1x_eapm_mu1.5"))
    b.joinpath("metrics.json").write_text(
        json.dumps({"iteration": 19, "loss_cls": 1.0, "eapm/cls_mf_pos": 1.2}) + "\n"
        + json.dumps({"iteration": 89999, "bbox/AP": 36.9, "bbox/AP50": 56.6, "bbox/AP75": 39.7,
                      "bbox/APs": 20.5, "bbox/APm": 40.6, "bbox/APl": 49.1,
                      "bbox/AP-person": 50.0}) + "\n"
    )  # fmt: skip
    # 3) no config.yaml: named by the folder; evaluated on test-dev (paper Table 3)
    c = tmp_path / "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0"
    c.mkdir()
    c.joinpath("log.txt").write_text(
        _log([("coco_2017_test-dev", [38.0, 58.0, 41.0, 21.0, 41.0, 48.0])])
    )
    # 4) nothing yet
    d = tmp_path / "fcos_R_50_FPN_1x"
    d.mkdir()
    return [str(a), str(b), str(c), str(d)]


def _rows(table):
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| run "):
            cells = [x.strip() for x in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_collect_results_table_values_deltas_and_paper(fake_runs, tmp_path, capsys):
    tool = load_tool("collect_results")
    out = tmp_path / "table.md"
    table = tool.main([*fake_runs, "--paper", "--output", str(out)])
    assert capsys.readouterr().out == table == out.read_text()
    assert table.splitlines()[0].startswith(
        "| run | dataset | AP | AP (paper) | AP50 | AP50 (paper) |"
    )
    rows = _rows(table)
    base = rows["retinanet_R_50_FPN_1x (baseline)"]
    # the *last* evaluation of the log, the paper's Table 1 RetinaNet row
    assert base == ["coco_2017_val", "35.5", "35.6", "55.0", "55.5", "38.3", "38.3", "20.0", "20.0",
                    "39.6", "39.6", "46.8", "46.8"]  # fmt: skip
    mu = rows["retinanet_R_50_FPN_1x_eapm_mu1.5"]
    assert mu[:5] == ["coco_2017_val", "36.9 (+1.4)", "37.1 (+1.5)", "56.6 (+1.6)", "56.6 (+1.1)"]
    assert mu[-2:] == ["49.1 (+2.3)", "49.1 (+2.3)"]
    # test-dev: paper Table 3, no differences across evaluation sets
    td = rows["libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0"]
    assert td[:3] == ["coco_2017_test-dev", "38.0", "38.5"]
    assert "Table 3" in table and 'Table 1, "RetinaNet, mu = 1.5"' in table
    # no results yet: dashes, a note, but the paper numbers
    assert rows["fcos_R_50_FPN_1x"][1:3] == ["—", "35.7 (+0.1)"]
    assert "fcos_R_50_FPN_1x: no bbox results found" in table


def test_collect_results_baseline_choice_and_no_paper(fake_runs):
    tool = load_tool("collect_results")
    by_name = _rows(
        tool.main(
            [*fake_runs[:2], "--baseline", "retinanet_R_50_FPN_1x_eapm_mu1.5", "--decimals", "2"]
        )
    )
    assert by_name["retinanet_R_50_FPN_1x"][1] == "35.51 (-1.39)"
    assert by_name["retinanet_R_50_FPN_1x_eapm_mu1.5 (baseline)"][1] == "36.90"
    assert len(by_name["retinanet_R_50_FPN_1x"]) == 7  # no paper columns
    assert _rows(tool.main([*fake_runs[:2], "--baseline", "1", "--decimals", "2"])) == by_name
    none = _rows(tool.main([*fake_runs[:2], "--baseline", "none"]))
    assert none["retinanet_R_50_FPN_1x_eapm_mu1.5"][1] == "36.9"
    with pytest.raises(SystemExit, match="matches no run"):
        tool.main([*fake_runs[:2], "--baseline", "nope"])


def test_collect_results_parsers(tmp_path):
    tool = load_tool("collect_results")
    blocks = tool.parse_log(
        _log([("a", [1, 2, 3, 4, 5, 6])]) + "copypaste: Task: segm\n" + _log([("b", [7] * 6)])
    )
    assert [(d, t, v["AP"]) for d, t, v in blocks] == [("a", "bbox", 1.0), ("b", "bbox", 7.0)]
    nan = tool.parse_log(_log([("a", [math.nan] * 6)]))
    assert math.isnan(nan[0][2]["AP"])
    # several test sets: metrics.json keys carry the dataset
    (tmp_path / "metrics.json").write_text(
        json.dumps({"coco_2017_val/bbox/AP": 30.0, "other/bbox/AP": 20.0}) + "\n"
    )
    r = tool.read_results(str(tmp_path), dataset="coco_2017_val")
    assert r.ok and r.metrics == {"AP": 30.0} and r.source == "metrics.json"


def test_paper_results_cover_the_coco_configs():
    from eapm.paper_results import PAPER_ROWS, TEST_DEV, VAL, paper_configs, paper_result

    folders = ("COCO-Detection", "COCO-InstanceSegmentation")
    for name in paper_configs():
        files = [os.path.join(REPO, "configs", d, name + ".yaml") for d in folders]
        assert sum(os.path.isfile(f) for f in files) == 1, name  # one config of that name
    assert len([k for k in PAPER_ROWS if k[1] == VAL]) == 12 + 7
    assert len([k for k in PAPER_ROWS if k[1] == TEST_DEV]) == 12  # Table 3: 6 rows x 2
    assert paper_result("retinanet_R_101_FPN_1x_ghm", "coco_2017_test-dev").values == (
        39.5, 58.6, 42.0, 22.2, 42.4, 50.1,
    )  # fmt: skip
    assert paper_result("mask_rcnn_R_50_FPN_1x").as_dict()["APl"] == 47.5  # test-dev only
    assert paper_result("retinanet_R_50_FPN_1x", "coco_2017_test-dev").values[0] == 36.9
    assert paper_result("retinanet_R_50_FPN_1x", "coco_2017_val").values[0] == 35.6
    assert paper_result("libra_retinanet_R_50_FPN_1x", "coco_2017_test-dev").values[0] == 37.8
    assert paper_result("libra_retinanet_R_50_FPN_1x", "coco_2017_val").values[0] == 37.6
    assert paper_result("libra_retinanet_R_50_FPN_1x", "eapm_shapes_val") is None
    assert paper_result("libra_retinanet_R_101_FPN_1x").values[:2] == (40.0, 59.7)
    assert paper_result("libra_rcnn_R_50_FPN_1x_eapm_theta1.5").as_dict()["APm"] == 42.3


# ----------------------------------------------------------------------------
# ablation
# ----------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------
# visualize
# ----------------------------------------------------------------------------
def test_visualize_untrained_model_writes_pngs(tiny_coco, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    js, imgs = tiny_coco
    opts = ["MODEL.RETINANET.NUM_CONVS", "1", "MODEL.FPN.OUT_CHANNELS", "32",
            "TEST.DETECTIONS_PER_IMAGE", "5",
            "DATASETS.EMBEDDED_ROOT", str(tmp_path / "shapes"),
            "DATASETS.COCO_JSON", f"[['tiny_vis', '{js}', '{imgs}']]"]  # fmt: skip
    model = build_model(tiny_cfg("quickstart/retinanet.yaml", *opts[:6]))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("untrained")
    weights = str(tmp_path / "untrained.pth")
    tool = load_tool("visualize")
    common = [
        "--config-file",
        os.path.join(REPO, "configs/quickstart/retinanet.yaml"),
        "--weights",
        weights,
    ]
    # a registered dataset, with the ground truth alongside; score 0 so boxes get drawn
    files = tool.main(common + ["--input", "tiny_vis", "--num", "2", "--show-gt",
                                "--score-thresh", "0",
                                "--output", str(tmp_path / "ds"), "--opts", *opts])  # fmt: skip
    assert [os.path.basename(f) for f in files] == ["img0.png", "img1.png"]
    from PIL import Image

    w, h = Image.open(files[0]).size
    assert h == 512 and w == 2 * 512 + 8  # 64 px drawn at 8x, prediction | ground truth
    # a folder and a single image
    files = tool.main(
        common + ["--input", imgs, "--output", str(tmp_path / "dir"), "--opts", *opts]
    )
    assert len(files) == 4 and all(os.path.getsize(f) > 0 for f in files)
    one = tool.main(
        common
        + [
            "--input",
            os.path.join(imgs, "img3.png"),
            "--output",
            str(tmp_path / "one"),
            "--opts",
            *opts,
        ]
    )
    assert len(one) == 1 and os.path.isfile(one[0])
    with pytest.raises(SystemExit, match="neither an image"):
        tool.main(
            common
            + ["--input", "no_such_dataset", "--output", str(tmp_path / "x"), "--opts", *opts]
        )
    with pytest.raises(SystemExit, match=r"^visualize.py: error: weights file not found: "):
        tool.main(
            common[:3]
            + [str(tmp_path / "none.pth"), "--input", imgs, "--output", str(tmp_path / "x")]
            + ["--opts", *opts]
        )


def test_visualize_lazy_config(tiny_coco, tmp_path):
    """A LazyConfig (once a raw yaml.parser.ParserError): its model, its weights, its
    overrides."""
    from eapm.checkpoint import EAPMCheckpointer
    from eapm.model_zoo import build_model, get_config

    js, imgs = tiny_coco
    config = os.path.join(REPO, "configs", "quickstart", "eapm_retinanet.py")
    model = build_model(get_config(config, ["model.max_detections_per_image=3"]), "cpu")
    EAPMCheckpointer(model, save_dir=str(tmp_path)).save("untrained")
    tool = load_tool("visualize")
    files = tool.main(
        ["--config-file", config, "--weights", str(tmp_path / "untrained.pth"),
         "--input", imgs, "--num", "2", "--score-thresh", "0", "--scale", "1",
         "--output", str(tmp_path / "out"), "--opts", "model.max_detections_per_image=3"]
    )  # fmt: skip
    assert [os.path.basename(f) for f in files] == ["img0.png", "img1.png"]
    from PIL import Image

    assert Image.open(files[0]).size == (64, 64)


def test_ablation_report_means_stds_and_paired_deltas(tmp_path):
    tool = load_tool("ablation")
    aps = {"retinanet": {1: 30.0, 2: 32.0, 3: 34.0}, "eapm_mu1.5": {1: 31.0, 2: 33.5, 3: 34.5}}
    for v, by_seed in aps.items():
        for s, ap in by_seed.items():
            d = tmp_path / v / f"seed{s}"
            d.mkdir(parents=True)
            d.joinpath("config.yaml").write_text(_config_yaml(str(d), test=("eapm_shapes_val",)))
            d.joinpath("log.txt").write_text(
                _log([("eapm_shapes_val", [ap, ap + 20, ap + 5, 1, 2, 3])])
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
            d.joinpath("config.yaml").write_text(_config_yaml(str(d), test=("eapm_shapes_val",)))
            d.joinpath("log.txt").write_text(_log([("eapm_shapes_val", [ap, 50, 40, 1, 2, 3])]))
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
            d.joinpath("config.yaml").write_text(_config_yaml(str(d), test=("eapm_shapes_val",)))
            d.joinpath("log.txt").write_text(
                _log([("eapm_shapes_val", [ap150, 1, 1, 1, 1, 1]),
                      ("eapm_shapes_val", [ap300, 1, 1, 1, 1, 1])])  # fmt: skip
            )
            recs = [{"iteration": 149, "bbox/AP": ap150}, {"iteration": 199, "loss_cls": 0.3},
                    {"iteration": 299, "bbox/AP": ap300}]  # fmt: skip
            d.joinpath("metrics.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
            d.joinpath("ablation_run.json").write_text(json.dumps({"status": "done"}))
    # seed 3 of eapm_mu1.5 was interrupted after its first periodic evaluation
    d = tmp_path / "eapm_mu1.5" / "seed3"
    d.mkdir()
    d.joinpath("config.yaml").write_text(_config_yaml(str(d), test=("eapm_shapes_val",)))
    d.joinpath("log.txt").write_text(_log([("eapm_shapes_val", [99.0, 1, 1, 1, 1, 1])]))
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


# ----------------------------------------------------------------------------
# anchor_matching
# ----------------------------------------------------------------------------
def test_anchor_matching_counts_positives_and_low_quality_matches():
    """detectron2's Matcher (RetinaNet's 0.4 / 0.5, low-quality matches on): a box equal to
    an anchor gets it (IoU 1); a box whose best IoU is 0.25 gets only its low-quality match;
    an anchor is counted for the box it is matched to; each image is matched on its own."""
    from detectron2.modeling.matcher import Matcher

    tool = load_tool("anchor_matching")
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60], [0, 0, 11, 10.0]])
    boxes = [
        torch.tensor([[0, 0, 10, 10], [50, 50, 70, 70.0]]),  # IoU 1 (+0.909, 0.25); 0.25
        torch.zeros((0, 4)),  # an image without boxes is skipped
        torch.tensor([[0, 0, 5, 20.0]]),  # best IoU 1/3 (with [0, 0, 10, 10]): low quality
    ]
    stats = tool.match_stats(anchors, boxes, Matcher([0.4, 0.5], [0, -1, 1], True))
    assert stats["best_iou"].tolist() == pytest.approx([1.0, 0.25, 1 / 3])
    # box 0: anchors 0 and 3 (IoU 1 and 10/11); box 1: anchor 2 (its best, 0.25); box 2, in
    # an image of its own: anchor 0 (IoU 1/3, its best)
    assert stats["positives"].tolist() == [2, 1, 1]
    rows = tool.summarize(stats, [0.4, 0.5])
    assert rows["all"]["boxes"] == 3
    assert rows["all"]["best IoU < 0.5 (%)"] == pytest.approx(200 / 3)
    assert rows["all"]["no positive (%)"] == 0.0
    assert rows["all"]["positives mean"] == pytest.approx(4 / 3)
    assert rows["aspect 4+"]["boxes"] == 1  # the 5 x 20 box
    assert rows["long side 16-32 px"]["boxes"] == 2
