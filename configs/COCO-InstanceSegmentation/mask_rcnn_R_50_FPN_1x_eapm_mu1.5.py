# LazyConfig twin of mask_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml: Mask R-CNN R50-FPN 1x with EAPM
# cross entropy on the ROI box classification, mu = 1.5 (loss_cls changes; the mask and box
# losses are detectron2's). Other mu: model.roi_heads.box_predictor.eapm_cls_mu=2.0 on the
# command line.
from eapm.modeling import EAPMFastRCNNOutputLayers, EAPMROIHeads

from .mask_rcnn_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads._target_ = EAPMROIHeads
model.roi_heads.box_predictor.update(
    _target_=EAPMFastRCNNOutputLayers,
    eapm_cls_mu=1.5,  # MODEL.EAPM.CLS.MU
    histogram_period=0,  # MODEL.EAPM.HISTOGRAM_PERIOD
)
train.output_dir = "./output/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_eapm_mu1.5"
