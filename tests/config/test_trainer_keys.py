"""Load-time checks of the trainer's and the data checks' keys: each bad value is a
ValueError naming the key before anything is built."""

from __future__ import annotations

import pytest

import eapm

QUICKSTART = "configs/quickstart/eapm_retinanet.yaml"


@pytest.mark.parametrize(
    "key, value, expected",
    [
        (
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
            "full",
            "must be one of ('value', 'norm', 'full_model')",
        ),
        ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", -1.0, "must be a finite number > 0"),
        ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", float("nan"), "must be a finite number > 0"),
        ("DATASETS.CHECK_IMAGES", "all", "must be one of ('exists', 'header', 'decode')"),
        ("DATASETS.CHECK_WORKERS", -1, "must be an integer >= 0"),
    ],
)
def test_a_bad_trainer_or_data_check_key_is_named(key, value, expected):
    with pytest.raises(ValueError) as e:
        eapm.load_config(QUICKSTART, [key, value])
    assert str(e.value).startswith(f"Invalid config {key} = ") and expected in str(e.value)


def test_clip_type_is_checked_only_when_clipping_is_on_and_full_model_is_accepted():
    off = ["SOLVER.CLIP_GRADIENTS.ENABLED", False, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "x"]
    assert eapm.load_config(QUICKSTART, off).SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "x"
    cfg = eapm.load_config(QUICKSTART, ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model"])
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"


@pytest.mark.parametrize(
    "config",
    [
        "COCO-Detection/Base-FCOS.yaml",
        "COCO-Detection/Base-LibraRetinaNet.yaml",
        "COCO-Detection/retinanet_R_50_FPN_1x_ghm.yaml",
        "COCO-Detection/retinanet_R_101_FPN_1x_ghm.yaml",
    ],
)
def test_the_configs_that_follow_mmdetection_clip_the_whole_model(config):
    cfg = eapm.load_config(f"configs/{config}", [], training=False)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 35.0
