# LazyConfig twin of libra_rcnn_R_50_FPN_1x.yaml (Base-LibraRCNN.yaml, paper Table 2): detectron2's
# COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py without the mask head (= Faster R-CNN
# R-50-FPN) + Balanced Feature Pyramid (P2-P6, refine at P4, non-local) + LibraROIHeads
# (IoU-balanced negatives in 3 bins, instance-balanced positives) + balanced L1 in the ROI box
# head (alpha 0.5, gamma 1.5, beta 1.0 on deltas weighted (10, 10, 5, 5)).
from detectron2.config import LazyCall as L

from eapm.modeling import BalancedFeaturePyramid, EAPMFastRCNNOutputLayers, LibraROIHeads

# Faster R-CNN R-50-FPN with this project's training settings (resumable loader, single scale
# 800, lr 0.02, no clipping, preemption): the twin of faster_rcnn_R_50_FPN_1x.yaml
from .faster_rcnn_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

# index into P2-P6: 2 = P4 (mmdetection's refine_level 2 for Faster R-CNN)
model.backbone = L(BalancedFeaturePyramid)(
    fpn=model.backbone, refine_level=2, refine_type="non_local"
)
model.roi_heads._target_ = LibraROIHeads
model.roi_heads.iou_balanced_num_bins = 3  # MODEL.ROI_HEADS.IOU_BALANCED_NUM_BINS
model.roi_heads.iou_balanced_floor_thresh = -1.0
model.roi_heads.iou_balanced_floor_fraction = 0.0
model.roi_heads.instance_balanced_pos = True
predictor = model.roi_heads.box_predictor
predictor._target_ = EAPMFastRCNNOutputLayers
predictor.box_reg_loss_type = "balanced_l1"  # MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE
predictor.balanced_l1 = (0.5, 1.5, 1.0)  # MODEL.BALANCED_L1.{ALPHA, GAMMA, BETA}
predictor.eapm_reg_theta = 0.0  # MODEL.EAPM.REG.THETA
predictor.compile_kernels = True  # MODEL.EAPM.COMPILE
del predictor

train.output_dir = "./output/COCO-Detection/libra_rcnn_R_50_FPN_1x"
