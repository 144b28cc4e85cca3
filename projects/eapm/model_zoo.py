"""The project's configs, as ``detectron2.model_zoo`` gives detectron2's: by their path
under the repository's ``configs/`` (e.g. ``"COCO-Detection/retinanet_R_50_FPN_1x.yaml"``,
``"quickstart/eapm_retinanet.py"``) or, when no other folder has a config of that name, by
the file name alone (``"eapm_retinanet.py"``).

    from eapm import model_zoo
    cfg = model_zoo.get_config("quickstart/eapm_retinanet.yaml")   # the validated config
    model = model_zoo.get("retinanet_R_50_FPN_1x_eapm_mu1.5.py")   # its model (not trained)

No trained weights are published yet: ``get(..., trained=True)`` says so. Train one with
``train_net.py`` and load its ``model_final.pth`` with ``eapm.checkpoint.EAPMCheckpointer``.

Where the configs are: an installed package (``pip install .`` / a wheel) carries them as
``eapm/configs/`` (``setup.py`` copies the repository's ``configs/`` there at build time);
in a checkout or an editable install they are read from ``configs/`` itself, the single
source.
"""

from __future__ import annotations

import os
from typing import List, Optional

__all__ = [
    "CONFIGS_DIR",
    "get_config_file",
    "resolve_config_file",
    "get_config",
    "default_device",
    "build_model",
    "get",
]

# the root of a source checkout (projects/eapm/ is two levels below it): the one place that
# computes it (tools, tests and eapm.utils.testing import it); meaningless in an installed wheel
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
CONFIGS_DIR = _PACKAGED if os.path.isdir(_PACKAGED) else os.path.join(REPO_ROOT, "configs")
_CONFIG_EXTS = (".yaml", ".py")


def _configs_named(name: str) -> List[str]:
    """The paths (relative to ``CONFIGS_DIR``, sorted) of the configs whose file name is
    ``name``."""
    found = []
    for root, dirs, files in os.walk(CONFIGS_DIR):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        if name in files:
            found.append(os.path.relpath(os.path.join(root, name), CONFIGS_DIR))
    return sorted(found)


def get_config_file(config_path: str) -> str:
    """The absolute path of a config file. ``config_path`` is

    * a path relative to ``CONFIGS_DIR`` (``"quickstart/eapm_retinanet.yaml"``);
    * a file name without folder (``"eapm_retinanet.yaml"``): the config of that name, when
      exactly one folder of ``CONFIGS_DIR`` has one;
    * an absolute path (your own config): itself.

    Raises:
        FileNotFoundError: no such config (the message names the path tried and the folder
            searched).
        ValueError: a file name without folder that several folders have (the message
            lists them)."""
    if os.path.isabs(config_path):
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"config file not found: {config_path}")
        return config_path
    path = os.path.join(CONFIGS_DIR, config_path)
    if os.path.isfile(path):
        return path
    if os.path.dirname(config_path) == "" and config_path.endswith(_CONFIG_EXTS):
        found = _configs_named(config_path)
        if len(found) == 1:
            return os.path.join(CONFIGS_DIR, found[0])
        if len(found) > 1:
            raise ValueError(
                f"config name {config_path!r} is ambiguous: {len(found)} configs in "
                f"{CONFIGS_DIR} have it ({', '.join(found)}); name one with its folder"
            )
        raise FileNotFoundError(
            f"{config_path!r} is not among the EAPM configs in {CONFIGS_DIR} (no folder of it "
            "holds a config of that name)"
        )
    raise FileNotFoundError(f"{config_path!r} is not among the EAPM configs in {CONFIGS_DIR}")


def resolve_config_file(spec: str) -> str:
    """The absolute path of a config given on a command line: ``spec`` itself when it is a
    file (relative to the current folder, or absolute), else ``get_config_file(spec)`` (a
    config of the project by its path under ``CONFIGS_DIR`` or its unique file name).

    Raises ``FileNotFoundError`` naming ``spec`` when it is neither, ``ValueError`` for an
    ambiguous name (``get_config_file``)."""
    if os.path.isfile(spec):
        return os.path.abspath(spec)
    try:
        return get_config_file(spec)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"config file not found: {spec} (neither a file nor a config of eapm.model_zoo in "
            f"{CONFIGS_DIR})"
        ) from None


def get_config(config_path: str, opts=()):
    """The loaded config of ``config_path`` (see ``get_config_file``): for a ``.yaml`` the
    validated yacs ``CfgNode`` of ``eapm.load_config`` (``opts``: ``KEY VALUE`` list;
    checked as for evaluation, not training; MODEL.DEVICE "cpu" without CUDA), for a ``.py``
    the LazyConfig of ``eapm.lazy.load_lazy_config`` (``opts``: ``key=value`` overrides;
    ``train.device`` "cpu" without CUDA).

    Raises what ``get_config_file`` raises, and ``ValueError`` naming the key for an invalid
    yacs value."""
    path = get_config_file(config_path)
    from .lazy import is_lazy_config

    if is_lazy_config(path):
        from .lazy import load_lazy_config

        return load_lazy_config(path, opts)
    from .validation import load_config

    return load_config(path, list(opts), training=False)


def default_device(device: Optional[str] = None) -> str:
    """``device``, else "cuda" when CUDA is available, else "cpu"."""
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(cfg, device: Optional[str] = None):
    """The model of a loaded config (a yacs ``CfgNode`` or a LazyConfig) on ``device``
    (``default_device``), as training builds it: yacs through ``EAPMTrainer.build_model``
    (detectron2's registries; channels-last with MODEL.CHANNELS_LAST), a LazyConfig
    through ``eapm.lazy.build_model`` (``train.channels_last``). Randomly initialised: no
    weights are loaded (not even the config's MODEL.WEIGHTS / ``train.init_checkpoint``). In
    training mode, as detectron2 builds it. ``cfg`` itself is not changed."""
    from detectron2.config import CfgNode

    device = default_device(device)
    if isinstance(cfg, CfgNode):
        from .engine import EAPMTrainer

        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = device
        return EAPMTrainer.build_model(cfg)
    import copy

    from detectron2.config import instantiate

    if "train" not in cfg:
        return instantiate(cfg.model).to(device)
    from .lazy import build_model as build_lazy

    cfg = copy.deepcopy(cfg)
    cfg.train.device = device
    return build_lazy(cfg)


def get(config_path: str, trained: bool = False, device: Optional[str] = None):
    """The model of one of the project's configs (yacs or LazyConfig; ``config_path`` as
    ``get_config_file`` takes it), as ``detectron2.model_zoo.get``: built on ``device``
    (default: "cuda" when CUDA is available, else "cpu"), in training mode, randomly
    initialised. Unlike detectron2's, the config's initial weights (MODEL.WEIGHTS /
    ``train.init_checkpoint``, e.g. an ImageNet backbone) are not loaded; load them, or a
    training's ``model_final.pth``, with ``eapm.checkpoint.EAPMCheckpointer(model).load(path)``.

    Raises:
        RuntimeError: ``trained=True``: no trained weights of these configs are published yet.
        FileNotFoundError, ValueError: as ``get_config_file`` (unknown or ambiguous name) and
            ``get_config`` (an invalid value)."""
    path = get_config_file(config_path)
    if trained:
        raise RuntimeError(
            f"no trained weights of the EAPM configs are published yet ({config_path}): use "
            "trained=False, or train the config with train_net.py and load its model_final.pth "
            "with eapm.checkpoint.EAPMCheckpointer(model).load(path)"
        )
    return build_model(get_config(path), device)
