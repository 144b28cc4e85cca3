"""The scenarios of detectron2's own R-CNN tests (its tests/modeling/test_fast_rcnn.py and the
Mask R-CNN cases of test_model_e2e.py), written for this project's EAPM heads, with EAPM on:

* the box predictor on two proposals at seed 132 (axis-aligned and rotated boxes): with EAPM
  off the losses are the values detectron2's test expects (loss_cls 1.7951188087 /
  1.7920907736, loss_box_reg 4.0357131958 / 4.0410838127); with EAPM on, loss_cls is the
  closed form -log(1 - MF Dif) computed in float64 and loss_box_reg is unchanged;
* the box predictor on an empty batch: every loss 0, with a gradient path;
* Mask R-CNN (EAPM cross entropy + EAPM RPN) on images without boxes, and on a half-empty
  batch: finite losses, the box / mask / RPN box losses 0 where there is nothing to learn,
  gradients; evaluation afterwards;
* non-finite features: the ROI heads in evaluation return no detection for inf / NaN
  features (the cascade stops at its second stage's proposals, as detectron2's does); the
  EAPM RPN drops non-finite proposals in evaluation and stops training with detectron2's
  FloatingPointError; in training, NaN ROI features make loss_cls non-finite as
  detectron2's (the trainer's NaN check stops the run), never an error inside the EAPM loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, RotatedBoxes
from detectron2.utils.events import EventStorage

from tests.helpers import make_batch, tiny_cfg

MU = 1.5
MASK_EAPM = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml"
RPN_OPTS = ("MODEL.PROPOSAL_GENERATOR.NAME", "EAPMRPN", "MODEL.EAPM.RPN.ENABLED", True)


def eapm_ce_closed_form(logits: torch.Tensor, labels: torch.Tensor, mu: float) -> float:
    """mean over rows of -log(1 - MF Dif), Dif = 1 - softmax(x)_y, in float64."""
    p = torch.softmax(logits.detach().double(), dim=1)
    dif = 1 - p.gather(1, labels[:, None]).squeeze(1)
    mf = 1 + math.tanh(mu) - torch.tanh(mu * dif)
    return float((-torch.log1p(-mf * dif)).mean())


# -------------------------------------------------------- detectron2's test_fast_rcnn.py
def _two_proposals(rotated: bool):
    """(predictor kwargs, proposals) of detectron2's two-proposal case, boxes in 10 x 10."""
    from detectron2.modeling.box_regression import Box2BoxTransform, Box2BoxTransformRotated

    prop = Instances((10, 10))
    if rotated:
        transform = Box2BoxTransformRotated(weights=(10, 10, 5, 5, 1))
        prop.proposal_boxes = RotatedBoxes(
            torch.tensor([[2, 1.95, 2.4, 1.7, 0], [4.65, 5.25, 4.7, 5.5, 0]])
        )
        prop.gt_boxes = RotatedBoxes(torch.tensor([[2.0, 2, 2, 2, 0], [4, 4, 4, 4, 0]]))
    else:
        transform = Box2BoxTransform(weights=(10, 10, 5, 5))
        prop.proposal_boxes = Boxes(torch.tensor([[0.8, 1.1, 3.2, 2.8], [2.3, 2.5, 7, 8]]))
        prop.gt_boxes = Boxes(torch.tensor([[1.0, 1, 3, 3], [2, 2, 6, 6]]))
    prop.gt_classes = torch.tensor([1, 2])
    return dict(box2box_transform=transform, num_classes=5), prop


@pytest.mark.parametrize(
    "rotated,expected",
    [(False, (1.7951188087, 4.0357131958)), (True, (1.7920907736, 4.0410838127))],
    ids=["boxes", "rotated"],
)
def test_fast_rcnn_expected_losses(rotated, expected):
    from eapm.modeling import EAPMFastRCNNOutputLayers

    kwargs, prop = _two_proposals(rotated)
    out = {}
    for mu in (0.0, MU):
        torch.manual_seed(132)
        predictor = EAPMFastRCNNOutputLayers(ShapeSpec(channels=8), eapm_cls_mu=mu, **kwargs)
        feats = torch.rand(2, 8)
        predictions = predictor(feats)
        with EventStorage() as storage:
            losses = predictor.losses(predictions, [prop])
        out[mu] = (losses, predictions[0], storage.latest())
    off, _, off_events = out[0.0]
    assert off["loss_cls"].item() == pytest.approx(expected[0], abs=1e-7)
    assert off["loss_box_reg"].item() == pytest.approx(expected[1], abs=1e-7)
    assert not any(k.startswith("eapm/") for k in off_events)
    on, logits, on_events = out[MU]
    closed = eapm_ce_closed_form(logits, prop.gt_classes, MU)
    assert on["loss_cls"].item() == pytest.approx(closed, rel=1e-6)
    assert on["loss_cls"].item() > off["loss_cls"].item() + 0.1  # MF > 1 raises the loss
    assert torch.equal(on["loss_box_reg"], off["loss_box_reg"])
    assert on_events["eapm/roi_cls_mf_fg"][0] > 1.0 and "eapm/roi_cls_mf_bg" not in on_events


def test_fast_rcnn_empty_batch():
    from detectron2.modeling.box_regression import Box2BoxTransform

    from eapm.modeling import EAPMFastRCNNOutputLayers

    predictor = EAPMFastRCNNOutputLayers(
        ShapeSpec(channels=10),
        box2box_transform=Box2BoxTransform(weights=(10, 10, 5, 5)),
        num_classes=8,
        eapm_cls_mu=MU,
        cls_agnostic_bbox_reg=True,  # detectron2's class-specific path cannot index no ROIs
    )
    feats = torch.randn(0, 10, requires_grad=True)
    with EventStorage():
        losses = predictor.losses(predictor(feats), [])
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    for value in losses.values():
        assert value.item() == 0.0 and value.requires_grad
    sum(losses.values()).backward()
    assert feats.grad is not None and feats.grad.shape == (0, 10)
    assert predictor.cls_score.weight.grad is not None


# ------------------------------------------------------ detectron2's test_model_e2e.py
def _masked_batch(num_boxes, seed=3):
    batch = make_batch(2, size=64, num_boxes=num_boxes, num_classes=4, seed=seed)
    for d in batch:
        inst = d["instances"]
        masks = torch.zeros(len(inst), 64, 64, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(inst.gt_boxes.tensor.round().long().tolist()):
            masks[i, y0 : y1 + 1, x0 : x1 + 1] = True
        inst.gt_masks = BitMasks(masks)
    return batch


def _mask_rcnn():
    cfg = tiny_cfg(MASK_EAPM, "MODEL.ROI_HEADS.NUM_CLASSES", 4, *RPN_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.roi_heads.box_predictor.eapm_cls_mu == MU
    assert model.proposal_generator.eapm_rpn_mu == MU
    return model


def _train(model, batch):
    model.train()
    torch.manual_seed(0)
    with EventStorage(0) as storage:
        losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    return losses, storage


def _evaluate(model, batch):
    model.eval()
    with torch.no_grad():
        out = model([{"image": d["image"], "height": 64, "width": 64} for d in batch])
    assert len(out) == len(batch)
    for o in out:
        inst = o["instances"]
        assert torch.isfinite(inst.scores).all() and torch.isfinite(inst.pred_boxes.tensor).all()
        assert inst.pred_masks.shape[1:] == (64, 64)


def test_mask_rcnn_empty_data():
    model = _mask_rcnn()
    batch = _masked_batch((0, 0))
    losses, storage = _train(model, batch)
    for k in ("loss_box_reg", "loss_mask", "loss_rpn_loc"):
        assert losses[k].item() == 0.0, k
    assert losses["loss_cls"].item() > 0 and losses["loss_rpn_cls"].item() > 0
    latest = storage.latest()  # all background: no foreground diagnostic, MF of the rest > 1
    assert "eapm/roi_cls_mf_fg" not in latest and latest["eapm/roi_cls_mf_bg"][0] > 1.0
    assert "eapm/rpn_mf_pos" not in latest and latest["eapm/rpn_mf_neg"][0] > 1.0
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.proposal_generator.rpn_head.objectness_logits.weight.grad.abs().sum() > 0
    _evaluate(model, batch)


def test_mask_rcnn_half_empty_data():
    model = _mask_rcnn()
    batch = _masked_batch((3, 0))
    losses, storage = _train(model, batch)
    for k in ("loss_box_reg", "loss_mask", "loss_rpn_loc"):
        assert losses[k].item() > 0, k
    latest = storage.latest()
    assert latest["eapm/roi_cls_mf_fg"][0] > 1.0 and latest["eapm/rpn_mf_pos"][0] > 1.0
    for part in ("mask_head", "box_predictor.cls_score", "box_predictor.bbox_pred"):
        grads = [p.grad for n, p in model.roi_heads.named_parameters() if n.startswith(part)]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert sum(g.abs().sum() for g in grads) > 0, part
    _evaluate(model, batch)


def _features(model, fill: float, size: int = 64):
    """(ImageList, {feature: tensor filled with ``fill``}) of one size x size image."""
    shapes = model.backbone.output_shape()
    images = ImageList(torch.zeros(1, 3, size, size), [(size - 2, size - 2)])
    feats = {
        k: torch.full((1, s.channels, size // s.stride, size // s.stride), fill)
        for k, s in shapes.items()
    }
    return images, feats


@pytest.mark.parametrize("fill", [math.inf, math.nan], ids=["inf", "nan"])
def test_roi_heads_inf_nan_data(fill):
    model = build_model(tiny_cfg(MASK_EAPM, "MODEL.ROI_HEADS.NUM_CLASSES", 4))
    model.eval()
    images, feats = _features(model, fill)
    with torch.no_grad():
        det, _ = model.roi_heads(images, feats, [_one_proposal()])
    assert len(det[0]) == 0


@pytest.mark.parametrize("fill", [math.inf, math.nan], ids=["inf", "nan"])
def test_cascade_roi_heads_inf_nan_data_as_detectron2(fill):
    """detectron2's cascade turns a stage's non-finite boxes into the next stage's proposals
    and stops there (``Boxes.clip`` asserts finite boxes): EAPMCascadeROIHeads the same."""
    path = "COCO-Detection/cascade_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml"
    errors = []
    for heads in ("CascadeROIHeads", "EAPMCascadeROIHeads"):
        model = build_model(tiny_cfg(path, "MODEL.ROI_HEADS.NAME", heads))
        assert type(model.roi_heads).__name__ == heads
        model.eval()
        images, feats = _features(model, fill)
        with torch.no_grad(), pytest.raises(AssertionError) as e:
            model.roi_heads(images, feats, [_one_proposal()])
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "infinite or NaN" in errors[0]


def _one_proposal():
    props = Instances((62, 62))
    props.proposal_boxes = Boxes(torch.tensor([[10.0, 10.0, 20.0, 20.0]]))
    props.objectness_logits = torch.tensor([1.0])
    return props


@pytest.mark.parametrize("fill", [math.inf, math.nan], ids=["inf", "nan"])
def test_eapm_rpn_inf_nan_data(fill):
    model = _mask_rcnn()
    images, feats = _features(model, fill)
    rpn = model.proposal_generator
    rpn.eval()
    with torch.no_grad():
        props, _ = rpn(images, feats)
    p = props[0]
    assert (
        torch.isfinite(p.proposal_boxes.tensor).all() and torch.isfinite(p.objectness_logits).all()
    )
    rpn.train()
    gt = Instances((62, 62))
    gt.gt_boxes = Boxes(torch.tensor([[5.0, 5.0, 30.0, 40.0]]))
    gt.gt_classes = torch.tensor([1])
    with EventStorage(0), pytest.raises(FloatingPointError, match="Inf/NaN"):
        rpn(images, feats, [gt])


def test_nan_roi_features_in_training_give_a_nan_loss_as_detectron2():
    """NaN box features in training: loss_cls is NaN with EAPM as with detectron2's cross
    entropy (the trainer's check of the losses stops the run), no error inside EAPM."""
    from eapm.modeling import EAPMROIHeads

    path = "quickstart/faster_rcnn_eapm_mu1.5.yaml"
    model = build_model(tiny_cfg(path))
    assert isinstance(model.roi_heads, EAPMROIHeads)
    images, feats = _features(model, math.nan)
    batch = make_batch(1, size=64, num_boxes=(3,), num_classes=4, seed=2)
    targets = [d["instances"] for d in batch]
    props = Instances((62, 62))
    props.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 60.0, 60.0], [8.0, 8.0, 24.0, 24.0]]))
    props.objectness_logits = torch.tensor([1.0, 1.0])
    out = {}
    for mu in (0.0, MU):
        model.roi_heads.box_predictor.eapm_cls_mu = mu
        model.train()
        torch.manual_seed(0)
        with EventStorage(0):
            _, losses = model.roi_heads(images, feats, [props], targets)
        out[mu] = losses["loss_cls"]
    assert not torch.isfinite(out[0.0]) and not torch.isfinite(out[MU])
