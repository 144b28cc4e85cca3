"""Loading and validating a config: ``load_config`` and ``validate_config``.

This module adds no rule of its own (docs/design.md, "Who owns what"): it asks the owners of
the keys before anything real is built, and raises ``Invalid config KEY = VALUE: ...``:

1. trainer and data keys: the functions of the engine and data modules that use them;
2. the model: built on PyTorch's meta device from a config that records every key read
   (``keys_read_by_model``), so every ``from_config`` and constructor check runs; a
   ``ValueError`` is reported for the key its argument was read from;
3. a project key named ``ENABLED`` that is on but that no chosen class read (or a box loss
   type whose parameters no chosen class read): an error naming the key, the chosen classes
   and the registered classes that read it;
4. with ``training``: ``engine.trainer.check_training_config``.
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
from .config import add_module_configs, default_config, import_modules, invalid, merge_config_file
from .data import check_category_counts, check_data_config
from .engine.hooks import check_preemption_config
from .engine.solver import check_solver_config
from .engine.trainer import check_training_config

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


def load_config(
    config_file: str,
    opts: Sequence[str] = (),
    *,
    training: bool = True,
    world_size: int = 1,
    coco_json: Iterable[Sequence[str]] = (),
    imports: Sequence[str] = (),
) -> CN:
    """The project's config: detectron2's defaults + ``add_eapm_config`` (+ the ``add_config``
    of each module of ``imports``, imported first: ``train_net.py --import``), merged from
    ``config_file`` and the ``KEY VALUE`` list ``opts``, with ``coco_json`` entries appended to
    ``DATASETS.COCO_JSON``, then ``validate_config``d (``training``: a training job's checks
    too; ``world_size``: ``--num-gpus x --num-machines``). Cheap: a bad value fails in seconds.
    MODEL.DEVICE falls back to "cpu" without CUDA. Returns the config, not yet frozen."""
    modules = import_modules(imports)  # first: they may register classes the defaults name
    cfg = add_module_configs(default_config(), modules)
    merge_config_file(cfg, config_file)
    cfg.merge_from_list(list(opts))
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE != "cpu":
        cfg.MODEL.DEVICE = "cpu"
    for entry in coco_json:
        cfg.DATASETS.COCO_JSON.append(list(entry))
    validate_config(cfg, training=training, world_size=world_size)
    return cfg


def validate_config(cfg: CN, *, training: bool = True, world_size: Optional[int] = None) -> None:
    """Raise ``ValueError`` naming the key for any value the project's modules cannot honour
    (the module docstring); ``world_size``: the number of training processes."""
    check_solver_config(cfg)
    check_preemption_config(cfg)
    check_data_config(cfg)
    reads = keys_read_by_model(cfg, name_errors=True)
    _check_switches(cfg, reads)
    if training:
        check_training_config(cfg, world_size, reads)


# --- the model, built on the meta device from a recording config
class _ReadRecorder(CN):
    """A copy of a config that records every leaf key read as an attribute (full name ->
    value) in the dict its root shares with its nodes (see ``keys_read_by_model``)."""

    def __getattr__(self, name):
        value = super().__getattr__(name)
        if not isinstance(value, CN):
            self.__dict__["_reads"][self.__dict__["_prefix"] + name] = value
        return value


def keys_read_by_model(cfg: CN, *, name_errors: bool = False) -> Dict[str, Any]:
    """The keys (full name -> value, in the order first read) that building ``cfg``'s model on
    PyTorch's meta device reads (no memory, no weights): a class honours a key if and only if
    it reads it here. Raises what the build raises; with ``name_errors`` as ``Invalid config
    KEY = VALUE: <message>`` for the key the argument it names was read from."""
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
    """Builds ``cfg``'s model on the meta device, recording every key read into ``reads``."""
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


# --- switches that no class of the model reads
def _project_switches(cfg: CN):
    """The keys this project adds (``add_eapm_config``) named ``ENABLED``."""
    ours, plain = default_config(), get_cfg()

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
    """Raise for ``key = value``: no chosen class reads ``wanted`` (naming the chosen classes
    and the registered ones that read it)."""
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
            trial.merge_from_list([key, name])
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


def check_datasets_fit_model(cfg: CN) -> None:
    """``eapm.data.check_category_counts`` of DATASETS.TRAIN / TEST against the class counts
    the chosen model reads (``*.NUM_CLASSES``, ``keys_read_by_model``)."""
    reads = keys_read_by_model(cfg)
    classes = {k: reads[k] for k in reads if k.endswith(".NUM_CLASSES") and "SEM_SEG" not in k}
    check_category_counts([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST], classes)
