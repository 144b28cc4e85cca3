"""The project's configs, as ``detectron2.model_zoo`` gives detectron2's: by their path
under the repository's ``configs/`` (e.g. ``"COCO-Detection/retinanet_R_50_FPN_1x.yaml"``,
``"quickstart/eapm_retinanet.py"``).

Where they are: an installed package (``pip install .`` / a wheel) carries them as
``eapm/configs/`` (``setup.py`` copies the repository's ``configs/`` there at build time);
in a checkout or an editable install they are read from ``configs/`` itself, the single
source.
"""

from __future__ import annotations

import os

__all__ = ["CONFIGS_DIR", "get_config_file", "get_config"]

_PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_CHECKOUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
CONFIGS_DIR = _PACKAGED if os.path.isdir(_PACKAGED) else _CHECKOUT


def get_config_file(config_path: str) -> str:
    """The absolute path of ``config_path`` (relative to ``CONFIGS_DIR``).

    Raises:
        FileNotFoundError: no such config (the message names the folder searched)."""
    path = os.path.join(CONFIGS_DIR, config_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{config_path!r} is not among the EAPM configs in {CONFIGS_DIR}")
    return path


def get_config(config_path: str, opts=()):
    """The loaded config: for a ``.yaml`` the validated yacs ``CfgNode`` of
    ``eapm.load_config`` (``opts``: ``KEY VALUE`` list; checked as for evaluation, not
    training), for a ``.py`` the LazyConfig (``opts``: ``key=value`` overrides)."""
    path = get_config_file(config_path)
    from .lazy import is_lazy_config

    if is_lazy_config(path):
        from .lazy import load_lazy_config

        return load_lazy_config(path, opts)
    from .validation import load_config

    return load_config(path, list(opts), training=False)
