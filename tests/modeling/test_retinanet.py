"""EAPMRetinaNet: equality with detectron2's RetinaNet, training steps, empty images,
config validation, diagnostics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tests.helpers import (
    CONFIGS,
    EAPM_TAGS,
    eapm_iou_reference,
    event_tags,
    grad_norms,
    make_batch,
    tiny_cfg,
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
    cfg = tiny_cfg(RETINA, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", reg)
    ours = build_model(cfg)
    cfg_d2 = cfg.clone()
    cfg_d2.MODEL.META_ARCHITECTURE = "RetinaNet"
    theirs = build_model(cfg_d2)
    assert type(ours).__name__ == "EAPMRetinaNet" and type(theirs).__name__ == "RetinaNet"
    theirs.load_state_dict(ours.state_dict())
    ours.train(), theirs.train()
    batch = make_batch(2, num_boxes=(3, 2))
    for it in range(2):  # the EMA normaliser evolves identically too
        a, _ = _losses(ours, batch, it)
        b, _ = _losses(theirs, batch, it)
        assert set(a) == set(b) == {"loss_cls", "loss_box_reg"}
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


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


# ---------------------------------------------------------------------------- diagnostics
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
