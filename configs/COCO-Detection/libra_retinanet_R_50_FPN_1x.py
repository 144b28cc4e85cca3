# LazyConfig twin of libra_retinanet_R_50_FPN_1x.yaml (Base-LibraRetinaNet.yaml): RetinaNet
# R-50-FPN (P3-P7) + Balanced Feature Pyramid (refine at P4, non-local) + balanced L1 box loss
# (alpha 0.5, gamma 1.5, beta 0.11 on unit-weight deltas), the whole model's gradient norm
# clipped at 35.
from detectron2.config import LazyCall as L

from eapm.modeling import BalancedFeaturePyramid

from .retinanet_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

# index into P3-P7: 1 = P4 (mmdetection's refine_level 1 for RetinaNet)
model.backbone = L(BalancedFeaturePyramid)(
    fpn=model.backbone, refine_level=1, refine_type="non_local"
)
model.box_reg_loss_type = "balanced_l1"
model.balanced_l1 = (0.5, 1.5, 0.11)  # MODEL.BALANCED_L1.{ALPHA, GAMMA, BETA}
# mmdetection's RetinaNet recipe clips the gradient norm of the whole model at 35 (yacs
# SOLVER.CLIP_GRADIENTS, CLIP_TYPE "full_model")
train.clip_gradients = dict(enabled=True, clip_type="full_model", clip_value=35.0, norm_type=2.0)
train.output_dir = "./output/COCO-Detection/libra_retinanet_R_50_FPN_1x"
