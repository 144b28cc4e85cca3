# LazyConfig twin of retinanet_R_50_FPN_1x_eapm_mu1.5.yaml (paper Table 1): RetinaNet with EAPM
# focal loss, mu = 1.5. Other mu: add model.eapm_cls_mu=2.0 to the command line.
from .retinanet_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.eapm_cls_mu = 1.5
train.output_dir = "./output/COCO-Detection/retinanet_R_50_FPN_1x_eapm_mu1.5"
