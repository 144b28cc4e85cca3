# LazyConfig twin of faster_rcnn_R_50_FPN_1x.yaml (detectron2's Faster R-CNN R50-FPN 1x, the
# paper's Table 3 reference row): ../COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py (the
# settings of Base-RCNN-FPN.yaml, single scale 800) without the mask head.
#   python train_net.py --num-gpus 8 --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x.py
from detectron2.config import LazyConfig

_base = LazyConfig.load_rel("../COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
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
train.output_dir = "./output/COCO-Detection/faster_rcnn_R_50_FPN_1x"
