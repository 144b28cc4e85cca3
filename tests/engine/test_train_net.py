"""End to end: train_net.py trains a tiny model on the embedded dataset, writes a
checkpoint and evaluation results, and --eval-only reloads the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

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


def run_train_net(*args, timeout=300, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="2", **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


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
    proc = run_train_net(*common, *opts)
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
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert f"Loading from {out / 'model_final.pth'}" in (out2 / "log.txt").read_text()
    assert (out2 / "inference" / "eapm_shapes_val" / "coco_instances_results.json").is_file()


def test_bad_config_fails_fast_with_key(tmp_path):
    proc = run_train_net(
        "--config-file",
        "configs/quickstart/eapm_retinanet.yaml",
        "MODEL.EAPM.CLS.MU",
        "-1",
        "OUTPUT_DIR",
        str(tmp_path),
        timeout=120,
    )
    assert proc.returncode != 0
    assert "MODEL.EAPM.CLS.MU" in proc.stderr


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
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "o" / "inference" / "cli_val" / "coco_instances_results.json").is_file()
