"""FCOS with EAPM focal loss (paper Table 1), registered as ``EAPMFCOS``, buildable
from yacs keys under ``MODEL.FCOS``.

detectron2 ships FCOS only as a LazyConfig model (not registered, ``__init__`` not
``@configurable``). ``EAPMFCOS`` subclasses it, adds a ``from_config`` that builds
the backbone and detectron2's ``FCOSHead`` from the config, and overrides only
``losses``. With EAPM off (and the default "ema" normaliser and "giou" box loss) the
three losses are computed by the same functions, on the same tensors, with the same
normaliser as detectron2's ``FCOS.losses``.

``build_fcos_resnet_fpn_backbone`` is the FCOS backbone: ResNet + FPN on res3-res5
with P6 / P7 computed from P5 (detectron2's ``LastLevelP6P7`` on the FPN output, as in
detectron2's FCOS LazyConfig), unlike RetinaNet's builder which takes them from C5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.utils.events import get_event_storage

from ..losses.checks import check_flag, choice, rule
from ..upstream import adapted_from
from .backbone import fpn_from_config
from .common import dense_loss_normalizer, model_focal_loss_sum, weighted_loss
from .keys import (
    check_cls_loss_weight,
    check_eapm_cls_mu,
    check_histogram_period,
    check_loss_normalizer,
    eapm_strength_from_config,
    kernel_args_from_config,
)

__all__ = ["EAPMFCOS", "build_fcos_resnet_fpn_backbone", "FCOS_BOX_LOSSES"]

# detectron2's FCOS initialises its (single, shared) EMA loss normaliser at 300
FCOS_NORMALIZER_INITIAL = 300
# regression losses FCOS accepts (on decoded boxes; detectron2's FCOS uses giou)
FCOS_BOX_LOSSES = ("giou", "diou", "ciou")
check_fcos_box_loss = choice("box_loss_type", FCOS_BOX_LOSSES)
# the head towers' norms accepted (names detectron2's get_norm knows)
FCOS_HEAD_NORMS = ("", "GN", "BN", "SyncBN", "FrozenBN", "LN")


# detectron2's FCOS and FCOSHead check none of their arguments: EAPMFCOS applies these rules
# (the constructor to its arguments, from_config to what it builds the head from)
def check_names(value, name: str = "head_in_features"):
    """``value`` must be a non-empty sequence of names."""
    names = isinstance(value, Sequence) and not isinstance(
        value, str
    )  # a LazyConfig ListConfig too
    if not (names and len(value) > 0 and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{name} must be a non-empty list of names, got {value!r}")
    return value


FCOS_ARG_CHECKS = {
    "num_classes": rule("num_classes", 1, integer=True),
    "test_topk_candidates": rule("test_topk_candidates", 1, integer=True),
    "head_in_features": check_names,
    "center_sampling_radius": rule("center_sampling_radius", 0, lo_open=True),
    "test_score_thresh": rule("test_score_thresh", 0, 1, hi_open=True),
    "test_nms_thresh": rule("test_nms_thresh", 0, 1, lo_open=True),
    # < 0 disables the alpha weighting (as fvcore)
    "focal_loss_alpha": rule("focal_loss_alpha", hi=1),
    "focal_loss_gamma": rule("focal_loss_gamma", 0),
}
check_num_convs = rule("num_convs", 1, integer=True)
check_prior_prob = rule("prior_prob", 0, 1, lo_open=True, hi_open=True)
check_head_norm = choice("head_norm", FCOS_HEAD_NORMS)


def check_gn_channels(norm: str, channels: int) -> None:
    """GroupNorm's 32 groups need at least 2 channels each (``ValueError``)."""
    if norm == "GN" and not (channels % 32 == 0 and channels >= 64):
        raise ValueError(
            f"head_norm 'GN' (32 groups) needs MODEL.FPN.OUT_CHANNELS a multiple of 32 and >= "
            f"64, got {channels} (with 32 channels each group holds one channel, which fails on "
            "the 1x1 P7 maps of small images); use HEAD_NORM ''"
        )


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape):
    """ResNet-FPN giving P3-P7 (with MODEL.FPN.IN_FEATURES res3-res5), P6 from P5 and
    P7 from P6 (3x3 stride-2 convs with MODEL.FPN.OUT_CHANNELS in and out)."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_block = LastLevelP6P7(out_channels, out_channels, in_feature="p5")
    return fpn_from_config(cfg, build_resnet_backbone(cfg, input_shape), top_block)


@META_ARCH_REGISTRY.register()
class EAPMFCOS(FCOS):
    """detectron2's FCOS whose classification loss can be EAPM focal loss.

    Extra args (besides FCOS's), checked here (``ValueError``):
        eapm_cls_mu: mu >= 0 of EAPM focal loss; 0 = detectron2's focal loss.
        box_loss_type: "giou" (detectron2's FCOS), "diou" or "ciou", on decoded boxes.
        loss_normalizer: "ema" (detectron2: one EMA of the positive count, initial 300,
            shared by the three losses) or "all_reduce" (mmdetection: this iteration's
            positive count averaged over all processes).
        histogram_period: log histograms of Dif / MF every this many iterations (>= 0).
        compile_kernels: run this model's EAPM loss kernels through ``torch.compile``.
        cls_loss_weight: factor (finite, > 0) of ``loss_fcos_cls``; 1.0 = the loss itself,
            bit for bit.

    ``from_config`` reads ``MODEL.FCOS.*`` (building the backbone and detectron2's
    ``FCOSHead``), ``MODEL.EAPM.CLS.*``, ``MODEL.EAPM.HISTOGRAM_PERIOD`` / ``COMPILE``,
    ``MODEL.LOSS_NORMALIZER.TYPE`` and ``MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT``;
    detectron2's FCOS checks none of its arguments: the constructor checks them
    (``FCOS_ARG_CHECKS``), ``from_config`` what it builds the head from (``NUM_CONVS``,
    ``PRIOR_PROB``, ``HEAD_NORM``; a GN head needs ``MODEL.FPN.OUT_CHANNELS`` a multiple of
    32 and >= 64).
    """

    @configurable
    def __init__(
        self,
        *,
        eapm_cls_mu: float = 0.0,
        box_loss_type: str = "giou",
        loss_normalizer: str = "ema",
        histogram_period: int = 0,
        compile_kernels: bool = False,
        cls_loss_weight: float = 1.0,
        **kwargs,
    ):
        for name, check in FCOS_ARG_CHECKS.items():
            if name in kwargs:
                check(kwargs[name])
        super().__init__(**kwargs)
        self.box_loss_type = check_fcos_box_loss(box_loss_type)
        self.eapm_cls_mu = check_eapm_cls_mu(eapm_cls_mu)
        self.loss_normalizer_type = check_loss_normalizer(loss_normalizer)
        self.histogram_period = check_histogram_period(histogram_period)
        self.compile_kernels = check_flag(compile_kernels, "compile_kernels")
        self.cls_loss_weight = float(check_cls_loss_weight(cls_loss_weight))

    @classmethod
    def from_config(cls, cfg):
        fc = cfg.MODEL.FCOS
        FCOS_ARG_CHECKS["head_in_features"](list(fc.IN_FEATURES))
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in fc.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"Invalid config MODEL.FCOS.IN_FEATURES = {list(fc.IN_FEATURES)!r}: {missing} not "
                f"produced by the backbone (it gives {sorted(shapes)}); use MODEL.BACKBONE.NAME "
                "'build_fcos_resnet_fpn_backbone'"
            )
        feature_shapes = [shapes[f] for f in fc.IN_FEATURES]
        check_num_convs(fc.NUM_CONVS)
        check_prior_prob(fc.PRIOR_PROB)
        check_head_norm(fc.HEAD_NORM)
        check_gn_channels(fc.HEAD_NORM, feature_shapes[0].channels)
        head = FCOSHead(
            input_shape=feature_shapes,
            num_classes=fc.NUM_CLASSES,
            conv_dims=[feature_shapes[0].channels] * fc.NUM_CONVS,
            norm=fc.HEAD_NORM,
            prior_prob=fc.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(fc.IN_FEATURES),
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_classes": fc.NUM_CLASSES,
            "center_sampling_radius": fc.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": fc.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": fc.FOCAL_LOSS_GAMMA,
            "test_score_thresh": fc.SCORE_THRESH_TEST,
            "test_topk_candidates": fc.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": fc.NMS_THRESH_TEST,
            "box_loss_type": fc.BOX_LOSS_TYPE,
            "eapm_cls_mu": eapm_strength_from_config(cfg, "CLS"),
            "loss_normalizer": cfg.MODEL.LOSS_NORMALIZER.TYPE,
            "cls_loss_weight": cfg.MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT,
            **kernel_args_from_config(cfg),
        }

    @adapted_from(
        FCOS.losses,
        "detectron2/modeling/meta_arch/fcos.py",
        "228fadb76de9d94c76c49fb2151264ceaefd34a4",
    )
    def losses(
        self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
    ):
        """Same inputs, outputs (``loss_fcos_cls/loc/ctr``) and normalisation as
        ``FCOS.losses``, with the classification and the box loss in their own methods
        (``classification_loss``, ``box_regression_loss``: override one to replace that
        loss); the loss normaliser and the classification loss weight are EAPM's. FCOS has no
        ignored locations."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos / num_images)
        normalizer = dense_loss_normalizer(
            self, num_pos, self.loss_normalizer_type, initial=FCOS_NORMALIZER_INITIAL
        )
        loss_cls = self.classification_loss(pred_logits, gt_labels, normalizer)
        loss_loc = self.box_regression_loss(
            anchors, pred_anchor_deltas, gt_boxes, pos_mask, normalizer
        )

        ctr_targets = self.compute_ctrness_targets(anchors, gt_boxes)  # (N, R)
        ctr_pred = torch.cat(pred_centerness, dim=1).squeeze(dim=2)  # (N, R)
        loss_ctr = F.binary_cross_entropy_with_logits(
            ctr_pred[pos_mask], ctr_targets[pos_mask], reduction="sum"
        )
        return {
            "loss_fcos_cls": weighted_loss(loss_cls, self.cls_loss_weight),
            "loss_fcos_loc": loss_loc,
            "loss_fcos_ctr": loss_ctr / normalizer,
        }

    def classification_loss(self, pred_logits, gt_labels, normalizer):
        """The classification loss, normalised (before ``cls_loss_weight``): (EAPM) focal
        loss over every location, summed and divided by ``normalizer``. Its EAPM diagnostics
        go to the event storage.

        Args:
            pred_logits: per level, (N, R_l, K) logits.
            gt_labels: (N, R) matched labels: a class in [0, K), K = background.
            normalizer: the (EMA or all-reduced) number of foreground locations.

        Returns a scalar tensor."""
        # one-hot targets without the background column
        targets = F.one_hot(gt_labels, num_classes=self.num_classes + 1)[:, :, :-1]
        logits = torch.cat(pred_logits, dim=1)  # (N, R, K)
        return model_focal_loss_sum(self, logits, targets) / normalizer

    def box_regression_loss(self, anchors, pred_anchor_deltas, gt_boxes, pos_mask, normalizer):
        """The box loss (``box_loss_type``, detectron2's) over the foreground locations,
        summed and divided by ``normalizer``.

        Args:
            anchors: per level, ``Boxes`` of the R_l locations (as points).
            pred_anchor_deltas: per level, (N, R_l, 4) predicted distances.
            gt_boxes: per image, (R, 4) matched GT boxes of every location.
            pos_mask: (N, R) bool, the foreground locations.
            normalizer: the (EMA or all-reduced) number of foreground locations.

        Returns a scalar tensor."""
        loss = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            gt_boxes,
            pos_mask,
            box_reg_loss_type=self.box_loss_type,
        )
        return loss / normalizer
