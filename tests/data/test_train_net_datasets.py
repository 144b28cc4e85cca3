"""train_net.py on broken COCO-json datasets (registered with DATASETS.COCO_JSON): each fails
before the model is built, the last line of stderr a DatasetError naming the dataset, the
json file and the id / file at fault; the recoverable cases (grayscale, RGBA and 16-bit
images, boxes partly outside the image, category ids from 0) train.

The in-process checks of each case are in test_validate.py; train_net.py also runs on category
ids from 0 with images without annotations (slow)."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from tests.helpers import (
    dump,
    make_coco,
    read_metrics,
    run_train_net,
    tail,
    tiny_opts,
    truncate_file,
)

QUICKSTART = os.path.join("configs", "quickstart", "eapm_retinanet.yaml")


def _as_jpeg(root: str, coco, index: int) -> str:
    import cv2

    im = coco["images"][index]
    src = os.path.join(root, "train", im["file_name"])
    im["file_name"] = im["file_name"].replace(".png", ".jpg")
    dst = os.path.join(root, "train", im["file_name"])
    cv2.imwrite(dst, cv2.imread(src))
    return dst


# each case: (root, train coco) -> the last stderr line expected (a regex; the json path
# is {js}); the case breaks the train split (the val split stays clean)
def _truncated_jpeg(root, coco):
    path = _as_jpeg(root, coco, 2)
    truncate_file(path, 0.6)
    return rf"eapm\.data\.DatasetError: {{where}}image 3 '{re.escape(path)}' is corrupt or " \
        r"truncated \(OSError: image file is truncated.*\)"  # fmt: skip


def _syntax(root, coco):
    """The json breaks off after the images list (written here, not by the test)."""
    text = json.dumps(coco)
    cut = text.index('"annotations"')
    with open(os.path.join(root, "train.json"), "w") as f:
        f.write(text[:cut] + "]")
    return r"eapm\.data\.DatasetError: Dataset 'tiny_train': {js} is not valid JSON: " \
        rf"line 1, column {cut + 1}: Expecting property name enclosed in double quotes"  # fmt: skip


def _negative_box(root, coco):
    coco["annotations"][1]["bbox"][2] = -4.0
    return r"eapm\.data\.DatasetError: {where}annotation 2 of .*/train/000\.png has an " \
        r"invalid box \[.*\] \(XYWH with negative size or non-finite value\)"  # fmt: skip


def _unknown_category(root, coco):
    coco["annotations"][3]["category_id"] = 7
    return r"eapm\.data\.DatasetError: {where}annotation 4 of image 002\.png has category_id " \
        r"7, which is not among the file's 'categories' \(ids \[1, 2\]\)"  # fmt: skip


def _duplicate_image_id(root, coco):
    coco["images"][3]["id"] = 2
    return r"eapm\.data\.DatasetError: {where}image id 2 appears twice \('001\.png' and " \
        r"'003\.png'\); detectron2 would merge their annotations onto one file"  # fmt: skip


def _missing_image(root, coco):
    os.remove(os.path.join(root, "train", "001.png"))
    return r"eapm\.data\.DatasetFileNotFoundError: {where}image file not found: " \
        r".*/train/001\.png"  # fmt: skip


def _corrupt_png(root, coco):
    path = os.path.join(root, "train", "002.png")
    truncate_file(path)
    return rf"eapm\.data\.DatasetError: {{where}}image 3 '{re.escape(path)}' is corrupt or " \
        r"truncated \(.+\)"  # fmt: skip


def _wrong_size(root, coco):
    coco["images"][0]["width"] = 80
    return r"eapm\.data\.DatasetError: {where}image 1 '.*/train/000\.png' is 64x64 pixels " \
        r"\(width x height, after EXIF orientation\) but the json says 80x64"  # fmt: skip


def _empty(root, coco):
    coco["images"], coco["annotations"] = [], []
    return r"eapm\.data\.DatasetError: {where}the dataset is empty \(its 'images' list is empty\)"


CASES = {
    "truncated_jpeg": _truncated_jpeg,
    "syntax": _syntax,
    "negative_box": _negative_box,
    "unknown_category": _unknown_category,
    "duplicate_image_id": _duplicate_image_id,
    "missing_image": _missing_image,
    "corrupt_png": _corrupt_png,
    "wrong_size": _wrong_size,
    "empty": _empty,
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """train_net.py's check cache in the test's folder (run_train_net passes os.environ)."""
    monkeypatch.setenv("EAPM_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, train, val, max_iter=2, write_train=True, **extra):
    root = str(tmp_path)
    js = os.path.join(root, "train.json")
    if write_train:
        dump(train, js)
    val_js = dump(val, os.path.join(root, "val.json"))
    entries = [["tiny_train", js, f"{root}/train"], ["tiny_val", val_js, f"{root}/val"]]
    out = tmp_path / "out"
    opts = tiny_opts(
        str(out), max_iter, str(tmp_path / "no_embedded"), **{"DATASETS.COCO_JSON": entries}
    )
    for k, v in extra.items():
        opts += [k, v]
    return run_train_net("--config-file", QUICKSTART, *opts, timeout=240), js, out


def _fails_before_the_model(tmp_path, case):
    root = str(tmp_path)
    train = make_coco(root, "train", num_images=4, seed=0)
    val = make_coco(root, "val", num_images=2, seed=1)
    expected = CASES[case](root, train)
    proc, js, out = _run(tmp_path, train, val, write_train=case != "syntax")
    assert proc.returncode == 1, tail(proc)
    last = proc.stderr.strip().splitlines()[-1]
    where = re.escape(f"Dataset 'tiny_train' ({js}): ")
    assert re.fullmatch(expected.format(where=where, js=re.escape(js)), last), last
    assert "Model:" not in proc.stdout  # the model was never built
    assert read_metrics(str(out)) == []
    return last


def test_truncated_jpeg_fails_before_the_model(tmp_path):
    """A truncated JPEG fails before the model is built, naming the file (without the check,
    detectron2's loader ends training mid-way with a bare ``OSError: image file is
    truncated``)."""
    last = _fails_before_the_model(tmp_path, "truncated_jpeg")
    assert "/train/002.jpg" in last


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(set(CASES) - {"truncated_jpeg"}))
def test_bad_dataset_fails_before_the_model(tmp_path, case):
    _fails_before_the_model(tmp_path, case)


@pytest.mark.slow
def test_recoverable_dataset_trains(tmp_path):
    """Grayscale, RGBA and 16-bit PNGs, boxes partly outside the image and category ids
    {0, 5}: 2 iterations with finite losses (the 16-bit image logs a warning)."""
    import cv2

    root = str(tmp_path)
    train = make_coco(root, "train", num_images=4, seed=0, cat_ids=(0, 5))
    val = make_coco(root, "val", num_images=2, seed=1, cat_ids=(0, 5))
    rng = np.random.default_rng(0)
    imgs = os.path.join(root, "train")
    cv2.imwrite(f"{imgs}/000.png", rng.integers(0, 255, (64, 64), np.uint8))
    cv2.imwrite(f"{imgs}/001.png", rng.integers(0, 255, (64, 64, 4), np.uint8))
    cv2.imwrite(f"{imgs}/002.png", rng.integers(0, 65535, (64, 64), np.uint16))
    train["annotations"][0]["bbox"] = [-10.0, -6.0, 30.0, 20.0]
    train["annotations"][1]["bbox"] = [50.0, 44.0, 30.0, 40.0]
    proc, js, out = _run(tmp_path, train, val, max_iter=2)
    assert proc.returncode == 0, tail(proc)
    losses = [m["total_loss"] for m in read_metrics(str(out)) if "total_loss" in m]
    assert len(losses) >= 1 and all(math.isfinite(v) for v in losses), losses
    log = (out / "log.txt").read_text()
    assert "mode I;16) are 16/32-bit single-channel" in log
    assert "images checked (decode: 4 opened, 0 unchanged" in log


@pytest.mark.slow
def test_lazy_config_path_checks_a_registered_dataset_before_the_model(tmp_path):
    """The LazyConfig spelling (``--register-coco``) gets the same named error before the
    model is built."""
    root = str(tmp_path)
    train = make_coco(root, "train", num_images=4, seed=0)
    expected = CASES["truncated_jpeg"](root, train)
    js = dump(train, os.path.join(root, "train.json"))
    proc = run_train_net(
        "--config-file",
        "configs/quickstart/eapm_retinanet.py",
        "--register-coco",
        "tiny_train",
        js,
        f"{root}/train",
        "dataloader.train.dataset.names=tiny_train",
        f"train.output_dir={tmp_path / 'out'}",
        timeout=240,
    )
    assert proc.returncode == 1, tail(proc)
    last = proc.stderr.strip().splitlines()[-1]
    where = re.escape(f"Dataset 'tiny_train' ({js}): ")
    assert re.fullmatch(expected.format(where=where, js=re.escape(js)), last), last
    assert "Model:" not in proc.stdout


@pytest.mark.slow
def test_train_and_evaluate_ids_from_zero_and_images_without_annotations(tmp_path):
    """train_net.py on a dataset with category ids {0, 3} where most images have no
    annotation (FILTER_EMPTY_ANNOTATIONS False): trains with finite losses and writes
    results with the file's category ids."""
    root = str(tmp_path)
    train = make_coco(
        root, "train", num_images=6, seed=3, cat_ids=(0, 3), boxes_per_image=(2, 0, 0)
    )
    val = make_coco(root, "val", num_images=2, seed=4, cat_ids=(0, 3), boxes_per_image=(2,))
    reg = [
        "--register-coco",
        "z_train",
        dump(train, f"{root}/train.json"),
        f"{root}/train",
        "--register-coco",
        "z_val",
        dump(val, f"{root}/val.json"),
        f"{root}/val",
    ]
    out = tmp_path / "out"
    opts = tiny_opts(
        str(out),
        4,
        str(tmp_path / "no_embedded"),
        **{
            "DATASETS.TRAIN": "('z_train',)",
            "DATASETS.TEST": "('z_val',)",
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS": "False",
            "MODEL.RETINANET.SCORE_THRESH_TEST": "0.0",
        },
    )
    proc = run_train_net("--config-file", QUICKSTART, *reg, *opts, timeout=240)
    assert proc.returncode == 0, tail(proc)
    assert "Removed" not in (out / "log.txt").read_text()  # no image was filtered out
    losses = [m["total_loss"] for m in read_metrics(str(out)) if "total_loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)
    preds = json.loads((out / "inference" / "z_val" / "coco_instances_results.json").read_text())
    assert preds and {p["category_id"] for p in preds} <= {0, 3}
