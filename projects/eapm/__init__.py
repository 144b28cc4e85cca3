"""EAPM (example attribute based prediction modulation) for detectron2.

``import eapm`` registers the project's meta-architectures, backbones and ROI heads
in detectron2's registries; ``eapm.add_eapm_config`` adds its config keys
(``eapm.config``) and ``eapm.load_config`` / ``eapm.validate_config`` load and validate a
config (``eapm.validation``).

Imports run one way: ``config``, ``capabilities`` and ``losses`` import nothing above them;
``modeling`` imports ``capabilities`` and ``losses`` and reads its own keys;
``validation`` imports ``modeling`` and ``config``; the trainer and the tools sit on top
(tests/config/test_import_graph.py checks it).
"""

from . import modeling  # noqa: F401  (registers)
from .config import add_eapm_config  # noqa: F401
from .validation import load_config, validate_config  # noqa: F401

__version__ = "0.5.0"
