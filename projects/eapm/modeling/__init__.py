"""Detectron2 components of the EAPM project; importing registers them."""
from .retinanet import EAPMRetinaNet  # noqa: F401
from .fcos import EAPMFCOS, build_fcos_resnet_fpn_backbone  # noqa: F401
