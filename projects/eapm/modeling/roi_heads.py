"""Libra R-CNN's ROI heads and EAPM with balanced L1 in the ROI box head.

* ``LibraROIHeads`` (``MODEL.ROI_HEADS.NAME: "LibraROIHeads"``): detectron2's
  ``StandardROIHeads`` with IoU-balanced negative and instance-balanced positive
  sampling (``MODEL.ROI_HEADS.IOU_BALANCED_*``, ``INSTANCE_BALANCED_POS``) and the
  ``EAPMFastRCNNOutputLayers`` box predictor. With ``IOU_BALANCED_NUM_BINS: 0`` and
  ``INSTANCE_BALANCED_POS: False`` the sampling is detectron2's own.
* ``EAPMFastRCNNOutputLayers``: ``FastRCNNOutputLayers`` whose box regression loss can
  be ``"balanced_l1"`` (``MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE``,
  ``MODEL.BALANCED_L1.*``), optionally with EAPM (``MODEL.EAPM.REG.*``): the dw/dh of
  the foreground ROIs' class-specific deltas are modulated by their Gap-over-Sum. As in
  detectron2, the summed loss is divided by the number of sampled ROIs. The deltas are
  the box transform's (weights (10, 10, 5, 5) applied, = mmdetection's target stds
  (0.1, 0.1, 0.2, 0.2)); GoS is scale-free, so the weights do not change it.

The IoU-balanced sampler needs each proposal's best IoU, which detectron2's
``_sample_proposals`` is not given: the ROI heads' matcher is a ``MaxIoUMatcher``
that keeps the per-proposal maximum of the IoU matrix of its last call, which
``label_and_sample_proposals`` makes right before ``_sample_proposals`` for the same
image.
"""

from __future__ import annotations

from typing import Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import nonzero_tuple
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import ROIHeads, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from ..capabilities import DeclaresConfigChecks, SupportsEAPMBalancedL1
from ..losses import check_balanced_l1_params
from ..upstream import adapted_from
from .common import box_reg_balanced_l1
from .keys import (
    BALANCED_L1_CHECKS,
    BOX_REG_LOSSES,
    EAPM_REG_CHECKS,
    KERNEL_CHECKS,
    IntAtLeast,
    NumberIn,
    OneOf,
    balanced_l1_from_config,
    check_eapm_reg_theta,
    check_histogram_period,
    eapm_reg_theta_from_config,
    kernel_args_from_config,
)
from .sampling import instance_balanced_positives, iou_balanced_negatives, random_subset

__all__ = ["EAPMFastRCNNOutputLayers", "LibraROIHeads", "MaxIoUMatcher"]

check_box_reg_loss_type = OneOf("box_reg_loss_type", BOX_REG_LOSSES)
check_iou_balanced_num_bins = IntAtLeast("iou_balanced_num_bins", 0)
check_iou_balanced_floor_fraction = NumberIn("iou_balanced_floor_fraction", 0, 1)


class EAPMFastRCNNOutputLayers(DeclaresConfigChecks, SupportsEAPMBalancedL1, FastRCNNOutputLayers):
    """``FastRCNNOutputLayers`` + the (EAPM) balanced L1 box regression loss.

    Extra args, checked here (``ValueError``), as is ``box_reg_loss_type`` (one of
    ``BOX_REG_LOSSES``):
        eapm_reg_theta: theta >= 0 of EAPM; 0 = plain balanced L1. > 0 needs
            ``box_reg_loss_type="balanced_l1"``.
        balanced_l1: (alpha, gamma, beta) > 0; Libra R-CNN uses (0.5, 1.5, 1.0).
        histogram_period: log GoS / MF histograms every this many iterations (0 = never).
        compile_kernels: run the balanced L1 kernel through ``torch.compile``.

    ``from_config`` reads ``MODEL.EAPM.REG.*``, ``MODEL.BALANCED_L1.*`` and
    ``MODEL.EAPM.HISTOGRAM_PERIOD`` / ``COMPILE`` besides detectron2's keys.
    """

    box_loss_key = "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE"

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        eapm_reg_theta: float = 0.0,
        balanced_l1: Tuple[float, float, float] = (0.5, 1.5, 1.0),
        histogram_period: int = 0,
        compile_kernels: bool = False,
        **kwargs,
    ):
        super().__init__(input_shape, **kwargs)
        self.eapm_reg_theta = check_eapm_reg_theta(eapm_reg_theta)
        check_box_reg_loss_type(self.box_reg_loss_type)
        self.check_box_loss(self.box_reg_loss_type, self.eapm_reg_theta)
        if self.box_reg_loss_type == "balanced_l1" and len(self.box2box_transform.weights) != 4:
            raise ValueError("the balanced L1 box loss supports axis-aligned boxes (4 deltas) only")
        check_balanced_l1_params(*balanced_l1)
        self.balanced_l1 = tuple(float(v) for v in balanced_l1)
        self.histogram_period = check_histogram_period(histogram_period)
        self.compile_kernels = bool(compile_kernels)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(
            eapm_reg_theta=eapm_reg_theta_from_config(cfg),
            balanced_l1=balanced_l1_from_config(cfg),
            **kernel_args_from_config(cfg),
        )
        return ret

    @classmethod
    def config_checks(cls):
        return {
            **EAPM_REG_CHECKS,
            **KERNEL_CHECKS,
            **BALANCED_L1_CHECKS,
            cls.box_loss_key: check_box_reg_loss_type,
        }

    def box_reg_loss(self, proposal_boxes, gt_boxes, pred_deltas, gt_classes):
        """(EAPM) balanced L1 over the foreground ROIs' deltas of their GT class, summed
        and divided by the number of sampled ROIs; other loss types: detectron2's."""
        if self.box_reg_loss_type != "balanced_l1":
            return super().box_reg_loss(proposal_boxes, gt_boxes, pred_deltas, gt_classes)
        fg = nonzero_tuple((gt_classes >= 0) & (gt_classes < self.num_classes))[0]
        if pred_deltas.shape[1] == 4:  # class-agnostic
            fg_pred = pred_deltas[fg]
        else:
            fg_pred = pred_deltas.view(-1, self.num_classes, 4)[fg, gt_classes[fg]]
        fg_target = self.box2box_transform.get_deltas(proposal_boxes[fg], gt_boxes[fg])
        loss = box_reg_balanced_l1(
            fg_pred,
            fg_target,
            self.eapm_reg_theta,
            self.balanced_l1,
            histogram_period=self.histogram_period,
            compile_kernels=self.compile_kernels,
        )
        return loss / max(gt_classes.numel(), 1.0)


class MaxIoUMatcher(Matcher):
    """detectron2's ``Matcher`` that also keeps, in ``last_max_iou``, the best match
    quality of every prediction in its last call (zeros without ground truth)."""

    last_max_iou = None

    @classmethod
    def from_matcher(cls, m: Matcher) -> "MaxIoUMatcher":
        return cls(m.thresholds[1:-1], m.labels, m.allow_low_quality_matches)

    def __call__(self, match_quality_matrix):
        if match_quality_matrix.shape[0] == 0:
            self.last_max_iou = match_quality_matrix.new_zeros(match_quality_matrix.shape[1])
        else:
            self.last_max_iou = match_quality_matrix.max(dim=0).values
        return super().__call__(match_quality_matrix)


@ROI_HEADS_REGISTRY.register()
class LibraROIHeads(DeclaresConfigChecks, SupportsEAPMBalancedL1, StandardROIHeads):
    """``StandardROIHeads`` with Libra R-CNN's balanced sampling and the
    ``EAPMFastRCNNOutputLayers`` box predictor.

    Extra args:
        iou_balanced_num_bins: IoU bins of the negative sampler; 0 = detectron2's random
            negatives, 1 = random above the floor.
        iou_balanced_floor_thresh: negatives below it are sampled at random (< 0: none).
        iou_balanced_floor_fraction: fraction of the negatives drawn below the floor.
        instance_balanced_pos: positives spread evenly over the GT instances.

    The box loss is ``EAPMFastRCNNOutputLayers``'s (balanced L1, EAPM regression).
    ``from_config`` reads ``MODEL.ROI_HEADS.IOU_BALANCED_*`` / ``INSTANCE_BALANCED_POS``;
    ``config_checks()`` declares their rules and the box predictor's.
    """

    box_loss_key = EAPMFastRCNNOutputLayers.box_loss_key
    box_predictor_class = EAPMFastRCNNOutputLayers

    @configurable
    def __init__(
        self,
        *,
        iou_balanced_num_bins: int = 3,
        iou_balanced_floor_thresh: float = -1.0,
        iou_balanced_floor_fraction: float = 0.0,
        instance_balanced_pos: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_iou_balanced_num_bins(iou_balanced_num_bins)
        check_iou_balanced_floor_fraction(iou_balanced_floor_fraction)
        if not isinstance(self.proposal_matcher, MaxIoUMatcher):
            self.proposal_matcher = MaxIoUMatcher.from_matcher(self.proposal_matcher)
        self.iou_balanced_num_bins = int(iou_balanced_num_bins)
        self.iou_balanced_floor_thresh = float(iou_balanced_floor_thresh)
        self.iou_balanced_floor_fraction = float(iou_balanced_floor_fraction)
        self.instance_balanced_pos = bool(instance_balanced_pos)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        rh = cfg.MODEL.ROI_HEADS
        ret.update(
            iou_balanced_num_bins=int(rh.IOU_BALANCED_NUM_BINS),
            iou_balanced_floor_thresh=float(rh.IOU_BALANCED_FLOOR_THRESH),
            iou_balanced_floor_fraction=float(rh.IOU_BALANCED_FLOOR_FRACTION),
            instance_balanced_pos=bool(rh.INSTANCE_BALANCED_POS),
        )
        return ret

    @classmethod
    def config_checks(cls):
        return {
            "MODEL.ROI_HEADS.IOU_BALANCED_NUM_BINS": check_iou_balanced_num_bins,
            "MODEL.ROI_HEADS.IOU_BALANCED_FLOOR_FRACTION": check_iou_balanced_floor_fraction,
            **cls.box_predictor_class.config_checks(),
        }

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = cls.box_predictor_class(cfg, ret["box_head"].output_shape)
        return ret

    @adapted_from(
        ROIHeads._sample_proposals,
        "detectron2/modeling/roi_heads/roi_heads.py",
        "d9875a08eabd4164269d9960b9df310a77fa7f9e",
    )
    def _sample_proposals(
        self, matched_idxs: torch.Tensor, matched_labels: torch.Tensor, gt_classes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Same contract as ``ROIHeads._sample_proposals``: the labelling is detectron2's,
        the subsampling Libra's (detectron2's ``subsample_labels`` has no hook)."""
        if self.iou_balanced_num_bins == 0 and not self.instance_balanced_pos:
            return super()._sample_proposals(matched_idxs, matched_labels, gt_classes)
        bg = self.num_classes
        if gt_classes.numel() > 0:
            labels = gt_classes[matched_idxs]
            labels = torch.where(matched_labels == 0, torch.full_like(labels, bg), labels)
            labels = torch.where(matched_labels == -1, torch.full_like(labels, -1), labels)
        else:
            labels = torch.full_like(matched_idxs, bg)
        pos = nonzero_tuple((labels != -1) & (labels != bg))[0]
        neg = nonzero_tuple(labels == bg)[0]
        num_pos = min(pos.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(neg.numel(), self.batch_size_per_image - num_pos)

        if self.instance_balanced_pos:
            pos = instance_balanced_positives(pos, matched_idxs[pos], num_pos)
        else:
            pos = random_subset(pos, num_pos)
        if self.iou_balanced_num_bins > 0:
            max_iou = self.proposal_matcher.last_max_iou
            if max_iou is None or max_iou.numel() != matched_idxs.numel():
                raise RuntimeError(
                    "LibraROIHeads: the matcher's IoUs do not belong to these proposals"
                )
            neg = iou_balanced_negatives(
                neg,
                max_iou,
                num_neg,
                self.iou_balanced_num_bins,
                self.iou_balanced_floor_thresh,
                self.iou_balanced_floor_fraction,
            )
        else:
            neg = random_subset(neg, num_neg)
        sampled = torch.cat([pos, neg])
        return sampled, labels[sampled]
