"""RetinaNet with EAPM losses (paper Sec. 2.2 / 2.3), registered as ``EAPMRetinaNet``.

Only the loss computation of detectron2's RetinaNet is overridden. With EAPM off and
one of detectron2's regression losses, the losses are computed by the very same
functions detectron2 uses (fvcore's focal loss, ``_dense_box_regression_loss``).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.utils.events import get_event_storage

from ..capabilities import SupportsEAPMBalancedL1, SupportsEAPMFocal
from ..config import eapm_kwargs
from ..losses import check_balanced_l1_params, check_eapm_param
from ..upstream import adapted_from
from .common import (
    box_reg_balanced_l1,
    check_loss_normalizer,
    dense_focal_loss_sum,
    dense_loss_normalizer,
)

__all__ = ["EAPMRetinaNet"]


@META_ARCH_REGISTRY.register()
class EAPMRetinaNet(SupportsEAPMFocal, SupportsEAPMBalancedL1, RetinaNet):
    """RetinaNet whose classification loss can be EAPM focal loss and whose regression
    loss can be (EAPM) balanced L1, besides detectron2's own choices.

    Extra args (besides RetinaNet's), all checked here (``ValueError``):
        eapm_cls_mu: mu >= 0 of EAPM focal loss; 0 = detectron2's focal loss.
        eapm_reg_theta: theta >= 0 of EAPM balanced L1; 0 = no modulation. > 0 needs
            ``box_reg_loss_type="balanced_l1"``.
        balanced_l1: (alpha, gamma, beta) > 0 of the balanced L1 loss.
        loss_normalizer: "ema" (detectron2) or "all_reduce" (mmdetection).
        histogram_period: log histograms of Dif / GoS / MF every this many iterations
            (0 = never).
        compile_kernels: run this model's EAPM loss kernels through ``torch.compile``.
    """

    box_loss_key = "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"

    @configurable
    def __init__(
        self,
        *,
        eapm_cls_mu: float = 0.0,
        eapm_reg_theta: float = 0.0,
        balanced_l1: Tuple[float, float, float] = (0.5, 1.5, 1.0),
        loss_normalizer: str = "ema",
        histogram_period: int = 0,
        compile_kernels: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.eapm_cls_mu = check_eapm_param(eapm_cls_mu, "eapm_cls_mu")
        self.eapm_reg_theta = check_eapm_param(eapm_reg_theta, "eapm_reg_theta")
        self.check_box_loss(self.box_reg_loss_type, self.eapm_reg_theta)
        check_balanced_l1_params(*balanced_l1)
        self.balanced_l1 = tuple(float(v) for v in balanced_l1)
        self.loss_normalizer_type = check_loss_normalizer(loss_normalizer)
        self.histogram_period = int(histogram_period)
        self.compile_kernels = bool(compile_kernels)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(eapm_kwargs(cfg)["EAPMRetinaNet"])
        return ret

    @adapted_from(
        RetinaNet.losses,
        "detectron2/modeling/meta_arch/retinanet.py",
        "ccd4d596350991914e1ac3c8aa24e7f6f0d8eb42",
    )
    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """Same inputs, outputs and normalisation as ``RetinaNet.losses``; the focal loss
        call and the box loss dispatch are EAPM's."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        valid_mask = gt_labels >= 0
        pos_mask = valid_mask & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = dense_loss_normalizer(self, num_pos_anchors, self.loss_normalizer_type)

        # classification: one-hot targets without the background column
        gt_labels_target = F.one_hot(gt_labels[valid_mask], num_classes=self.num_classes + 1)[
            :, :-1
        ]
        logits = cat(pred_logits, dim=1)[valid_mask]
        loss_cls = dense_focal_loss_sum(
            logits,
            gt_labels_target,
            self.eapm_cls_mu,
            self.focal_loss_alpha,
            self.focal_loss_gamma,
            histogram_period=self.histogram_period,
            compile_kernels=self.compile_kernels,
        )

        if self.box_reg_loss_type == "balanced_l1":
            loss_box_reg = self._balanced_l1_box_loss(
                anchors, pred_anchor_deltas, gt_boxes, pos_mask
            )
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
        """Summed (EAPM) balanced L1 over the foreground anchors' deltas (a scalar)."""
        anchors = type(anchors[0]).cat(anchors).tensor  # (R, 4)
        pos_gt = torch.stack(gt_boxes)[pos_mask]  # (P, 4)
        pos_anchors = anchors[None].expand(pos_mask.shape[0], -1, -1)[pos_mask]
        gt_deltas = self.box2box_transform.get_deltas(pos_anchors, pos_gt)
        pred = cat(pred_anchor_deltas, dim=1)[pos_mask]
        return box_reg_balanced_l1(
            pred,
            gt_deltas,
            self.eapm_reg_theta,
            self.balanced_l1,
            histogram_period=self.histogram_period,
            compile_kernels=self.compile_kernels,
        )
