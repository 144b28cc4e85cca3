"""EAPM (example attribute based prediction modulation) for detectron2.

``import eapm`` registers the project's meta-architectures, backbones, ROI heads and RPN in
detectron2's registries; ``eapm.add_eapm_config`` adds its config keys (``eapm.config``) and
``eapm.load_config`` / ``eapm.validate_config`` load and validate a config
(``eapm.validation``).

Imports run one way: ``config``, ``capabilities`` and ``losses`` import nothing above them;
``modeling`` imports ``losses``, ``capabilities`` and ``upstream`` and reads its own keys
(``modeling.keys``); ``checkpoint`` imports ``safe_load``; ``engine`` imports ``data``,
``checkpoint`` and (the LazyConfig loop's defaults) ``config``, but no model: it builds
them through detectron2's registries; ``validation``
imports ``modeling``, ``capabilities``, ``config``, ``data.image_check`` and
``engine.solver``; ``export``, ``model_zoo``, ``utils`` and the tools sit on top
(tests/config/test_import_graph.py checks it; docs/layout.md lists every module).
"""

from . import modeling  # noqa: F401  (registers)
from .config import add_eapm_config  # noqa: F401
from .validation import load_config, validate_config  # noqa: F401

__version__ = "0.5.0"
