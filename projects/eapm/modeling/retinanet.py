"""RetinaNet with EAPM losses (paper Sec. 2.2 / 2.3), registered as ``EAPMRetinaNet``.

Only the loss computation of detectron2's RetinaNet is overridden. With EAPM off and
one of detectron2's regression losses, the losses are computed by the very same
functions detectron2 uses (fvcore's focal loss, ``_dense_box_regression_loss``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.utils.events import get_event_storage

from ..losses import GHMC, GHMR, check_balanced_l1_params, check_ghm_params
from ..losses.checks import check_flag, choice
from ..upstream import adapted_from
from .common import (
    box_reg_balanced_l1,
    check_eapm_box_loss,
    dense_loss_normalizer,
    eapm_iou_box_loss,
    model_focal_loss_sum,
    put_reg_stats,
    weighted_loss,
)
from .keys import (
    BOX_REG_LOSSES,
    balanced_l1_from_config,
    check_cls_loss_weight,
    check_eapm_cls_mu,
    check_eapm_reg_theta,
    check_histogram_period,
    check_loss_normalizer,
    eapm_strength_from_config,
    kernel_args_from_config,
)

__all__ = ["EAPMRetinaNet", "RETINANET_BOX_REG_LOSSES"]

# RetinaNet's box losses: detectron2's four, balanced L1 and GHM-R (classes with SupportsGHM)
RETINANET_BOX_REG_LOSSES = BOX_REG_LOSSES + ("ghm_r",)
check_retinanet_box_loss = choice("box_reg_loss_type", RETINANET_BOX_REG_LOSSES)


def _check_ghm(prefix: str, **params) -> None:
    """``eapm.losses.check_ghm_params`` of each parameter, its error prefixed with the
    argument's full name (``ghm_cls_bins: ...``)."""
    for name, value in params.items():
        try:
            check_ghm_params(**{name: value})
        except ValueError as e:
            raise ValueError(f"{prefix}_{name}: {e}") from None


def check_ghm_cls(ghm_cls: bool, eapm_cls_mu: float) -> None:
    """Raise ``ValueError`` if GHM-C (``ghm_cls`` True) is asked together with EAPM focal
    loss (``eapm_cls_mu > 0``): GHM-C replaces the focal loss that EAPM modulates."""
    if ghm_cls and eapm_cls_mu > 0:
        raise ValueError(
            "GHM-C (ghm_cls, MODEL.GHM.CLS.ENABLED) replaces the focal loss that EAPM "
            "modulates: it needs eapm_cls_mu 0 (MODEL.EAPM.CLS.ENABLED False), got "
            f"{eapm_cls_mu}"
        )


@META_ARCH_REGISTRY.register()
class EAPMRetinaNet(RetinaNet):
    """RetinaNet whose classification loss can be EAPM focal loss or GHM-C and whose
    regression loss can be (EAPM) balanced L1, EAPM giou / diou / ciou or GHM-R, besides
    detectron2's own choices.

    Extra args (besides RetinaNet's), all checked here (``ValueError``), as is
    ``box_reg_loss_type`` (one of ``RETINANET_BOX_REG_LOSSES``):
        eapm_cls_mu: mu >= 0 of EAPM focal loss; 0 = detectron2's focal loss.
        eapm_reg_theta: theta >= 0 of EAPM regression; 0 = no modulation. > 0 needs
            ``box_reg_loss_type`` "balanced_l1" (EAPM balanced L1) or one of detectron2's
            IoU losses "giou" / "diou" / "ciou" (the dw, dh deltas modulated, then decoded:
            ``eapm.modeling.common.eapm_iou_box_loss``).
        balanced_l1: (alpha, gamma, beta) > 0 of the balanced L1 loss.
        loss_normalizer: "ema" (detectron2) or "all_reduce" (mmdetection).
        histogram_period: log histograms of Dif / GoS / MF every this many iterations
            (0 = never).
        compile_kernels: run this model's EAPM loss kernels through ``torch.compile``.
        ghm_cls: None (focal loss) or the keyword arguments of ``eapm.losses.GHMC``
            (``bins``, ``momentum``): GHM-C replaces the focal loss; needs
            ``eapm_cls_mu == 0``. The module is the submodule ``ghm_cls`` (its moving
            average is in this model's state_dict).
        ghm_cls_loss_weight: factor (>= 0) of the GHM-C loss.
        ghm_reg: keyword arguments of ``eapm.losses.GHMR`` (``mu``, ``bins``,
            ``momentum``), used when ``box_reg_loss_type == "ghm_r"`` (the submodule
            ``ghm_reg``).
        ghm_reg_loss_weight: factor (>= 0) of the GHM-R loss.
        ghm_all_reduce: sum the GHM bin counts over all processes (see ``GHMC``).
        ghm_per_level: one GHM call per feature level (mmdetection), or one over all.
        cls_loss_weight: factor (finite, > 0) of ``loss_cls`` whatever computes it (on top of
            ``ghm_cls_loss_weight`` for GHM-C); 1.0 = the loss itself, bit for bit.

    The GHM losses are not divided by the positive-anchor normaliser (each is normalised
    by its own number of valid elements, as in mmdetection); the loss keys stay
    ``loss_cls`` / ``loss_box_reg``.

    ``from_config`` reads ``MODEL.EAPM.*``, ``MODEL.BALANCED_L1.*``, ``MODEL.GHM.*``,
    ``MODEL.LOSS_NORMALIZER.TYPE`` and ``MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT`` besides
    RetinaNet's keys (reading a key is what honouring it means: ``eapm.validation``).
    """

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
        ghm_cls: Optional[Dict[str, Any]] = None,
        ghm_cls_loss_weight: float = 1.0,
        ghm_reg: Optional[Dict[str, Any]] = None,
        ghm_reg_loss_weight: float = 10.0,
        ghm_all_reduce: bool = False,
        ghm_per_level: bool = True,
        cls_loss_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.eapm_cls_mu = check_eapm_cls_mu(eapm_cls_mu)
        self.eapm_reg_theta = check_eapm_reg_theta(eapm_reg_theta)
        check_retinanet_box_loss(self.box_reg_loss_type)
        check_eapm_box_loss(self.box_reg_loss_type, self.eapm_reg_theta)
        check_balanced_l1_params(*balanced_l1)
        self.balanced_l1 = tuple(float(v) for v in balanced_l1)
        self.loss_normalizer_type = check_loss_normalizer(loss_normalizer)
        self.histogram_period = check_histogram_period(histogram_period)
        self.compile_kernels = check_flag(compile_kernels, "compile_kernels")
        _check_ghm("ghm_cls", loss_weight=ghm_cls_loss_weight)
        _check_ghm("ghm_reg", loss_weight=ghm_reg_loss_weight)
        self.ghm_cls_loss_weight = float(ghm_cls_loss_weight)
        self.ghm_reg_loss_weight = float(ghm_reg_loss_weight)
        self.ghm_per_level = check_flag(ghm_per_level, "ghm_per_level")
        ghm_all_reduce = check_flag(ghm_all_reduce, "ghm_all_reduce")
        self.cls_loss_weight = float(check_cls_loss_weight(cls_loss_weight))
        check_ghm_cls(ghm_cls is not None, self.eapm_cls_mu)
        self.ghm_cls = None
        if ghm_cls is not None:
            _check_ghm("ghm_cls", **ghm_cls)
            self.ghm_cls = GHMC(**ghm_cls, all_reduce=ghm_all_reduce)
        self.ghm_reg = None
        if self.box_reg_loss_type == "ghm_r":
            _check_ghm("ghm_reg", **(ghm_reg or {}))
            self.ghm_reg = GHMR(**(ghm_reg or {}), all_reduce=ghm_all_reduce)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        gh = cfg.MODEL.GHM
        ret.update(
            eapm_cls_mu=eapm_strength_from_config(cfg, "CLS"),
            eapm_reg_theta=eapm_strength_from_config(cfg, "REG"),
            balanced_l1=balanced_l1_from_config(cfg),
            loss_normalizer=cfg.MODEL.LOSS_NORMALIZER.TYPE,
            # GHM-C only when enabled; GHM-R whenever the box loss type is "ghm_r"; the values
            # as the config holds them (the constructor and the GHM losses check them)
            ghm_cls=dict(bins=gh.CLS.BINS, momentum=gh.CLS.MOMENTUM) if gh.CLS.ENABLED else None,
            ghm_cls_loss_weight=gh.CLS.LOSS_WEIGHT,
            ghm_reg=dict(mu=gh.REG.MU, bins=gh.REG.BINS, momentum=gh.REG.MOMENTUM),
            ghm_reg_loss_weight=gh.REG.LOSS_WEIGHT,
            ghm_all_reduce=gh.ALL_REDUCE,
            ghm_per_level=gh.PER_LEVEL,
            cls_loss_weight=cfg.MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT,
            **kernel_args_from_config(cfg),
        )
        return ret

    @adapted_from(
        RetinaNet.losses,
        "detectron2/modeling/meta_arch/retinanet.py",
        "ccd4d596350991914e1ac3c8aa24e7f6f0d8eb42",
    )
    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """Same inputs, outputs and normalisation as ``RetinaNet.losses``, with each loss in
        its own method (``classification_loss``, ``box_regression_loss``: override one to
        replace that loss) and the classification loss weight applied here."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        valid_mask = gt_labels >= 0
        pos_mask = valid_mask & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = dense_loss_normalizer(self, num_pos_anchors, self.loss_normalizer_type)
        loss_cls = self.classification_loss(pred_logits, gt_labels, normalizer)
        loss_box_reg = self.box_regression_loss(
            anchors, pred_anchor_deltas, gt_boxes, pos_mask, normalizer
        )
        return {
            "loss_cls": weighted_loss(loss_cls, self.cls_loss_weight),
            "loss_box_reg": loss_box_reg,
        }

    def classification_loss(self, pred_logits, gt_labels, normalizer):
        """The classification loss, normalised (before ``cls_loss_weight``): (EAPM) focal
        loss summed over the valid anchors and divided by ``normalizer``, or GHM-C (normalised
        by its own count). Its EAPM diagnostics go to the event storage.

        Args:
            pred_logits: per level, (N, R_l, K) logits.
            gt_labels: (N, R) matched labels: a class in [0, K), K = background, -1 ignored.
            normalizer: the (EMA or all-reduced) number of foreground anchors.

        Returns a scalar tensor."""
        if self.ghm_cls is not None:
            return self.ghm_cls_loss_weight * self._ghm_cls_loss(pred_logits, gt_labels)
        valid_mask = gt_labels >= 0
        # one-hot targets without the background column
        target = F.one_hot(gt_labels[valid_mask], num_classes=self.num_classes + 1)[:, :-1]
        logits = cat(pred_logits, dim=1)[valid_mask]
        return model_focal_loss_sum(self, logits, target) / normalizer

    def box_regression_loss(self, anchors, pred_anchor_deltas, gt_boxes, pos_mask, normalizer):
        """The box regression loss over the foreground anchors, normalised: the
        ``box_reg_loss_type`` (balanced L1 with EAPM when ``eapm_reg_theta > 0``, an EAPM IoU
        loss, or detectron2's) summed and divided by ``normalizer``, or GHM-R (normalised by
        its own count). Its EAPM diagnostics go to the event storage.

        Args:
            anchors: per level, ``Boxes`` of R_l anchors (shared by the images).
            pred_anchor_deltas: per level, (N, R_l, 4) predicted deltas.
            gt_boxes: per image, (R, 4) matched GT boxes of every anchor.
            pos_mask: (N, R) bool, the foreground anchors.
            normalizer: the (EMA or all-reduced) number of foreground anchors.

        Returns a scalar tensor. ``foreground_deltas`` gives the foreground anchors' boxes,
        GT boxes, predicted and target deltas to a subclass that replaces this loss."""
        if self.box_reg_loss_type == "ghm_r":  # normalised by its own count
            return self.ghm_reg_loss_weight * self._ghm_reg_loss(
                anchors, pred_anchor_deltas, gt_boxes, pos_mask
            )
        if self.box_reg_loss_type == "balanced_l1":
            loss = self._balanced_l1_box_loss(anchors, pred_anchor_deltas, gt_boxes, pos_mask)
        elif self.eapm_reg_theta > 0:  # an IoU loss (check_box_loss)
            loss = self._eapm_iou_box_loss(anchors, pred_anchor_deltas, gt_boxes, pos_mask)
        else:
            loss = _dense_box_regression_loss(
                anchors,
                self.box2box_transform,
                pred_anchor_deltas,
                gt_boxes,
                pos_mask,
                box_reg_loss_type=self.box_reg_loss_type,
                smooth_l1_beta=self.smooth_l1_beta,
            )
        return loss / normalizer

    def _level_slices(self, level_sizes: List[int]) -> List[slice]:
        """The anchor ranges the GHM losses are called on: one per level, or all at once."""
        if not self.ghm_per_level:
            return [slice(0, sum(level_sizes))]
        ends = torch.tensor(level_sizes).cumsum(0).tolist()
        return [slice(e - n, e) for n, e in zip(level_sizes, ends)]

    def _ghm_cls_loss(self, pred_logits, gt_labels):
        """Sum over the level slices of GHM-C on (images x anchors x classes) with one-hot
        targets; ignored anchors (label -1) are invalid elements."""
        logits = cat(pred_logits, dim=1)  # (N, R, K)
        valid = gt_labels >= 0
        labels = torch.where(valid, gt_labels, torch.full_like(gt_labels, self.num_classes))
        target = F.one_hot(labels, num_classes=self.num_classes + 1)[..., :-1]
        total = logits.new_zeros(())
        for sl in self._level_slices([x.shape[1] for x in pred_logits]):
            x = logits[:, sl]
            total = total + self.ghm_cls(x, target[:, sl], valid[:, sl, None].expand_as(x))
        return total

    def _ghm_reg_loss(self, anchors, pred_anchor_deltas, gt_boxes, pos_mask):
        """Sum over the level slices of GHM-R on the positive anchors' deltas (every
        coordinate of a positive anchor valid, as mmdetection's bbox weights)."""
        all_anchors = type(anchors[0]).cat(anchors).tensor  # (R, 4)
        gt = torch.stack(gt_boxes)  # (N, R, 4)
        pred = cat(pred_anchor_deltas, dim=1)  # (N, R, 4)
        total = pred.new_zeros(())
        for sl in self._level_slices([len(a) for a in anchors]):
            pos = pos_mask[:, sl]
            pos_anchors = all_anchors[sl][None].expand(pos.shape[0], -1, -1)[pos]
            gt_deltas = self.box2box_transform.get_deltas(pos_anchors, gt[:, sl][pos])
            total = total + self.ghm_reg(pred[:, sl][pos], gt_deltas)
        return total

    def foreground_deltas(self, anchors, pred_anchor_deltas, gt_boxes, pos_mask):
        """The foreground anchors' (P, 4) boxes, GT boxes, predicted and target deltas (the
        ``box2box_transform``'s), in the order of ``pos_mask``: what a box loss of your own
        needs (``box_regression_loss``)."""
        anchors = type(anchors[0]).cat(anchors).tensor  # (R, 4)
        pos_gt = torch.stack(gt_boxes)[pos_mask]  # (P, 4)
        pos_anchors = anchors[None].expand(pos_mask.shape[0], -1, -1)[pos_mask]
        gt_deltas = self.box2box_transform.get_deltas(pos_anchors, pos_gt)
        pred = cat(pred_anchor_deltas, dim=1)[pos_mask]
        return pos_anchors, pos_gt, pred, gt_deltas

    def _eapm_iou_box_loss(self, anchors, pred_anchor_deltas, gt_boxes, pos_mask):
        """Summed EAPM IoU loss (giou / diou / ciou at the modulated deltas) over the
        foreground anchors (a scalar); GoS / MF of dw, dh as ``eapm/reg_gos`` / ``_mf``."""
        pos_anchors, pos_gt, pred, gt_deltas = self.foreground_deltas(
            anchors, pred_anchor_deltas, gt_boxes, pos_mask
        )
        loss, ea, mf = eapm_iou_box_loss(
            self.box2box_transform,
            pos_anchors,
            pos_gt,
            pred,
            gt_deltas,
            self.eapm_reg_theta,
            self.box_reg_loss_type,
        )
        put_reg_stats(ea, mf, self.histogram_period)
        return loss

    def _balanced_l1_box_loss(self, anchors, pred_anchor_deltas, gt_boxes, pos_mask):
        """Summed (EAPM) balanced L1 over the foreground anchors' deltas (a scalar)."""
        _, _, pred, gt_deltas = self.foreground_deltas(
            anchors, pred_anchor_deltas, gt_boxes, pos_mask
        )
        return box_reg_balanced_l1(
            pred,
            gt_deltas,
            self.eapm_reg_theta,
            self.balanced_l1,
            histogram_period=self.histogram_period,
            compile_kernels=self.compile_kernels,
        )
