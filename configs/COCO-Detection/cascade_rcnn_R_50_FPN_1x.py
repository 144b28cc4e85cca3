# LazyConfig twin of cascade_rcnn_R_50_FPN_1x.yaml (detectron2's Cascade R-CNN R50-FPN 1x, box
# only): faster_rcnn_R_50_FPN_1x.py with detectron2's three-stage CascadeROIHeads (IoU 0.5 /
# 0.6 / 0.7, box weights (10, 10, 5, 5) x 1, 2, 3, class-agnostic box regression; as
# detectron2's common/models/cascade_rcnn.py) and 2000 proposals per image in training.
#   python train_net.py --num-gpus 8 \
#       --config-file configs/COCO-Detection/cascade_rcnn_R_50_FPN_1x.py
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from .faster_rcnn_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

for _key in ("box_head", "box_predictor", "proposal_matcher"):  # one per stage instead
    del model.roi_heads[_key]
model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[],
            fc_dims=[1024, 1024],
        )
        for _ in range(3)
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for w1, w2 in ((10, 5), (20, 10), (30, 15))
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False)
        for iou in (0.5, 0.6, 0.7)
    ],
)
model.proposal_generator.post_nms_topk = (2000, 1000)  # MODEL.RPN.POST_NMS_TOPK_TRAIN 2000
train.output_dir = "./output/COCO-Detection/cascade_rcnn_R_50_FPN_1x"
