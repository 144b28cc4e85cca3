# LazyConfig twin of cascade_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml: Cascade R-CNN R50-FPN 1x with
# EAPM cross entropy on the box classification of every stage, mu = 1.5 (loss_cls_stage0/1/2
# change; regression, matching and inference are detectron2's).
from eapm.modeling import EAPMCascadeROIHeads, EAPMFastRCNNOutputLayers

from .cascade_rcnn_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads._target_ = EAPMCascadeROIHeads
for _predictor in model.roi_heads.box_predictors:
    _predictor.update(
        _target_=EAPMFastRCNNOutputLayers,
        eapm_cls_mu=1.5,  # MODEL.EAPM.CLS.MU
        histogram_period=0,  # MODEL.EAPM.HISTOGRAM_PERIOD
    )
train.output_dir = "./output/COCO-Detection/cascade_rcnn_R_50_FPN_1x_eapm_mu1.5"
