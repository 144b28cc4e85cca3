"""Detectron2 components of the EAPM project; importing registers them."""
from .retinanet import EAPMRetinaNet  # noqa: F401
