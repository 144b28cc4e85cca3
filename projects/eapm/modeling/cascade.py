"""Cascade R-CNN with EAPM in every stage: ``EAPMCascadeROIHeads``
(``MODEL.ROI_HEADS.NAME: "EAPMCascadeROIHeads"``).

detectron2's ``CascadeROIHeads`` whose every stage's box predictor is an
``EAPMFastRCNNOutputLayers`` with that stage's box transform
(``MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS``): EAPM cross entropy on each stage's
softmax classification (``MODEL.EAPM.CLS.*``, the same mu in every stage), the (EAPM)
balanced L1 box loss and EAPM regression with the IoU losses (giou / diou / ciou) are
available; the stages, their matching, the per-stage loss names
(``loss_cls_stage0``, ...) and the inference (scores averaged over the stages) are
detectron2's. Each stage's EAPM diagnostics carry the stage in their names
(``stage1/eapm/roi_cls_mf_fg``, ...), as detectron2's own per-stage scalars
(``stage1/fast_rcnn/cls_accuracy``).
"""

from __future__ import annotations

from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import CascadeROIHeads

from .roi_heads import EAPMBoxPredictorHeads, rebuilt_as, require_predictor

__all__ = ["EAPMCascadeROIHeads"]


@ROI_HEADS_REGISTRY.register()
class EAPMCascadeROIHeads(EAPMBoxPredictorHeads, CascadeROIHeads):
    """``CascadeROIHeads`` whose box predictors are ``EAPMFastRCNNOutputLayers``.

    Args: those of ``CascadeROIHeads``; every element of ``box_predictors`` must be an
    ``EAPMFastRCNNOutputLayers`` (``TypeError`` otherwise); the k-th gets the
    ``stage_name`` ``"stage<k>"`` (its diagnostics' prefix). From a config each stage's
    predictor is built from the same keys with that stage's box transform, holding the
    parameters detectron2's would have at the same seed (``rebuilt_as``): the model
    initialises as detectron2's with ``CascadeROIHeads``.
    """

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for k, predictor in enumerate(self.box_predictor):
            require_predictor(predictor, self.box_predictor_class, f"box_predictors[{k}]")
            predictor.stage_name = f"stage{k}"  # CascadeROIHeads' name scope of stage k

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            rebuilt_as(
                cls.box_predictor_class,
                built,
                cfg,
                head.output_shape,
                box2box_transform=built.box2box_transform,
            )
            for head, built in zip(ret["box_heads"], ret["box_predictors"])
        ]
        return ret
