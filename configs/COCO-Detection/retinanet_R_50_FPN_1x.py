# LazyConfig twin of retinanet_R_50_FPN_1x.yaml (paper Table 1, "RetinaNet" row): detectron2's
# own COCO-Detection/retinanet_R_50_FPN_1x.py with the settings of Base-RetinaNet.yaml.
#   python train_net.py --num-gpus 8 --config-file configs/COCO-Detection/retinanet_R_50_FPN_1x.py
from detectron2.model_zoo import get_config

from eapm.data.resumable import build_resumable_train_loader
from eapm.modeling import EAPMRetinaNet

_base = get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
dataloader, lr_multiplier, model, optimizer, train = (
    _base.dataloader,
    _base.lr_multiplier,
    _base.model,
    _base.optimizer,
    _base.train,
)

model._target_ = EAPMRetinaNet
# plain L1 on the deltas, as mmdetection's RetinaNet (yacs MODEL.RETINANET.SMOOTH_L1_LOSS_BETA 0.0)
model.smooth_l1_beta = 0.0
# the anchor sizes as Base-RetinaNet.yaml writes them (x * 2^(k/3) to two decimals)
model.anchor_generator.sizes = [
    [32.0, 40.32, 50.8],
    [64.0, 80.63, 101.59],
    [128.0, 161.27, 203.19],
    [256.0, 322.54, 406.37],
    [512.0, 645.08, 812.75],
]
# EAPM's keyword arguments (EAPMRetinaNet.from_config reads them from the yacs keys); off here
model.eapm_cls_mu = 0.0  # MODEL.EAPM.CLS.MU (0 = detectron2's focal loss)
model.eapm_reg_theta = (
    0.0  # MODEL.EAPM.REG.THETA (box loss "balanced_l1", "giou", "diou" or "ciou")
)
model.loss_normalizer = "ema"  # MODEL.LOSS_NORMALIZER.TYPE
model.compile_kernels = True  # MODEL.EAPM.COMPILE

# single scale 800 (the paper follows mmdetection; detectron2's zoo trains at 640-800)
# the exactly resumable loader (yacs DATALOADER.EXACT_RESUME True): same arguments as
# detectron2's build_detection_train_loader
dataloader.train._target_ = build_resumable_train_loader
dataloader.train.mapper.augmentations[0].short_edge_length = (800,)
dataloader.evaluator.output_dir = "${...train.output_dir}/inference"

optimizer.lr = 0.01  # 16 images per iteration (see Base-RetinaNet.yaml for other batches)
train.eval_period = 0  # evaluate at the end (yacs TEST.EVAL_PERIOD 0)
train.seed = -1
train.clip_gradients = dict(enabled=False)
train.preemption = dict(signals=["SIGTERM", "SIGUSR1"], exit_code=75)  # SOLVER.PREEMPTION
train.output_dir = "./output/COCO-Detection/retinanet_R_50_FPN_1x"
