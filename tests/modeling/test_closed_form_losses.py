"""The detectors' EAPM losses, value AND gradient, against independent float64 formulas.

``test_loss_targets.py`` checks that each detector feeds its own matched targets and its
configured strengths to ``eapm.losses``; its expected values come from ``eapm.losses`` itself,
so a wrong loss function (or a wrong gradient: those tests compare values only) passes there.
Here the targets, anchors and sampled ROIs are still the model's own (recorded at its loss
method, with the head's raw outputs), but the loss math is written out below in float64 from
the definitions, not taken from the package:

* classification: Dif = |p - p*|, MF = 1 + tanh(mu) - tanh(mu Dif), the base loss evaluated at
  p' = p* + MF (p - p*); its gradient w.r.t. the logit is the base loss's gradient at the
  modulated logit x' = logit(p') (MF not differentiated). The base loss is written as a
  function of x' and differentiated by float64 autograd at x'.
* regression: GoS = |t - t*| / (|t| + |t*|) for dw, dh only, MF = 1 + tanh(theta) -
  tanh(theta GoS), balanced L1 (mmdetection's formula) at t' = t* + MF (t - t*), gradient
  the balanced L1 gradient at t'; dx, dy unmodulated.

The gradients compared are those reaching the head's raw outputs (RetinaNet's per-level
logits and deltas, the RPN's per-level objectness logits, the ROI predictor's class scores),
through the whole loss method: normaliser, masks and loss weights included.

The two-stage model has different RPN and ROI strengths (0.7 and 2.0): a model that read one
for the other misses the closed form, which the tests also show."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import cat
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from tests.helpers import make_batch, record, tiny_cfg

RPN_MU, CLS_MU = 0.7, 2.0
MU, THETA = 1.3, 0.7
FOCAL = dict(alpha=0.3, gamma=1.7)
BL1 = dict(alpha=0.4, gamma=1.8, beta=0.6)
# float32 kernels against float64: relative 1e-5; the gradients per element are ~1e-7 (a loss
# divided by ~100 positives), hence an absolute floor far below them
TIGHT = dict(rtol=1e-5, atol=1e-12)


# ------------------------------------------------------------------ float64 references
def tanh_mf(attribute: torch.Tensor, strength: float) -> torch.Tensor:
    return 1 + math.tanh(strength) - torch.tanh(strength * attribute)


def modulated_logit(x: torch.Tensor, t: torch.Tensor, mu: float) -> torch.Tensor:
    """x' = logit(p'), p' = t + MF (p - t), Dif = |p - t| (float64 ``x``, ``t`` in {0, 1})."""
    p = torch.sigmoid(x)
    pm = t + tanh_mf((p - t).abs(), mu) * (p - t)
    return torch.log(pm) - torch.log1p(-pm)


def focal_of_logit(z: torch.Tensor, t: torch.Tensor, alpha: float, gamma: float):
    """Lin et al.'s focal loss per element as a function of the logit ``z``: -alpha_t (1 -
    p_t)^gamma log p_t (alpha < 0: no alpha_t)."""
    p = torch.sigmoid(z)
    p_t = torch.where(t > 0.5, p, 1 - p)
    a_t = 1.0 if alpha < 0 else alpha * t + (1 - alpha) * (1 - t)  # t in {0, 1}
    return -a_t * (1 - p_t) ** gamma * torch.log(p_t)


def eapm_focal_sum(x: torch.Tensor, t: torch.Tensor, mu: float, alpha: float, gamma: float):
    """(summed EAPM focal loss, its gradient w.r.t. x) in float64: the focal loss at the
    modulated logit and its derivative there."""
    xm = modulated_logit(x.double(), t.double(), mu).requires_grad_()
    value = focal_of_logit(xm, t.double(), alpha, gamma).sum()
    (grad,) = torch.autograd.grad(value, xm)
    return value.detach(), grad


def balanced_l1_of_error(d: torch.Tensor, alpha: float, gamma: float, beta: float):
    """mmdetection's balanced L1 of the error ``d`` (b = e^(gamma / alpha) - 1): alpha / b (b
    |d| + 1) ln(b |d| / beta + 1) - alpha |d| below beta, gamma |d| + gamma / b - alpha beta
    above."""
    b = math.exp(gamma / alpha) - 1
    a = d.abs()
    inlier = alpha / b * (b * a + 1) * torch.log(b * a / beta + 1) - alpha * a
    return torch.where(a < beta, inlier, gamma * a + gamma / b - alpha * beta)


def eapm_bl1_sum(t: torch.Tensor, t_star: torch.Tensor, theta: float, **bl1):
    """(summed EAPM balanced L1, its gradient w.r.t. t) of (P, 4) deltas in float64: dw, dh
    at t* + MF (t - t*), MF from GoS; dx, dy as predicted."""
    t, t_star = t.double(), t_star.double()
    gos = (t - t_star).abs() / (t.abs() + t_star.abs())
    mf = tanh_mf(gos, theta)
    mf[:, :2] = 1.0
    tm = (t_star + mf * (t - t_star)).requires_grad_()
    value = balanced_l1_of_error(tm - t_star, **bl1).sum()
    (grad,) = torch.autograd.grad(value, tm)
    return value.detach(), grad


def eapm_ce_mean(scores: torch.Tensor, labels: torch.Tensor, mu: float):
    """(mean EAPM softmax cross entropy, its gradient w.r.t. the scores) in float64: per row
    Dif = 1 - p_y, p' = Y + MF (p - Y), the cross entropy -log softmax(x')_y at the logits
    x' = log p' (softmax(x') = p'), its gradient there; the mean over the rows."""
    x = scores.double()
    p = torch.softmax(x, dim=1)
    y = F.one_hot(labels, x.shape[1]).double()
    dif = 1 - (p * y).sum(1)
    pm = y + tanh_mf(dif, mu)[:, None] * (p - y)
    xm = torch.log(pm).requires_grad_()
    value = -(torch.log_softmax(xm, dim=1) * y).sum(1).mean()
    (grad,) = torch.autograd.grad(value, xm)
    return value.detach(), grad


def _close(actual, expected):
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), **TIGHT)


def _misses(actual, wrong):
    """``wrong`` is far outside the tolerance of ``_close`` (the test can fail)."""
    a, w = float(actual), float(wrong)
    assert abs(a - w) > 100 * (TIGHT["atol"] + TIGHT["rtol"] * abs(w)), (a, w)


def _train_forward(model, batch):
    model.train()
    torch.manual_seed(0)
    with EventStorage(0):
        return model(batch)


# ------------------------------------------------------------------ RetinaNet
def test_retinanet_eapm_focal_and_balanced_l1_value_and_gradient_float64():
    cfg = tiny_cfg(
        "quickstart/eapm_retinanet.yaml",
        "MODEL.EAPM.CLS.MU", MU, "MODEL.EAPM.REG.THETA", THETA,
        "MODEL.BALANCED_L1.ALPHA", BL1["alpha"], "MODEL.BALANCED_L1.GAMMA", BL1["gamma"],
        "MODEL.BALANCED_L1.BETA", BL1["beta"],
        "MODEL.RETINANET.FOCAL_LOSS_ALPHA", FOCAL["alpha"],
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", FOCAL["gamma"],
        "MODEL.RETINANET.BBOX_REG_WEIGHTS", (1.0, 1.0, 2.0, 2.0),
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
    out = _train_forward(model, make_batch(2, num_boxes=(4, 2)))
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
    cls_sum, cls_grad = eapm_focal_sum(logits[valid], onehot[valid], MU, **FOCAL)
    want_grad_logits = torch.zeros_like(logits, dtype=torch.float64)
    want_grad_logits[valid] = cls_grad / norm
    _close(out["loss_cls"], cls_sum / norm)
    _close(torch.cat(grad_logits, dim=1), want_grad_logits)

    transform = Box2BoxTransform(weights=(1.0, 1.0, 2.0, 2.0))
    all_anchors = Boxes.cat(anchors).tensor.double()[None].expand(len(gt_boxes), -1, -1)
    target = transform.get_deltas(all_anchors[pos], torch.stack(gt_boxes).double()[pos])
    deltas = torch.cat(pred_deltas, dim=1).detach()
    box_sum, box_grad = eapm_bl1_sum(deltas[pos], target, THETA, **BL1)
    want_grad_deltas = torch.zeros_like(deltas, dtype=torch.float64)
    want_grad_deltas[pos] = box_grad / norm
    _close(out["loss_box_reg"], box_sum / norm)
    _close(torch.cat(grad_deltas, dim=1), want_grad_deltas)

    # the references can fail: the plain losses (mu = theta = 0) are far off
    _misses(out["loss_cls"], eapm_focal_sum(logits[valid], onehot[valid], 0.0, **FOCAL)[0] / norm)
    _misses(out["loss_box_reg"], eapm_bl1_sum(deltas[pos], target, 0.0, **BL1)[0] / norm)
    plain_grad = eapm_focal_sum(logits[valid], onehot[valid], 0.0, **FOCAL)[1] / norm
    assert not torch.allclose(plain_grad, want_grad_logits[valid], rtol=0.1, atol=0)


# ------------------------------------------------------------------ Faster R-CNN + EAPM RPN
@pytest.fixture(scope="module")
def two_stage():
    """A tiny Faster R-CNN with EAPM cross entropy in the box predictor (mu 2.0) and EAPM
    binary cross entropy on the RPN objectness (mu 0.7), after one training forward: its
    losses, what its RPN and box predictor losses saw, and the gradients of loss_rpn_cls /
    loss_cls w.r.t. the raw objectness logits / class scores."""
    cfg = tiny_cfg(
        "quickstart/faster_rcnn_eapm_mu1.5.yaml",
        "MODEL.ROI_HEADS.NUM_CLASSES", 4,
        "MODEL.PROPOSAL_GENERATOR.NAME", "EAPMRPN",
        "MODEL.EAPM.RPN.ENABLED", True,
        "MODEL.EAPM.RPN.MU", RPN_MU,
        "MODEL.EAPM.CLS.MU", CLS_MU,
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    rpn_seen = record(model.proposal_generator, "losses")
    roi_seen = record(model.roi_heads.box_predictor, "losses")
    out = _train_forward(model, make_batch(2, size=64, num_boxes=(3, 1), num_classes=4, seed=1))
    _, logits, gt_labels, _, _ = rpn_seen["args"]
    (scores, _), proposals = roi_seen["args"]
    return {
        "cfg": cfg,
        "out": out,
        "logits": [x.detach() for x in logits],
        "gt_labels": gt_labels,
        "scores": scores.detach(),
        "classes": cat([p.gt_classes for p in proposals], dim=0),
        "grad_logits": torch.autograd.grad(out["loss_rpn_cls"], logits, retain_graph=True),
        "grad_scores": torch.autograd.grad(out["loss_cls"], scores),
    }


def test_eapm_rpn_objectness_loss_at_the_rpn_mu_float64(two_stage):
    """loss_rpn_cls is EAPM binary cross entropy at MODEL.EAPM.RPN.MU (0.7, not the ROI
    heads' MODEL.EAPM.CLS.MU 2.0) over the sampled anchors, summed and divided by
    RPN.BATCH_SIZE_PER_IMAGE x images; its gradient w.r.t. the objectness logits is the
    BCE gradient at the modulated logit, 0 for anchors not sampled."""
    cfg, out = two_stage["cfg"], two_stage["out"]
    labels = torch.stack(two_stage["gt_labels"])  # (N, A): 1, 0, -1 (not sampled)
    sampled = labels >= 0
    assert int((labels == 1).sum()) > 0 and int((labels == 0).sum()) > 0
    assert int((~sampled).sum()) > 0
    norm = cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE * labels.shape[0]
    logits = cat(two_stage["logits"], dim=1)
    x, t = logits[sampled].double(), labels[sampled].double()

    value, grad = eapm_focal_sum(x, t, RPN_MU, alpha=-1.0, gamma=0.0)  # BCE: gamma 0, no alpha
    # the BCE gradient at x' is sigmoid(x') - t = MF (p - t): the same in closed form
    p = torch.sigmoid(x)
    torch.testing.assert_close(grad, tanh_mf((p - t).abs(), RPN_MU) * (p - t))
    want_grad = torch.zeros_like(logits, dtype=torch.float64)
    want_grad[sampled] = grad / norm
    _close(out["loss_rpn_cls"], value / norm)
    _close(cat(two_stage["grad_logits"], dim=1), want_grad)
    # the value at the classification mu is far off: the RPN reads its own strength
    at_cls_mu = eapm_focal_sum(x, t, CLS_MU, alpha=-1.0, gamma=0.0)[0] / norm
    _misses(out["loss_rpn_cls"], at_cls_mu)


def test_roi_box_predictor_eapm_cross_entropy_value_and_gradient_float64(two_stage):
    """loss_cls is the mean over the sampled ROIs of the cross entropy at the modulated
    distribution (MODEL.EAPM.CLS.MU 2.0); its gradient w.r.t. the class scores is the cross
    entropy's gradient there, MF (p - Y) / R."""
    out, scores, classes = two_stage["out"], two_stage["scores"], two_stage["classes"]
    k = two_stage["cfg"].MODEL.ROI_HEADS.NUM_CLASSES
    assert (classes < k).any() and (classes == k).any()  # foreground and background ROIs
    value, grad = eapm_ce_mean(scores, classes, CLS_MU)
    _close(out["loss_cls"], value)
    _close(two_stage["grad_scores"][0], grad)
    # the gradient in closed form: MF (p - Y) per row, over R
    p = torch.softmax(scores.double(), dim=1)
    y = F.one_hot(classes, k + 1).double()
    mf = tanh_mf(1 - (p * y).sum(1), CLS_MU)
    torch.testing.assert_close(grad, mf[:, None] * (p - y) / len(classes))
    _misses(out["loss_cls"], eapm_ce_mean(scores, classes, RPN_MU)[0])
