"""Datasets and models agree: a dataset with more categories than the chosen model's classes
is an error naming the dataset, both numbers and the key the model reads (yacs and
LazyConfig); fewer is a warning naming the same."""

from __future__ import annotations

import logging
import os

import pytest
from detectron2.config import LazyConfig

from eapm.data import DatasetError, check_category_counts, register_coco_json
from eapm.lazy import _num_classes
from eapm.validation import check_datasets_fit_model, keys_read_by_model, load_config
from tests.helpers import CONFIGS, dump, make_coco


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
