"""Loading and validating a config: ``load_config`` and ``validate_config``.

One owner per key: a class honours a key if and only if its ``from_config`` reads it, and a
rule about a value lives once, where the value is used (the constructor that takes it, or
the engine / data module that uses a trainer key). This module sits above the models (it
imports ``eapm.modeling``, which registers them) and asks those owners, before anything real
is built, raising ``ValueError("Invalid config KEY = VALUE: ...")`` naming the key:

1. the trainer's and the data keys: the functions of the modules that use them
   (``engine.solver.check_solver_config``, ``engine.hooks.check_preemption_config``,
   ``data.check_data_config``);
2. the model: built on PyTorch's meta device (no memory, no weights) from a copy of the
   config that records every key read (``keys_read_by_model``), so every ``from_config``
   runs and every constructor checks its arguments; a ``ValueError`` is reported for the key
   its argument was read from;
3. switches: a key of this project named ``ENABLED`` that is on but that no class of the
   model read would train without what it asks for: an error naming the key, the classes
   chosen, and the registered classes that read it (found the same way); a box loss type
   only this project's classes implement needs its parameters read too;
4. with ``training``: what only a training job needs (AMP on a GPU, the batch per process).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_HEADS_REGISTRY,
)

from . import modeling  # noqa: F401  (registers the classes built below)
from .config import add_eapm_config, add_module_configs, import_modules, invalid, merge_config_file
from .data import check_category_counts, check_data_config
from .engine.hooks import check_preemption_config
from .engine.solver import check_solver_config

__all__ = ["check_datasets_fit_model", "keys_read_by_model", "load_config", "validate_config"]

# the keys that name the classes of a model, with their registries (MODEL.BACKBONE.NAME last:
# a backbone builder is tried only when no class of the others reads a switch)
_NAMED = (
    ("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY),
    ("MODEL.ROI_HEADS.NAME", ROI_HEADS_REGISTRY),
    ("MODEL.PROPOSAL_GENERATOR.NAME", PROPOSAL_GENERATOR_REGISTRY),
    ("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY),
)
# box loss types only this project's classes implement, and a key such a class reads for it
_LOSS_PARAMETERS = {"balanced_l1": "MODEL.BALANCED_L1.BETA", "ghm_r": "MODEL.GHM.REG.MU"}
# the dense heads' norm keys: "BN" there needs 2 images per process (1x1 top level)
_HEAD_NORMS = ("MODEL.RETINANET.NORM", "MODEL.FCOS.HEAD_NORM")


def load_config(
    config_file: str,
    opts: Sequence[str] = (),
    *,
    training: bool = True,
    world_size: int = 1,
    coco_json: Iterable[Sequence[str]] = (),
    imports: Sequence[str] = (),
) -> CN:
    """The project's config: detectron2's defaults + ``add_eapm_config``, merged from
    ``config_file`` and the ``KEY VALUE`` list ``opts``, validated (``validate_config``).
    Cheap (no data, no real model, no process group), so a bad value fails in seconds.

    Args:
        training: also check what only a training job needs (AMP, batch per process).
        world_size: the number of training processes (``--num-gpus x --num-machines``).
        coco_json: extra ``[name, json_file, image_root]`` entries appended to
            ``DATASETS.COCO_JSON``.
        imports: modules to import first (``train_net.py --import``): they register their
            classes, and the ``add_config(cfg)`` of each that defines one adds its keys
            before the file and ``opts`` are merged (``eapm.config.add_module_configs``).

    Returns the (not yet frozen) config. MODEL.DEVICE falls back to "cpu" when CUDA is
    not available. Raises ``ValueError`` naming the key (see ``validate_config``).
    """
    modules = import_modules(imports)
    cfg = get_cfg()
    add_eapm_config(cfg)
    add_module_configs(cfg, modules)
    merge_config_file(cfg, config_file)
    cfg.merge_from_list(list(opts))
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE != "cpu":
        cfg.MODEL.DEVICE = "cpu"
    for entry in coco_json:
        cfg.DATASETS.COCO_JSON.append(list(entry))
    validate_config(cfg, training=training, world_size=world_size)
    return cfg


def validate_config(cfg: CN, *, training: bool = True, world_size: Optional[int] = None) -> None:
    """Raise ``ValueError`` naming the key for any value the project's modules cannot
    honour (see the module docstring). ``training`` adds the checks of a training job;
    ``world_size`` (the number of processes) the checks of the batch per process."""
    check_solver_config(cfg)
    check_preemption_config(cfg)
    check_data_config(cfg)
    reads = keys_read_by_model(cfg, name_errors=True)
    _check_switches(cfg, reads)
    if training:
        _check_training(cfg, world_size, reads)


# ---------------------------------------------------------------------------
# the model, built on the meta device from a recording config
# ---------------------------------------------------------------------------
class _ReadRecorder(CN):
    """A copy of a config that records every leaf key read as an attribute (full name ->
    value) in the dict its root shares with its nodes (see ``keys_read_by_model``)."""

    def __getattr__(self, name):
        value = super().__getattr__(name)
        if not isinstance(value, CN):
            self.__dict__["_reads"][self.__dict__["_prefix"] + name] = value
        return value


def keys_read_by_model(cfg: CN, *, name_errors: bool = False) -> Dict[str, Any]:
    """The config keys (full name -> value, in the order first read) that building
    ``cfg``'s model reads: the registered meta-architecture's ``from_config`` and everything
    it builds, on PyTorch's meta device (no memory, no weights: a fraction of a second for
    an R-50-FPN model). A class honours a key if and only if it reads it here.

    Raises what the model's ``from_config`` and constructors raise; with ``name_errors`` a
    ``ValueError`` (or another error of the build) is raised as ``Invalid config KEY = VALUE:
    <message>`` for the key the argument it names was read from."""
    reads: Dict[str, Any] = {}
    try:
        _build_reading(cfg, reads)
    except Exception as e:
        if not name_errors or str(e).startswith("Invalid config "):
            raise
        key = _key_of(str(e), reads)
        if key is None:
            where = f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r}"
            raise ValueError(
                f"Invalid config: building the model ({where}) failed: {type(e).__name__}: {e}"
            ) from e
        raise invalid(key, reads[key], str(e)) from e
    return reads


def _build_reading(cfg: CN, reads: Dict[str, Any]) -> None:
    """Builds ``cfg``'s model on the meta device, recording into ``reads`` every key read
    (also the reads before an error)."""
    rec = _ReadRecorder(cfg)  # a deep copy whose nodes are recorders too

    def tag(node: CN, prefix: str) -> None:
        node.__dict__.update(_reads=reads, _prefix=prefix)
        for k, v in node.items():
            if isinstance(v, CN):
                tag(v, f"{prefix}{k}.")

    tag(rec, "")
    arch = _registered(cfg, "MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY)
    with torch.device("meta"):
        arch(rec)


def _registered(cfg: CN, key: str, registry):
    name = _get(cfg, key)
    try:
        return registry.get(name)
    except KeyError:
        raise invalid(key, name, f"not registered in detectron2's {registry._name} registry")


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _key_of(msg: str, reads: Dict[str, Any]) -> Optional[str]:
    """The read key an error message is about: the argument it names first (the message's
    first word, or the word before " must"), matched to the key it was read from by name
    (``eapm_cls_mu`` <- ``MODEL.EAPM.CLS.MU``), ties broken by the value after "got ", then by
    the latest read; else the first read key the message names."""
    got = re.search(r"got (.+?)\)?$", msg)
    words = [w for w in (re.match(r"(\w+)", msg), re.search(r"(\w+) must\b", msg)) if w]
    for arg in (w.group(1).lower() for w in words):
        flat = {k: k.lower().replace(".", "_") for k in reads}
        found = (
            [k for k in reads if flat[k].endswith(arg)]
            or [k for k in reads if arg.endswith(k.split(".")[-1].lower())]
            or [k for k in reads if len(arg) > 3 and arg in flat[k]]
        )
        if len(found) > 1 and got:
            found = [k for k in found if got.group(1) in (repr(reads[k]), str(reads[k]))] or found
        if found:  # the latest: the failing constructor read its keys last
            return found[-1]
    named = [k for k in re.findall(r"[A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)+", msg) if k in reads]
    return named[0] if named else None


# ---------------------------------------------------------------------------
# switches that no class of the model reads
# ---------------------------------------------------------------------------
def _project_switches(cfg: CN):
    """The keys this project adds (``add_eapm_config``) named ``ENABLED``."""
    ours, plain = add_eapm_config(get_cfg()), get_cfg()

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, CN):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    known = set(leaves(plain))
    return [k for k in leaves(ours) if k not in known and k.endswith(".ENABLED")]


def _check_switches(cfg: CN, reads: Dict[str, Any]) -> None:
    for key in _project_switches(cfg):
        if _get(cfg, key) is True and key not in reads:
            _unread(cfg, reads, key, key, True, "would train without it")
    for key, value in reads.items():
        needs = _LOSS_PARAMETERS.get(value) if isinstance(value, str) else None
        if needs and needs not in reads:
            _unread(cfg, reads, needs, key, value, f"has no {value!r} loss")


def _unread(cfg: CN, reads, wanted: str, key: str, value, what: str) -> None:
    """Raise for ``key = value``: no chosen class reads ``wanted``. The message names the
    chosen classes and the registered ones that read ``wanted`` with this config."""
    chosen = [(k, _get(cfg, k)) for k, _ in _NAMED if k in reads or k == "MODEL.META_ARCHITECTURE"]
    classes = ", ".join(f"{k} {v!r}" for k, v in chosen)
    use = _readers(cfg, wanted, [k for k, _ in chosen])
    raise invalid(key, value, f"no class of this model reads {wanted} ({classes}): it {what}{use}")


def _readers(cfg: CN, wanted: str, names) -> str:
    """ "; use KEY 'A' or 'B' (or a subclass)" for the first class-naming key whose
    registered classes read ``wanted`` when chosen instead, or ""."""
    for key, registry in _NAMED:
        if key not in names:
            continue
        found = []
        for name, _ in sorted(registry, key=lambda kv: kv[0]):
            trial = cfg.clone()
            trial.defrost()
            _set(trial, key, name)
            reads: Dict[str, Any] = {}
            try:
                _build_reading(trial, reads)
            except Exception:  # what it read before it failed still counts
                pass
            if wanted in reads:
                found.append(f"'{name}'")
        if found:
            listed = found[0] if len(found) == 1 else ", ".join(found[:-1]) + f" or {found[-1]}"
            return f"; use {key} {listed} (or a subclass)"
    return ""


def _set(cfg: CN, key: str, value) -> None:
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = value


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------
def _check_training(cfg: CN, world_size: Optional[int], reads: Dict[str, Any]) -> None:
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        raise invalid(
            "SOLVER.AMP.ENABLED",
            True,
            "mixed-precision training (detectron2's AMPTrainer) needs CUDA, and MODEL.DEVICE "
            "is 'cpu' (set when no GPU is available)",
        )
    if world_size is None or cfg.SOLVER.REFERENCE_WORLD_SIZE != 0:
        return
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch % world_size:  # detectron2 asserts this only after model and data are loaded
        raise invalid(
            "SOLVER.IMS_PER_BATCH",
            batch,
            "it is the total batch of all processes and must be divisible by their number "
            f"({world_size} = --num-gpus x --num-machines)",
        )
    per_process = batch // world_size
    for key in _HEAD_NORMS:  # BatchNorm on one image's 1x1 top level fails at iteration 0
        if reads.get(key) == "BN" and per_process < 2:
            raise invalid(
                "SOLVER.IMS_PER_BATCH",
                batch,
                f"the head's BatchNorm needs at least 2 images per process, got {per_process} "
                f"({world_size} processes, {key} 'BN'); use more images, or GN / SyncBN in the "
                "head",
            )


def check_datasets_fit_model(cfg: CN) -> None:
    """The category count of each registered dataset of DATASETS.TRAIN / TEST against the
    class count the chosen model reads (``MODEL.RETINANET.NUM_CLASSES``, ``MODEL.FCOS.
    NUM_CLASSES``, ``MODEL.ROI_HEADS.NUM_CLASSES``, ...: ``keys_read_by_model``). More
    categories than classes raises ``DatasetError``; fewer logs a warning (see
    ``eapm.data.check_category_counts``)."""
    classes = {
        k: v
        for k, v in keys_read_by_model(cfg).items()
        if k.split(".")[-1] == "NUM_CLASSES" and k != "MODEL.SEM_SEG_HEAD.NUM_CLASSES"  # stuff
    }
    check_category_counts([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST], classes)
