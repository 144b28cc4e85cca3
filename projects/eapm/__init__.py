"""EAPM (example attribute based prediction modulation) for detectron2.

``import eapm`` registers the project's meta-architectures, backbones and ROI heads
in detectron2's registries; ``eapm.add_eapm_config`` adds its config keys and
``eapm.load_config`` loads and validates a config file.
"""

from . import modeling  # noqa: F401  (registers)
from .config import add_eapm_config, eapm_kwargs, load_config, validate_config  # noqa: F401

__version__ = "0.5.0"
