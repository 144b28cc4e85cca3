"""train_net.py end to end: it trains a tiny model on the embedded dataset, writes a
checkpoint and evaluation results, and --eval-only reloads the checkpoint; --register-coco;
invalid configs are rejected before training naming the key (its ``load_config`` in process,
and the command failing fast before anything runs)."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest

from tests.helpers import REPO, run_train_net

TINY = [
    "SOLVER.MAX_ITER",
    "6",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.CHECKPOINT_PERIOD",
    "3",
    "SOLVER.WARMUP_ITERS",
    "2",
    "SOLVER.STEPS",
    "(4,)",
    "MODEL.RETINANET.NUM_CONVS",
    "1",
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "DATALOADER.NUM_WORKERS",
    "0",
    "TEST.DETECTIONS_PER_IMAGE",
    "10",
]


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory):
    from eapm.data import shapes

    return shapes.ensure_generated(str(tmp_path_factory.mktemp("data") / "eapm_shapes"))


def test_embedded_dataset_is_deterministic_and_stresses_eapm(dataset_root, tmp_path):
    from eapm.data import shapes

    other = shapes.ensure_generated(str(tmp_path / "again"))
    for split in ("train", "val"):
        a = open(os.path.join(dataset_root, "annotations", f"instances_{split}.json")).read()
        b = open(os.path.join(other, "annotations", f"instances_{split}.json")).read()
        assert a == b
    coco = json.loads(a)
    boxes = [
        x["bbox"]
        for x in json.load(open(os.path.join(dataset_root, "annotations", "instances_train.json")))[
            "annotations"
        ]
    ]
    ratios = [max(w / h, h / w) for _, _, w, h in boxes]
    sides = [max(w, h) for _, _, w, h in boxes]
    assert max(ratios) > 8 and min(ratios) < 1.2  # thin bars and square-ish shapes
    assert min(sides) < 10 and max(sides) > 60  # small and large objects
    train = json.load(open(os.path.join(dataset_root, "annotations", "instances_train.json")))
    with_objects = {a["image_id"] for a in train["annotations"]}
    assert len(with_objects) < len(train["images"])  # some images without objects
    assert {a["hard"] for a in train["annotations"]} == {0, 1}
    assert [c["name"] for c in coco["categories"]] == list(shapes.CLASSES)


@pytest.mark.slow
def test_train_then_eval_only(dataset_root, tmp_path):
    out = tmp_path / "out"
    common = ["--config-file", "configs/quickstart/eapm_retinanet.yaml"]
    opts = TINY + ["OUTPUT_DIR", str(out), "DATASETS.EMBEDDED_ROOT", dataset_root]
    proc = run_train_net(*common, *opts, timeout=300, threads=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model_final.pth").is_file()
    assert (out / "model_0000002.pth").is_file()  # periodic checkpoint (iteration 3)
    results = out / "inference" / "eapm_shapes_val" / "coco_instances_results.json"
    assert results.is_file() and isinstance(json.loads(results.read_text()), list)
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("eapm/cls_mf_pos" in m for m in metrics)
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in proc.stdout + proc.stderr

    out2 = tmp_path / "eval"
    proc = run_train_net(
        *common,
        "--eval-only",
        *opts[:-4],
        "OUTPUT_DIR",
        str(out2),
        "DATASETS.EMBEDDED_ROOT",
        dataset_root,
        "MODEL.WEIGHTS",
        str(out / "model_final.pth"),
        timeout=300,
        threads=2,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert f"Loading from {out / 'model_final.pth'}" in (out2 / "log.txt").read_text()
    assert (out2 / "inference" / "eapm_shapes_val" / "coco_instances_results.json").is_file()


def test_register_coco_from_command_line(dataset_root, tmp_path):
    """--register-coco NAME JSON ROOT makes a COCO-json dataset usable without code."""
    from detectron2.data import DatasetCatalog

    from eapm.data import register_coco_json

    js = os.path.join(dataset_root, "annotations", "instances_val.json")
    register_coco_json("my_val_copy", js, os.path.join(dataset_root, "val"))
    dicts = DatasetCatalog.get("my_val_copy")
    assert len(dicts) == 200 and os.path.isfile(dicts[0]["file_name"])
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        register_coco_json("missing", str(tmp_path / "nope.json"), str(tmp_path))
    # the command-line flag, used for evaluation only (no training)
    proc = run_train_net(
        "--config-file",
        "configs/quickstart/eapm_retinanet.yaml",
        "--eval-only",
        "--register-coco",
        "cli_val",
        js,
        os.path.join(dataset_root, "val"),
        "DATASETS.TEST",
        "('cli_val',)",
        "OUTPUT_DIR",
        str(tmp_path / "o"),
        "DATASETS.EMBEDDED_ROOT",
        dataset_root,
        "MODEL.RETINANET.NUM_CONVS",
        "1",
        "MODEL.FPN.OUT_CHANNELS",
        "32",
        "TEST.DETECTIONS_PER_IMAGE",
        "5",
        timeout=300,
        threads=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "o" / "inference" / "cli_val" / "coco_instances_results.json").is_file()


# ---------------------------------- invalid configs: rejected before training, the key named


QUICKSTART = os.path.join(REPO, "configs", "quickstart", "eapm_retinanet.yaml")


def _train_net_module():
    spec = importlib.util.spec_from_file_location(
        "eapm_train_net", os.path.join(REPO, "train_net.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def train_net():
    return _train_net_module()


BAD_OPTS = [
    # (overrides, the key the error must name)
    (["MODEL.EAPM.CLS.MU", "-1.0"], "MODEL.EAPM.CLS.MU"),
    (["MODEL.EAPM.CLS.MU", "1e999"], "MODEL.EAPM.CLS.MU"),  # inf
    (["MODEL.EAPM.CLS.MU", "nan"], "MODEL.EAPM.CLS.MU"),  # yacs: a string for a float key
    (["MODEL.EAPM.REG.THETA", "-0.5"], "MODEL.EAPM.REG.THETA"),
    (["MODEL.EAPM.REG.THETA", "1e999"], "MODEL.EAPM.REG.THETA"),
    (["MODEL.EAPM.HISTOGRAM_PERIOD", "-1"], "MODEL.EAPM.HISTOGRAM_PERIOD"),
    (["MODEL.BALANCED_L1.ALPHA", "0.0"], "MODEL.BALANCED_L1.ALPHA"),
    (["MODEL.BALANCED_L1.GAMMA", "-1.5"], "MODEL.BALANCED_L1.GAMMA"),
    (["MODEL.BALANCED_L1.BETA", "1e999"], "MODEL.BALANCED_L1.BETA"),
    (["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "l2"], "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"),
    (["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "balanced_L1"],
     "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "configs/quickstart/eapm_libra_rcnn.yaml"),
    (["MODEL.FCOS.BOX_LOSS_TYPE", "smooth_l1"], "MODEL.FCOS.BOX_LOSS_TYPE",
     "configs/quickstart/eapm_fcos.yaml"),
    (["MODEL.LOSS_NORMALIZER.TYPE", "sum"], "MODEL.LOSS_NORMALIZER.TYPE"),
    (["MODEL.EAPM.CLS.MUU", "1.0"], "MODEL.EAPM.CLS.MUU"),  # typo: yacs "Non-existent key"
    # EAPM regression on a loss it cannot modulate
    (["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "smooth_l1"], "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"),
    # EAPM switched on for detectron2's own RetinaNet: would silently train without EAPM
    (["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.EAPM.REG.ENABLED", "False",
      "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "smooth_l1"], "MODEL.EAPM.CLS.ENABLED"),
    (["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.EAPM.CLS.ENABLED", "False"],
     "MODEL.EAPM.REG.ENABLED"),
    (["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.EAPM.CLS.ENABLED", "False",
      "MODEL.EAPM.REG.ENABLED", "False"], "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"),
    # detectron2's ROI heads with balanced L1: would fail only at the first iteration
    (["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "balanced_l1"],
     "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "configs/quickstart/faster_rcnn.yaml"),
    # detectron2's AMPTrainer needs CUDA (this machine has none: MODEL.DEVICE is cpu)
    (["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu"], "SOLVER.AMP.ENABLED"),
]  # fmt: skip


# an entry may name its config (default QUICKSTART): a value is checked by the model reading it
BAD = [(o[0], o[1], os.path.join(REPO, o[2]) if len(o) > 2 else QUICKSTART) for o in BAD_OPTS]


@pytest.mark.parametrize(
    "opts,key,config",
    BAD,
    ids=[" ".join(o[0][:2]) + (" ..." if len(o[0]) > 2 else "") for o in BAD],
)
def test_bad_config_rejected_naming_key(train_net, opts, key, config):
    args = train_net.build_parser().parse_args(["--config-file", config, *opts])
    with pytest.raises((ValueError, KeyError, AssertionError)) as e:  # yacs asserts on unknown keys
        train_net.load_config(args)
    assert key in str(e.value)
    if isinstance(e.value, ValueError) and "Invalid config" in str(e.value):
        assert str(e.value).startswith(f"Invalid config {key}"), str(e.value)


def test_total_batch_not_divisible_by_processes(train_net):
    args = train_net.build_parser().parse_args(
        [
            "--num-gpus",
            "2",
            "--num-machines",
            "2",
            "--config-file",
            QUICKSTART,
            "SOLVER.IMS_PER_BATCH",
            "6",
        ]
    )
    with pytest.raises(
        ValueError, match=r"SOLVER.IMS_PER_BATCH = 6: .* divisible by their number \(4 = "
    ):
        train_net.load_config(args)
    args.opts += ["SOLVER.IMS_PER_BATCH", "8"]
    train_net.load_config(args)


def test_batchnorm_head_needs_two_images_per_process(train_net):
    """The quickstart head uses BN: one image per process would fail inside torch on the
    1x1 top level at iteration 0; it is rejected up front instead."""
    args = train_net.build_parser().parse_args(
        ["--num-gpus", "4", "--config-file", QUICKSTART, "SOLVER.IMS_PER_BATCH", "4"]
    )
    with pytest.raises(
        ValueError, match=r"SOLVER.IMS_PER_BATCH = 4: the head's BatchNorm needs at least 2 images"
    ):
        train_net.load_config(args)
    args.opts += ["MODEL.RETINANET.NORM", "GN"]
    train_net.load_config(args)


@pytest.mark.parametrize(
    "yaml_value,key", [(".nan", "MODEL.EAPM.REG.THETA"), (".inf", "MODEL.BALANCED_L1.BETA")]
)
def test_non_finite_values_from_yaml_rejected(train_net, tmp_path, yaml_value, key):
    """YAML can spell nan / inf as floats (yacs' type check lets them through)."""
    *parents, leaf = key.split(".")
    text = f"_BASE_: {json.dumps(QUICKSTART)}\n"
    for depth, p in enumerate(parents):
        text += "  " * depth + f"{p}:\n"
    text += "  " * len(parents) + f"{leaf}: {yaml_value}\n"
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    args = train_net.build_parser().parse_args(["--config-file", str(cfg_file)])
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*finite"):
        train_net.load_config(args)


def test_good_configs_pass(train_net):
    import glob

    files = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
    assert len(files) >= 30
    for f in files:
        args = train_net.build_parser().parse_args(["--config-file", f, "MODEL.DEVICE", "cpu"])
        cfg = train_net.load_config(args)
        assert cfg.MODEL.DEVICE == "cpu" and not cfg.is_frozen()
        # the file's own values arrive (not only the defaults)
        assert cfg.MODEL.META_ARCHITECTURE in ("EAPMRetinaNet", "EAPMFCOS", "GeneralizedRCNN"), f
    # AMP is only checked for training; --eval-only ignores it
    args = train_net.build_parser().parse_args(
        ["--config-file", QUICKSTART, "--eval-only", "SOLVER.AMP.ENABLED", "True"]
    )
    assert train_net.load_config(args).SOLVER.AMP.ENABLED is True


def test_bad_config_fails_fast_with_key(tmp_path):
    """An integer for a float key: yacs' type check names the key (the values the validation
    rejects: test_train_net_fails_fast, slow)."""
    proc = run_train_net(
        "--config-file",
        "configs/quickstart/eapm_retinanet.yaml",
        "MODEL.EAPM.CLS.MU",
        "-1",
        "OUTPUT_DIR",
        str(tmp_path),
        timeout=120,
        threads=2,
    )
    assert proc.returncode != 0
    assert "MODEL.EAPM.CLS.MU" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher,opts,key",
    [
        ([], ["MODEL.EAPM.CLS.MU", "1e999"], "MODEL.EAPM.CLS.MU"),
        ([], ["MODEL.BALANCED_L1.BETA", "0.0"], "MODEL.BALANCED_L1.BETA"),
        ([], ["MODEL.LOSS_NORMALIZER.TYPE", "sum"], "MODEL.LOSS_NORMALIZER.TYPE"),
        # with several processes the check runs before any is spawned
        (
            ["--num-gpus", "2", "--dist-url", "auto"],
            ["MODEL.EAPM.REG.THETA", "-1.0"],
            "MODEL.EAPM.REG.THETA",
        ),
    ],
)
def test_train_net_fails_fast(tmp_path, launcher, opts, key):
    out, data = tmp_path / "out", tmp_path / "embedded"
    t0 = time.time()
    proc = run_train_net(
        *launcher,
        "--config-file",
        QUICKSTART,
        *opts,
        "OUTPUT_DIR",
        str(out),
        "DATASETS.EMBEDDED_ROOT",
        str(data),
        timeout=120,
    )
    elapsed = time.time() - t0
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: Invalid config " + key), proc.stderr[-3000:]
    assert "Process 0 terminated" not in proc.stderr  # nothing was spawned
    assert not out.exists() and not data.exists()  # before default_setup, dataset or model
    assert elapsed < 60, elapsed
