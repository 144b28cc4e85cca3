# LazyConfig twin of fcos_R_50_FPN_1x.yaml (Base-FCOS.yaml): detectron2's own
# COCO-Detection/fcos_R_50_FPN_1x.py as EAPMFCOS, with the paper's (mmdetection's) recipe:
# single scale 800, constant warm-up at lr / 3 for 500 iterations, bias lr x2 without weight
# decay, the gradient norm of the whole model clipped at 35.
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler

from eapm.data.resumable import build_resumable_train_loader
from eapm.modeling import EAPMFCOS

_base = get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
dataloader, model, optimizer, train = (
    _base.dataloader,
    _base.model,
    _base.optimizer,
    _base.train,
)

model._target_ = EAPMFCOS
model.eapm_cls_mu = 0.0  # MODEL.EAPM.CLS.MU (0 = detectron2's focal loss)
model.box_loss_type = "giou"  # MODEL.FCOS.BOX_LOSS_TYPE
model.loss_normalizer = "ema"  # MODEL.LOSS_NORMALIZER.TYPE
model.compile_kernels = True  # MODEL.EAPM.COMPILE

# the exactly resumable loader (yacs DATALOADER.EXACT_RESUME True): same arguments as
# detectron2's build_detection_train_loader
dataloader.train._target_ = build_resumable_train_loader
dataloader.train.mapper.augmentations[0].short_edge_length = (800,)
dataloader.evaluator.output_dir = "${...train.output_dir}/inference"

optimizer.lr = 0.01
optimizer.params.base_lr = "${..lr}"
optimizer.params.bias_lr_factor = 2.0
optimizer.params.weight_decay_bias = 0.0
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=_base.lr_multiplier.scheduler,  # x0.1 at 60k and 80k of 90k
    warmup_length=500 / 90000,
    warmup_method="constant",
    warmup_factor=1.0 / 3,
)
train.eval_period = 0
train.seed = -1
train.checkpointer.period = 10000
# the whole model's gradient norm (yacs CLIP_TYPE "full_model", mmdetection's grad_clip)
train.clip_gradients = dict(enabled=True, clip_type="full_model", clip_value=35.0, norm_type=2.0)
train.preemption = dict(signals=["SIGTERM", "SIGUSR1"], exit_code=75)  # SOLVER.PREEMPTION
train.output_dir = "./output/COCO-Detection/fcos_R_50_FPN_1x"
