# LazyConfig twin of mask_rcnn_R_50_FPN_1x.yaml (detectron2's Mask R-CNN R50-FPN 1x, box and
# mask AP): detectron2's COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py with the settings
# of ../COCO-Detection/Base-RCNN-FPN.yaml (single scale 800, the exactly resumable loader,
# preemption). The base of the Faster R-CNN and Cascade R-CNN LazyConfigs too.
#   python train_net.py --num-gpus 8 \
#       --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py
from detectron2.model_zoo import get_config

from eapm.data.resumable import build_resumable_train_loader

_base = get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
dataloader, lr_multiplier, model, optimizer, train = (
    _base.dataloader,
    _base.lr_multiplier,
    _base.model,
    _base.optimizer,
    _base.train,
)

# the exactly resumable loader (yacs DATALOADER.EXACT_RESUME True): same arguments as
# detectron2's build_detection_train_loader
dataloader.train._target_ = build_resumable_train_loader
# single scale 800 (the paper follows mmdetection; detectron2's zoo trains at 640-800)
dataloader.train.mapper.augmentations[0].short_edge_length = (800,)
dataloader.evaluator.output_dir = "${...train.output_dir}/inference"

optimizer.lr = 0.02
train.eval_period = 0
train.seed = -1
train.clip_gradients = dict(enabled=False)
train.preemption = dict(signals=["SIGTERM", "SIGUSR1"], exit_code=75)  # SOLVER.PREEMPTION
train.output_dir = "./output/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x"
