"""eapm/modeling/rpn.py: EAPMRPN, EAPM binary cross entropy on the RPN objectness at its own
mu (MODEL.EAPM.RPN.MU), against a float64 formula; the key needs the EAPM RPN; non-finite
features. (The RPN's bitwise equality with detectron2's at mu 0, its diagnostics and its loss in
a Faster R-CNN training step are checked with the ROI heads, test_roi_heads.py.)"""

from __future__ import annotations

import math
import os

import pytest
import torch
from detectron2.layers import cat
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import eapm
from tests.helpers import (
    CLS_MU,
    CONFIGS,
    RPN_MU,
    RPN_OPTS,
    close_f64,
    eapm_focal_sum,
    eapm_mask_rcnn,
    filled_features,
    load_config_raises,
    misses_f64,
    tanh_mf,
)


def test_eapm_rpn_objectness_loss_at_the_rpn_mu_float64(two_stage_step):
    """loss_rpn_cls is EAPM binary cross entropy at MODEL.EAPM.RPN.MU (0.7, not the ROI
    heads' MODEL.EAPM.CLS.MU 2.0) over the sampled anchors, summed and divided by
    RPN.BATCH_SIZE_PER_IMAGE x images; its gradient w.r.t. the objectness logits is the
    BCE gradient at the modulated logit, 0 for anchors not sampled."""
    cfg, out = two_stage_step["cfg"], two_stage_step["out"]
    labels = torch.stack(two_stage_step["gt_labels"])  # (N, A): 1, 0, -1 (not sampled)
    sampled = labels >= 0
    assert int((labels == 1).sum()) > 0 and int((labels == 0).sum()) > 0
    assert int((~sampled).sum()) > 0
    norm = cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE * labels.shape[0]
    logits = cat(two_stage_step["logits"], dim=1)
    x, t = logits[sampled].double(), labels[sampled].double()

    value, grad = eapm_focal_sum(x, t, RPN_MU, alpha=-1.0, gamma=0.0)  # BCE: gamma 0, no alpha
    # the BCE gradient at x' is sigmoid(x') - t = MF (p - t): the same in closed form
    p = torch.sigmoid(x)
    torch.testing.assert_close(grad, tanh_mf((p - t).abs(), RPN_MU) * (p - t))
    want_grad = torch.zeros_like(logits, dtype=torch.float64)
    want_grad[sampled] = grad / norm
    close_f64(out["loss_rpn_cls"], value / norm)
    close_f64(cat(two_stage_step["grad_logits"], dim=1), want_grad)
    # the value at the classification mu is far off: the RPN reads its own strength
    at_cls_mu = eapm_focal_sum(x, t, CLS_MU, alpha=-1.0, gamma=0.0)[0] / norm
    misses_f64(out["loss_rpn_cls"], at_cls_mu)


def test_eapm_rpn_needs_an_eapm_rpn_naming_the_key():
    load_config_raises(
        "quickstart/faster_rcnn_eapm_mu1.5.yaml",
        ["MODEL.EAPM.RPN.ENABLED", "True"],
        r"^Invalid config MODEL\.EAPM\.RPN\.ENABLED = True: no class of this model reads "
        r"MODEL\.EAPM\.RPN\.ENABLED \(.*MODEL\.PROPOSAL_GENERATOR\.NAME 'RPN'.*\): it would "
        r"train without it; use MODEL\.PROPOSAL_GENERATOR\.NAME 'EAPMRPN' \(or a subclass\)",
    )
    load_config_raises(
        "quickstart/retinanet.yaml",
        ["MODEL.EAPM.RPN.ENABLED", "True"],
        r"^Invalid config MODEL\.EAPM\.RPN\.ENABLED = True: no class of this model reads "
        r"MODEL\.EAPM\.RPN\.ENABLED \(MODEL\.META_ARCHITECTURE 'EAPMRetinaNet'",
    )
    cfg = eapm.load_config(
        os.path.join(CONFIGS, "quickstart/faster_rcnn.yaml"), [str(v) for v in RPN_OPTS]
    )
    assert cfg.MODEL.EAPM.RPN.ENABLED


@pytest.mark.parametrize("fill", [math.inf, math.nan], ids=["inf", "nan"])
def test_eapm_rpn_inf_nan_data(fill):
    model = eapm_mask_rcnn()
    images, feats = filled_features(model, fill)
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
