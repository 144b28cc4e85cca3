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

import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from tests.helpers import make_batch, record, tiny_cfg

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
