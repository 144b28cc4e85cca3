"""eapm/modeling/roi_heads.py: the EAPM box predictor (EAPMFastRCNNOutputLayers: EAPM cross
entropy, EAPM regression with balanced L1 or detectron2's IoU losses, diagnostics, the loss
seams), EAPMROIHeads (Faster / Mask R-CNN; Cascade R-CNN's configs too, whose stages use the same
predictor) and LibraROIHeads (IoU-balanced sampling, Libra R-CNN), their configs and validation.

Reference values: the losses equal ``eapm.losses`` evaluated on the tensors recorded at the
models' own loss methods (the head's logits and its own sampled labels), or float64 formulas
written from the definitions (``tests/helpers.py``); the diagnostics equal float64 values
computed from those tensors; with EAPM off (or mu 0) every loss and gradient is detectron2's
bitwise; detectron2's own R-CNN test scenarios (its test_fast_rcnn.py and the Mask R-CNN cases of
test_model_e2e.py) pass with EAPM on."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_HEADS_REGISTRY, build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances, RotatedBoxes, pairwise_iou
from detectron2.utils.events import EventStorage

import eapm
from eapm.losses import (
    eapm_balanced_l1_loss,
    eapm_binary_cross_entropy_with_logits,
    eapm_cross_entropy,
)
from eapm.modeling.roi_heads import EAPMFastRCNNOutputLayers
from tests.helpers import (
    CLS_MU,
    CONFIGS,
    DISTINCT_BL1,
    DISTINCT_BL1_OPTS,
    DISTINCT_MU,
    DISTINCT_STRENGTHS,
    DISTINCT_THETA,
    MASK_EAPM,
    RCNN_MU,
    RCNN_TWINS,
    RPN_MU,
    RPN_OPTS,
    assert_same_parameters,
    box_predictors,
    build_and_train_step,
    build_pair,
    check_reg_diagnostics,
    close_f64,
    close_loss,
    differs_loss,
    eapm_ce_mean,
    eapm_iou_reference,
    eapm_mask_rcnn,
    filled_features,
    forward_with_histograms,
    grad_norms,
    load_config_raises,
    make_batch,
    misses_f64,
    one_proposal,
    rcnn_batch,
    rcnn_cfg,
    record,
    record_box_cls,
    record_rpn,
    reg_diagnostics_reference,
    spread_box_predictions,
    swap_class,
    tanh_mf,
    tiny_cfg,
    train_forward,
    train_step,
    with_masks,
)

# ----------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted(RCNN_TWINS))
def test_configs_name_their_baseline_twin_and_load(path):
    base_path, ours, theirs = RCNN_TWINS[path]
    assert (
        os.path.basename(path) == os.path.basename(base_path)[: -len(".yaml")] + "_eapm_mu1.5.yaml"
    )
    for p, heads, enabled in ((path, ours, True), (base_path, theirs, False)):
        cfg = eapm.load_config(os.path.join(CONFIGS, p))  # validated, full size
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        assert cfg.MODEL.ROI_HEADS.NAME == heads
        assert cfg.MODEL.EAPM.CLS.ENABLED is enabled and cfg.MODEL.EAPM.CLS.MU == RCNN_MU
        assert not cfg.MODEL.EAPM.RPN.ENABLED and not cfg.MODEL.EAPM.REG.ENABLED
        assert cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN"
        assert cfg.MODEL.MASK_ON == ("mask_rcnn" in p)
        assert os.path.basename(p)[: -len(".yaml")] in cfg.OUTPUT_DIR
        if p.startswith("COCO"):
            assert cfg.MODEL.WEIGHTS.endswith("R-50.pkl") and cfg.MODEL.RESNETS.DEPTH == 50
            assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.SOLVER.MAX_ITER == 90000
        else:
            assert cfg.DATASETS.TRAIN == ("eapm_shapes_train",) and cfg.MODEL.RESNETS.DEPTH == 18
        if "cascade" in p:
            assert cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG


CASES = [(p, ()) for p in sorted(RCNN_TWINS)] + [
    ("quickstart/faster_rcnn_eapm_mu1.5.yaml", RPN_OPTS)
]


@pytest.mark.parametrize(
    "path,opts", CASES, ids=[os.path.basename(p)[:-5] + ("+rpn" if o else "") for p, o in CASES]
)
def test_config_trains_a_step_and_only_loss_cls_changes(path, opts):
    """Built at the same seed, the EAPM config and its baseline twin hold the same
    parameters; on the same batch every loss but loss_cls (loss_rpn_cls with EAPM-RPN) is
    bitwise the same, and loss_cls is eapm_cross_entropy on the head's own sampled labels
    (detectron2's: F.cross_entropy) with the configured mu."""
    from eapm.modeling import EAPMCascadeROIHeads, EAPMFastRCNNOutputLayers, EAPMROIHeads

    base_path, heads, _ = RCNN_TWINS[path]
    cfg = rcnn_cfg(path, *opts)
    base, ours = build_pair(path, base_path, *opts)
    assert_same_parameters(base, ours)
    cls = EAPMROIHeads if heads == "EAPMROIHeads" else EAPMCascadeROIHeads
    assert type(ours.roi_heads) is cls
    assert all(type(p) is EAPMFastRCNNOutputLayers for p in box_predictors(ours))
    assert all(p.eapm_cls_mu == RCNN_MU for p in box_predictors(ours))
    batch = rcnn_batch(cfg)
    seen_base, seen_ours = record_box_cls(base), record_box_cls(ours)
    rpn_base = record_rpn(base) if opts else None
    rpn_ours = record_rpn(ours) if opts else None
    lb, _ = train_step(base, batch)
    lo, storage = train_step(ours, batch)
    assert lb.keys() == lo.keys()
    assert all(torch.isfinite(v) for v in lo.values()), lo
    changed = {k for k in lo if k.startswith("loss_cls") or (opts and k == "loss_rpn_cls")}
    for k in lo:
        if k not in changed:
            assert torch.equal(lo[k], lb[k]), k
    stages = sorted(k for k in lo if k.startswith("loss_cls"))
    assert len(stages) == len(seen_ours) == len(seen_base) == (3 if "cascade" in path else 1)
    for k, (sb, yb), (so, yo) in zip(stages, seen_base, seen_ours):
        assert torch.equal(yb, yo) and torch.equal(sb, so)  # same ROIs, labels and logits
        assert (yo < 4).any() and (yo == 4).any()  # foreground and background ROIs
        assert torch.equal(lb[k], F.cross_entropy(sb, yb))
        assert torch.equal(lo[k], eapm_cross_entropy(so, yo, RCNN_MU))
        assert abs(lo[k].item() - lb[k].item()) > 1e-3, k
    if opts:
        valid = torch.stack(rpn_ours["labels"]) >= 0
        logits = cat(rpn_ours["logits"], dim=1)[valid]
        targets = torch.stack(rpn_ours["labels"])[valid].float()
        expected = eapm_binary_cross_entropy_with_logits(logits, targets, RCNN_MU) / (64 * 2)
        torch.testing.assert_close(lo["loss_rpn_cls"], expected, rtol=1e-6, atol=0)
        base_expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 128
        assert torch.equal(lb["loss_rpn_cls"], base_expected)
        assert torch.equal(cat(rpn_base["logits"], dim=1), cat(rpn_ours["logits"], dim=1))
        assert abs(lo["loss_rpn_cls"].item() - lb["loss_rpn_cls"].item()) > 1e-3
    # gradients reach the ROI heads (every stage), the RPN and the backbone
    parts = ["backbone.bottom_up", "proposal_generator.rpn_head", "roi_heads.box_head"]
    parts += [n for n, _ in ours.named_modules() if n.endswith("cls_score")]
    if cfg.MODEL.MASK_ON:
        parts.append("roi_heads.mask_head")
    norms = grad_norms(ours, parts)
    assert all(v > 0 and math.isfinite(v) for v in norms.values()), norms
    latest = storage.latest()
    scope = "stage2/" if "cascade" in path else ""
    assert latest[f"{scope}eapm/roi_cls_mf_fg"][0] > 1.0
    assert ("eapm/rpn_mf_pos" in latest) == bool(opts)


# ------------------------------------------------------------------------ mu 0 == detectron2


OFF = [
    ("faster", "quickstart/faster_rcnn_eapm_mu1.5.yaml", ("MODEL.EAPM.CLS.ENABLED", False)),
    ("faster_mu0", "quickstart/faster_rcnn_eapm_mu1.5.yaml", ("MODEL.EAPM.CLS.MU", 0.0)),
    (
        "mask_mu0",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml",
        ("MODEL.EAPM.CLS.MU", 0.0),
    ),
    (
        "cascade",
        "COCO-Detection/cascade_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml",
        ("MODEL.EAPM.CLS.ENABLED", False),
    ),
    ("cascade_mu0", "quickstart/cascade_rcnn_eapm_mu1.5.yaml", ("MODEL.EAPM.CLS.MU", 0.0)),
    (
        "rpn_mu0",
        "quickstart/faster_rcnn_eapm_mu1.5.yaml",
        RPN_OPTS + ("MODEL.EAPM.RPN.MU", 0.0, "MODEL.EAPM.CLS.MU", 0.0),
    ),
    (
        "rpn_off",
        "quickstart/faster_rcnn_eapm_mu1.5.yaml",
        RPN_OPTS[:2] + ("MODEL.EAPM.CLS.ENABLED", False),
    ),
]


@pytest.mark.parametrize("name,path,opts", OFF, ids=[o[0] for o in OFF])
def test_eapm_off_is_detectron2_bitwise(name, path, opts):
    """mu 0 or ENABLED False: every loss and every parameter's gradient is detectron2's
    bitwise (same seed, same batch), and no EAPM diagnostic is logged."""
    base, ours = build_pair(path, RCNN_TWINS[path][0], *opts)
    assert_same_parameters(base, ours)
    assert all(p.eapm_cls_mu == 0.0 for p in box_predictors(ours))
    if "rpn" in name:
        assert type(ours.proposal_generator).__name__ == "EAPMRPN"
        assert ours.proposal_generator.eapm_rpn_mu == 0.0
    batch = rcnn_batch(rcnn_cfg(path), num_boxes=(4, 2))
    lb, _ = train_step(base, batch)
    lo, storage = train_step(ours, batch)
    assert lb.keys() == lo.keys()
    for k in lb:
        assert torch.equal(lo[k], lb[k]), k
    grads_b = dict(base.named_parameters())
    for n, p in ours.named_parameters():
        gb = grads_b[n].grad
        assert (p.grad is None) == (gb is None), n
        if gb is not None:
            assert torch.equal(p.grad, gb), n
    assert not any(k.startswith("eapm/") or "/eapm/" in k for k in storage.latest())


# --------------------------------------------- the upstream definitions the overrides mirror


# detectron2's FastRCNNOutputLayers.losses / RPN.losses compute loss_cls / loss_rpn_cls
# inline; EAPMFastRCNNOutputLayers.cls_loss and EAPMRPN.objectness_loss replace them with the
# same definition (mean over the sampled ROIs; sum over the sampled anchors divided by
# batch_size_per_image x images). Checked bitwise at mu 0 below, and pinned to the source.
UPSTREAM = {
    "FastRCNNOutputLayers.losses": "20720939a4c16eac46dad07f57046c282e47955e",
    "RPN.losses": "14d863a2f2543e9939697d12b8b503cc5afbd1a6",
}


def test_mirrored_upstream_losses_are_pinned():
    from detectron2.modeling.proposal_generator import RPN
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    from eapm.upstream import source_sha1

    now = {
        "FastRCNNOutputLayers.losses": source_sha1(FastRCNNOutputLayers.losses),
        "RPN.losses": source_sha1(RPN.losses),
    }
    assert now == UPSTREAM, (
        "detectron2 changed a loss that EAPMFastRCNNOutputLayers.cls_loss / "
        "EAPMRPN.objectness_loss mirror: check their definitions, then update UPSTREAM"
    )


def test_cls_loss_and_objectness_loss_at_mu0_are_detectron2s(storage):
    from detectron2.layers import cross_entropy as d2_cross_entropy
    from detectron2.modeling.proposal_generator import RPN
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    path = "quickstart/faster_rcnn_eapm_mu1.5.yaml"
    model = build_model(rcnn_cfg(path, *RPN_OPTS, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", 2.0))
    predictor, rpn = model.roi_heads.box_predictor, model.proposal_generator
    args = {}
    for obj, key in ((predictor, "roi"), (rpn, "rpn")):
        original = obj.losses

        def wrapper(*a, _original=original, _key=key):
            args[_key] = a
            return _original(*a)

        obj.losses = wrapper
    model.train()
    torch.manual_seed(0)
    model(make_batch(2, size=64, num_boxes=(3, 1), num_classes=4, seed=1))
    predictions, proposals = args["roi"]
    upstream = FastRCNNOutputLayers.losses(predictor, predictions, proposals)
    labels = cat([p.gt_classes for p in proposals], dim=0)
    ours = EAPMLossesAt(predictor, 0.0)
    assert torch.equal(ours.cls_loss(predictions[0], labels), upstream["loss_cls"])
    # the loss weight applies to the replaced loss as to detectron2's
    predictor.loss_weight = {"loss_cls": 3.0, "loss_box_reg": 1.0}
    with_weight = predictor.losses(predictions, proposals)
    predictor.loss_weight = {"loss_cls": 1.0, "loss_box_reg": 1.0}
    assert torch.equal(
        with_weight["loss_cls"], 3.0 * predictor.losses(predictions, proposals)["loss_cls"]
    )
    # no ROI at all: detectron2's cross_entropy gives 0 with a gradient path, so does ours
    empty = predictions[0][:0]
    zero = ours.cls_loss(empty, labels[:0])
    assert torch.equal(zero, d2_cross_entropy(empty, labels[:0])) and zero.requires_grad
    anchors, logits, gt_labels, deltas, gt_boxes = args["rpn"]
    upstream = RPN.losses(rpn, anchors, logits, gt_labels, deltas, gt_boxes)
    assert torch.equal(
        EAPMLossesAt(rpn, 0.0).objectness_loss(logits, gt_labels), upstream["loss_rpn_cls"]
    )


class EAPMLossesAt:
    """The module's mirrored loss with its mu set to ``mu`` for the call."""

    def __init__(self, module, mu):
        self.module, self.mu = module, mu

    def _call(self, name, *args):
        attr = "eapm_cls_mu" if hasattr(self.module, "eapm_cls_mu") else "eapm_rpn_mu"
        old = getattr(self.module, attr)
        setattr(self.module, attr, self.mu)
        try:
            return getattr(self.module, name)(*args)
        finally:
            setattr(self.module, attr, old)

    def cls_loss(self, *args):
        return self._call("cls_loss", *args)

    def objectness_loss(self, *args):
        return self._call("objectness_loss", *args)


# ----------------------------------------------- EAPM cross entropy against float64 formulas


def test_roi_box_predictor_eapm_cross_entropy_value_and_gradient_float64(two_stage_step):
    """loss_cls is the mean over the sampled ROIs of the cross entropy at the modulated
    distribution (MODEL.EAPM.CLS.MU 2.0); its gradient w.r.t. the class scores is the cross
    entropy's gradient there, MF (p - Y) / R."""
    out, scores, classes = (
        two_stage_step["out"],
        two_stage_step["scores"],
        two_stage_step["classes"],
    )
    k = two_stage_step["cfg"].MODEL.ROI_HEADS.NUM_CLASSES
    assert (classes < k).any() and (classes == k).any()  # foreground and background ROIs
    value, grad = eapm_ce_mean(scores, classes, CLS_MU)
    close_f64(out["loss_cls"], value)
    close_f64(two_stage_step["grad_scores"][0], grad)
    # the gradient in closed form: MF (p - Y) per row, over R
    p = torch.softmax(scores.double(), dim=1)
    y = F.one_hot(classes, k + 1).double()
    mf = tanh_mf(1 - (p * y).sum(1), CLS_MU)
    torch.testing.assert_close(grad, mf[:, None] * (p - y) / len(classes))
    misses_f64(out["loss_cls"], eapm_ce_mean(scores, classes, RPN_MU)[0])


# ------------------------------------------------------------ detectron2's test_fast_rcnn.py


def eapm_ce_closed_form(logits: torch.Tensor, labels: torch.Tensor, mu: float) -> float:
    """mean over rows of -log(1 - MF Dif), Dif = 1 - softmax(x)_y, in float64."""
    p = torch.softmax(logits.detach().double(), dim=1)
    dif = 1 - p.gather(1, labels[:, None]).squeeze(1)
    mf = 1 + math.tanh(mu) - torch.tanh(mu * dif)
    return float((-torch.log1p(-mf * dif)).mean())


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
    for mu in (0.0, RCNN_MU):
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
    on, logits, on_events = out[RCNN_MU]
    closed = eapm_ce_closed_form(logits, prop.gt_classes, RCNN_MU)
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
        eapm_cls_mu=RCNN_MU,
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


# -------------------------------------------- EAPM balanced L1 in the box head (Libra R-CNN)


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


def test_libra_rcnn_box_loss_is_eapm_balanced_l1_on_its_sampled_proposals():
    weights = (10.0, 10.0, 5.0, 5.0)
    cfg = tiny_cfg(
        "quickstart/eapm_libra_rcnn.yaml",
        *DISTINCT_STRENGTHS,
        *DISTINCT_BL1_OPTS,
        "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", weights,
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    spread_box_predictions(model.roi_heads.box_predictor.bbox_pred)
    seen = record(model.roi_heads.box_predictor, "losses")
    batch = make_batch(2, num_boxes=(4, 3))
    out = train_forward(model, batch)
    (scores, deltas), proposals = seen["args"]

    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    gt_classes = torch.cat([p.gt_classes for p in proposals])
    prop = torch.cat([p.proposal_boxes.tensor for p in proposals])
    gt = torch.cat([p.gt_boxes.tensor for p in proposals])
    fg = (gt_classes >= 0) & (gt_classes < k)
    assert 0 < int(fg.sum()) < len(gt_classes)
    # the labels are the matcher's: foreground exactly where the IoU with the matched box
    # reaches the ROI heads' threshold
    iou = pairwise_iou(Boxes(prop), Boxes(gt)).diagonal()
    assert torch.equal(fg, iou >= cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0])

    with torch.no_grad():
        pred = deltas.view(-1, k, 4)[fg, gt_classes[fg]]  # the GT class's deltas
        target = Box2BoxTransform(weights=weights).get_deltas(prop[fg], gt[fg])
        box = eapm_balanced_l1_loss(pred, target, DISTINCT_THETA, reduction="sum", **DISTINCT_BL1)
        box_wrong = eapm_balanced_l1_loss(
            pred, target, DISTINCT_MU, reduction="sum", **DISTINCT_BL1
        )
        cls = F.cross_entropy(scores, gt_classes)  # detectron2's, EAPM classification off
    n = len(gt_classes)  # detectron2 divides by the number of sampled ROIs
    close_loss(out["loss_box_reg"], box / n)
    differs_loss(out["loss_box_reg"], box_wrong / n)
    close_loss(out["loss_cls"], cls)


@pytest.mark.parametrize("theta", [0.0, DISTINCT_THETA])
def test_libra_rcnn_balanced_l1_parameters_reach_the_loss(theta):
    """The balanced L1 parameters are the config's (alpha, gamma, beta in that order), with
    and without EAPM: the plain loss (theta 0) too is checked against eapm.losses."""
    cfg = tiny_cfg(
        "quickstart/eapm_libra_rcnn.yaml",
        "MODEL.EAPM.REG.THETA", max(theta, 0.1),
        "MODEL.EAPM.REG.ENABLED", theta > 0,
        *DISTINCT_BL1_OPTS,
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    spread_box_predictions(model.roi_heads.box_predictor.bbox_pred)
    seen = record(model.roi_heads.box_predictor, "losses")
    out = train_forward(model, make_batch(2, num_boxes=(2, 5), seed=3))
    (_, deltas), proposals = seen["args"]
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    gt_classes = torch.cat([p.gt_classes for p in proposals])
    fg = (gt_classes >= 0) & (gt_classes < k)
    prop = torch.cat([p.proposal_boxes.tensor for p in proposals])[fg]
    gt = torch.cat([p.gt_boxes.tensor for p in proposals])[fg]
    with torch.no_grad():
        pred = deltas.view(-1, k, 4)[fg, gt_classes[fg]]
        target = model.roi_heads.box_predictor.box2box_transform.get_deltas(prop, gt)
        box = eapm_balanced_l1_loss(pred, target, theta, reduction="sum", **DISTINCT_BL1)
        permuted = dict(
            alpha=DISTINCT_BL1["gamma"], gamma=DISTINCT_BL1["alpha"], beta=DISTINCT_BL1["beta"]
        )
        box_wrong = eapm_balanced_l1_loss(pred, target, theta, reduction="sum", **permuted)
    close_loss(out["loss_box_reg"], box / len(gt_classes))
    differs_loss(out["loss_box_reg"], box_wrong / len(gt_classes))


# ---------------------------------------------- EAPM regression with detectron2's IoU losses


@pytest.mark.parametrize("loss_type", ["giou", "diou", "ciou"])
def test_eapm_iou_box_loss_is_the_iou_loss_at_the_modulated_deltas(loss_type, storage):
    """Value: detectron2's IoU loss of the boxes decoded from t' (dw, dh: t* + MF (t - t*),
    MF = 1 + tanh(theta) - tanh(theta GoS); dx, dy: t), summed over the foreground ROIs and
    divided by the sampled ROIs. Gradient w.r.t. the predicted deltas: the IoU loss's gradient
    w.r.t. t' (MF not differentiated); zero for the background ROIs and the other classes."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform

    from eapm.modeling import EAPMFastRCNNOutputLayers

    theta, weights = 1.0, (10.0, 10.0, 5.0, 5.0)
    layer = EAPMFastRCNNOutputLayers(
        ShapeSpec(channels=8),
        box2box_transform=Box2BoxTransform(weights=weights),
        num_classes=3,
        box_reg_loss_type=loss_type,
        eapm_reg_theta=theta,
    )
    g = torch.Generator().manual_seed(0)
    proposals = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 40.0, 20.0], [2.0, 3.0, 9.0, 30.0], [1, 1, 8, 8.0]]
    )
    gt = torch.tensor(
        [[-5.0, 1.0, 15.0, 12.0], [3.0, 6.0, 30.0, 25.0], [1.0, 1.0, 12.0, 20.0], [0, 0, 5, 5.0]]
    )
    classes = torch.tensor([1, 0, 2, 3])  # the last ROI is background
    pred = torch.randn(4, 12, generator=g) * 0.3  # other classes: noise
    fg = torch.arange(3)
    t_star = layer.box2box_transform.get_deltas(proposals[fg], gt[fg])
    # each ROI's own class: the target's sign, another magnitude (GoS in (0, 1): MF > 1)
    pred.view(4, 3, 4)[fg, classes[fg]] = t_star * torch.tensor([0.5, 1.5, 0.6, 1.7])
    pred.requires_grad_()
    loss = layer.box_reg_loss(proposals, gt, pred, classes)
    loss.backward()

    ref = eapm_iou_reference(
        pred.view(4, 3, 4)[fg, classes[fg]],
        t_star,
        theta,
        proposals[fg],
        gt[fg],
        layer.box2box_transform,
        loss_type,
    )
    gos, mf = ref["gos"], ref["mf"]
    assert (mf[:, 2:] > 1.05).all()
    torch.testing.assert_close(loss, ref["loss"] / 4, rtol=1e-6, atol=1e-7)
    expected = torch.zeros(4, 3, 4)
    expected[fg, classes[fg]] = ref["grad"] / 4
    torch.testing.assert_close(pred.grad.view(4, 3, 4), expected, rtol=1e-5, atol=1e-7)
    # not the plain IoU loss: the modulation changed the value
    assert abs(loss.item() - ref["plain"].item() / 4) > 1e-4
    latest = storage.latest()
    assert latest["eapm/reg_mf"][0] == pytest.approx(mf[:, 2:].mean().item(), rel=1e-6)
    assert latest["eapm/reg_gos"][0] == pytest.approx(gos[:, 2:].mean().item(), rel=1e-6)


def test_eapm_iou_regression_in_the_roi_heads_configs():
    """giou + MODEL.EAPM.REG with the EAPM ROI heads: valid and trains; at theta 0 it is
    detectron2's giou bitwise; smooth L1 cannot be modulated (RetinaNet or ROI heads)."""
    path = "quickstart/faster_rcnn_eapm_mu1.5.yaml"
    opts = ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "giou", "MODEL.EAPM.REG.ENABLED", "True"]
    eapm.load_config(os.path.join(CONFIGS, path), opts)
    base, ours = build_pair(path, "quickstart/faster_rcnn.yaml", *opts)
    assert ours.roi_heads.box_predictor.eapm_reg_theta == 1.0
    batch = rcnn_batch(rcnn_cfg(path))
    losses, storage = train_step(ours, batch)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box_reg"] > 0
    assert (
        grad_norms(ours, ["roi_heads.box_predictor.bbox_pred"])["roi_heads.box_predictor.bbox_pred"]
        > 0
    )
    assert storage.latest()["eapm/reg_mf"][0] > 1.0
    zero = build_pair(path, "quickstart/faster_rcnn.yaml", *opts, "MODEL.EAPM.REG.THETA", 0.0)[1]
    base.roi_heads.box_predictor.box_reg_loss_type = "giou"
    l0, _ = train_step(zero, batch, backward=False)
    lb, _ = train_step(base, batch, backward=False)
    assert torch.equal(l0["loss_box_reg"], lb["loss_box_reg"])
    load_config_raises(
        "quickstart/retinanet.yaml",
        ["MODEL.EAPM.REG.ENABLED", "True"],
        r"^Invalid config MODEL\.RETINANET\.BBOX_REG_LOSS_TYPE = 'smooth_l1': "
        r".*box_reg_loss_type must be one of \('balanced_l1', 'giou', 'diou', 'ciou'\)",
    )
    load_config_raises(
        path,
        ["MODEL.EAPM.REG.ENABLED", "True"],
        r"^Invalid config MODEL\.ROI_BOX_HEAD\.BBOX_REG_LOSS_TYPE = 'smooth_l1': "
        r".*box_reg_loss_type must be one of \('balanced_l1', 'giou', 'diou', 'ciou'\)",
    )


# ------------------------------------------------------------------------------- diagnostics


def test_roi_and_rpn_diagnostics_equal_float64_values(monkeypatch):
    """eapm/roi_cls_{dif,mf}_{fg,bg}: the means of Dif = 1 - softmax(x)_y and MF over the
    foreground / background sampled ROIs; eapm/rpn_{dif,mf}_{pos,neg}: Dif = |sigmoid(x) - t|
    and MF over the positive / negative sampled anchors; histograms (period 1) hold exactly
    those values."""
    path = "quickstart/faster_rcnn_eapm_mu1.5.yaml"
    model = build_model(rcnn_cfg(path, *RPN_OPTS, "MODEL.EAPM.HISTOGRAM_PERIOD", 1))
    seen, rpn_seen, hists = record_box_cls(model), record_rpn(model), {}
    _, storage = train_step(model, rcnn_batch(rcnn_cfg(path)), hists, monkeypatch, backward=False)
    ((scores, labels),) = seen
    p = torch.softmax(scores.double(), dim=1)
    dif = 1 - p.gather(1, labels[:, None]).squeeze(1)
    mf = 1 + math.tanh(RCNN_MU) - torch.tanh(RCNN_MU * dif)
    fg = labels < 4
    t = torch.stack(rpn_seen["labels"])
    valid = t >= 0
    x = cat(rpn_seen["logits"], dim=1)[valid].double()
    t = t[valid].double()
    rdif = (torch.sigmoid(x) - t).abs()
    rmf = 1 + math.tanh(RCNN_MU) - torch.tanh(RCNN_MU * rdif)
    pos = t > 0.5
    expected = {
        "eapm/roi_cls_dif_fg": dif[fg],
        "eapm/roi_cls_dif_bg": dif[~fg],
        "eapm/roi_cls_mf_fg": mf[fg],
        "eapm/roi_cls_mf_bg": mf[~fg],
        "eapm/rpn_dif_pos": rdif[pos],
        "eapm/rpn_dif_neg": rdif[~pos],
        "eapm/rpn_mf_pos": rmf[pos],
        "eapm/rpn_mf_neg": rmf[~pos],
    }
    for name, values in expected.items():
        assert values.numel() > 0, name
        assert storage.history(name).latest() == pytest.approx(values.mean().item(), rel=2e-6)
        got = hists[name].double().sort().values
        torch.testing.assert_close(got, values.sort().values, rtol=2e-6, atol=1e-7)
    assert set(hists) == set(expected)


def test_libra_rcnn_diagnostics_equal_direct_values(monkeypatch):
    cfg = tiny_cfg(
        "quickstart/eapm_libra_rcnn.yaml",
        "MODEL.EAPM.REG.THETA", DISTINCT_THETA,
        "MODEL.EAPM.HISTOGRAM_PERIOD", 1,
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    predictor = model.roi_heads.box_predictor
    spread_box_predictions(predictor.bbox_pred)
    seen = record(predictor, "losses")
    storage, hists = forward_with_histograms(model, make_batch(2, num_boxes=(4, 3)), monkeypatch)
    (_, deltas), proposals = seen["args"]
    k = predictor.num_classes
    gt_classes = torch.cat([p.gt_classes for p in proposals])
    fg = (gt_classes >= 0) & (gt_classes < k)
    prop = torch.cat([p.proposal_boxes.tensor for p in proposals])[fg]
    gt = torch.cat([p.gt_boxes.tensor for p in proposals])[fg]
    pred = deltas.view(-1, k, 4)[fg, gt_classes[fg]]
    transform = Box2BoxTransform(weights=cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS)
    check_reg_diagnostics(
        storage,
        hists,
        *reg_diagnostics_reference(pred, transform.get_deltas(prop, gt), DISTINCT_THETA),
    )
    assert not any(key.startswith("eapm/cls") for key in storage.latest())  # no EAPM cls here


# ----------------------------------------------------------------------------- the loss seam


def test_the_box_predictors_cls_loss_override_is_used_also_at_mu_zero():
    cfg = tiny_cfg("quickstart/faster_rcnn.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", 4,
                   "MODEL.ROI_HEADS.NAME", "EAPMROIHeads")  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    predictor = model.roi_heads.box_predictor
    assert isinstance(predictor, EAPMFastRCNNOutputLayers) and predictor.eapm_cls_mu == 0
    batch = make_batch(2, num_boxes=(3, 2))
    twin = swap_class(model, type(model))  # the same model, before any step
    ref = train_forward(model, batch)

    class MyCls(EAPMFastRCNNOutputLayers):
        def cls_loss(self, scores, gt_classes):
            return scores.sum() * 0 + 5.0

    twin.roi_heads.box_predictor.__class__ = MyCls
    out = train_forward(twin, batch)
    assert out["loss_cls"].item() == 5.0 * predictor.loss_weight.get("loss_cls", 1.0)
    torch.testing.assert_close(out["loss_box_reg"], ref["loss_box_reg"], rtol=0, atol=0)


# -------------------------------------------------------------------------------- validation


def test_eapm_cls_on_detectron2_roi_heads_is_rejected_naming_the_key():
    for path in ("quickstart/faster_rcnn.yaml", "quickstart/cascade_rcnn.yaml"):
        load_config_raises(
            path,
            ["MODEL.EAPM.CLS.ENABLED", "True"],
            r"^Invalid config MODEL\.EAPM\.CLS\.ENABLED = True: no class of this model reads "
            r"MODEL\.EAPM\.CLS\.ENABLED \(.*MODEL\.ROI_HEADS\.NAME '(Standard|Cascade)ROIHeads'"
            r".*\): it would train without it; use MODEL\.ROI_HEADS\.NAME .*'EAPM",
        )
    # Libra R-CNN's heads have it
    cfg = eapm.load_config(
        os.path.join(CONFIGS, "quickstart/libra_rcnn.yaml"), ["MODEL.EAPM.CLS.ENABLED", "True"]
    )
    tiny = tiny_cfg("quickstart/libra_rcnn.yaml", "MODEL.EAPM.CLS.ENABLED", True)
    assert (
        cfg.MODEL.EAPM.CLS.ENABLED
        and build_model(tiny).roi_heads.box_predictor.eapm_cls_mu == RCNN_MU
    )


@pytest.mark.parametrize(
    "opts,key",
    [
        (
            [
                "MODEL.EAPM.RPN.ENABLED",
                "True",
                "MODEL.PROPOSAL_GENERATOR.NAME",
                "EAPMRPN",
                "MODEL.EAPM.RPN.MU",
                "-1.0",
            ],
            "MODEL.EAPM.RPN.MU",
        ),  # fmt: skip
        (["MODEL.EAPM.CLS.MU", "1e999"], "MODEL.EAPM.CLS.MU"),
        (["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True"], "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE"),
    ],
)
def test_bad_two_stage_values_are_named(opts, key):
    load_config_raises(
        "quickstart/faster_rcnn_eapm_mu1.5.yaml",
        opts,
        f"^Invalid config {key.replace('.', '[.]')} = ",
    )


def test_constructors_apply_the_same_rules():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform

    from eapm.modeling import EAPMFastRCNNOutputLayers

    args = dict(box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), num_classes=3)
    with pytest.raises(ValueError, match="use_sigmoid_ce"):
        EAPMFastRCNNOutputLayers(
            ShapeSpec(channels=8), eapm_cls_mu=1.0, use_sigmoid_ce=True, **args
        )
    with pytest.raises(ValueError, match="eapm_cls_mu"):
        EAPMFastRCNNOutputLayers(ShapeSpec(channels=8), eapm_cls_mu=-0.5, **args)
    with pytest.raises(ValueError, match="eapm_rpn_mu"):
        build_model(rcnn_cfg("quickstart/faster_rcnn.yaml", *RPN_OPTS, "MODEL.EAPM.RPN.MU", -2.0))


@ROI_HEADS_REGISTRY.register()
class UserEAPMROIHeads(__import__("eapm").modeling.EAPMROIHeads):
    """A user's own ROI heads built on EAPMROIHeads: inherits its capabilities."""


def test_user_subclass_of_eapm_roi_heads_is_accepted():
    opts = ["MODEL.ROI_HEADS.NAME", "UserEAPMROIHeads"]
    eapm.load_config(os.path.join(CONFIGS, "quickstart/faster_rcnn_eapm_mu1.5.yaml"), opts)
    model = build_model(rcnn_cfg("quickstart/faster_rcnn_eapm_mu1.5.yaml", *opts))
    assert type(model.roi_heads) is UserEAPMROIHeads
    assert model.roi_heads.box_predictor.eapm_cls_mu == RCNN_MU


def test_lazy_eapm_roi_heads_need_the_eapm_predictor():
    from detectron2.config import instantiate

    from eapm.modeling import EAPMROIHeads
    from eapm.utils.testing import tiny_lazy_cfg

    lazy = tiny_lazy_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x.py")
    lazy.model.roi_heads._target_ = EAPMROIHeads  # the predictor left detectron2's
    with pytest.raises(TypeError, match=r"box_predictor must be a .*EAPMFastRCNNOutputLayers"):
        instantiate(lazy.model)


# --------------------------- detectron2's test_model_e2e.py: Mask R-CNN, non-finite features


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
    model = eapm_mask_rcnn()
    batch = with_masks(make_batch(2, size=64, num_boxes=(0, 0), num_classes=4, seed=3))
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
    model = eapm_mask_rcnn()
    batch = with_masks(make_batch(2, size=64, num_boxes=(3, 0), num_classes=4, seed=3))
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


@pytest.mark.parametrize("fill", [math.inf, math.nan], ids=["inf", "nan"])
def test_roi_heads_inf_nan_data(fill):
    model = build_model(tiny_cfg(MASK_EAPM, "MODEL.ROI_HEADS.NUM_CLASSES", 4))
    model.eval()
    images, feats = filled_features(model, fill)
    with torch.no_grad():
        det, _ = model.roi_heads(images, feats, [one_proposal()])
    assert len(det[0]) == 0


def test_nan_roi_features_in_training_give_a_nan_loss_as_detectron2():
    """NaN box features in training: loss_cls is NaN with EAPM as with detectron2's cross
    entropy (the trainer's check of the losses stops the run), no error inside EAPM."""
    from eapm.modeling import EAPMROIHeads

    path = "quickstart/faster_rcnn_eapm_mu1.5.yaml"
    model = build_model(tiny_cfg(path))
    assert isinstance(model.roi_heads, EAPMROIHeads)
    images, feats = filled_features(model, math.nan)
    batch = make_batch(1, size=64, num_boxes=(3,), num_classes=4, seed=2)
    targets = [d["instances"] for d in batch]
    props = Instances((62, 62))
    props.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 60.0, 60.0], [8.0, 8.0, 24.0, 24.0]]))
    props.objectness_logits = torch.tensor([1.0, 1.0])
    out = {}
    for mu in (0.0, RCNN_MU):
        model.roi_heads.box_predictor.eapm_cls_mu = mu
        model.train()
        torch.manual_seed(0)
        with EventStorage(0):
            _, losses = model.roi_heads(images, feats, [props], targets)
        out[mu] = losses["loss_cls"]
    assert not torch.isfinite(out[0.0]) and not torch.isfinite(out[RCNN_MU])


# --------------------------------------------------------------- Libra R-CNN: training steps


def test_libra_rcnn_eapm_train_step(storage):
    cfg = tiny_cfg("quickstart/eapm_libra_rcnn.yaml")
    model, losses = build_and_train_step(cfg, make_batch(num_boxes=(3, 1)))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert losses["loss_box_reg"].item() > 0
    bfp = model.backbone.refine
    assert bfp.conv_out.weight.grad.abs().sum() > 0
    g = grad_norms(model, ["backbone.refine", "backbone.fpn", "roi_heads.box_predictor.bbox_pred"])
    assert all(v > 0 for v in g.values()), g
    assert "eapm/reg_gos" in storage.latest()


def test_libra_rcnn_images_without_boxes(storage):
    cfg = tiny_cfg("quickstart/eapm_libra_rcnn.yaml")
    model, losses = build_and_train_step(cfg, make_batch(num_boxes=(0, 0)))
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_rpn_loc"].item() == 0.0
    assert model.backbone.refine.conv_out.weight.grad is not None


# ------------------------------------------------------ LibraROIHeads: IoU-balanced sampling


LIBRA_RCNN = "quickstart/libra_rcnn.yaml"


def _heads(*opts):
    from detectron2.modeling import build_model

    cfg = tiny_cfg(LIBRA_RCNN, *opts)
    torch.manual_seed(0)
    return build_model(cfg).roi_heads


@pytest.mark.parametrize(
    "key, value, text",
    [
        # values a Python script can put in a config past yacs's type check; int() / bool()
        # in from_config used to turn them into 2 bins and True
        ("IOU_BALANCED_NUM_BINS", 2.5, "iou_balanced_num_bins must be an integer >= 0"),
        ("INSTANCE_BALANCED_POS", "False", "instance_balanced_pos must be True or False"),
        ("IOU_BALANCED_FLOOR_FRACTION", "0.5", "iou_balanced_floor_fraction must be a finite"),
    ],
)
def test_libra_roi_heads_from_config_passes_values_to_the_constructors_rules(key, value, text):
    cfg = tiny_cfg(LIBRA_RCNN)
    cfg.MODEL.ROI_HEADS[key] = value
    with pytest.raises(ValueError, match=text):
        build_model(cfg)


def _shifted_proposals(gt, shifts):
    """Boxes gt shifted right by s: IoU with gt = (w - s) / (w + s)."""
    from detectron2.structures import Boxes

    b = gt.repeat(len(shifts), 1)
    b[:, 0] += shifts
    b[:, 2] += shifts
    return Boxes(b)


def _instances(size, **fields):
    from detectron2.structures import Instances

    inst = Instances(size)
    for k, v in fields.items():
        inst.set(k, v)
    return inst


def test_roi_heads_sample_known_ious(storage):
    """One GT box; proposals at known IoUs. 256 RoIs: <= 64 positives, and the
    negatives spread over bins of width max IoU / 3 = 1/3 (the GT is appended)."""
    from detectron2.structures import Boxes

    heads = _heads("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 256)
    assert type(heads).__name__ == "LibraROIHeads"
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    # IoU (100 - s) / (100 + s): s in [0, 20] -> IoU >= 0.67 (positives), s in
    # [40, 50) -> IoU in (0.33, 0.43] (bin 2), s in [60, 200) -> IoU < 0.25 (bin 1)
    shifts = torch.cat(
        [torch.linspace(0, 20, 100), torch.linspace(40, 49.9, 30), torch.linspace(60, 199, 870)]
    )
    target = _instances((300, 400), gt_boxes=Boxes(gt), gt_classes=torch.tensor([2]))
    boxes = _shifted_proposals(gt[0], shifts)
    proposal = _instances((300, 400), proposal_boxes=boxes, objectness_logits=torch.zeros(1000))
    torch.manual_seed(0)
    out = heads.label_and_sample_proposals([proposal], [target])[0]
    from detectron2.structures import pairwise_iou

    iou = pairwise_iou(out.proposal_boxes, Boxes(gt))[:, 0]
    fg = out.gt_classes == 2
    assert int(fg.sum()) == 64 and len(out) == 256
    assert bool((out.gt_classes[~fg] == heads.num_classes).all())
    neg_iou = iou[~fg]
    # 192 negatives, int(192 / 3) = 64 per bin: all 30 of (1/3, 2/3), 64+ of [0, 1/3)
    assert int(((neg_iou >= 1 / 3) & (neg_iou < 2 / 3)).sum()) == 30
    assert int((neg_iou < 1 / 3).sum()) == 162
    # the random sampler would take ~192 * 30/900 = 6.4 of the 30
    heads_rnd = _heads("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 256,
                       "MODEL.ROI_HEADS.IOU_BALANCED_NUM_BINS", 0,
                       "MODEL.ROI_HEADS.INSTANCE_BALANCED_POS", False)  # fmt: skip
    torch.manual_seed(0)
    out = heads_rnd.label_and_sample_proposals([proposal], [target])[0]
    iou = pairwise_iou(out.proposal_boxes, Boxes(gt))[:, 0]
    assert int(((iou >= 1 / 3) & (iou < 0.5)).sum()) < 20


def test_roi_heads_positives_balanced_over_instances(storage):
    from detectron2.structures import Boxes

    heads = _heads(
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 128, "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", False
    )
    gts = torch.tensor([[0.0, 0.0, 100.0, 100.0], [300.0, 0.0, 400.0, 100.0]])
    # GT 0: 150 positives, GT 1: 5 positives; plus 300 far negatives
    props = torch.cat([
        _shifted_proposals(gts[0], torch.linspace(0, 20, 150)).tensor,
        _shifted_proposals(gts[1], torch.linspace(0, 10, 5)).tensor,
        _shifted_proposals(torch.tensor([0.0, 200.0, 50.0, 250.0]),
                           torch.linspace(0, 300, 300)).tensor,
    ])  # fmt: skip
    target = _instances((300, 800), gt_boxes=Boxes(gts), gt_classes=torch.tensor([0, 1]))
    proposal = _instances(
        (300, 800), proposal_boxes=Boxes(props), objectness_logits=torch.zeros(455)
    )
    torch.manual_seed(0)
    out = heads.label_and_sample_proposals([proposal], [target])[0]
    # 32 positives: round(32 / 2) + 1 = 17 per instance -> all 5 of GT 1, 27 of GT 0
    assert int((out.gt_classes == 1).sum()) == 5 and int((out.gt_classes == 0).sum()) == 27
    assert len(out) == 128


def test_roi_heads_fewer_negatives_than_needed_and_no_gt(storage):
    from detectron2.structures import Boxes

    heads = _heads("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 256)
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    shifts = torch.cat([torch.linspace(0, 10, 20), torch.linspace(60, 150, 50)])
    target = _instances((300, 400), gt_boxes=Boxes(gt), gt_classes=torch.tensor([1]))
    boxes = _shifted_proposals(gt[0], shifts)
    proposal = _instances((300, 400), proposal_boxes=boxes, objectness_logits=torch.zeros(70))
    out = heads.label_and_sample_proposals([proposal], [target])[0]
    # 21 positives (20 + the appended GT), all 50 negatives; nothing twice
    assert len(out) == 71 and int((out.gt_classes == heads.num_classes).sum()) == 50
    # an image without any GT box: everything is background, sampled at random
    empty = _instances(
        (300, 400), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long)
    )
    many = _instances((300, 400),
                      proposal_boxes=_shifted_proposals(gt[0], torch.linspace(0, 300, 400)),
                      objectness_logits=torch.zeros(400))  # fmt: skip
    out = heads.label_and_sample_proposals([many], [empty])[0]
    assert len(out) == 256 and bool((out.gt_classes == heads.num_classes).all())
    assert not out.has("gt_boxes")
    assert heads.proposal_matcher.last_max_iou.abs().sum() == 0


def test_roi_heads_random_mode_is_detectron2(storage):
    """NUM_BINS 0 + no instance balancing: the very same draw as StandardROIHeads."""
    from detectron2.modeling.roi_heads import StandardROIHeads

    heads = _heads(
        "MODEL.ROI_HEADS.IOU_BALANCED_NUM_BINS", 0, "MODEL.ROI_HEADS.INSTANCE_BALANCED_POS", False
    )
    g = torch.Generator().manual_seed(0)
    matched_idxs = torch.randint(0, 3, (500,), generator=g)
    matched_labels = torch.randint(-1, 2, (500,), generator=g).to(torch.int8)
    gt_classes = torch.tensor([0, 3, 1])
    torch.manual_seed(5)
    a = heads._sample_proposals(matched_idxs, matched_labels, gt_classes.clone())
    torch.manual_seed(5)
    b = StandardROIHeads._sample_proposals(heads, matched_idxs, matched_labels, gt_classes.clone())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("opts", [(), ("MODEL.ROI_HEADS.INSTANCE_BALANCED_POS", False)])
def test_roi_heads_labels_match_detectron2(storage, opts):
    """Same labels (fg class / background / ignored never sampled) as detectron2."""
    heads = _heads(*opts)
    g = torch.Generator().manual_seed(1)
    matched_idxs = torch.randint(0, 3, (300,), generator=g)
    matched_labels = torch.randint(-1, 2, (300,), generator=g).to(torch.int8)
    heads.proposal_matcher.last_max_iou = torch.rand(300, generator=g)
    idx, labels = heads._sample_proposals(matched_idxs, matched_labels, torch.tensor([0, 3, 1]))
    expected = torch.tensor([0, 3, 1])[matched_idxs[idx]]
    expected[matched_labels[idx] == 0] = heads.num_classes
    assert bool((matched_labels[idx] != -1).all()) and torch.equal(labels, expected)
    assert (
        idx.unique().numel()
        == idx.numel()
        == min(heads.batch_size_per_image, int((matched_labels != -1).sum()))
    )
