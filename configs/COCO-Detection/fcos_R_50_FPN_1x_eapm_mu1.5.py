# LazyConfig twin of fcos_R_50_FPN_1x_eapm_mu1.5.yaml (paper Table 1): FCOS with EAPM focal
# loss, mu = 1.5. Other mu: model.eapm_cls_mu=1.0 on the command line.
from .fcos_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.eapm_cls_mu = 1.5
train.output_dir = "./output/COCO-Detection/fcos_R_50_FPN_1x_eapm_mu1.5"
