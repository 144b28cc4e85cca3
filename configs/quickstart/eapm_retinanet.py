# LazyConfig twin of eapm_retinanet.yaml (with Base-Shapes.yaml and retinanet.yaml): RetinaNet
# R-18-FPN at width 32 from scratch (BatchNorm everywhere, channels-last) with EAPM focal loss
# (mu 1.5) and EAPM balanced L1 (theta 1.0) on the embedded dataset, the head (one conv per tower)
# on FPN levels P2-P6 (anchors matched at IoU 0.3 / 0.4), AdamW, 620 iterations of 8 images, on a
# CPU:
#   python train_net.py --config-file configs/quickstart/eapm_retinanet.py
# Built on detectron2's own COCO-Detection/retinanet_R_50_FPN_1x.py.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from eapm.data.resumable import build_resumable_train_loader
from eapm.modeling import EAPMRetinaNet
from eapm.modeling.backbone import make_basic_stages

_base = get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
dataloader, model, train = _base.dataloader, _base.model, _base.train
_optim = get_config("common/optim.py")

# ------------------------------------------------------------------ model
model._target_ = EAPMRetinaNet
_bottom_up = model.backbone.bottom_up
# R-18 at width 32 (yacs: build_slim_resnet_fpn_backbone, STEM_OUT_CHANNELS and
# RES2_OUT_CHANNELS 32): stem 32, res2..res5 32, 64, 128, 256 channels
_bottom_up.stem.norm = "BN"
_bottom_up.stem.out_channels = 32
_bottom_up.stages = L(make_basic_stages)(depth=18, stem_channels=32, res2_channels=32, norm="BN")
_bottom_up.freeze_at = 0  # from scratch: nothing frozen
# the FPN from P2 (stride 4) to P6 (max-pooled from P5), as yacs build_slim_resnet_fpn_backbone
_bottom_up.out_features = ["res2", "res3", "res4", "res5"]
model.backbone.in_features = ["res2", "res3", "res4", "res5"]
model.backbone.out_channels = 64
model.backbone.norm = "BN"
model.backbone.top_block = L(LastLevelMaxPool)()
model.head_in_features = ["p2", "p3", "p4", "p5", "p6"]
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.conv_dims = [64]  # one conv per tower (yacs MODEL.RETINANET.NUM_CONVS 1)
model.head.norm = "BN"
model.head.num_anchors = 15
# 128 px images: anchors 8..203 px on P2..P6 (three scales per octave), five aspect ratios (bars
# reach 1:10)
model.anchor_generator.sizes = [
    [8.0, 10.08, 12.7],
    [16.0, 20.16, 25.4],
    [32.0, 40.32, 50.8],
    [64.0, 80.63, 101.59],
    [128.0, 161.27, 203.19],
]
model.anchor_generator.aspect_ratios = [0.25, 0.5, 1.0, 2.0, 4.0]
model.anchor_generator.strides = [4, 8, 16, 32, 64]
# background below IoU 0.3, foreground from 0.4 (yacs MODEL.RETINANET.IOU_THRESHOLDS)
model.anchor_matcher.thresholds = [0.3, 0.4]
model.num_classes = 4
model.smooth_l1_beta = 0.1
model.test_score_thresh = 0.05
model.max_detections_per_image = 50
model.pixel_mean = [103.53, 116.28, 123.675]
model.pixel_std = [57.375, 57.12, 58.395]
# the losses: EAPM focal (mu 1.5), EAPM balanced L1 (theta 1.0) with Libra RetinaNet's
# parameters (alpha 0.5, gamma 1.5, beta 0.11 on unit-weight deltas)
model.box_reg_loss_type = "balanced_l1"
model.balanced_l1 = (0.5, 1.5, 0.11)
model.eapm_cls_mu = 1.5
model.eapm_reg_theta = 1.0
model.compile_kernels = False  # tiny tensors: compiling would cost more than it saves

# ------------------------------------------------------------------- data
# the exactly resumable loader (yacs DATALOADER.EXACT_RESUME True): same arguments as
# detectron2's build_detection_train_loader
dataloader.train._target_ = build_resumable_train_loader
dataloader.train.dataset.names = "eapm_shapes_train"
# 54 of the 800 train images have no object: train on them too
dataloader.train.dataset.filter_empty = False
dataloader.train.mapper.augmentations[0].short_edge_length = (128,)
dataloader.train.mapper.augmentations[0].max_size = 128
dataloader.train.mapper.use_instance_mask = False
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 0  # 2 cores: see Base-Shapes.yaml
dataloader.test.dataset.names = "eapm_shapes_val"
dataloader.test.mapper.augmentations[0].short_edge_length = 128
dataloader.test.mapper.augmentations[0].max_size = 128
dataloader.test.num_workers = 1
dataloader.evaluator.output_dir = "${...train.output_dir}/inference"

# ----------------------------------------------------------------- solver
# AdamW for training from scratch in few iterations on a CPU (yacs SOLVER.OPTIMIZER "ADAMW")
optimizer = _optim.AdamW
optimizer.lr = 0.003  # yacs retinanet.yaml SOLVER.BASE_LR
optimizer.weight_decay = 0.05
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[465, 558], num_updates=620
    ),
    warmup_length=31 / 620,
    warmup_method="linear",
    warmup_factor=0.001,
)
train.max_iter = 620
train.checkpointer.period = 310
train.eval_period = 0
train.device = "cpu"
train.channels_last = True  # yacs MODEL.CHANNELS_LAST: faster oneDNN convolutions on CPUs
train.seed = 1
train.init_checkpoint = ""
# detectron2's "norm": every parameter tensor's gradient norm clipped at 10 on its own
train.clip_gradients = dict(enabled=True, clip_type="norm", clip_value=10.0, norm_type=2.0)
train.preemption = dict(signals=["SIGTERM", "SIGUSR1"], exit_code=75)  # SOLVER.PREEMPTION
train.output_dir = "./output/quickstart/eapm_retinanet"
