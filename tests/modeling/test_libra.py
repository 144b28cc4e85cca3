"""EAPM with balanced L1 in the ROI box head, Libra R-CNN / Libra RetinaNet configs,
and CPU training steps of both detectors."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from tests.helpers import CONFIGS, grad_norms, make_batch, tiny_cfg

# ------------------------------------------------------------------ configs
NEW_CONFIGS = sorted(
    [
        os.path.relpath(p, CONFIGS)
        for p in glob.glob(os.path.join(CONFIGS, "COCO-Detection", "*libra*.yaml"))
    ]
    + ["quickstart/libra_rcnn.yaml", "quickstart/eapm_libra_rcnn.yaml"]
)
EXPECTED = {  # name -> (mu, theta)
    "libra_retinanet_R_50_FPN_1x": (None, None),
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.0": (1.0, None),
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.5": (1.5, None),
    "libra_retinanet_R_50_FPN_1x_eapm_mu2.0": (2.0, None),
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0": (1.5, 1.0),
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.5": (1.5, 1.5),
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta2.0": (1.5, 2.0),
    "libra_retinanet_R_101_FPN_1x": (None, None),
    "libra_retinanet_R_101_FPN_1x_eapm_mu1.5_theta1.0": (1.5, 1.0),
    "libra_rcnn_R_50_FPN_1x": (None, None),
    "libra_rcnn_R_50_FPN_1x_eapm_theta1.0": (None, 1.0),
    "libra_rcnn_R_50_FPN_1x_eapm_theta1.5": (None, 1.5),
    "libra_rcnn_R_50_FPN_1x_eapm_theta2.0": (None, 2.0),
    "libra_rcnn": (None, None),
    "eapm_libra_rcnn": (None, 1.5),
}


def test_all_table_rows_have_a_config():
    names = {os.path.splitext(os.path.basename(p))[0] for p in NEW_CONFIGS}
    assert set(EXPECTED) <= names


@pytest.mark.parametrize("path", NEW_CONFIGS)
def test_config_loads_and_builds(path):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import eapm
    from eapm.modeling.bfp import BalancedFeaturePyramid
    from eapm.modeling.roi_heads import EAPMFastRCNNOutputLayers, LibraROIHeads

    name = os.path.splitext(os.path.basename(path))[0]
    full = get_cfg()
    eapm.add_eapm_config(full)
    full.merge_from_file(os.path.join(CONFIGS, path))
    eapm.validate_config(full)
    mu, theta = EXPECTED[name]
    assert (full.MODEL.EAPM.CLS.MU if full.MODEL.EAPM.CLS.ENABLED else None) == mu
    assert (full.MODEL.EAPM.REG.THETA if full.MODEL.EAPM.REG.ENABLED else None) == theta
    assert full.MODEL.BFP.ENABLED and full.MODEL.BFP.REFINE_TYPE == "non_local"
    rcnn = "rcnn" in name
    assert full.MODEL.BALANCED_L1.BETA == (1.0 if rcnn else 0.11)
    if path.startswith("COCO"):
        depth = 101 if "R_101" in name else 50
        assert full.MODEL.RESNETS.DEPTH == depth and full.MODEL.WEIGHTS.endswith(f"R-{depth}.pkl")
        assert full.DATASETS.TRAIN == ("coco_2017_train",) and full.DATASETS.TEST == (
            "coco_2017_val",
        )
        assert full.SOLVER.MAX_ITER == 90000 and tuple(full.SOLVER.STEPS) == (60000, 80000)
        assert full.SOLVER.IMS_PER_BATCH == 16 and full.SOLVER.BASE_LR == (0.02 if rcnn else 0.01)
        assert name in full.OUTPUT_DIR

    cfg = tiny_cfg(path)  # build only, shrunk to R-18
    model = build_model(cfg)
    assert isinstance(model.backbone, BalancedFeaturePyramid)
    # the refine level is P4 in both pyramids
    assert model.backbone.in_features[model.backbone.refine_level] == "p4"
    if rcnn:
        assert isinstance(model.roi_heads, LibraROIHeads)
        assert isinstance(model.roi_heads.box_predictor, EAPMFastRCNNOutputLayers)
        assert model.roi_heads.box_predictor.eapm_reg_theta == (theta or 0.0)
        assert model.roi_heads.box_predictor.box_reg_loss_type == "balanced_l1"
        assert model.roi_heads.iou_balanced_num_bins == 3 and model.roi_heads.instance_balanced_pos
    else:
        assert type(model).__name__ == "EAPMRetinaNet"
        assert model.eapm_cls_mu == (mu or 0.0) and model.eapm_reg_theta == (theta or 0.0)
        assert model.box_reg_loss_type == "balanced_l1" and model.balanced_l1 == (0.5, 1.5, 0.11)


# ------------------------------------------------------------ training steps
def _train_step(cfg, batch):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    return model, losses


def test_libra_retinanet_eapm_train_step(storage):
    path = "COCO-Detection/libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0.yaml"
    cfg = tiny_cfg(path, "MODEL.RETINANET.NUM_CLASSES", 4)
    model, losses = _train_step(cfg, make_batch(num_boxes=(3, 0)))
    assert set(losses) == {"loss_cls", "loss_box_reg"} and losses["loss_box_reg"].item() > 0
    assert model.backbone.refine.conv_out.weight.grad.abs().sum() > 0
    g = grad_norms(model, ["backbone.refine", "backbone.fpn.bottom_up", "head.bbox_pred"])
    assert all(v > 0 for v in g.values()), g
    latest = storage.latest()
    assert "eapm/reg_gos" in latest and "eapm/cls_mf_pos" in latest
