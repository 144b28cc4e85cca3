"""eapm/data/register.py: COCO-json datasets registered with ``register_coco_json`` and
checked when first loaded through detectron2's DatasetCatalog (a missing image, negative / NaN
box sizes, an unknown category id, no categories, a truncated json: each named with the file and
the annotation; category ids from 0 mapped to contiguous ids); ``register_from_config`` checks
the datasets a run uses at once; ``check_category_counts``: the dataset's categories against
the classes the chosen model reads (yacs and LazyConfig spellings); the data checks' keys."""

from __future__ import annotations

import logging
import os
import re

import pytest
from detectron2.config import LazyConfig

import eapm
from eapm.data import DatasetError, check_category_counts, register_coco_json
from eapm.lazy import _num_classes
from eapm.validation import check_datasets_fit_model, keys_read_by_model, load_config
from tests.helpers import CONFIGS, dataset_cfg, dataset_in, dump, make_coco, truncate_file

# -------------------------------------------- registered datasets, checked when first loaded


def _register(tmp_path, coco, tag):
    from eapm.data import register_coco_json

    name = f"robust_{tag}_{abs(hash(str(tmp_path))) % 10**8}"
    js = dump(coco, str(tmp_path / f"{tag}.json"))
    register_coco_json(name, js, str(tmp_path / "imgs"))
    return name, js


def _get(name):
    from detectron2.data import DatasetCatalog

    return DatasetCatalog.get(name)


def test_missing_image_file(tmp_path):
    coco = make_coco(str(tmp_path), "imgs", num_images=3)
    os.remove(tmp_path / "imgs" / "001.png")
    name, js = _register(tmp_path, coco, "missing")
    msg = rf"Dataset '{name}' \({re.escape(js)}\): image file not found: .*imgs/001\.png$"
    with pytest.raises(FileNotFoundError, match=msg):
        _get(name)


@pytest.mark.parametrize(
    "bbox", [[5.0, 5.0, -3.0, 10.0], [5.0, 5.0, 10.0, -0.5], [5.0, float("nan"), 10.0, 10.0]]
)
def test_box_of_negative_size_or_non_finite(tmp_path, bbox):
    coco = make_coco(str(tmp_path), "imgs", num_images=2)
    coco["annotations"][1]["bbox"] = bbox
    ann_id = coco["annotations"][1]["id"]
    fname = [
        im["file_name"] for im in coco["images"] if im["id"] == coco["annotations"][1]["image_id"]
    ][0]
    name, js = _register(tmp_path, coco, "negbox")
    with pytest.raises(
        ValueError,
        match=rf"\({re.escape(js)}\): annotation {ann_id} of .*{fname} has an invalid box",
    ):
        _get(name)


def test_unknown_category_id(tmp_path):
    coco = make_coco(str(tmp_path), "imgs", num_images=2, cat_ids=(1, 2))
    coco["annotations"][2]["category_id"] = 7
    ann = coco["annotations"][2]
    name, js = _register(tmp_path, coco, "unknowncat")
    with pytest.raises(
        ValueError,
        match=rf"\({re.escape(js)}\): annotation {ann['id']} "
        rf"of image 00{ann['image_id'] - 1}\.png has "
        r"category_id 7, which is not among the file's 'categories' \(ids \[1, 2\]\)",
    ):
        _get(name)


def test_no_categories_or_invalid_json(tmp_path):
    from eapm.data import register_coco_json

    coco = make_coco(str(tmp_path), "imgs", num_images=1)
    coco["categories"] = []
    with pytest.raises(ValueError, match="has no 'categories'"):
        _register(tmp_path, coco, "nocats")
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        register_coco_json(
            "robust_broken_json", str(tmp_path / "broken.json"), str(tmp_path / "imgs")
        )


def test_category_ids_from_zero_are_mapped_to_contiguous_ids(tmp_path):
    """Category ids {0, 3}: detectron2's load_coco_json maps them to the contiguous
    training ids {0, 1} and records the map in the metadata (used by the evaluator to
    write results with the file's ids)."""
    from detectron2.data import MetadataCatalog

    coco = make_coco(str(tmp_path), "imgs", num_images=4, cat_ids=(0, 3), boxes_per_image=(3,))
    name, _ = _register(tmp_path, coco, "fromzero")
    dicts = _get(name)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["class0", "class3"]
    assert meta.thing_dataset_id_to_contiguous_id == {0: 0, 3: 1}
    by_id = {a["id"]: a["category_id"] for a in coco["annotations"]}
    got = {a["id"]: a["category_id"] for d in dicts for a in d["annotations"]}
    assert got == {k: {0: 0, 3: 1}[v] for k, v in by_id.items()} and set(got.values()) == {0, 1}


# ------------------- registration from a config: the datasets a run uses are checked at once


def test_register_from_config_checks_the_used_datasets_now(tmp_path):
    from detectron2.data import DatasetCatalog

    from eapm.data import register_from_config

    coco, imgs = dataset_in(tmp_path)
    truncate_file(os.path.join(imgs, "002.png"))
    js = dump(coco, str(tmp_path / "ann.json"))
    tag = abs(hash(str(tmp_path))) % 10**8
    lazy, used = f"lazy_{tag}", f"used_{tag}"
    embedded = str(tmp_path / "no_embedded")
    # registered but not used by the run: checked when first loaded
    register_from_config(dataset_cfg([[lazy, js, imgs]], embedded=embedded))
    with pytest.raises(DatasetError, match=rf"Dataset '{lazy}' .* is corrupt"):
        DatasetCatalog.get(lazy)
    with pytest.raises(DatasetError, match=rf"Dataset '{used}' .*image 3 .* is corrupt"):
        register_from_config(dataset_cfg([[used, js, imgs]], test=[used], embedded=embedded))
    assert not os.path.exists(embedded)


def test_training_set_without_annotations_rejected(tmp_path):
    from eapm.data import register_from_config

    coco, imgs = dataset_in(tmp_path, boxes_per_image=(0,))
    js = dump(coco, str(tmp_path / "ann.json"))
    name = f"noanns_{abs(hash(str(tmp_path))) % 10**8}"
    cfg = dataset_cfg([[name, js, imgs]], train=[name], embedded=str(tmp_path / "e"))
    with pytest.raises(DatasetError, match=rf"Dataset '{name}' .*: none of its 0 annotations"):
        register_from_config(cfg)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False  # all-background training is allowed
    register_from_config(cfg)


# ---------------------------------------- the categories against the classes the model reads


def _two_category_dataset(tmp_path) -> str:
    name = f"two_cats_{abs(hash(str(tmp_path))) % 10**8}"
    coco = make_coco(str(tmp_path), "imgs", num_images=2, cat_ids=(1, 2))
    register_coco_json(name, dump(coco, str(tmp_path / "ann.json")), str(tmp_path / "imgs"))
    return name


@pytest.mark.parametrize(
    "config, key",
    [
        ("eapm_retinanet.yaml", "MODEL.RETINANET.NUM_CLASSES"),
        ("eapm_fcos.yaml", "MODEL.FCOS.NUM_CLASSES"),
        ("faster_rcnn.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    ],
)
def test_more_categories_than_the_key_the_model_reads_is_an_error(tmp_path, caplog, config, key):
    name = _two_category_dataset(tmp_path)
    path = os.path.join(CONFIGS, "quickstart", config)
    opts = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"]
    cfg = load_config(path, opts + [key, "1"])
    assert keys_read_by_model(cfg)[key] == 1  # the chosen model reads this key
    with pytest.raises(DatasetError, match=rf"Dataset '{name}' has 2 categories, but the "
                       rf"model has 1 classes \({key} = 1\); set {key} to 2"):  # fmt: skip
        check_datasets_fit_model(cfg)
    with caplog.at_level(logging.WARNING):
        check_datasets_fit_model(load_config(path, opts + [key, "4"]))
    assert f"Dataset '{name}' has 2 categories, fewer than the model's 4 classes ({key} = 4)" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_datasets_fit_model(load_config(path, opts + [key, "2"]))
    assert "categories" not in caplog.text


def test_the_lazyconfig_spelling_is_named(tmp_path):
    name = _two_category_dataset(tmp_path)
    cfg = LazyConfig.load(os.path.join(CONFIGS, "quickstart", "eapm_retinanet.py"))
    cfg.model.num_classes = 1
    classes = _num_classes(cfg.model, "model")
    assert classes == {"model.num_classes": 1}
    with pytest.raises(DatasetError, match=r"\(model\.num_classes = 1\)"):
        check_category_counts([name], classes)
    rcnn = LazyConfig.load(os.path.join(CONFIGS, "COCO-Detection", "faster_rcnn_R_50_FPN_1x.py"))
    assert _num_classes(rcnn.model, "model") == {"model.roi_heads.num_classes": 80}


# --------------------------------------------------------------------- the data checks' keys
@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("DATASETS.CHECK_IMAGES", "all", "must be one of ('exists', 'header', 'decode')"),
        ("DATASETS.CHECK_WORKERS", -1, "must be an integer >= 0"),
    ],
)
def test_a_bad_data_check_key_is_named(key, value, expected):
    with pytest.raises(ValueError) as e:
        eapm.load_config("configs/quickstart/eapm_retinanet.yaml", [key, value])
    assert str(e.value).startswith(f"Invalid config {key} = ") and expected in str(e.value)
