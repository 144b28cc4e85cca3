"""EAPM with balanced L1 in the ROI box head, Libra R-CNN / Libra RetinaNet configs,
and CPU training steps of both detectors."""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch

from tests.helpers import CONFIGS, grad_norms, make_batch, tiny_cfg

B = math.exp(3.0) - 1.0  # balanced L1's b for alpha 0.5, gamma 1.5


def _layer(theta=1.0, weights=(10.0, 10.0, 5.0, 5.0), num_classes=3, beta=1.0):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform

    from eapm.modeling.roi_heads import EAPMFastRCNNOutputLayers

    return EAPMFastRCNNOutputLayers(
        ShapeSpec(channels=8),
        box2box_transform=Box2BoxTransform(weights=weights),
        num_classes=num_classes,
        box_reg_loss_type="balanced_l1",
        eapm_reg_theta=theta,
        balanced_l1=(0.5, 1.5, beta),
    )


def _bl1_inlier(d):  # beta 1: a/b (b d + 1) ln(b d + 1) - a d
    return 0.5 / B * (B * d + 1) * math.log(B * d + 1) - 0.5 * d


def _bl1_outlier(d):  # beta 1: g d + g/b - a
    return 1.5 * d + 1.5 / B - 0.5


def _case():
    """One foreground ROI (class 1) and three background ROIs. Proposal [0, 0, 10, 10],
    GT [-5, 0, 15, 10]: same centre, twice as wide -> target deltas with weights
    (10, 10, 5, 5) = (0, 0, 5 ln 2, 0)."""
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4)
    gt = torch.tensor([[-5.0, 0.0, 15.0, 10.0]] * 4)
    gt_classes = torch.tensor([1, 3, 3, 3])
    pred = torch.randn(4, 3 * 4, generator=torch.Generator().manual_seed(0))  # other classes: noise
    pred[0, 4:8] = torch.tensor([0.5, -0.2, 2.0, 0.5])  # class 1
    return proposals, gt, gt_classes, pred.requires_grad_()


def test_roi_eapm_balanced_l1_hand_computed(storage):
    layer = _layer(theta=1.0)
    proposals, gt, gt_classes, pred = _case()
    loss = layer.box_reg_loss(proposals, gt, pred, gt_classes)
    # by hand: dx error 0.5, dy 0.2 (not modulated, inliers); dh: t = 0.5, t* = 0 ->
    # GoS = 1 -> MF = 1 + tanh(1) - tanh(1) = 1 -> error 0.5; dw: t = 2, t* = 5 ln 2 ->
    # GoS = (5 ln 2 - 2) / (5 ln 2 + 2) = 0.26817, MF = 1 + tanh(1) - tanh(GoS) = 1.49967,
    # modulated error 1.49967 * 1.46574 = 2.19813 >= beta: outlier.
    tw = 5 * math.log(2.0)
    gos = (tw - 2.0) / (tw + 2.0)
    mf = 1 + math.tanh(1.0) - math.tanh(gos)
    assert abs(gos - 0.26817) < 1e-5 and abs(mf - 1.49967) < 1e-5
    dw = mf * (tw - 2.0)
    expected = (
        _bl1_inlier(0.5) + _bl1_inlier(0.2) + _bl1_outlier(dw) + _bl1_inlier(0.5)
    ) / 4  # 4 sampled ROIs
    assert abs(_bl1_inlier(0.5) - 0.4006) < 1e-4  # peers.md's reference value
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert storage.latest()["eapm/reg_mf"][0] == pytest.approx((mf + 1.0) / 2, rel=1e-6)  # dw, dh
    loss.backward()
    grad = pred.grad
    # gradient = balanced L1's gradient at the modulated point, no extra factor MF:
    # inlier a ln(b d + 1) (with sign), outlier gamma (with sign), / 4
    g_in = lambda d: 0.5 * math.log(B * d + 1)  # noqa: E731
    expected_grad = torch.tensor([g_in(0.5), -g_in(0.2), -1.5, g_in(0.5)]) / 4
    torch.testing.assert_close(grad[0, 4:8], expected_grad, rtol=1e-5, atol=1e-7)
    grad[0, 4:8] = 0
    assert grad.abs().sum() == 0  # other classes and background ROIs: no gradient


def test_roi_balanced_l1_without_eapm_and_normaliser(storage):
    layer = _layer(theta=0.0)
    proposals, gt, gt_classes, pred = _case()
    loss = layer.box_reg_loss(proposals, gt, pred, gt_classes)
    tw = 5 * math.log(2.0)
    expected = (_bl1_inlier(0.5) + _bl1_inlier(0.2) + _bl1_outlier(tw - 2.0) + _bl1_inlier(0.5)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # more background ROIs: same sum, divided by the number of sampled ROIs
    classes = torch.tensor([1, 3, 3, 3] + [3] * 4)
    extra = layer.box_reg_loss(
        torch.cat([proposals, proposals]), torch.cat([gt, gt]), torch.cat([pred, pred]), classes
    )
    assert extra.item() == pytest.approx(expected / 2, rel=1e-6)
    assert "eapm/reg_gos" not in storage.latest()


def test_roi_gos_invariant_to_box_weights(storage):
    """The same predicted boxes under weights (10, 10, 5, 5) and (1, 1, 1, 1): the
    deltas scale by the weights, GoS and MF do not."""
    from detectron2.modeling.box_regression import Box2BoxTransform

    from eapm.losses import gap_over_sum

    proposals = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 40.0, 20.0], [2.0, 3.0, 9.0, 30.0]]
    )
    gt = torch.tensor([[-5.0, 1.0, 15.0, 12.0], [3.0, 6.0, 30.0, 25.0], [1.0, 1.0, 12.0, 20.0]])
    unit = torch.tensor([[0.05, -0.02, 0.4, 0.1], [0.1, 0.0, -0.3, 0.2], [-0.05, 0.03, 0.2, -0.1]])
    w = torch.tensor([10.0, 10.0, 5.0, 5.0])
    t10 = Box2BoxTransform((10.0, 10.0, 5.0, 5.0)).get_deltas(proposals, gt)
    t1 = Box2BoxTransform((1.0, 1.0, 1.0, 1.0)).get_deltas(proposals, gt)
    torch.testing.assert_close(t10, t1 * w)
    torch.testing.assert_close(gap_over_sum(unit * w, t10), gap_over_sum(unit, t1))
    logged = []
    for weights, pred in (((10.0, 10.0, 5.0, 5.0), unit * w), ((1.0, 1.0, 1.0, 1.0), unit)):
        layer = _layer(theta=1.5, weights=weights, num_classes=1)
        layer.box_reg_loss(proposals, gt, pred, torch.zeros(3, dtype=torch.long))
        latest = storage.latest()
        logged.append((latest["eapm/reg_gos"][0], latest["eapm/reg_mf"][0]))
    assert logged[0] == pytest.approx(logged[1], rel=1e-6)


def test_roi_no_foreground_and_empty(storage):
    from detectron2.structures import Boxes, Instances

    layer = _layer(theta=1.0)
    feats = torch.randn(5, 8, requires_grad=True)
    props = Instances((32, 32))
    props.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 5))
    props.gt_classes = torch.full((5,), 3)  # all background, no gt_boxes field
    losses = layer.losses(layer(feats), [props])
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_box_reg"].requires_grad
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert (
        layer.bbox_pred.weight.grad.abs().sum() == 0 and layer.cls_score.weight.grad.abs().sum() > 0
    )
    # no ROI at all
    empty = Instances((32, 32))
    empty.proposal_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    none = torch.zeros(0, 4)
    loss = layer.box_reg_loss(
        none, none, torch.zeros(0, 12, requires_grad=True), torch.zeros(0, dtype=torch.long)
    )
    assert loss.item() == 0.0 and loss.requires_grad


def test_roi_other_loss_types_defer_to_detectron2(storage):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    from eapm.modeling.roi_heads import EAPMFastRCNNOutputLayers

    args = dict(
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
        num_classes=3,
        box_reg_loss_type="giou",
    )
    ours = EAPMFastRCNNOutputLayers(ShapeSpec(channels=8), **args)
    theirs = FastRCNNOutputLayers(ShapeSpec(channels=8), **args)
    proposals, gt, gt_classes, pred = _case()
    case = (proposals, gt, pred, gt_classes)
    assert ours.box_reg_loss(*case).item() == theirs.box_reg_loss(*case).item() > 0
    # EAPM regression modulates balanced L1 and detectron2's IoU losses, not smooth L1
    smooth_l1 = dict(args, box_reg_loss_type="smooth_l1")
    with pytest.raises(
        ValueError, match="box_reg_loss_type must be one of .*'balanced_l1', 'giou'"
    ):
        EAPMFastRCNNOutputLayers(ShapeSpec(channels=8), eapm_reg_theta=1.0, **smooth_l1)


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


def test_libra_rcnn_eapm_train_step(storage):
    cfg = tiny_cfg("quickstart/eapm_libra_rcnn.yaml")
    model, losses = _train_step(cfg, make_batch(num_boxes=(3, 1)))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert losses["loss_box_reg"].item() > 0
    bfp = model.backbone.refine
    assert bfp.conv_out.weight.grad.abs().sum() > 0
    g = grad_norms(model, ["backbone.refine", "backbone.fpn", "roi_heads.box_predictor.bbox_pred"])
    assert all(v > 0 for v in g.values()), g
    assert "eapm/reg_gos" in storage.latest()


def test_libra_rcnn_images_without_boxes(storage):
    cfg = tiny_cfg("quickstart/eapm_libra_rcnn.yaml")
    model, losses = _train_step(cfg, make_batch(num_boxes=(0, 0)))
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_rpn_loc"].item() == 0.0
    assert model.backbone.refine.conv_out.weight.grad is not None


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
