"""Each detector's EAPM losses equal the loss functions of ``eapm.losses`` applied to the
detector's OWN matched targets with the CONFIGURED strengths and parameters.

The other model tests check that EAPM raises the losses; a swapped, ignored or hard-coded
mu / theta / alpha / gamma / beta passes those. Here every configured value is distinct
(mu 1.3, theta 0.7, focal alpha 0.3 / gamma 1.7, balanced L1 alpha 0.4 / gamma 1.8 / beta
0.6), the inputs of the model's loss method are recorded (the predictions and the targets
its detectron2 matching gave), the matching is checked against the detectron2 method it
uses (or, for R-CNN, against the IoU of each sampled proposal with its matched box), and the
expected losses are computed from those tensors by ``eapm.losses`` and detectron2's
functions, divided by the normaliser in closed form (detectron2's EMA after its first
update: ``initial x 0.9 + 0.1 x positives``). Each test also checks that the same formula
with mu and theta swapped misses the model's value (the test can fail)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import diou_loss
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from eapm.losses import eapm_balanced_l1_loss, eapm_sigmoid_focal_loss
from tests.helpers import make_batch, record, tiny_cfg

MU, THETA = 1.3, 0.7
FOCAL = dict(alpha=0.3, gamma=1.7)
BL1 = dict(alpha=0.4, gamma=1.8, beta=0.6)
STRENGTHS = ("MODEL.EAPM.CLS.MU", MU, "MODEL.EAPM.REG.THETA", THETA)
BL1_OPTS = ("MODEL.BALANCED_L1.ALPHA", 0.4, "MODEL.BALANCED_L1.GAMMA", 1.8,
            "MODEL.BALANCED_L1.BETA", 0.6)  # fmt: skip
TIGHT = dict(rtol=2e-5, atol=1e-7)


def ema_first_update(initial: float, num_pos: int) -> float:
    """detectron2's ``DenseDetector._ema_update`` (momentum 0.9) at its first call."""
    return initial * 0.9 + 0.1 * max(num_pos, 1)


def spread_box_predictions(layer: torch.nn.Module, seed: int = 0) -> None:
    """Box deltas of order 0.1-1 from a box regressor ``layer`` (a Linear or Conv2d with a
    bias). detectron2 initialises it with std 0.001 or 0.01: deltas ~ 0 give GoS ~ 1 and
    MF ~ 1 for every theta, which would hide the strength."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.5)


def train_losses(model, batch):
    model.train()
    torch.manual_seed(0)
    with EventStorage(0):
        return model(batch)


def _close(actual, expected):
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), **TIGHT)


def _differs(actual, wrong):
    """``wrong`` misses ``actual`` by more than 10x the tolerance of ``_close``."""
    a, w = float(actual), float(wrong)
    assert abs(a - w) > 10 * (TIGHT["atol"] + TIGHT["rtol"] * abs(w)), (a, w)


def test_retinanet_losses_are_eapm_focal_and_balanced_l1_on_its_own_targets():
    cfg = tiny_cfg(
        "quickstart/eapm_retinanet.yaml",
        *STRENGTHS,
        *BL1_OPTS,
        "MODEL.RETINANET.FOCAL_LOSS_ALPHA", FOCAL["alpha"],
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", FOCAL["gamma"],
        "MODEL.RETINANET.BBOX_REG_WEIGHTS", (1.0, 1.0, 2.0, 2.0),
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    spread_box_predictions(model.head.bbox_pred)
    seen = record(model, "losses")
    batch = make_batch(2, num_boxes=(4, 2))
    out = train_losses(model, batch)
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
        cls = eapm_sigmoid_focal_loss(logits, onehot, MU, reduction="sum", **FOCAL) / norm
        transform = Box2BoxTransform(weights=(1.0, 1.0, 2.0, 2.0))
        all_anchors = Boxes.cat(anchors).tensor[None].expand(len(batch), -1, -1)
        target = transform.get_deltas(all_anchors[pos], torch.stack(gt_boxes)[pos])
        pred = torch.cat(pred_deltas, dim=1)[pos]
        box = eapm_balanced_l1_loss(pred, target, THETA, reduction="sum", **BL1) / norm
        # mu and theta swapped
        cls_swapped = eapm_sigmoid_focal_loss(logits, onehot, THETA, reduction="sum", **FOCAL)
        box_swapped = eapm_balanced_l1_loss(pred, target, MU, reduction="sum", **BL1)
    assert set(out) == {"loss_cls", "loss_box_reg"}
    _close(out["loss_cls"], cls)
    _close(out["loss_box_reg"], box)
    _differs(out["loss_cls"], cls_swapped / norm)
    _differs(out["loss_box_reg"], box_swapped / norm)


def test_fcos_losses_are_eapm_focal_on_its_own_targets():
    cfg = tiny_cfg(
        "quickstart/eapm_fcos.yaml",
        "MODEL.FPN.OUT_CHANNELS", 64,  # GN head: 2 channels per group
        "MODEL.EAPM.CLS.MU", MU,
        "MODEL.FCOS.FOCAL_LOSS_ALPHA", FOCAL["alpha"],
        "MODEL.FCOS.FOCAL_LOSS_GAMMA", FOCAL["gamma"],
        "MODEL.FCOS.BOX_LOSS_TYPE", "diou",
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = record(model, "losses")
    batch = make_batch(2, num_boxes=(3, 2))
    out = train_losses(model, batch)
    anchors, pred_logits, gt_labels, pred_deltas, gt_boxes, pred_ctr = seen["args"]

    # the targets are those of detectron2's FCOS.label_anchors (center sampling) on this batch
    labels_again, boxes_again = model.label_anchors(anchors, [b["instances"] for b in batch])
    for a, b in zip(gt_labels + gt_boxes, labels_again + boxes_again):
        assert torch.equal(a, b)

    k = cfg.MODEL.FCOS.NUM_CLASSES
    labels = torch.stack(gt_labels)
    pos = (labels >= 0) & (labels != k)
    num_pos = int(pos.sum())
    assert num_pos > 0
    norm = ema_first_update(300.0, num_pos)  # detectron2's FCOS starts its EMA at 300
    with torch.no_grad():
        logits = torch.cat(pred_logits, dim=1)  # every location (FCOS ignores none)
        onehot = F.one_hot(labels, k + 1)[..., :-1].to(logits.dtype)
        cls = eapm_sigmoid_focal_loss(logits, onehot, MU, reduction="sum", **FOCAL) / norm
        cls_wrong = eapm_sigmoid_focal_loss(logits, onehot, THETA, reduction="sum", **FOCAL)
        all_anchors = Boxes.cat(anchors).tensor
        deltas = torch.cat(pred_deltas, dim=1)
        pred_boxes = torch.stack(
            [model.box2box_transform.apply_deltas(d, all_anchors) for d in deltas]
        )
        loc = diou_loss(pred_boxes[pos], torch.stack(gt_boxes)[pos], reduction="sum") / norm
        ctr_target = model.compute_ctrness_targets(anchors, gt_boxes)
        ctr_logits = torch.cat(pred_ctr, dim=1).squeeze(2)
        ctr = (
            F.binary_cross_entropy_with_logits(ctr_logits[pos], ctr_target[pos], reduction="sum")
            / norm
        )
    assert set(out) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    _close(out["loss_fcos_cls"], cls)
    _close(out["loss_fcos_loc"], loc)
    _close(out["loss_fcos_ctr"], ctr)
    _differs(out["loss_fcos_cls"], cls_wrong / norm)
