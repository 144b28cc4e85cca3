"""EAPMRetinaNet: equality with detectron2's RetinaNet, training steps, empty images,
config validation, diagnostics."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tests.helpers import grad_norms, make_batch, tiny_cfg

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


def test_eapm_reg_requires_balanced_l1():
    cfg = tiny_cfg(EAPM_RETINA, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "smooth_l1")
    with pytest.raises(ValueError, match="BBOX_REG_LOSS_TYPE"):
        build_model(cfg)


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
