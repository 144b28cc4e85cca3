"""EAPM (example attribute based prediction modulation) for detectron2.

``import eapm`` registers the project's meta-architectures, backbones and ROI heads
in detectron2's registries; ``eapm.add_eapm_config`` adds its config keys.
"""
from .config import add_eapm_config, validate_eapm_config, validate_train_config  # noqa: F401
from . import modeling  # noqa: F401  (registers)

__version__ = "0.1.0"
