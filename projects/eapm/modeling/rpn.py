"""The RPN with EAPM on its objectness: ``EAPMRPN``
(``MODEL.PROPOSAL_GENERATOR.NAME: "EAPMRPN"``, ``MODEL.EAPM.RPN.*``).

detectron2's ``RPN`` whose objectness loss ``loss_rpn_cls`` can be EAPM binary cross
entropy (``eapm.losses.eapm_binary_cross_entropy_with_logits``: the BCE at the modulated
probability ``p' = p* + MF (p - p*)``, Dif = |p - p*|, MF = 1 + tanh(mu) - tanh(mu Dif)),
over the same sampled anchors and with the same normaliser (``batch_size_per_image`` x
images) and loss weight; the anchors, sampling, box loss and proposals are detectron2's.

Diagnostics (event storage, with EAPM on): the means of Dif and MF over the positive and the
negative sampled anchors every iteration (``eapm/rpn_dif_pos``, ``eapm/rpn_dif_neg``,
``eapm/rpn_mf_pos``, ``eapm/rpn_mf_neg``), their histograms (same names) every
``histogram_period`` iterations.
"""

from __future__ import annotations

from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator import RPN

from ..losses import eapm_binary_cross_entropy_with_logits
from ..losses.checks import check_flag
from .common import dense_focal_loss_sum
from .keys import (
    check_eapm_rpn_mu,
    check_histogram_period,
    eapm_strength_from_config,
    kernel_args_from_config,
)

__all__ = ["EAPMRPN"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class EAPMRPN(RPN):
    """``RPN`` + EAPM binary cross entropy on the objectness.

    Extra args, checked here (``ValueError``):
        eapm_rpn_mu: mu >= 0; 0 = detectron2's binary cross entropy (bitwise).
        histogram_period: log Dif / MF histograms every this many iterations (0 = never).
        compile_kernels: run the fused EAPM kernel through ``torch.compile``.

    ``from_config`` reads ``MODEL.EAPM.RPN.*`` and ``MODEL.EAPM.HISTOGRAM_PERIOD`` /
    ``COMPILE`` besides detectron2's keys. It builds the same modules as ``RPN``: at the
    same seed the parameters are detectron2's.
    """

    @configurable
    def __init__(
        self,
        *,
        eapm_rpn_mu: float = 0.0,
        histogram_period: int = 0,
        compile_kernels: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.eapm_rpn_mu = check_eapm_rpn_mu(eapm_rpn_mu)
        self.histogram_period = check_histogram_period(histogram_period)
        self.compile_kernels = check_flag(compile_kernels, "compile_kernels")

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(
            eapm_rpn_mu=eapm_strength_from_config(cfg, "RPN"), **kernel_args_from_config(cfg)
        )
        return ret

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """detectron2's RPN losses (same keys, normalisers and loss weights); with
        ``eapm_rpn_mu > 0`` its ``loss_rpn_cls`` is replaced by ``objectness_loss`` times the
        loss weight.

        detectron2's ``RPN.losses`` has no hook for its objectness loss: rather than
        repeating its body, its own ``loss_rpn_cls`` (one BCE over the sampled anchors) is
        computed and discarded. ``objectness_loss`` mirrors its definition (tested bitwise at
        mu 0)."""
        losses = super().losses(
            anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes
        )
        if self.eapm_rpn_mu > 0:
            weight = self.loss_weight.get("loss_rpn_cls", 1.0)
            losses["loss_rpn_cls"] = (
                self.objectness_loss(pred_objectness_logits, gt_labels) * weight
            )
        return losses

    def objectness_loss(
        self, pred_objectness_logits: List[torch.Tensor], gt_labels: List[torch.Tensor]
    ) -> torch.Tensor:
        """The objectness loss of detectron2's ``RPN.losses`` (before the loss weight) with
        EAPM: binary cross entropy summed over the sampled anchors (label 0 or 1) of all
        images, divided by ``batch_size_per_image`` x the number of images.

        Args:
            pred_objectness_logits: L tensors (N, Hi*Wi*A), the head's logits per level.
            gt_labels: N tensors (sum Hi*Wi*A,) of 1 (positive), 0 (negative), -1 (not
                sampled), as ``label_and_sample_anchors`` returns them.

        Returns a scalar. ``eapm_rpn_mu == 0``: detectron2's ``loss_rpn_cls`` bitwise;
        ``eapm_rpn_mu > 0``: EAPM binary cross entropy (the fused kernel of
        ``eapm_binary_cross_entropy_with_logits``), with the diagnostics of the module
        docstring."""
        num_images = len(gt_labels)
        labels = torch.stack(gt_labels)
        valid = labels >= 0
        logits = cat(pred_objectness_logits, dim=1)[valid]
        targets = labels[valid].to(torch.float32)
        if self.eapm_rpn_mu == 0:
            loss = eapm_binary_cross_entropy_with_logits(logits, targets, 0.0, reduction="sum")
        else:
            # EAPM BCE is EAPM focal loss without weighting (alpha < 0) and gamma 0
            loss = dense_focal_loss_sum(
                logits,
                targets,
                self.eapm_rpn_mu,
                alpha=-1.0,
                gamma=0.0,
                histogram_period=self.histogram_period,
                compile_kernels=self.compile_kernels,
                prefix="eapm/rpn",
            )
        return loss / (self.batch_size_per_image * num_images)
