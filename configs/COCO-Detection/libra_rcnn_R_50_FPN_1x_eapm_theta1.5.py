# LazyConfig twin of libra_rcnn_R_50_FPN_1x_eapm_theta1.5.yaml (paper Table 2): Libra R-CNN with
# EAPM balanced L1 in the ROI box head, theta = 1.5 (others: model.roi_heads.box_predictor.
# eapm_reg_theta=1.0 on the command line).
from .libra_rcnn_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_predictor.eapm_reg_theta = 1.5
train.output_dir = "./output/COCO-Detection/libra_rcnn_R_50_FPN_1x_eapm_theta1.5"
