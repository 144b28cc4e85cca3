"""EAPM (example attribute based prediction modulation) for detectron2.

``import eapm`` registers the project's meta-architectures, backbones, ROI heads and RPN in
detectron2's registries; ``eapm.add_eapm_config`` adds its config keys (``eapm.config``) and
``eapm.load_config`` / ``eapm.validate_config`` load and validate a config
(``eapm.validation``).

Without detectron2 (plain PyTorch, another detection framework) ``import eapm`` registers
nothing and ``eapm.losses`` is the whole of the package that works: the losses import torch
only. ``eapm.HAS_DETECTRON2`` says which case holds; asking for ``eapm.load_config``,
``eapm.validate_config`` or ``eapm.add_eapm_config`` without detectron2 raises a
``ModuleNotFoundError`` naming detectron2. A detectron2 that is installed but fails to
import raises its own error here, as before.

Imports run one way: ``config`` and ``losses`` import nothing above them; ``modeling``
imports ``losses`` and ``upstream`` and reads its own keys (``modeling.keys``);
``checkpoint`` imports ``safe_load``; ``engine`` imports ``data``, ``checkpoint`` and (the
LazyConfig loop's defaults) ``config``, but no model: it builds them through detectron2's
registries; ``validation`` imports ``modeling``, ``config``, ``data`` and ``engine`` (the
modules that own the trainer keys' rules); ``export``, ``model_zoo``, ``utils`` and the
tools sit on top
(tests/config/test_import_graph.py checks it; docs/layout.md lists every module).
"""

from importlib.util import find_spec as _find_spec

__version__ = "0.5.0"


def _detectron2_installed() -> bool:
    """Whether an import of detectron2 would find it (without importing it). A finder on
    ``sys.meta_path`` that refuses it, or ``sys.modules["detectron2"] = None``, count as
    not installed."""
    try:
        return _find_spec("detectron2") is not None
    except (ImportError, ValueError):
        return False


HAS_DETECTRON2 = _detectron2_installed()

# the names of this module that need detectron2
_NEEDS_DETECTRON2 = ("add_eapm_config", "load_config", "validate_config")

if HAS_DETECTRON2:
    from . import modeling  # noqa: F401  (registers)
    from .config import add_eapm_config  # noqa: F401
    from .validation import load_config, validate_config  # noqa: F401
else:

    def __getattr__(name: str):
        if name in _NEEDS_DETECTRON2:
            raise ModuleNotFoundError(
                f"eapm.{name} needs detectron2, which is not installed (or not importable) in "
                "this Python; without it only eapm.losses works",
                name="detectron2",
            )
        raise AttributeError(f"module 'eapm' has no attribute {name!r}")
