# LazyConfig twin of faster_rcnn_R_50_FPN_1x.yaml (detectron2's Faster R-CNN R50-FPN 1x, the
# paper's Table 3 reference row): detectron2's COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py
# without the mask head, with the settings of Base-RCNN-FPN.yaml (single scale 800).
#   python train_net.py --num-gpus 8 --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x.py
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

# Faster R-CNN: no mask branch
for _key in ("mask_in_features", "mask_pooler", "mask_head"):
    del model.roi_heads[_key]
dataloader.train.mapper.use_instance_mask = False

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
train.output_dir = "./output/coco/faster_rcnn_R_50_FPN_1x"
