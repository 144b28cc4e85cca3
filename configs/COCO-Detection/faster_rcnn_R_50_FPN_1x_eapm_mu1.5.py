# LazyConfig twin of faster_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml: Faster R-CNN R50-FPN 1x with EAPM
# cross entropy on the ROI box classification, mu = 1.5 (other mu: add
# model.roi_heads.box_predictor.eapm_cls_mu=2.0 to the command line). EAPM on the RPN
# objectness too: model.proposal_generator._target_ = EAPMRPN and
# model.proposal_generator.eapm_rpn_mu = 1.5.
from eapm.modeling import EAPMFastRCNNOutputLayers, EAPMROIHeads

from .faster_rcnn_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads._target_ = EAPMROIHeads
model.roi_heads.box_predictor.update(
    _target_=EAPMFastRCNNOutputLayers,
    eapm_cls_mu=1.5,  # MODEL.EAPM.CLS.MU
    histogram_period=0,  # MODEL.EAPM.HISTOGRAM_PERIOD
)
train.output_dir = "./output/COCO-Detection/faster_rcnn_R_50_FPN_1x_eapm_mu1.5"
