"""Detectron2 components of the EAPM project; importing registers them."""

from .backbone import (  # noqa: F401
    build_retinanet_slim_resnet_fpn_backbone,
    build_slim_resnet_backbone,
    build_slim_resnet_fpn_backbone,
)
from .bfp import BalancedFeaturePyramid  # noqa: F401
from .cascade import EAPMCascadeROIHeads  # noqa: F401
from .fcos import EAPMFCOS, build_fcos_resnet_fpn_backbone  # noqa: F401
from .retinanet import EAPMRetinaNet  # noqa: F401
from .roi_heads import EAPMFastRCNNOutputLayers, EAPMROIHeads, LibraROIHeads  # noqa: F401
from .rpn import EAPMRPN  # noqa: F401
