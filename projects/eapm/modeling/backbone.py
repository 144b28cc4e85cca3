"""ResNet-18 / 34 of any width, for small CPU models (the quickstart recipe).

detectron2's ``build_resnet_backbone`` builds R-18 / R-34 only at width 64
(``MODEL.RESNETS.RES2_OUT_CHANNELS`` must be 64). ``build_slim_resnet_backbone`` is the same
network (detectron2's ``BasicStem``, ``BasicBlock`` and ``ResNet``) at the width the config
asks for: the stem has ``STEM_OUT_CHANNELS`` channels, res2 ``RES2_OUT_CHANNELS``, and each
later stage twice the one before. At width 64 it is detectron2's R-18 / R-34, parameter for
parameter (a test checks the state-dict shapes). Depth 50 and more: detectron2's builder.

``build_retinanet_slim_resnet_fpn_backbone`` puts RetinaNet's FPN (P3-P7, P6 from res5) on
it, as detectron2's ``build_retinanet_resnet_fpn_backbone`` does on the width-64 ResNet;
``build_slim_resnet_fpn_backbone`` the R-CNN FPN (P2-P6, P6 max-pooled from P5), as
detectron2's ``build_resnet_fpn_backbone`` does.
"""

from __future__ import annotations

from typing import List

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, Backbone, ResNet, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem

__all__ = [
    "BASIC_BLOCKS_PER_STAGE",
    "make_basic_stages",
    "build_slim_resnet_backbone",
    "build_retinanet_slim_resnet_fpn_backbone",
    "build_slim_resnet_fpn_backbone",
    "fpn_from_config",
]

# blocks per stage (res2..res5) of the ResNets made of BasicBlocks
BASIC_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def make_basic_stages(depth: int, stem_channels: int, res2_channels: int, norm) -> List[list]:
    """The four stages (res2..res5) of a ResNet-``depth`` (18 or 34) of ``BasicBlock``s:
    res2 has ``res2_channels`` channels (stride 1, input ``stem_channels``), each later
    stage doubles the channels and halves the resolution (stride 2 in its first block)."""
    if depth not in BASIC_BLOCKS_PER_STAGE:
        raise ValueError(f"BasicBlock ResNets have depth 18 or 34, got {depth}")
    if stem_channels < 1 or res2_channels < 1:
        raise ValueError(
            f"channel counts must be >= 1, got stem {stem_channels}, res2 {res2_channels}"
        )
    stages = []
    in_channels, out_channels = stem_channels, res2_channels
    for i, blocks in enumerate(BASIC_BLOCKS_PER_STAGE[depth]):
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=blocks,
                stride_per_block=[1 if i == 0 else 2] + [1] * (blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=norm,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return stages


@BACKBONE_REGISTRY.register()
def build_slim_resnet_backbone(cfg, input_shape: ShapeSpec):
    """``MODEL.RESNETS.DEPTH`` 18 / 34 at the widths ``MODEL.RESNETS.STEM_OUT_CHANNELS``
    and ``RES2_OUT_CHANNELS`` (any, not only 64), with ``NORM``, ``OUT_FEATURES`` and
    ``MODEL.BACKBONE.FREEZE_AT`` as detectron2 reads them. Other depths: detectron2's
    ``build_resnet_backbone``. R-18 / R-34 options detectron2 does not support (deformable
    convs, res5 dilation, groups) raise ``ValueError``."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in BASIC_BLOCKS_PER_STAGE:
        return build_resnet_backbone(cfg, input_shape)
    unsupported = {
        "DEFORM_ON_PER_STAGE": any(r.DEFORM_ON_PER_STAGE),
        "RES5_DILATION": r.RES5_DILATION != 1,
        "NUM_GROUPS": r.NUM_GROUPS != 1,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(
            f"MODEL.RESNETS.{bad[0]} is not supported by R-{r.DEPTH} (BasicBlock): "
            f"got {getattr(r, bad[0])}"
        )
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages = make_basic_stages(r.DEPTH, r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.NORM)
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def fpn_from_config(cfg, bottom_up: Backbone, top_block) -> FPN:
    """detectron2's FPN on ``bottom_up`` with ``MODEL.FPN.*`` (IN_FEATURES, OUT_CHANNELS,
    NORM, FUSE_TYPE) and the given ``top_block`` (e.g. ``LastLevelP6P7``)."""
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_retinanet_slim_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """RetinaNet's ResNet-FPN (P3-P7: ``MODEL.FPN.IN_FEATURES`` res3-res5, P6 and P7 from
    res5) on ``build_slim_resnet_backbone``."""
    bottom_up = build_slim_resnet_backbone(cfg, input_shape)
    res5 = bottom_up.output_shape()["res5"].channels
    return fpn_from_config(cfg, bottom_up, LastLevelP6P7(res5, cfg.MODEL.FPN.OUT_CHANNELS))


@BACKBONE_REGISTRY.register()
def build_slim_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """The FPN of detectron2's ``build_resnet_fpn_backbone`` (``MODEL.FPN.IN_FEATURES``, e.g.
    res2-res5 for P2-P5, and P6 max-pooled from P5: no parameters) on
    ``build_slim_resnet_backbone``. The quickstart RetinaNet's backbone: its head reads P2-P6."""
    bottom_up = build_slim_resnet_backbone(cfg, input_shape)
    return fpn_from_config(cfg, bottom_up, LastLevelMaxPool())
