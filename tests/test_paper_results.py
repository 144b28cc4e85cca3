"""eapm/paper_results.py: the paper's rows cover the COCO configs of the repository; the
configs of Table 3 (R-50 / R-101: Faster / Mask R-CNN, RetinaNet, GHM RetinaNet, Libra
RetinaNet with and without EAPM) load, validate, build and have their row."""

from __future__ import annotations

import os

import pytest

from tests.helpers import REPO, tiny_cfg


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


TABLE3 = [
    f"COCO-{'InstanceSegmentation' if (name, depth) == ('mask_rcnn', 50) else 'Detection'}/"
    f"{name}_R_{depth}_FPN_1x{suffix}.yaml"
    for depth in (50, 101)
    for name, suffix in (
        ("faster_rcnn", ""),
        ("mask_rcnn", ""),
        ("retinanet", ""),
        ("retinanet", "_ghm"),
        ("libra_retinanet", ""),
        ("libra_retinanet", "_eapm_mu1.5_theta1.0"),
    )
]


@pytest.mark.parametrize("config", TABLE3)
def test_table3_configs_load_validate_and_build(config):
    from detectron2.modeling import build_model

    import eapm
    from eapm.paper_results import TEST_DEV, paper_result

    path = os.path.join(REPO, "configs", config)
    cfg = eapm.load_config(path, ["MODEL.DEVICE", "cpu"])
    depth = 101 if "R_101" in config else 50
    assert cfg.MODEL.RESNETS.DEPTH == depth and f"R-{depth}.pkl" in cfg.MODEL.WEIGHTS
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (90000, (60000, 80000))
    name = os.path.basename(config)[: -len(".yaml")]
    assert paper_result(name, TEST_DEV) is not None  # every config has its Table 3 row
    if "ghm" in config:
        assert cfg.MODEL.GHM.CLS.ENABLED and cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE == "ghm_r"
        assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 35.0
    if "mask_rcnn" in config:
        assert cfg.MODEL.MASK_ON
    model = build_model(tiny_cfg(path))
    assert sum(p.numel() for p in model.parameters()) > 0
