"""RetinaNet with EAPM losses (paper Sec. 2.2 / 2.3), registered as ``EAPMRetinaNet``.

Only the loss computation of detectron2's RetinaNet is overridden. With EAPM off and
one of detectron2's regression losses, the losses are computed by the very same
functions detectron2 uses (fvcore's focal loss, ``_dense_box_regression_loss``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.utils.events import get_event_storage

from ..config import validate_eapm_config
from ..losses import set_compile
from .common import box_reg_balanced_l1, dense_focal_loss_sum, dense_loss_normalizer

__all__ = ["EAPMRetinaNet", "eapm_loss_kwargs"]


def eapm_loss_kwargs(cfg) -> dict:
    """The EAPM / balanced-L1 / normaliser constructor arguments shared by the
    EAPM detectors, read from (and validated against) the config."""
    validate_eapm_config(cfg)
    e = cfg.MODEL.EAPM
    set_compile(e.COMPILE)
    return {
        "eapm_cls_mu": float(e.CLS.MU) if e.CLS.ENABLED else None,
        "eapm_reg_theta": float(e.REG.THETA) if e.REG.ENABLED else None,
        "balanced_l1": (cfg.MODEL.BALANCED_L1.ALPHA, cfg.MODEL.BALANCED_L1.GAMMA, cfg.MODEL.BALANCED_L1.BETA),
        "loss_normalizer": cfg.MODEL.LOSS_NORMALIZER.TYPE,
        "histogram_period": int(e.HISTOGRAM_PERIOD),
    }


@META_ARCH_REGISTRY.register()
class EAPMRetinaNet(RetinaNet):
    """RetinaNet whose classification loss can be EAPM focal loss and whose regression
    loss can be (EAPM) balanced L1, besides detectron2's own choices.

    Extra args (besides RetinaNet's):
        eapm_cls_mu: mu of EAPM focal loss; None = detectron2's focal loss.
        eapm_reg_theta: theta of EAPM balanced L1; None = no modulation.
            Only used with ``box_reg_loss_type="balanced_l1"``.
        balanced_l1: (alpha, gamma, beta) of the balanced L1 loss.
        loss_normalizer: "ema" (detectron2) or "all_reduce" (mmdetection).
        histogram_period: log histograms of Dif / GoS / MF every this many iterations.
    """

    @configurable
    def __init__(
        self,
        *,
        eapm_cls_mu=None,
        eapm_reg_theta=None,
        balanced_l1=(0.5, 1.5, 1.0),
        loss_normalizer="ema",
        histogram_period=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if eapm_reg_theta is not None and self.box_reg_loss_type != "balanced_l1":
            raise ValueError(
                "EAPM regression (MODEL.EAPM.REG.ENABLED) needs MODEL.RETINANET.BBOX_REG_LOSS_TYPE "
                f"'balanced_l1', got {self.box_reg_loss_type!r}"
            )
        self.eapm_cls_mu = eapm_cls_mu
        self.eapm_reg_theta = eapm_reg_theta
        self.balanced_l1 = tuple(float(v) for v in balanced_l1)
        self.loss_normalizer_type = loss_normalizer
        self.histogram_period = histogram_period

    @classmethod
    def from_config(cls, cfg):
        kwargs = eapm_loss_kwargs(cfg)  # validates first: a bad value fails before the model is built
        ret = super().from_config(cfg)
        ret.update(kwargs)
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """Same inputs, outputs and normalisation as ``RetinaNet.losses``."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        valid_mask = gt_labels >= 0
        pos_mask = valid_mask & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = dense_loss_normalizer(self, num_pos_anchors, self.loss_normalizer_type)

        # classification: one-hot targets without the background column
        gt_labels_target = F.one_hot(gt_labels[valid_mask], num_classes=self.num_classes + 1)[:, :-1]
        logits = cat(pred_logits, dim=1)[valid_mask]
        loss_cls = dense_focal_loss_sum(
            logits, gt_labels_target, self.eapm_cls_mu, self.focal_loss_alpha, self.focal_loss_gamma, self.histogram_period
        )

        if self.box_reg_loss_type == "balanced_l1":
            loss_box_reg = self._balanced_l1_box_loss(anchors, pred_anchor_deltas, gt_boxes, pos_mask)
        else:
            loss_box_reg = _dense_box_regression_loss(
                anchors,
                self.box2box_transform,
                pred_anchor_deltas,
                gt_boxes,
                pos_mask,
                box_reg_loss_type=self.box_reg_loss_type,
                smooth_l1_beta=self.smooth_l1_beta,
            )
        return {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box_reg / normalizer}

    def _balanced_l1_box_loss(self, anchors, pred_anchor_deltas, gt_boxes, pos_mask):
        """Summed (EAPM) balanced L1 over the foreground anchors' deltas."""
        anchors = type(anchors[0]).cat(anchors).tensor  # (R, 4)
        pos_gt = torch.stack(gt_boxes)[pos_mask]  # (P, 4)
        pos_anchors = anchors[None].expand(pos_mask.shape[0], -1, -1)[pos_mask]
        gt_deltas = self.box2box_transform.get_deltas(pos_anchors, pos_gt)
        pred = cat(pred_anchor_deltas, dim=1)[pos_mask]
        return box_reg_balanced_l1(pred, gt_deltas, self.eapm_reg_theta, self.balanced_l1, self.histogram_period)

