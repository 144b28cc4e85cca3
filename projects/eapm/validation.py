"""Loading and validating a config: ``load_config`` and ``validate_config``.

This module sits above the models (it imports ``eapm.modeling``, which registers them, and
asks the registered classes); nothing below it imports it. ``validate_config`` raises
``ValueError("Invalid config KEY = VALUE: ...")`` naming the key, before anything is built:

1. the rules of the keys the trainer and the data loaders read (``SOLVER.OPTIMIZER``,
   ``SOLVER.PREEMPTION.*``, ``DATALOADER.EXACT_RESUME``, ``DATASETS.COCO_JSON``): here;
2. the rules of the keys the models read: each registered class that declares
   ``config_checks()`` (``eapm.capabilities.DeclaresConfigChecks``; backbone builders: an
   attribute) names the function that owns each rule, the one its constructor applies to
   the argument; it is applied here to the key, whatever the config chooses (a key's value
   must suit every class that reads it), each distinct ``(key, rule)`` once;
3. capabilities: each switched-on EAPM / GHM / BFP key must be honoured by the registered
   class the config chooses (``issubclass`` of the mixins in ``eapm.capabilities``, never a
   class name; for R-CNN models ``MODEL.EAPM.CLS`` asks the ROI heads, ``MODEL.EAPM.RPN``
   the proposal generator), and the class's own cross-key rules (``check_box_loss``,
   ``check_cls_loss``, ``check_ghm_cls``, ``check_head_norm``) are applied to the keys;
4. with ``training``: what only a training job needs (AMP on a GPU, the batch per process).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_HEADS_REGISTRY,
    GeneralizedRCNN,
    ProposalNetwork,
    RetinaNet,
)

from . import modeling  # noqa: F401  (registers the classes asked below)
from .capabilities import (
    DenseHeadNorm,
    SupportsEAPMBalancedL1,
    SupportsEAPMFocal,
    SupportsEAPMObjectness,
    SupportsEAPMSoftmaxCE,
    SupportsGHM,
)
from .config import add_eapm_config, add_module_configs, import_modules, merge_config_file
from .data import check_category_counts
from .data.image_check import LEVELS
from .engine.hooks import preemption_signals
from .engine.solver import CLIP_TYPES, OPTIMIZERS

__all__ = ["check_datasets_fit_model", "keys_read_by_model", "load_config", "validate_config"]


class _ReadRecorder(CN):
    """A copy of a config that records every leaf key read as an attribute (full name ->
    value) in the dict its root shares with its nodes (see ``keys_read_by_model``)."""

    def __getattr__(self, name):
        value = super().__getattr__(name)
        if not isinstance(value, CN):
            self.__dict__["_reads"][self.__dict__["_prefix"] + name] = value
        return value


def keys_read_by_model(cfg: CN) -> Dict[str, Any]:
    """The config keys (full name -> value) that building ``cfg``'s model reads: the
    registered meta-architecture's ``from_config`` and everything it builds (backbone,
    proposal generator, heads), built on PyTorch's meta device (no memory, no weights; a
    fraction of a second for an R-50-FPN model). A class honours a key if and only if it
    reads it here. Raises what the model's constructors raise for the config's values."""
    reads: Dict[str, Any] = {}
    rec = _ReadRecorder(cfg)  # a deep copy whose nodes are recorders too

    def tag(node: CN, prefix: str) -> None:
        node.__dict__.update(_reads=reads, _prefix=prefix)
        for k, v in node.items():
            if isinstance(v, CN):
                tag(v, f"{prefix}{k}.")

    tag(rec, "")
    arch = _registered(META_ARCH_REGISTRY, "MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE)
    with torch.device("meta"):
        arch(rec)
    return reads


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
    Cheap (no data, model or process group), so a bad value fails in seconds.

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
    honour: out-of-range values, and switches the chosen (registered) classes do not
    support. ``training`` adds the checks of a training job; ``world_size`` (the number
    of processes) the checks of the batch per process."""
    _validate_trainer_keys(cfg)
    _validate_declared_rules(cfg)
    _validate_capabilities(cfg)
    if training:
        _validate_training(cfg, world_size)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _fail(key: str, value, msg: str):
    raise ValueError(f"Invalid config {key} = {value!r}: {msg}")


def _require(cond: bool, key: str, msg: str, value) -> None:
    if not cond:
        _fail(key, value, msg)


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _checked(cfg: CN, key: str, check) -> None:
    """Runs ``check(value)`` (the function that owns the rule about this value, used by
    the module that takes it too) and re-raises its ValueError naming the key."""
    value = _get(cfg, key)
    try:
        check(value)
    except ValueError as e:
        _fail(key, value, str(e))


def _registered(registry, key: str, name: str):
    try:
        return registry.get(name)
    except KeyError:
        _fail(key, name, f"not registered in detectron2's {registry._name} registry")


def _describe(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _use(registry, capability) -> str:
    """The registered names of ``registry`` whose class has ``capability``, for an error's
    "use ...": taken from the registry, so a class registered later is named too."""
    names = sorted(
        name for name, obj in registry if isinstance(obj, type) and issubclass(obj, capability)
    )
    quoted = [f"'{n}'" for n in names]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" or {quoted[-1]}"
    return f"{listed} (or a subclass)"


# ---------------------------------------------------------------------------
# 1. keys of the trainer and the data loaders
# ---------------------------------------------------------------------------


def _is_positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _validate_trainer_keys(cfg: CN) -> None:
    opt = cfg.SOLVER.OPTIMIZER
    _require(opt in OPTIMIZERS, "SOLVER.OPTIMIZER", f"must be one of {OPTIMIZERS}", opt)
    sigs = cfg.SOLVER.PREEMPTION.SIGNALS
    _require(isinstance(sigs, (list, tuple)), "SOLVER.PREEMPTION.SIGNALS", "must be a list", sigs)
    _checked(cfg, "SOLVER.PREEMPTION.SIGNALS", preemption_signals)  # the handler's own rule
    code = cfg.SOLVER.PREEMPTION.EXIT_CODE
    _require(
        isinstance(code, int) and not isinstance(code, bool) and 1 <= code <= 255,
        "SOLVER.PREEMPTION.EXIT_CODE",
        "must be an integer in [1, 255]",
        code,
    )
    _require(
        not cfg.DATALOADER.EXACT_RESUME or cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler",
        "DATALOADER.SAMPLER_TRAIN",
        "DATALOADER.EXACT_RESUME True implements 'TrainingSampler' only (set EXACT_RESUME False "
        "for detectron2's other samplers)",
        cfg.DATALOADER.SAMPLER_TRAIN,
    )
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED:
        _require(
            clip.CLIP_TYPE in CLIP_TYPES,
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
            f'must be one of {CLIP_TYPES} ("full_model": one norm over all parameters, as '
            'mmdetection; "norm": detectron2\'s norm of each parameter tensor)',
            clip.CLIP_TYPE,
        )
        _require(
            _is_positive_number(clip.CLIP_VALUE),
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
            "must be a finite number > 0",
            clip.CLIP_VALUE,
        )
    level = cfg.DATASETS.CHECK_IMAGES
    _require(level in LEVELS, "DATASETS.CHECK_IMAGES", f"must be one of {tuple(LEVELS)}", level)
    workers = cfg.DATASETS.CHECK_WORKERS
    _require(
        isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0,
        "DATASETS.CHECK_WORKERS",
        "must be an integer >= 0",
        workers,
    )
    for i, entry in enumerate(cfg.DATASETS.COCO_JSON):
        _require(
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and all(isinstance(x, str) for x in entry),
            f"DATASETS.COCO_JSON[{i}]",
            "each entry must be [name, json_file, image_root]",
            entry,
        )


# ---------------------------------------------------------------------------
# 2. the rules the models declare for the keys they read
# ---------------------------------------------------------------------------
def _validate_declared_rules(cfg: CN) -> None:
    done = set()
    for registry in (
        META_ARCH_REGISTRY,
        ROI_HEADS_REGISTRY,
        PROPOSAL_GENERATOR_REGISTRY,
        BACKBONE_REGISTRY,
    ):
        for _, obj in registry:
            declared = getattr(obj, "config_checks", None)
            if not callable(declared):
                continue
            for key, check in declared().items():
                if (key, check) in done:
                    continue
                done.add((key, check))
                _checked(cfg, key, check)


# ---------------------------------------------------------------------------
# 3. capabilities of the chosen classes
# ---------------------------------------------------------------------------
def _validate_capabilities(cfg: CN) -> None:
    """Each switched-on EAPM key must be honoured by the registered class that reads it."""
    arch_name = cfg.MODEL.META_ARCHITECTURE
    arch = _registered(META_ARCH_REGISTRY, "MODEL.META_ARCHITECTURE", arch_name)
    where = f"MODEL.META_ARCHITECTURE {arch_name!r} ({_describe(arch)})"
    e = cfg.MODEL.EAPM
    if issubclass(arch, GeneralizedRCNN):
        _validate_rcnn_eapm_cls(cfg)
    elif e.CLS.ENABLED and not issubclass(arch, SupportsEAPMFocal):
        _fail(
            "MODEL.EAPM.CLS.ENABLED",
            True,
            f"{where} has no EAPM focal loss and would train without it; use "
            f"{_use(META_ARCH_REGISTRY, SupportsEAPMFocal)}",
        )
    _validate_eapm_rpn(cfg, arch, where)
    # the class that owns the box regression loss, and the key that selects its type
    if issubclass(arch, GeneralizedRCNN):
        heads_name = cfg.MODEL.ROI_HEADS.NAME
        owner = _registered(ROI_HEADS_REGISTRY, "MODEL.ROI_HEADS.NAME", heads_name)
        owner_key, loss_key = "MODEL.ROI_HEADS.NAME", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE"
        owner_where = f"MODEL.ROI_HEADS.NAME {heads_name!r} ({_describe(owner)})"
        use = _use(ROI_HEADS_REGISTRY, SupportsEAPMBalancedL1)
    else:
        owner, owner_key, owner_where = arch, "MODEL.META_ARCHITECTURE", where
        loss_key = "MODEL.RETINANET.BBOX_REG_LOSS_TYPE" if issubclass(arch, RetinaNet) else None
        use = _use(META_ARCH_REGISTRY, SupportsEAPMBalancedL1)
    supports_bl1 = issubclass(owner, SupportsEAPMBalancedL1)
    if e.REG.ENABLED and not supports_bl1:
        _fail(
            "MODEL.EAPM.REG.ENABLED",
            True,
            f"{owner_where} has no EAPM balanced L1 box loss and would train without it; "
            f"use {use}",
        )
    if loss_key and _get(cfg, loss_key) == "balanced_l1" and not supports_bl1:
        _fail(
            owner_key,
            _get(cfg, owner_key),
            f"it has no 'balanced_l1' box loss ({loss_key}); use {use}",
        )
    # GHM: GHM-C (MODEL.GHM.CLS.ENABLED) and GHM-R (box loss "ghm_r") need SupportsGHM
    ghm_use = _use(META_ARCH_REGISTRY, SupportsGHM)
    supports_ghm = issubclass(arch, SupportsGHM)
    if cfg.MODEL.GHM.CLS.ENABLED and not supports_ghm:
        _fail(
            "MODEL.GHM.CLS.ENABLED",
            True,
            f"{where} has no GHM-C loss and would train without it; use {ghm_use}",
        )
    if (
        issubclass(arch, RetinaNet)
        and cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE == "ghm_r"
        and not supports_ghm
    ):
        _fail(
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
            "ghm_r",
            f"{where} has no GHM-R box loss; use {ghm_use}",
        )
    mu = float(e.CLS.MU) if e.CLS.ENABLED else 0.0
    if supports_ghm:
        _checked(cfg, "MODEL.GHM.CLS.ENABLED", lambda v: arch.check_ghm_cls(v, mu))
    if supports_bl1:
        theta = float(e.REG.THETA) if e.REG.ENABLED else 0.0
        _checked(cfg, owner.box_loss_key, lambda v: owner.check_box_loss(v, theta))
    # BFP: only the BFP backbone builders read MODEL.BFP.*
    bb = cfg.MODEL.BACKBONE.NAME
    builder = _registered(BACKBONE_REGISTRY, "MODEL.BACKBONE.NAME", bb)
    _require(
        not cfg.MODEL.BFP.ENABLED or getattr(builder, "reads_bfp_config", False),
        "MODEL.BACKBONE.NAME",
        "MODEL.BFP.ENABLED needs a BFP backbone builder (build_resnet_fpn_bfp_backbone or "
        "build_retinanet_resnet_fpn_bfp_backbone); with this one BFP would silently be off",
        bb,
    )
    # the dense head's own rule about its normalisation
    if issubclass(arch, DenseHeadNorm):
        channels = cfg.MODEL.FPN.OUT_CHANNELS
        _checked(cfg, arch.head_norm_key, lambda v: arch.check_head_norm(v, channels))


def _registered_capable(cfg: CN, registry, name_key, capability, switch_key, lacks):
    """The class registered under the name at ``name_key``; a ``switch_key`` switched on that
    it cannot honour (not a subclass of ``capability``) is an error naming it, that says what
    the class ``lacks`` and which registered classes to use instead."""
    name = _get(cfg, name_key)
    cls = _registered(registry, name_key, name)
    if not issubclass(cls, capability):
        _fail(
            switch_key,
            True,
            f"{name_key} {name!r} ({_describe(cls)}) has no {lacks} and would train without "
            f"it; use {_use(registry, capability)}",
        )
    return cls


def _validate_rcnn_eapm_cls(cfg: CN) -> None:
    """MODEL.EAPM.CLS of an R-CNN model: EAPM cross entropy in the ROI box predictor(s)."""
    e = cfg.MODEL.EAPM
    if not e.CLS.ENABLED:
        return
    heads = _registered_capable(
        cfg,
        ROI_HEADS_REGISTRY,
        "MODEL.ROI_HEADS.NAME",
        SupportsEAPMSoftmaxCE,
        "MODEL.EAPM.CLS.ENABLED",
        "EAPM cross entropy in its box predictor",
    )
    mu = float(e.CLS.MU)
    _checked(cfg, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", lambda v: heads.check_cls_loss(v, mu))


def _validate_eapm_rpn(cfg: CN, arch, where: str) -> None:
    """MODEL.EAPM.RPN: EAPM binary cross entropy on the objectness of the proposal generator."""
    if not cfg.MODEL.EAPM.RPN.ENABLED:
        return
    if not issubclass(arch, (GeneralizedRCNN, ProposalNetwork)):
        _fail(
            "MODEL.EAPM.RPN.ENABLED",
            True,
            f"{where} has no proposal generator (RPN) whose objectness EAPM could modulate",
        )
    _registered_capable(
        cfg,
        PROPOSAL_GENERATOR_REGISTRY,
        "MODEL.PROPOSAL_GENERATOR.NAME",
        SupportsEAPMObjectness,
        "MODEL.EAPM.RPN.ENABLED",
        "EAPM objectness loss",
    )


# ---------------------------------------------------------------------------
# 4. training
# ---------------------------------------------------------------------------
def _head_norm_key(arch) -> Optional[str]:
    """The key of the dense head's normalisation: declared by the class
    (``DenseHeadNorm.head_norm_key``), or detectron2's for its own RetinaNet."""
    if issubclass(arch, DenseHeadNorm):
        return arch.head_norm_key
    if issubclass(arch, RetinaNet):
        return "MODEL.RETINANET.NORM"
    return None


def _validate_training(cfg: CN, world_size: Optional[int]) -> None:
    _require(
        not (cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"),
        "SOLVER.AMP.ENABLED",
        "mixed-precision training (detectron2's AMPTrainer) needs CUDA, and MODEL.DEVICE is "
        "'cpu' (set when no GPU is available)",
        cfg.SOLVER.AMP.ENABLED,
    )
    if world_size is None or cfg.SOLVER.REFERENCE_WORLD_SIZE != 0:
        return
    batch = cfg.SOLVER.IMS_PER_BATCH
    # detectron2 asserts this only after the model and the dataset are loaded
    _require(
        batch % world_size == 0,
        "SOLVER.IMS_PER_BATCH",
        f"it is the total batch of all processes and must be divisible by their number "
        f"({world_size} = --num-gpus x --num-machines)",
        batch,
    )
    norm_key = _head_norm_key(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE))
    per_process = batch // world_size
    # BatchNorm on the 1x1 top level of one image fails deep inside torch at iteration 0
    _require(
        not (norm_key and _get(cfg, norm_key) == "BN" and per_process < 2),
        "SOLVER.IMS_PER_BATCH",
        f"the head's BatchNorm needs at least 2 images per process, got {per_process} "
        f"({world_size} processes, {norm_key} 'BN'); use more images, or GN / SyncBN in the head",
        batch,
    )
