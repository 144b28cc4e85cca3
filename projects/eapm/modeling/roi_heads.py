"""The EAPM ROI heads of the R-CNN models (Faster / Mask / Cascade / Libra R-CNN).

* ``EAPMFastRCNNOutputLayers``: detectron2's ``FastRCNNOutputLayers`` whose losses can use
  EAPM: the softmax box classification with EAPM cross entropy (``MODEL.EAPM.CLS.*``:
  ``eapm.losses.eapm_cross_entropy``, Dif = 1 - p_y of each sampled ROI, background
  included; mean over the sampled ROIs as detectron2's ``loss_cls``), and the box regression
  with the balanced L1 loss (``MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE "balanced_l1"``,
  ``MODEL.BALANCED_L1.*``) or detectron2's losses, with EAPM (``MODEL.EAPM.REG.*``) on balanced
  L1 or the IoU losses "giou" / "diou" / "ciou": the dw/dh of the foreground ROIs'
  class-specific deltas are modulated by their Gap-over-Sum (for an IoU loss, then decoded).
  As in detectron2, the summed box loss is divided by the number of sampled ROIs. The deltas are
  the box transform's (weights (10, 10, 5, 5) applied, = mmdetection's target stds
  (0.1, 0.1, 0.2, 0.2)); GoS is scale-free, so the weights do not change it.
* ``EAPMROIHeads`` (``MODEL.ROI_HEADS.NAME: "EAPMROIHeads"``): detectron2's
  ``StandardROIHeads`` (Faster and Mask R-CNN) with the ``EAPMFastRCNNOutputLayers`` box
  predictor; its other parts (sampling, box head, mask head) are detectron2's. At the same
  seed it initialises every parameter as ``StandardROIHeads`` does, and with EAPM off its
  losses are detectron2's bitwise.
* ``LibraROIHeads`` (``MODEL.ROI_HEADS.NAME: "LibraROIHeads"``): ``StandardROIHeads`` with
  IoU-balanced negative and instance-balanced positive sampling
  (``MODEL.ROI_HEADS.IOU_BALANCED_*``, ``INSTANCE_BALANCED_POS``) and the
  ``EAPMFastRCNNOutputLayers`` box predictor. With ``IOU_BALANCED_NUM_BINS: 0`` and
  ``INSTANCE_BALANCED_POS: False`` the sampling is detectron2's own.

The cascade (``EAPMCascadeROIHeads``) is in ``eapm.modeling.cascade``.

Diagnostics (event storage, with EAPM cross entropy on): the means of Dif and MF over the
foreground and the background ROIs every iteration (``eapm/roi_cls_dif_fg``,
``eapm/roi_cls_dif_bg``, ``eapm/roi_cls_mf_fg``, ``eapm/roi_cls_mf_bg``), their histograms
(same names) every ``histogram_period`` iterations; a predictor with a ``stage_name`` (a
cascade stage) prefixes every name with ``<stage_name>/``, as detectron2 names its
per-stage scalars.

The IoU-balanced sampler needs each proposal's best IoU, which detectron2's
``_sample_proposals`` is not given: the ROI heads' matcher is a ``MaxIoUMatcher``
that keeps the per-proposal maximum of the IoU matrix of its last call, which
``label_and_sample_proposals`` makes right before ``_sample_proposals`` for the same
image.
"""

from __future__ import annotations

import contextlib
from typing import Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import cat, nonzero_tuple
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import ROIHeads, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.utils.events import get_event_storage

from ..losses import (
    check_balanced_l1_params,
    eapm_ce_stats,
    eapm_cross_entropy,
    gap_over_sum,
    modulating_factor,
)
from ..losses.checks import check_flag, choice, rule
from ..upstream import adapted_from
from .common import IOU_BOX_LOSSES, box_reg_balanced_l1, check_eapm_box_loss, eapm_iou_box_loss
from .keys import (
    BOX_REG_LOSSES,
    balanced_l1_from_config,
    check_eapm_cls_mu,
    check_eapm_reg_theta,
    check_histogram_period,
    eapm_strength_from_config,
    kernel_args_from_config,
)
from .sampling import instance_balanced_positives, iou_balanced_negatives, random_subset

__all__ = [
    "EAPMBoxPredictorHeads",
    "EAPMFastRCNNOutputLayers",
    "EAPMROIHeads",
    "LibraROIHeads",
    "MaxIoUMatcher",
    "rebuilt_as",
    "require_predictor",
]

check_box_reg_loss_type = choice("box_reg_loss_type", BOX_REG_LOSSES)
check_iou_balanced_num_bins = rule("iou_balanced_num_bins", 0, integer=True)
check_iou_balanced_floor_fraction = rule("iou_balanced_floor_fraction", 0, 1)
check_iou_balanced_floor_thresh = rule("iou_balanced_floor_thresh", hi=1)


def check_softmax_cls(use_sigmoid_ce: bool, eapm_cls_mu: float) -> None:
    """Raise ``ValueError`` if EAPM cross entropy (``eapm_cls_mu > 0``) is asked of a box
    predictor whose classification is per-class sigmoid: EAPM modulates the softmax."""
    if use_sigmoid_ce and eapm_cls_mu > 0:
        raise ValueError(
            "use_sigmoid_ce must be False for EAPM cross entropy (MODEL.EAPM.CLS.ENABLED, mu "
            f"{eapm_cls_mu}), which modulates the softmax classification, got True"
        )


class EAPMFastRCNNOutputLayers(FastRCNNOutputLayers):
    """``FastRCNNOutputLayers`` + EAPM cross entropy for the classification and the (EAPM)
    balanced L1 box regression loss, and EAPM regression with detectron2's IoU losses.

    Extra args, checked here (``ValueError``), as is ``box_reg_loss_type`` (one of
    ``BOX_REG_LOSSES``):
        eapm_cls_mu: mu >= 0 of EAPM cross entropy on the softmax classification; 0 =
            detectron2's cross entropy (bitwise). > 0 needs ``use_sigmoid_ce=False``.
        eapm_reg_theta: theta >= 0 of EAPM regression; 0 = no modulation. > 0 needs
            ``box_reg_loss_type`` "balanced_l1" (EAPM balanced L1) or one of detectron2's IoU
            losses "giou" / "diou" / "ciou" (the dw, dh deltas modulated, then decoded).
        balanced_l1: (alpha, gamma, beta) > 0; Libra R-CNN uses (0.5, 1.5, 1.0).
        histogram_period: log Dif / GoS / MF histograms every this many iterations (0 = never).
        compile_kernels: run the balanced L1 kernel through ``torch.compile``.
        stage_name: "" or a cascade stage's name (``"stage1"``): the diagnostics' names get
            the prefix ``"<stage_name>/"`` (``EAPMCascadeROIHeads`` sets it).

    ``from_config`` reads ``MODEL.EAPM.CLS.*``, ``MODEL.EAPM.REG.*``, ``MODEL.BALANCED_L1.*``
    and ``MODEL.EAPM.HISTOGRAM_PERIOD`` / ``COMPILE`` besides detectron2's keys.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        eapm_cls_mu: float = 0.0,
        eapm_reg_theta: float = 0.0,
        balanced_l1: Tuple[float, float, float] = (0.5, 1.5, 1.0),
        histogram_period: int = 0,
        compile_kernels: bool = False,
        stage_name: str = "",
        **kwargs,
    ):
        super().__init__(input_shape, **kwargs)
        self.eapm_cls_mu = check_eapm_cls_mu(eapm_cls_mu)
        check_softmax_cls(self.use_sigmoid_ce, self.eapm_cls_mu)
        self.eapm_reg_theta = check_eapm_reg_theta(eapm_reg_theta)
        check_box_reg_loss_type(self.box_reg_loss_type)
        check_eapm_box_loss(self.box_reg_loss_type, self.eapm_reg_theta)
        if self.box_reg_loss_type == "balanced_l1" and len(self.box2box_transform.weights) != 4:
            raise ValueError("the balanced L1 box loss supports axis-aligned boxes (4 deltas) only")
        if self.eapm_reg_theta > 0 and len(self.box2box_transform.weights) != 4:
            raise ValueError("EAPM regression supports axis-aligned boxes (4 deltas) only")
        check_balanced_l1_params(*balanced_l1)
        self.balanced_l1 = tuple(float(v) for v in balanced_l1)
        self.histogram_period = check_histogram_period(histogram_period)
        self.compile_kernels = check_flag(compile_kernels, "compile_kernels")
        if not isinstance(stage_name, str):
            raise ValueError(f"stage_name must be a string, got {stage_name!r}")
        self.stage_name = stage_name

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(
            eapm_cls_mu=eapm_strength_from_config(cfg, "CLS"),
            eapm_reg_theta=eapm_strength_from_config(cfg, "REG"),
            balanced_l1=balanced_l1_from_config(cfg),
            **kernel_args_from_config(cfg),
        )
        return ret

    # ------------------------------------------------------------ diagnostics
    def _scope(self):
        """The event storage's name scope of this predictor's scalars (its stage, if any)."""
        if not self.stage_name:
            return contextlib.nullcontext()
        return get_event_storage().name_scope(self.stage_name)

    def _histogram_name(self, name: str) -> str:
        return f"{self.stage_name}/{name}" if self.stage_name else name

    def _histograms_due(self) -> bool:
        return self.histogram_period > 0 and get_event_storage().iter % self.histogram_period == 0

    # ----------------------------------------------------------------- losses
    def losses(self, predictions, proposals):
        """detectron2's losses (same keys, normalisers and loss weights); with
        ``eapm_cls_mu > 0``, or in a subclass that overrides ``cls_loss`` (the seam for a
        classification loss of your own; ``box_reg_loss`` is the one for the box loss), its
        ``loss_cls`` is replaced by ``cls_loss`` times the loss weight.

        detectron2's ``FastRCNNOutputLayers.losses`` has no hook for its cross entropy: rather
        than repeating its body, its own ``loss_cls`` (one (R, K+1) log-softmax) is computed
        and discarded. ``cls_loss`` mirrors its definition (tested bitwise at mu 0)."""
        losses = super().losses(predictions, proposals)
        if self.eapm_cls_mu > 0 or type(self).cls_loss is not EAPMFastRCNNOutputLayers.cls_loss:
            scores = predictions[0]
            if len(proposals):
                gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            else:
                gt_classes = torch.zeros(0, dtype=torch.long, device=scores.device)
            weight = self.loss_weight.get("loss_cls", 1.0)
            losses["loss_cls"] = self.cls_loss(scores, gt_classes) * weight
        return losses

    def cls_loss(self, scores: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
        """The classification loss of detectron2's ``FastRCNNOutputLayers.losses`` (softmax,
        before the loss weight) with EAPM: the mean over the R sampled ROIs of
        ``eapm_cross_entropy(scores, gt_classes, eapm_cls_mu)``.

        Args:
            scores: (R, K + 1) class logits (background = index K).
            gt_classes: (R,) integer labels in [0, K].

        Returns a scalar; 0 with a gradient path for R == 0. ``eapm_cls_mu == 0`` is
        detectron2's ``loss_cls`` bitwise. With ``eapm_cls_mu > 0`` the Dif / MF diagnostics
        of the module docstring go to the event storage. Raises ``ValueError`` for a label
        outside [0, K] (``eapm_cross_entropy``)."""
        loss = eapm_cross_entropy(scores, gt_classes, self.eapm_cls_mu, reduction="mean")
        if self.eapm_cls_mu > 0 and gt_classes.numel() > 0:
            self._log_cls_stats(scores, gt_classes)
        return loss

    @torch.no_grad()
    def _log_cls_stats(self, scores, gt_classes) -> None:
        dif, mf = eapm_ce_stats(scores, gt_classes, self.eapm_cls_mu)
        fg = gt_classes < self.num_classes
        fgf = fg.to(dif.dtype)
        bgf = 1.0 - fgf
        sums = torch.stack(
            [(dif * fgf).sum(), (dif * bgf).sum(), (mf * fgf).sum(), (mf * bgf).sum(), fgf.sum()]
        )
        dif_fg, dif_bg, mf_fg, mf_bg, n_fg = sums.tolist()  # one host synchronisation
        n_bg = gt_classes.numel() - n_fg
        storage = get_event_storage()
        prefix = "eapm/roi_cls"
        with self._scope():
            for part, n, d, m in (("fg", n_fg, dif_fg, mf_fg), ("bg", n_bg, dif_bg, mf_bg)):
                if n > 0:
                    storage.put_scalar(f"{prefix}_dif_{part}", d / n)
                    storage.put_scalar(f"{prefix}_mf_{part}", m / n)
        if self._histograms_due():
            for name, values in (("dif", dif), ("mf", mf)):
                for part, mask in (("fg", fg), ("bg", ~fg)):
                    if mask.any():
                        hist = self._histogram_name(f"{prefix}_{name}_{part}")
                        storage.put_histogram(hist, values[mask])

    def box_reg_loss(self, proposal_boxes, gt_boxes, pred_deltas, gt_classes):
        """The box loss over the foreground ROIs' deltas of their GT class (class-agnostic:
        their only deltas), summed and divided by the number of sampled ROIs.

        "balanced_l1": (EAPM) balanced L1 on the deltas. "giou" / "diou" / "ciou" with
        ``eapm_reg_theta > 0``: EAPM through the general recipe (``eapm.losses.
        modulate_prediction``): the dw, dh of the predicted deltas are modulated by their
        Gap-over-Sum factor, ``t' = t* + MF (t - t*)``, then decoded and given to detectron2's
        IoU loss, whose gradient at the decoded modulated boxes reaches the deltas unchanged
        (MF not differentiated). Other loss types and theta 0: detectron2's."""
        eapm_iou = self.eapm_reg_theta > 0 and self.box_reg_loss_type in IOU_BOX_LOSSES
        if self.box_reg_loss_type != "balanced_l1" and not eapm_iou:
            return super().box_reg_loss(proposal_boxes, gt_boxes, pred_deltas, gt_classes)
        fg = nonzero_tuple((gt_classes >= 0) & (gt_classes < self.num_classes))[0]
        if pred_deltas.shape[1] == 4:  # class-agnostic
            fg_pred = pred_deltas[fg]
        else:
            fg_pred = pred_deltas.view(-1, self.num_classes, 4)[fg, gt_classes[fg]]
        fg_target = self.box2box_transform.get_deltas(proposal_boxes[fg], gt_boxes[fg])
        if eapm_iou:
            loss = self._eapm_iou_loss(proposal_boxes[fg], gt_boxes[fg], fg_pred, fg_target)
            return loss / max(gt_classes.numel(), 1.0)
        with self._scope():
            loss = box_reg_balanced_l1(
                fg_pred,
                fg_target,
                self.eapm_reg_theta,
                self.balanced_l1,
                # a stage's histograms are named here, with the stage
                histogram_period=0 if self.stage_name else self.histogram_period,
                compile_kernels=self.compile_kernels,
            )
        if self.stage_name and self.eapm_reg_theta > 0 and fg.numel() and self._histograms_due():
            with torch.no_grad():
                ea = gap_over_sum(fg_pred[:, 2:], fg_target[:, 2:])
                self._log_reg_stats(ea, modulating_factor(ea, self.eapm_reg_theta), means=False)
        return loss / max(gt_classes.numel(), 1.0)

    def _eapm_iou_loss(self, proposals, gt, fg_pred, fg_target):
        """Summed EAPM IoU loss (``box_reg_loss``) of P foreground ROIs: (P, 4) boxes and
        deltas."""
        loss, ea, mf = eapm_iou_box_loss(
            self.box2box_transform,
            proposals,
            gt,
            fg_pred,
            fg_target,
            self.eapm_reg_theta,
            self.box_reg_loss_type,
        )
        if fg_pred.shape[0] > 0:
            self._log_reg_stats(ea, mf, means=True)
        return loss

    @torch.no_grad()
    def _log_reg_stats(self, gos_values, mf, *, means: bool) -> None:
        """GoS / MF of the dw, dh components: means as ``eapm/reg_{gos,mf}`` (``means``), and
        histograms of the same names when due (with the stage's prefix)."""
        storage = get_event_storage()
        if means:
            with self._scope():
                storage.put_scalar("eapm/reg_gos", float(gos_values.mean()))
                storage.put_scalar("eapm/reg_mf", float(mf.mean()))
        if self._histograms_due():
            storage.put_histogram(self._histogram_name("eapm/reg_gos"), gos_values.flatten())
            storage.put_histogram(self._histogram_name("eapm/reg_mf"), mf.flatten())


def rebuilt_as(cls, built: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
    """``cls(*args, **kwargs)`` holding the parameters and buffers of ``built`` (a module
    of the same structure that detectron2 built in its place), constructed without drawing
    from torch's default CPU generator: a model that swaps ``built`` for it initialises every
    parameter, this module's and the later modules', as the model with ``built`` does at
    the same seed. Raises ``RuntimeError`` (``load_state_dict``, strict) when the two
    modules' parameters differ in names or shapes."""
    with torch.random.fork_rng(devices=[]):
        new = cls(*args, **kwargs)
    new.load_state_dict(built.state_dict())
    return new


def require_predictor(predictor, cls, where: str) -> None:
    """Raise ``TypeError`` unless ``predictor`` is an instance of ``cls`` (an ROI heads'
    box predictor that must be EAPM's, e.g. from a LazyConfig that kept detectron2's)."""
    if not isinstance(predictor, cls):
        raise TypeError(
            f"{where} must be a {cls.__module__}.{cls.__qualname__} (it owns the EAPM losses), "
            f"got {type(predictor).__module__}.{type(predictor).__qualname__}"
        )


class EAPMBoxPredictorHeads:
    """Mixin of the ROI heads whose box predictors are ``box_predictor_class``
    (``EAPMFastRCNNOutputLayers``): the predictor reads the EAPM keys and owns the losses."""

    box_predictor_class = EAPMFastRCNNOutputLayers


@ROI_HEADS_REGISTRY.register()
class EAPMROIHeads(EAPMBoxPredictorHeads, StandardROIHeads):
    """detectron2's ``StandardROIHeads`` (Faster R-CNN; Mask R-CNN with ``MODEL.MASK_ON``)
    whose box predictor is ``EAPMFastRCNNOutputLayers``: EAPM cross entropy
    (``MODEL.EAPM.CLS.*``), the (EAPM) balanced L1 box loss and EAPM regression with the
    IoU losses (giou / diou / ciou) are available, everything else is detectron2's.

    Args: those of ``StandardROIHeads``; ``box_predictor`` must be an
    ``EAPMFastRCNNOutputLayers`` (``TypeError`` otherwise). From a config the predictor is
    built from the same keys, with the parameters detectron2's would have at the same seed
    (``rebuilt_as``), so the model initialises as detectron2's with ``StandardROIHeads``.
    """

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        require_predictor(self.box_predictor, self.box_predictor_class, "box_predictor")

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = rebuilt_as(
            cls.box_predictor_class, ret["box_predictor"], cfg, ret["box_head"].output_shape
        )
        return ret


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
class LibraROIHeads(EAPMBoxPredictorHeads, StandardROIHeads):
    """``StandardROIHeads`` with Libra R-CNN's balanced sampling and the
    ``EAPMFastRCNNOutputLayers`` box predictor.

    Extra args:
        iou_balanced_num_bins: IoU bins of the negative sampler; 0 = detectron2's random
            negatives, 1 = random above the floor.
        iou_balanced_floor_thresh: negatives below it are sampled at random (< 0: none).
        iou_balanced_floor_fraction: fraction of the negatives drawn below the floor.
        instance_balanced_pos: positives spread evenly over the GT instances.

    The losses are ``EAPMFastRCNNOutputLayers``'s (EAPM cross entropy, balanced L1, EAPM
    regression).
    ``from_config`` reads ``MODEL.ROI_HEADS.IOU_BALANCED_*`` / ``INSTANCE_BALANCED_POS``.
    """

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
        self.iou_balanced_num_bins = check_iou_balanced_num_bins(iou_balanced_num_bins)
        self.iou_balanced_floor_thresh = check_iou_balanced_floor_thresh(iou_balanced_floor_thresh)
        self.iou_balanced_floor_fraction = check_iou_balanced_floor_fraction(
            iou_balanced_floor_fraction
        )
        self.instance_balanced_pos = check_flag(instance_balanced_pos, "instance_balanced_pos")
        if not isinstance(self.proposal_matcher, MaxIoUMatcher):
            self.proposal_matcher = MaxIoUMatcher.from_matcher(self.proposal_matcher)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        rh = cfg.MODEL.ROI_HEADS
        ret.update(
            # the values as the config holds them: the constructor's rules check them
            iou_balanced_num_bins=rh.IOU_BALANCED_NUM_BINS,
            iou_balanced_floor_thresh=rh.IOU_BALANCED_FLOOR_THRESH,
            iou_balanced_floor_fraction=rh.IOU_BALANCED_FLOOR_FRACTION,
            instance_balanced_pos=rh.INSTANCE_BALANCED_POS,
        )
        return ret

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
