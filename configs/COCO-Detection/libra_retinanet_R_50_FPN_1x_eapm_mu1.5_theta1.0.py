# LazyConfig twin of libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0.yaml (paper Tables 2 and 3):
# Libra RetinaNet + EAPM focal loss (mu 1.5) + EAPM balanced L1 (theta 1.0).
# mu only (Table 1): model.eapm_reg_theta=0.0; other theta: model.eapm_reg_theta=1.5.
from .libra_retinanet_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.eapm_cls_mu = 1.5
model.eapm_reg_theta = 1.0
train.output_dir = "./output/COCO-Detection/libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0"
