"""eapm/modeling/retinanet.py, EAPMRetinaNet: equality with detectron2's RetinaNet (EAPM off,
classification loss weight 1), training steps, empty images, config validation, EAPM
regression with detectron2's IoU losses; its losses equal ``eapm.losses`` on its own matched
targets with the configured strengths and parameters, and float64 formulas written from the
definitions (values and gradients); its diagnostics equal directly computed values and reach
TensorBoard / metrics.json; Libra RetinaNet and GHM RetinaNet (MODEL.GHM, "ghm_r"); its
configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from eapm.losses import eapm_balanced_l1_loss, eapm_sigmoid_focal_loss
from eapm.utils.testing import repo_cfg
from tests.helpers import (
    CONFIGS,
    DISTINCT_BL1,
    DISTINCT_BL1_OPTS,
    DISTINCT_FOCAL,
    DISTINCT_MU,
    DISTINCT_STRENGTHS,
    DISTINCT_THETA,
    EAPM_TAGS,
    RefGHM,
    build_and_train_step,
    build_for_training,
    check_cls_diagnostics,
    check_reg_diagnostics,
    close_f64,
    close_loss,
    cls_diagnostics_reference,
    differs_loss,
    eapm_bl1_sum,
    eapm_focal_sum,
    eapm_iou_reference,
    ema_first_update,
    event_tags,
    forward_with_histograms,
    grad_norms,
    losses_and_grads,
    make_batch,
    misses_f64,
    record,
    reg_diagnostics_reference,
    spread_box_predictions,
    tiny_cfg,
    train_forward,
    warm_up_focal,
)

RETINA = "quickstart/retinanet.yaml"
EAPM_RETINA = "quickstart/eapm_retinanet.yaml"


def _losses(model, batch, it=0):
    torch.manual_seed(0)
    with EventStorage(it) as storage:
        losses = model(batch)
    return losses, storage


@pytest.mark.parametrize("reg", ["smooth_l1", "giou"])
def test_eapm_off_equals_detectron2_retinanet(reg):
    """EAPM off, MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT 1.0 (explicit), against detectron2's own
    RetinaNet with the same weights on the same batch: the losses of two iterations (the EMA
    normaliser evolves identically too) and the classification loss's gradient in every
    parameter are bitwise equal."""
    cfg = tiny_cfg(
        RETINA,
        "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", reg,
        "MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT", 1.0,
    )  # fmt: skip
    ours = build_for_training(cfg)
    assert ours.cls_loss_weight == 1.0
    cfg_d2 = cfg.clone()
    cfg_d2.MODEL.META_ARCHITECTURE = "RetinaNet"
    theirs = build_for_training(cfg_d2, ours.state_dict())
    assert type(ours).__name__ == "EAPMRetinaNet" and type(theirs).__name__ == "RetinaNet"
    batch = make_batch(2, num_boxes=(3, 2))
    warm_up_focal(cfg, ours.state_dict(), batch, "loss_cls")
    for it in range(2):  # the EMA normaliser evolves identically too
        a, ga = losses_and_grads(ours, batch, "loss_cls")
        b, gb = losses_and_grads(theirs, batch, "loss_cls")
        assert set(a) == set(b) == {"loss_cls", "loss_box_reg"}
        for k in a:
            assert torch.equal(a[k], b[k]), (it, k)
        reached = 0
        for x, y in zip(ga, gb):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x, y), it
                reached += 1
        assert reached > 10


def test_eapm_mu_zero_and_theta_zero_equal_base_losses():
    base = tiny_cfg(EAPM_RETINA, "MODEL.EAPM.CLS.ENABLED", False, "MODEL.EAPM.REG.ENABLED", False)
    zero = tiny_cfg(EAPM_RETINA, "MODEL.EAPM.CLS.MU", 0.0, "MODEL.EAPM.REG.THETA", 0.0)
    m0, m1 = build_model(base), build_model(zero)
    m1.load_state_dict(m0.state_dict())
    batch = make_batch(2, num_boxes=(4, 1))
    a, _ = _losses(m0, batch)
    b, _ = _losses(m1, batch)
    torch.testing.assert_close(a["loss_cls"], b["loss_cls"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a["loss_box_reg"], b["loss_box_reg"], rtol=1e-6, atol=0)
    on = build_model(tiny_cfg(EAPM_RETINA))
    on.load_state_dict(m0.state_dict())
    c, _ = _losses(on, batch)
    assert float(c["loss_cls"]) > float(a["loss_cls"])  # MF >= 1 raises every modulated error
    assert float(c["loss_box_reg"]) >= float(a["loss_box_reg"])


def test_training_step_finite_with_grads_in_head_and_backbone():
    cfg = tiny_cfg(EAPM_RETINA)
    model = build_model(cfg)
    model.train()
    batch = make_batch(2, num_boxes=(5, 3))
    losses, storage = _losses(model, batch)
    assert set(losses) == {"loss_cls", "loss_box_reg"}  # diagnostics never in the loss dict
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    norms = grad_norms(
        model, ["backbone.bottom_up", "backbone.fpn_lateral3", "head.cls_score", "head.bbox_pred"]
    )
    for k, v in norms.items():
        assert v > 0 and math.isfinite(v), (k, v)
    # diagnostics in the event storage
    latest = storage.latest()
    for key in (
        "eapm/cls_dif_pos",
        "eapm/cls_dif_neg",
        "eapm/cls_mf_pos",
        "eapm/cls_mf_neg",
        "eapm/reg_gos",
        "eapm/reg_mf",
    ):
        assert key in latest, key
    assert 1.0 <= latest["eapm/cls_mf_neg"][0] <= 1 + math.tanh(1.5)
    assert 0.0 <= latest["eapm/reg_gos"][0] <= 1.0


def test_histograms_logged_every_period(monkeypatch):
    model = build_model(tiny_cfg(EAPM_RETINA, "MODEL.EAPM.HISTOGRAM_PERIOD", 2))
    batch = make_batch(2, num_boxes=(3,))
    logged = []
    monkeypatch.setattr(
        EventStorage,
        "put_histogram",
        lambda self, tag, values, **kw: logged.append((self.iter, tag, values)),
    )
    for it in (0, 1, 2):
        with EventStorage(it):
            model(batch)
    for it, expected in ((0, True), (1, False), (2, True)):
        names = {tag for i, tag, _ in logged if i == it}
        assert ("eapm/cls_mf_pos" in names) == expected
        assert ("eapm/reg_gos" in names) == expected
    mf = [v for i, tag, v in logged if tag == "eapm/cls_mf_neg"][0]
    assert mf.min() >= 1.0 and mf.max() <= 1.0 + math.tanh(1.5) + 1e-6  # MF's range


@pytest.mark.parametrize("boxes", [(0,), (0, 3)])
def test_images_without_boxes(boxes):
    model = build_model(tiny_cfg(EAPM_RETINA))
    batch = make_batch(2, num_boxes=boxes)
    losses, _ = _losses(model, batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert grad_norms(model, ["head.cls_score"])["head.cls_score"] > 0
    if boxes == (0,):
        assert float(losses["loss_box_reg"]) == 0.0


def test_all_reduce_normaliser_single_process():
    model = build_model(tiny_cfg(EAPM_RETINA, "MODEL.LOSS_NORMALIZER.TYPE", "all_reduce"))
    batch = make_batch(2, num_boxes=(3, 3))
    losses, storage = _losses(model, batch)
    # normaliser = this iteration's positive count (not the EMA starting at 100)
    num_pos = storage.latest()["num_pos_anchors"][0] * 2
    ema = build_model(tiny_cfg(EAPM_RETINA))
    ema.load_state_dict(model.state_dict())
    l2, _ = _losses(ema, batch)
    ratio = float(losses["loss_cls"] / l2["loss_cls"])
    assert abs(ratio - (100 * 0.9 + num_pos * 0.1) / num_pos) < 1e-4


@pytest.mark.parametrize(
    "key,value",
    [
        ("MODEL.EAPM.CLS.MU", -1.0),
        ("MODEL.EAPM.CLS.MU", float("nan")),
        ("MODEL.EAPM.REG.THETA", float("inf")),
        ("MODEL.BALANCED_L1.ALPHA", 0.0),
        ("MODEL.BALANCED_L1.GAMMA", -1.0),
        ("MODEL.BALANCED_L1.BETA", 0.0),
        ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "l2"),
        ("MODEL.LOSS_NORMALIZER.TYPE", "median"),
    ],
)
def test_bad_config_rejected_by_validation(key, value):
    import eapm

    cfg = tiny_cfg(EAPM_RETINA, key, value)
    with pytest.raises(ValueError, match="^Invalid config " + key.replace(".", r"\.")):
        eapm.validate_config(cfg)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"eapm_cls_mu": -1.0}, "eapm_cls_mu"),
        ({"eapm_reg_theta": float("inf")}, "eapm_reg_theta"),
        ({"balanced_l1": (0.5, 0.0, 1.0)}, "gamma"),
        ({"loss_normalizer": "median"}, "loss_normalizer"),
        ({"eapm_reg_theta": 1.0, "box_reg_loss_type": "smooth_l1"}, "balanced_l1"),
    ],
)
def test_constructor_enforces_its_arguments(kwargs, arg):
    """Built from keyword arguments (no config), the model checks them itself."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNet

    from eapm.modeling import EAPMRetinaNet

    base = RetinaNet.from_config(tiny_cfg(EAPM_RETINA))
    base["box_reg_loss_type"] = "balanced_l1"
    with pytest.raises(ValueError, match=arg):
        EAPMRetinaNet(**{**base, **kwargs})
    assert EAPMRetinaNet(**base).eapm_cls_mu == 0.0  # defaults: EAPM off


def test_eapm_reg_requires_balanced_l1_or_an_iou_loss():
    cfg = tiny_cfg(EAPM_RETINA, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "smooth_l1")
    with pytest.raises(
        ValueError,
        match=r"BBOX_REG_LOSS_TYPE\), got 'smooth_l1'|box_reg_loss_type must be one of "
        r"\('balanced_l1', 'giou', 'diou', 'ciou'\)",
    ):
        build_model(cfg)


def _dense_iou_inputs(g):
    """Two images, two levels of anchors; image 0 has two positive anchors (one per level),
    image 1 one; the rest background (label 4) or ignored (-1)."""
    from detectron2.structures import Boxes

    anchors = [
        Boxes(torch.tensor([[0.0, 0, 16, 16], [8, 8, 24, 40], [30, 2, 50, 20]])),
        Boxes(torch.tensor([[0.0, 0, 32, 32], [10, 20, 60, 50]])),
    ]
    gt_labels = [torch.tensor([2, 4, 4, 1, -1]), torch.tensor([4, 0, 4, 4, 4])]
    gt_boxes = [
        torch.tensor([[-3.0, 2, 18, 14], [0, 0, 1, 1], [0, 0, 1, 1], [4, 6, 30, 36], [0, 0, 1, 1]]),
        torch.tensor([[0.0, 0, 1, 1], [5, 10, 30, 45], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]),
    ]
    pred_logits = [torch.randn(2, 3, 4, generator=g), torch.randn(2, 2, 4, generator=g)]
    return anchors, gt_labels, gt_boxes, pred_logits


@pytest.mark.parametrize("loss_type", ["giou", "diou", "ciou"])
def test_eapm_iou_box_loss_is_the_iou_loss_at_the_modulated_deltas(loss_type):
    """MODEL.EAPM.REG with detectron2's IoU losses: the loss is the IoU loss of the boxes
    decoded from t' (dw, dh: t* + MF (t - t*), MF = 1 + tanh(theta) - tanh(theta GoS);
    dx, dy: t) over the positive anchors, divided by the normaliser; the gradient w.r.t. the
    predicted deltas is the IoU loss's gradient at t' (MF not differentiated), zero for the
    other anchors; GoS / MF of dw, dh go to the event storage."""
    theta = 1.0
    cfg = tiny_cfg(
        RETINA,
        "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
        loss_type,
        "MODEL.EAPM.REG.ENABLED",
        True,
        "MODEL.EAPM.REG.THETA",
        theta,
        "MODEL.LOSS_NORMALIZER.TYPE",
        "all_reduce",  # the normaliser is the positive count (3)
    )
    model = build_model(cfg)
    assert model.eapm_reg_theta == theta and model.box_reg_loss_type == loss_type
    g = torch.Generator().manual_seed(0)
    anchors, gt_labels, gt_boxes, pred_logits = _dense_iou_inputs(g)
    all_anchors = torch.cat([a.tensor for a in anchors])
    pos = torch.stack(gt_labels)
    pos = (pos >= 0) & (pos != 4)
    t_star = torch.stack(
        [model.box2box_transform.get_deltas(all_anchors, b) for b in gt_boxes]
    )  # (2, 5, 4)
    # the positives: the target's sign, another magnitude (GoS in (0, 1): MF > 1); others noise
    deltas = torch.randn(2, 5, 4, generator=g) * 0.3
    deltas[pos] = t_star[pos] * torch.tensor([0.5, 1.5, 0.6, 1.7])
    deltas.requires_grad_()
    pred_deltas = [deltas[:, :3], deltas[:, 3:]]
    with EventStorage(0) as storage:
        loss = model.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)["loss_box_reg"]
    loss.backward()

    pos_anchors = all_anchors[None].expand(2, -1, -1)[pos]
    ref = eapm_iou_reference(
        deltas[pos],
        t_star[pos],
        theta,
        pos_anchors,
        torch.stack(gt_boxes)[pos],
        model.box2box_transform,
        loss_type,
    )
    gos, mf = ref["gos"], ref["mf"]
    assert (mf[:, 2:] > 1.05).all()
    torch.testing.assert_close(loss, ref["loss"] / 3, rtol=1e-6, atol=1e-7)
    expected = torch.zeros(2, 5, 4)
    expected[pos] = ref["grad"] / 3
    torch.testing.assert_close(deltas.grad, expected, rtol=1e-5, atol=1e-7)
    # not the plain IoU loss: the modulation changed the value
    assert abs(loss.item() - ref["plain"].item() / 3) > 1e-4
    latest = storage.latest()
    assert latest["eapm/reg_mf"][0] == pytest.approx(mf[:, 2:].mean().item(), rel=1e-6)
    assert latest["eapm/reg_gos"][0] == pytest.approx(gos[:, 2:].mean().item(), rel=1e-6)


def test_eapm_iou_regression_from_the_config():
    """giou + MODEL.EAPM.REG on the quickstart RetinaNet: valid, trains a step with finite
    losses and gradients in the box branch, a different loss_box_reg than plain giou at the
    same weights; theta 0 is detectron2's giou bitwise; images without boxes give 0."""
    import eapm

    opts = ["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "giou", "MODEL.EAPM.REG.ENABLED", "True"]
    eapm.load_config(f"{CONFIGS}/{RETINA}", opts)
    on = build_model(tiny_cfg(RETINA, *opts))
    plain = build_model(tiny_cfg(RETINA, *opts[:2]))
    zero = build_model(tiny_cfg(RETINA, *opts, "MODEL.EAPM.REG.THETA", 0.0))
    plain.load_state_dict(on.state_dict())
    zero.load_state_dict(on.state_dict())
    batch = make_batch(2, num_boxes=(4, 2))
    a, storage = _losses(on, batch)
    b, _ = _losses(plain, batch)
    c, _ = _losses(zero, batch)
    assert all(torch.isfinite(v) for v in a.values())
    assert float(a["loss_box_reg"]) > float(b["loss_box_reg"])  # MF > 1 moves t' away from t*
    torch.testing.assert_close(a["loss_cls"], b["loss_cls"], rtol=0, atol=0)
    torch.testing.assert_close(c["loss_box_reg"], b["loss_box_reg"], rtol=0, atol=0)
    assert storage.latest()["eapm/reg_mf"][0] > 1.0
    sum(a.values()).backward()
    assert grad_norms(on, ["head.bbox_pred"])["head.bbox_pred"] > 0
    empty, _ = _losses(on, make_batch(2, num_boxes=(0,)))
    assert float(empty["loss_box_reg"]) == 0.0 and torch.isfinite(empty["loss_cls"])


def test_inference_is_detectron2_retinanet_inference():
    """EAPM changes training only: with the same weights, inference gives detectron2's
    RetinaNet's detections exactly."""
    cfg = tiny_cfg(EAPM_RETINA, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0)
    ours = build_model(cfg)
    cfg_d2 = tiny_cfg(
        RETINA, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, "MODEL.META_ARCHITECTURE", "RetinaNet"
    )
    theirs = build_model(cfg_d2)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    batch = make_batch(2, num_boxes=(0,))
    with torch.no_grad():
        a, b = ours(batch), theirs(batch)
    assert len(a) == 2
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert 0 < len(x) <= cfg.TEST.DETECTIONS_PER_IMAGE
        torch.testing.assert_close(x.pred_boxes.tensor, y.pred_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(x.scores, y.scores, rtol=0, atol=0)
        assert torch.equal(x.pred_classes, y.pred_classes)
        assert x.pred_classes.max() < cfg.MODEL.RETINANET.NUM_CLASSES


@pytest.mark.parametrize(
    "name,mu",
    [("retinanet_R_50_FPN_1x", None)]
    + [(f"retinanet_R_50_FPN_1x_eapm_mu{m}", m) for m in ("1.0", "1.5", "2.0")],
)
def test_coco_configs_build(name, mu):
    cfg = tiny_cfg(f"COCO-Detection/{name}.yaml")
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.SOLVER.MAX_ITER == 90000
    assert cfg.MODEL.EAPM.CLS.ENABLED == (mu is not None)
    if mu is not None:
        assert cfg.MODEL.EAPM.CLS.MU == float(mu)
    model = build_model(cfg)
    assert model.eapm_cls_mu == (0.0 if mu is None else float(mu))


# ------------------------------------------- losses against eapm.losses and float64 formulas


def test_retinanet_losses_are_eapm_focal_and_balanced_l1_on_its_own_targets():
    cfg = tiny_cfg(
        "quickstart/eapm_retinanet.yaml",
        *DISTINCT_STRENGTHS,
        *DISTINCT_BL1_OPTS,
        "MODEL.RETINANET.FOCAL_LOSS_ALPHA", DISTINCT_FOCAL["alpha"],
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", DISTINCT_FOCAL["gamma"],
        "MODEL.RETINANET.BBOX_REG_WEIGHTS", (1.0, 1.0, 2.0, 2.0),
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    spread_box_predictions(model.head.bbox_pred)
    seen = record(model, "losses")
    batch = make_batch(2, num_boxes=(4, 2))
    out = train_forward(model, batch)
    anchors, pred_logits, gt_labels, pred_deltas, gt_boxes = seen["args"]

    # the targets are those of detectron2's RetinaNet.label_anchors on this batch
    labels_again, boxes_again = model.label_anchors(anchors, [b["instances"] for b in batch])
    for a, b in zip(gt_labels + gt_boxes, labels_again + boxes_again):
        assert torch.equal(a, b)

    k = cfg.MODEL.RETINANET.NUM_CLASSES
    labels = torch.stack(gt_labels)  # (N, R)
    valid = labels >= 0
    pos = valid & (labels != k)
    num_pos = int(pos.sum())
    assert num_pos > 0 and int((labels == -1).sum()) > 0  # positives and ignored anchors
    norm = ema_first_update(100.0, num_pos)
    with torch.no_grad():
        logits = torch.cat(pred_logits, dim=1)[valid]
        onehot = F.one_hot(labels[valid], k + 1)[:, :-1].to(logits.dtype)
        cls = (
            eapm_sigmoid_focal_loss(logits, onehot, DISTINCT_MU, reduction="sum", **DISTINCT_FOCAL)
            / norm
        )
        transform = Box2BoxTransform(weights=(1.0, 1.0, 2.0, 2.0))
        all_anchors = Boxes.cat(anchors).tensor[None].expand(len(batch), -1, -1)
        target = transform.get_deltas(all_anchors[pos], torch.stack(gt_boxes)[pos])
        pred = torch.cat(pred_deltas, dim=1)[pos]
        box = (
            eapm_balanced_l1_loss(pred, target, DISTINCT_THETA, reduction="sum", **DISTINCT_BL1)
            / norm
        )
        # mu and theta swapped
        cls_swapped = eapm_sigmoid_focal_loss(
            logits, onehot, DISTINCT_THETA, reduction="sum", **DISTINCT_FOCAL
        )
        box_swapped = eapm_balanced_l1_loss(
            pred, target, DISTINCT_MU, reduction="sum", **DISTINCT_BL1
        )
    assert set(out) == {"loss_cls", "loss_box_reg"}
    close_loss(out["loss_cls"], cls)
    close_loss(out["loss_box_reg"], box)
    differs_loss(out["loss_cls"], cls_swapped / norm)
    differs_loss(out["loss_box_reg"], box_swapped / norm)


def test_retinanet_eapm_focal_and_balanced_l1_value_and_gradient_float64():
    cfg = tiny_cfg(
        "quickstart/eapm_retinanet.yaml",
        "MODEL.EAPM.CLS.MU", DISTINCT_MU, "MODEL.EAPM.REG.THETA", DISTINCT_THETA,
        "MODEL.BALANCED_L1.ALPHA", DISTINCT_BL1["alpha"],
        "MODEL.BALANCED_L1.GAMMA", DISTINCT_BL1["gamma"],
        "MODEL.BALANCED_L1.BETA", DISTINCT_BL1["beta"],
        "MODEL.RETINANET.FOCAL_LOSS_ALPHA", DISTINCT_FOCAL["alpha"],
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", DISTINCT_FOCAL["gamma"],
        "MODEL.RETINANET.BBOX_REG_WEIGHTS", (1.0, 1.0, 2.0, 2.0),
        # detectron2's thresholds, the inputs this tolerance was set on: at the quickstart's
        # 0.3 / 0.4 one of the 40920 gradient elements (float32 model against float64
        # formulas) differs by 1.01e-5 relative (3e-8 absolute), just over F64_TOL
        "MODEL.RETINANET.IOU_THRESHOLDS", [0.4, 0.5],
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # deltas of order 0.1-1 (detectron2's init gives ~0: GoS ~ 1, MF ~ 1)
        g = torch.Generator().manual_seed(0)
        reg = model.head.bbox_pred
        reg.weight.copy_(torch.randn(reg.weight.shape, generator=g) * 0.02)
        reg.bias.copy_(torch.randn(reg.bias.shape, generator=g) * 0.5)
    seen = record(model, "losses")
    out = train_forward(model, make_batch(2, num_boxes=(4, 2)))
    anchors, pred_logits, gt_labels, pred_deltas, gt_boxes = seen["args"]
    grad_logits = torch.autograd.grad(out["loss_cls"], pred_logits)
    grad_deltas = torch.autograd.grad(out["loss_box_reg"], pred_deltas)

    k = cfg.MODEL.RETINANET.NUM_CLASSES
    labels = torch.stack(gt_labels)  # (N, R): -1 ignored, k background
    valid = labels >= 0
    pos = valid & (labels != k)
    num_pos = int(pos.sum())
    assert num_pos > 0 and int((~valid).sum()) > 0
    # detectron2's normaliser: an EMA of the positive count, at its first update
    norm = 100.0 * 0.9 + 0.1 * max(num_pos, 1)

    logits = torch.cat(pred_logits, dim=1).detach()
    onehot = (labels[..., None] == torch.arange(k)).double()  # background: all zeros
    cls_sum, cls_grad = eapm_focal_sum(logits[valid], onehot[valid], DISTINCT_MU, **DISTINCT_FOCAL)
    want_grad_logits = torch.zeros_like(logits, dtype=torch.float64)
    want_grad_logits[valid] = cls_grad / norm
    close_f64(out["loss_cls"], cls_sum / norm)
    close_f64(torch.cat(grad_logits, dim=1), want_grad_logits)

    transform = Box2BoxTransform(weights=(1.0, 1.0, 2.0, 2.0))
    all_anchors = Boxes.cat(anchors).tensor.double()[None].expand(len(gt_boxes), -1, -1)
    target = transform.get_deltas(all_anchors[pos], torch.stack(gt_boxes).double()[pos])
    deltas = torch.cat(pred_deltas, dim=1).detach()
    box_sum, box_grad = eapm_bl1_sum(deltas[pos], target, DISTINCT_THETA, **DISTINCT_BL1)
    want_grad_deltas = torch.zeros_like(deltas, dtype=torch.float64)
    want_grad_deltas[pos] = box_grad / norm
    close_f64(out["loss_box_reg"], box_sum / norm)
    close_f64(torch.cat(grad_deltas, dim=1), want_grad_deltas)

    # the references can fail: the plain losses (mu = theta = 0) are far off
    misses_f64(
        out["loss_cls"],
        eapm_focal_sum(logits[valid], onehot[valid], 0.0, **DISTINCT_FOCAL)[0] / norm,
    )
    misses_f64(
        out["loss_box_reg"], eapm_bl1_sum(deltas[pos], target, 0.0, **DISTINCT_BL1)[0] / norm
    )
    plain_grad = eapm_focal_sum(logits[valid], onehot[valid], 0.0, **DISTINCT_FOCAL)[1] / norm
    assert not torch.allclose(plain_grad, want_grad_logits[valid], rtol=0.1, atol=0)


# ------------------------------------------------------------------------------- diagnostics


def test_retinanet_diagnostics_equal_direct_values(monkeypatch):
    cfg = tiny_cfg(
        "quickstart/eapm_retinanet.yaml",
        "MODEL.EAPM.CLS.MU", DISTINCT_MU,
        "MODEL.EAPM.REG.THETA", DISTINCT_THETA,
        "MODEL.EAPM.HISTOGRAM_PERIOD", 1,
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    spread_box_predictions(model.head.bbox_pred)
    seen = record(model, "losses")
    storage, hists = forward_with_histograms(model, make_batch(2, num_boxes=(4, 2)), monkeypatch)
    anchors, pred_logits, gt_labels, pred_deltas, gt_boxes = seen["args"]

    k = model.num_classes
    labels = torch.stack(gt_labels)
    valid = labels >= 0
    assert int((~valid).sum()) > 0  # ignored anchors exist and must be left out
    logits = torch.cat(pred_logits, dim=1)[valid]
    onehot = F.one_hot(labels[valid], k + 1)[:, :-1]
    check_cls_diagnostics(storage, hists, cls_diagnostics_reference(logits, onehot, DISTINCT_MU))

    pos = valid & (labels != k)
    transform = Box2BoxTransform(weights=cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS)
    all_anchors = Boxes.cat(anchors).tensor[None].expand(len(gt_labels), -1, -1)
    target = transform.get_deltas(all_anchors[pos], torch.stack(gt_boxes)[pos])
    pred = torch.cat(pred_deltas, dim=1)[pos]
    check_reg_diagnostics(storage, hists, *reg_diagnostics_reference(pred, target, DISTINCT_THETA))


@pytest.mark.parametrize("period", [0, 1])
def test_eapm_histograms_reach_tensorboard_scalars_reach_metrics_json(tmp_path, period):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage, JSONWriter, TensorboardXWriter

    cfg = tiny_cfg("quickstart/eapm_retinanet.yaml", "MODEL.EAPM.HISTOGRAM_PERIOD", period)
    model = build_model(cfg)
    model.train()
    torch.manual_seed(0)
    tb = TensorboardXWriter(str(tmp_path))
    js = JSONWriter(str(tmp_path / "metrics.json"))
    with EventStorage(0) as storage:
        for it in range(2):
            storage.iter = it
            sum(model(make_batch(2, num_boxes=(3, 2), seed=it)).values()).backward()
            storage.step()
        tb.write()
        js.write()
    tb.close()
    js.close()
    tags = event_tags(tmp_path)
    hist = {t for t, plugin in tags if plugin == "histograms"}
    scalars = {t for t, plugin in tags if plugin == "scalars"}
    assert set(EAPM_TAGS) <= scalars
    assert hist == (set(EAPM_TAGS) if period else set())
    # metrics.json takes the scalars only (detectron2's JSONWriter ignores histograms)
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert all(k in lines[-1] for k in EAPM_TAGS)
    assert all(isinstance(v, (int, float)) for line in lines for v in line.values())


# ----------------------------------- Libra RetinaNet (balanced feature pyramid, balanced L1)


def test_libra_retinanet_eapm_train_step(storage):
    path = "COCO-Detection/libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0.yaml"
    cfg = tiny_cfg(path, "MODEL.RETINANET.NUM_CLASSES", 4)
    model, losses = build_and_train_step(cfg, make_batch(num_boxes=(3, 0)))
    assert set(losses) == {"loss_cls", "loss_box_reg"} and losses["loss_box_reg"].item() > 0
    assert model.backbone.refine.conv_out.weight.grad.abs().sum() > 0
    g = grad_norms(model, ["backbone.refine", "backbone.fpn.bottom_up", "head.bbox_pred"])
    assert all(v > 0 for v in g.values()), g
    latest = storage.latest()
    assert "eapm/reg_gos" in latest and "eapm/cls_mf_pos" in latest


# -------------------------------------------------------- GHM RetinaNet (MODEL.GHM, "ghm_r")


GHM_OPTS = ("MODEL.GHM.CLS.ENABLED", True, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r")


def ghm_model(*opts, config="quickstart/retinanet.yaml"):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(tiny_cfg(config, *opts))
    model.train()
    return model


@pytest.mark.parametrize(
    "path, value, text",
    [
        # values a Python script can put in a config past yacs's type check; int() / bool()
        # in from_config used to turn them into 2 bins and a True flag
        (("GHM", "CLS", "BINS"), 2.5, "GHM bins must be an integer >= 1"),
        (("GHM", "PER_LEVEL"), "False", "ghm_per_level must be True or False"),
        (("GHM", "ALL_REDUCE"), 1, "ghm_all_reduce must be True or False"),
        (("EAPM", "COMPILE"), "no", "compile_kernels must be True or False"),
    ],
)
def test_retinanet_from_config_passes_values_to_the_constructors_rules(path, value, text):
    cfg = tiny_cfg("quickstart/retinanet.yaml", "MODEL.GHM.CLS.ENABLED", True)
    node = cfg.MODEL
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=text):
        build_model(cfg)


def test_ghm_retinanet_losses_match_per_level_reference():
    """EAPMRetinaNet.losses with GHM on synthetic anchors: loss_cls = sum over the levels of
    GHM-C on that level's anchors x classes (ignored anchors invalid), loss_box_reg = 10 x
    sum over the levels of GHM-R on that level's positive deltas; not divided by the
    positive-anchor normaliser; both modules' states updated level by level."""
    from detectron2.structures import Boxes
    from detectron2.utils.events import EventStorage

    model = ghm_model(*GHM_OPTS)
    K = model.num_classes
    g = torch.Generator().manual_seed(0)
    sizes = [7, 4]
    anchors = []
    for n in sizes:
        xy = torch.rand(n, 2, generator=g) * 40
        anchors.append(Boxes(torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 20], 1)))
    N, R = 2, sum(sizes)
    labels = torch.randint(-1, K + 1, (N, R), generator=g)
    labels[0, 0], labels[1, 8] = 1, 2  # positives on both levels
    xy = torch.rand(N, R, 2, generator=g) * 40
    gt_boxes = torch.cat([xy, xy + 5 + torch.rand(N, R, 2, generator=g) * 30], 2)
    logits = torch.randn(N, R, K, generator=g, dtype=torch.float64).float().requires_grad_()
    deltas = (torch.randn(N, R, 4, generator=g) * 0.3).requires_grad_()
    split = lambda t: list(t.split(sizes, dim=1))  # noqa: E731
    with EventStorage():
        out = model.losses(anchors, split(logits), list(labels), split(deltas), list(gt_boxes))
    assert set(out) == {"loss_cls", "loss_box_reg"}

    ref_c, ref_r = RefGHM(30, 0.75), RefGHM(10, 0.7, last=1e3)
    want_c = want_r = 0.0
    start = 0
    for lvl, n in enumerate(sizes):
        lab = labels[:, start : start + n]
        valid = (lab >= 0)[..., None].expand(-1, -1, K)
        tgt = torch.nn.functional.one_hot(lab.clamp(min=0), K + 1)[..., :K].float()
        tgt[lab < 0] = 0
        want_c += ref_c.ghmc(
            logits[:, start : start + n].detach().double().flatten().tolist(),
            tgt.flatten().tolist(),
            valid.flatten().tolist(),
        )[0]
        pos = (lab >= 0) & (lab != K)
        anc = anchors[lvl].tensor[None].expand(N, -1, -1)[pos]
        gtd = model.box2box_transform.get_deltas(anc, gt_boxes[:, start : start + n][pos])
        pred = deltas[:, start : start + n][pos].detach()
        want_r += ref_r.ghmr(
            pred.double().flatten().tolist(),
            gtd.double().flatten().tolist(),
            [True] * pred.numel(),
            0.02,
        )[0]
        start += n
    assert out["loss_cls"].item() == pytest.approx(want_c, rel=1e-4)
    assert out["loss_box_reg"].item() == pytest.approx(10 * want_r, rel=1e-4)
    np.testing.assert_allclose(model.ghm_cls.acc_sum.numpy(), ref_c.acc, rtol=1e-5)
    np.testing.assert_allclose(model.ghm_reg.acc_sum.numpy(), ref_r.acc, rtol=1e-5)


def test_ghm_retinanet_training_step_on_cpu():
    from detectron2.utils.events import EventStorage

    from eapm.utils.testing import grad_norms

    model = ghm_model(*GHM_OPTS)
    assert type(model.ghm_cls).__name__ == "GHMC" and type(model.ghm_reg).__name__ == "GHMR"
    with EventStorage():
        losses = model(make_batch(2, 64, num_boxes=(3, 0)))
        assert set(losses) == {"loss_cls", "loss_box_reg"}
        assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
        sum(losses.values()).backward()
    norms = grad_norms(model, ["head.cls_score", "head.bbox_pred", "backbone"])
    assert all(math.isfinite(v) and v > 0 for v in norms.values()), norms
    assert model.ghm_cls.acc_sum.sum() > 0 and model.ghm_reg.acc_sum.sum() > 0


def test_ghm_retinanet_batch_without_boxes():
    from detectron2.utils.events import EventStorage

    model = ghm_model(*GHM_OPTS)
    with EventStorage():
        losses = model(make_batch(2, 64, num_boxes=(0,)))
        assert losses["loss_box_reg"].item() == 0.0 and torch.isfinite(losses["loss_cls"])
        sum(losses.values()).backward()


def test_ghm_state_survives_checkpoint(tmp_path):
    """The moving averages are in the model's state_dict: saved by detectron2's
    DetectionCheckpointer, restored by loading; the next step is the same."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    model = ghm_model(*GHM_OPTS)
    batch = make_batch(2, 64, num_boxes=(3, 2))
    with EventStorage():
        for _ in range(2):
            model(batch)
    assert {"ghm_cls.acc_sum", "ghm_reg.acc_sum"} <= set(model.state_dict())
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_x")
    fresh = ghm_model(*GHM_OPTS)
    assert fresh.ghm_cls.acc_sum.sum() == 0
    DetectionCheckpointer(fresh).load(str(tmp_path / "model_x.pth"))
    torch.testing.assert_close(fresh.ghm_cls.acc_sum, model.ghm_cls.acc_sum, rtol=0, atol=0)
    torch.testing.assert_close(fresh.ghm_reg.acc_sum, model.ghm_reg.acc_sum, rtol=0, atol=0)
    with EventStorage():
        a, b = model(batch), fresh(batch)
    for k in a:
        assert a[k].item() == b[k].item(), k
    torch.testing.assert_close(fresh.ghm_cls.acc_sum, model.ghm_cls.acc_sum, rtol=0, atol=0)
    # without the restored state the loss differs (the test can fail)
    other = ghm_model(*GHM_OPTS)
    with EventStorage():
        assert other(batch)["loss_cls"].item() != a["loss_cls"].item()


def test_ghm_off_builds_no_ghm_module_and_each_loss_alone():
    plain = ghm_model()
    assert plain.ghm_cls is None and plain.ghm_reg is None
    assert not any("ghm" in k for k in plain.state_dict())
    only_c = ghm_model("MODEL.GHM.CLS.ENABLED", True)
    assert only_c.ghm_cls is not None and only_c.ghm_reg is None
    only_r = ghm_model("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r")
    assert only_r.ghm_cls is None and only_r.ghm_reg is not None
    assert (only_r.ghm_reg.mu, only_r.ghm_reg.bins, only_r.ghm_reg.momentum) == (0.02, 10, 0.7)
    assert (only_c.ghm_cls.bins, only_c.ghm_cls.momentum) == (30, 0.75)
    assert only_r.ghm_reg_loss_weight == 10.0 and not only_r.ghm_reg.all_reduce


@pytest.mark.parametrize(
    "opts,key,config",
    [
        # (a value is checked where it is used: GHM-C's with GHM-C on, GHM-R's with ghm_r)
        (
            ("MODEL.GHM.CLS.ENABLED", True, "MODEL.GHM.CLS.BINS", 0),
            "MODEL.GHM.CLS.BINS",
            "retinanet",
        ),
        (
            ("MODEL.GHM.CLS.ENABLED", True, "MODEL.GHM.CLS.MOMENTUM", 1.0),
            "MODEL.GHM.CLS.MOMENTUM",
            "retinanet",
        ),
        (
            ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r", "MODEL.GHM.REG.MU", 0.0),
            "MODEL.GHM.REG.MU",
            "retinanet",
        ),
        (
            ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r", "MODEL.GHM.REG.BINS", -1),
            "MODEL.GHM.REG.BINS",
            "retinanet",
        ),
        (("MODEL.GHM.REG.LOSS_WEIGHT", -1.0), "MODEL.GHM.REG.LOSS_WEIGHT", "retinanet"),
        (
            ("MODEL.GHM.CLS.ENABLED", True, "MODEL.EAPM.CLS.ENABLED", True),
            "MODEL.GHM.CLS.ENABLED",
            "retinanet",
        ),
        (
            ("MODEL.GHM.CLS.ENABLED", True, "MODEL.META_ARCHITECTURE", "RetinaNet"),
            "MODEL.GHM.CLS.ENABLED",
            "retinanet",
        ),
        (
            ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r", "MODEL.META_ARCHITECTURE", "RetinaNet"),
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
            "retinanet",
        ),
        (
            ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r", "MODEL.EAPM.REG.ENABLED", True),
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
            "retinanet",
        ),
        (("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "ghm_r"), "MODEL.ROI_BOX_HEAD", "faster_rcnn"),
    ],
)
def test_bad_ghm_config_names_the_key(opts, key, config):
    import eapm

    cfg = tiny_cfg(f"quickstart/{config}.yaml", *opts)
    with pytest.raises(ValueError, match="Invalid config " + key.replace(".", r"\.")):
        eapm.validate_config(cfg)


def test_ghm_on_fcos_is_rejected_and_constructor_checks():
    from detectron2.modeling import build_model

    import eapm

    cfg = tiny_cfg("quickstart/fcos.yaml", "MODEL.GHM.CLS.ENABLED", True)
    with pytest.raises(
        ValueError, match=r"Invalid config MODEL\.GHM\.CLS\.ENABLED = True: no class .* reads"
    ):
        eapm.validate_config(cfg)
    # the constructor checks its own arguments (no validate_config)
    cfg = tiny_cfg("quickstart/retinanet.yaml", *GHM_OPTS, "MODEL.EAPM.CLS.ENABLED", True)
    with pytest.raises(ValueError, match="eapm_cls_mu 0"):
        build_model(cfg)
    cfg = tiny_cfg("quickstart/retinanet.yaml", *GHM_OPTS, "MODEL.GHM.CLS.BINS", 0)
    with pytest.raises(ValueError, match="bins"):
        build_model(cfg)


# -------------------------------------------------------------- mixed precision, determinism


def test_eapm_retinanet_under_bf16_autocast(one_thread):
    """Forward + backward of EAPMRetinaNet (EAPM focal + EAPM balanced L1) under CPU
    bf16 autocast: the head's outputs are bf16, the losses float32 and finite, every
    parameter's gradient finite, non-zero in head and backbone, the losses close to float32's.

    The images are 128 px, not 64: at 64 px P7's conv (3x3, stride 2, padding 1) gets a
    1x1 input, and for a bf16 convolution whose input is 1 px wide with stride 2 the
    backward-weights kernel of oneDNN 3.3.6 (torch 2.3.1, AVX-512 CPUs: ``jit_bf16:
    avx512_core_bf16``) leaves the padding columns' weight gradients uninitialised: P7's
    gradient then held whatever memory oneDNN read (non-finite in some runs, whatever the
    test order or seed). At 128 px every stride-2 convolution sees at least 2 px."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)  # the initial weights; the batch has its own generator
    # the all-reduced normaliser (= this batch's positive count on one process) is stateless,
    # unlike the EMA: both forward passes are divided by the same number
    model = build_model(
        tiny_cfg("quickstart/eapm_retinanet.yaml", "MODEL.LOSS_NORMALIZER.TYPE", "all_reduce")
    )
    batch = make_batch(2, size=128, num_boxes=(3, 1))
    dtypes = []
    model.head.register_forward_hook(lambda m, i, o: dtypes.append(o[0][0].dtype))
    with EventStorage(0):
        ref = {k: float(v) for k, v in model(batch).items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(batch)
    assert dtypes == [torch.float32, torch.bfloat16]
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    for k, v in losses.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
        assert float(v) == pytest.approx(ref[k], rel=0.25), k
    sum(losses.values()).backward()
    norms = grad_norms(
        model, ["head.cls_score", "head.bbox_pred", "head.cls_subnet", "backbone.bottom_up"]
    )
    for k, n in norms.items():
        assert math.isfinite(n) and n > 0, (k, n)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == sum(1 for p in model.parameters() if p.requires_grad)
    assert [n for n, g in grads.items() if not torch.isfinite(g).all()] == []


def test_same_seed_same_first_losses(one_thread):
    """Two model builds with the same seed (detectron2's seed_all_rng) give bit-identical
    losses and gradients on the same batch; another seed gives other losses."""
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    cfg = tiny_cfg("quickstart/eapm_retinanet.yaml")
    batch = make_batch(2, num_boxes=(3, 1))

    def run(seed):
        seed_all_rng(seed)
        model = build_model(cfg)
        with EventStorage(0):
            losses = model(batch)
        sum(losses.values()).backward()
        return {k: v.item() for k, v in losses.items()}, [
            p.grad.clone() for p in model.parameters() if p.grad is not None
        ]

    (a, ga), (b, gb), (c, _) = run(1), run(1), run(2)
    assert a == b
    assert len(ga) == len(gb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert a != c


# ----------------------------------------------------------- the quickstart recipe's configs


def test_recipe_0_3_config_is_the_recipe_before_0_4():
    """configs/quickstart/eapm_retinanet_0.3.yaml rebuilds the quickstart model of 0.3
    (detectron2's R-18 at width 64, contiguous memory, one loader worker) and the 0.4 / 0.5
    recipe (eapm_retinanet_0.5.yaml) is a narrower network in channels-last, loading in the main
    process; the rest (data, losses, schedule) is the same."""
    from detectron2.modeling import build_model

    old = repo_cfg("quickstart/eapm_retinanet_0.3.yaml", "MODEL.EAPM.COMPILE", False)
    new = repo_cfg("quickstart/eapm_retinanet_0.5.yaml", "MODEL.EAPM.COMPILE", False)
    assert old.MODEL.BACKBONE.NAME == "build_retinanet_resnet_fpn_backbone"
    assert not old.MODEL.CHANNELS_LAST and new.MODEL.CHANNELS_LAST
    assert new.MODEL.BACKBONE.NAME == "build_retinanet_slim_resnet_fpn_backbone"
    torch.manual_seed(0)
    n_old = sum(p.numel() for p in build_model(old).parameters())
    n_new = sum(p.numel() for p in build_model(new).parameters())
    assert n_new < n_old / 2
    for key in ("SOLVER", "DATASETS", "INPUT", "SEED"):
        assert old[key] == new[key], key
    assert (new.SOLVER.MAX_ITER, new.SOLVER.STEPS, new.SOLVER.WARMUP_ITERS) == (
        1000,
        (750, 900),
        50,
    )
    # the batches do not depend on the number of workers (exactly resumable loader)
    assert old.DATALOADER.NUM_WORKERS == 1 and new.DATALOADER.NUM_WORKERS == 0
    assert new.DATALOADER.EXACT_RESUME
    old.DATALOADER.NUM_WORKERS = new.DATALOADER.NUM_WORKERS
    assert old.DATALOADER == new.DATALOADER
    assert old.MODEL.EAPM == new.MODEL.EAPM and old.MODEL.RETINANET == new.MODEL.RETINANET
    assert old.MODEL.ANCHOR_GENERATOR == new.MODEL.ANCHOR_GENERATOR


def test_recipe_0_5_config_is_the_recipe_before_the_p2_head():
    """eapm_retinanet_0.5.yaml is the quickstart with the head (two convs per tower) on P3-P7
    (RetinaNet's FPN, P6 and P7 from res5), detectron2's IoU thresholds 0.4 / 0.5 and learning
    rate 0.002 for 1000 iterations; the quickstart's head (one conv per tower) reads P2-P6 (the
    R-CNN FPN on the same ResNet, P6 max-pooled), matches at 0.3 / 0.4 and trains at 0.003 for
    620. Nothing else differs; the baseline is the same network; the LazyConfig twin follows the
    quickstart."""
    from detectron2.config import LazyConfig

    from eapm.utils.testing import get_config_file

    old = repo_cfg("quickstart/eapm_retinanet_0.5.yaml")
    new = repo_cfg("quickstart/eapm_retinanet.yaml")
    base = repo_cfg("quickstart/retinanet.yaml")
    assert new.MODEL.BACKBONE.NAME == base.MODEL.BACKBONE.NAME == "build_slim_resnet_fpn_backbone"
    assert new.MODEL.RETINANET.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]
    assert old.MODEL.RETINANET.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"]
    assert new.MODEL.RESNETS.OUT_FEATURES == new.MODEL.FPN.IN_FEATURES == [
        "res2", "res3", "res4", "res5"
    ]  # fmt: skip
    assert (new.SOLVER.MAX_ITER, new.SOLVER.STEPS, new.SOLVER.WARMUP_ITERS) == (620, (465, 558), 31)
    assert (old.SOLVER.MAX_ITER, old.SOLVER.STEPS) == (1000, (750, 900))
    assert old.SOLVER.WARMUP_ITERS == 50
    assert (new.MODEL.RETINANET.NUM_CONVS, old.MODEL.RETINANET.NUM_CONVS) == (1, 2)
    assert (new.MODEL.RETINANET.IOU_THRESHOLDS, old.MODEL.RETINANET.IOU_THRESHOLDS) == (
        [0.3, 0.4], [0.4, 0.5]
    )  # fmt: skip
    assert (new.SOLVER.BASE_LR, old.SOLVER.BASE_LR) == (0.003, 0.002)
    changed = {
        "MODEL.BACKBONE.NAME", "MODEL.RESNETS.OUT_FEATURES", "MODEL.FPN.IN_FEATURES",
        "MODEL.RETINANET.IN_FEATURES", "MODEL.RETINANET.NUM_CONVS",
        "MODEL.RETINANET.IOU_THRESHOLDS", "SOLVER.BASE_LR", "SOLVER.MAX_ITER", "SOLVER.STEPS",
        "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD", "OUTPUT_DIR",
    }  # fmt: skip

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            if hasattr(v, "items"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    assert {k for k in a if a[k] != b[k]} == changed
    lazy = LazyConfig.load(get_config_file("quickstart/eapm_retinanet.py"))
    assert lazy.train.channels_last is True
    assert lazy.dataloader.train.num_workers == new.DATALOADER.NUM_WORKERS
    assert lazy.model.head_in_features == new.MODEL.RETINANET.IN_FEATURES
    assert lazy.model.backbone.in_features == new.MODEL.FPN.IN_FEATURES
    assert lazy.model.anchor_generator.strides == [4, 8, 16, 32, 64]
    assert lazy.model.head.conv_dims == [64] * new.MODEL.RETINANET.NUM_CONVS
    assert lazy.train.max_iter == new.SOLVER.MAX_ITER
    assert lazy.model.anchor_matcher.thresholds == new.MODEL.RETINANET.IOU_THRESHOLDS
    assert lazy.optimizer.lr == new.SOLVER.BASE_LR
    sched = lazy.lr_multiplier
    assert sched.scheduler.milestones == list(new.SOLVER.STEPS)
    assert sched.warmup_length * new.SOLVER.MAX_ITER == new.SOLVER.WARMUP_ITERS
    stages = lazy.model.backbone.bottom_up.stages
    assert (stages.stem_channels, stages.res2_channels) == (
        new.MODEL.RESNETS.STEM_OUT_CHANNELS,
        new.MODEL.RESNETS.RES2_OUT_CHANNELS,
    )
