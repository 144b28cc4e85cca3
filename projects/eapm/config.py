"""Config keys of the EAPM project, their validation, and their mapping to the
constructor arguments of the EAPM modules.

* ``add_eapm_config(cfg)`` adds the keys (call it on detectron2's default config before
  ``merge_from_file``); every key is documented inline.
* ``load_config(...)`` is where a config is loaded: merged, and validated once by
  ``validate_config``, which raises ``ValueError`` naming the key before anything is
  built. It asks the registered classes what they support (``eapm.capabilities``).
* ``eapm_kwargs(cfg)`` turns the config into the constructor arguments of every EAPM
  module; the modules' ``from_config`` take theirs from it and nothing else.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .capabilities import SupportsEAPMBalancedL1, SupportsEAPMFocal, SupportsGHM
from .losses import check_balanced_l1_params, check_eapm_param, check_ghm_params

__all__ = [
    "add_eapm_config",
    "load_config",
    "validate_config",
    "eapm_kwargs",
    "BOX_REG_LOSSES",
    "RETINANET_BOX_REG_LOSSES",
    "FCOS_BOX_LOSSES",
    "LOSS_NORMALIZERS",
]

# box regression losses of RetinaNet and the ROI box head: detectron2's four and ours
BOX_REG_LOSSES = ("smooth_l1", "giou", "diou", "ciou", "balanced_l1")
# RetinaNet's box losses: the above and GHM-R (MODEL.GHM.REG; classes with SupportsGHM)
RETINANET_BOX_REG_LOSSES = BOX_REG_LOSSES + ("ghm_r",)
# regression losses FCOS accepts (on decoded boxes; detectron2's FCOS uses giou)
FCOS_BOX_LOSSES = ("giou", "diou", "ciou")
# how the dense heads normalise their losses (see MODEL.LOSS_NORMALIZER.TYPE)
LOSS_NORMALIZERS = ("ema", "all_reduce")


def add_eapm_config(cfg: CN) -> CN:
    """Add the EAPM project's keys (in place) and return ``cfg``."""
    _C = cfg

    # ---------------------------------------------------------------- EAPM
    _C.MODEL.EAPM = CN()
    _C.MODEL.EAPM.CLS = CN()
    # EAPM with focal loss on the classification branch of dense detectors
    # (RetinaNet, Libra RetinaNet, FCOS). False = plain focal loss.
    _C.MODEL.EAPM.CLS.ENABLED = False
    # mu >= 0 of MF_cls = 1 + tanh(mu) - tanh(mu * Dif), Dif = |p - p*|.
    # The paper's best value is 1.5; mu = 0 is exactly the focal loss, and is computed as
    # with ENABLED False (detectron2's focal loss): 0 is the one way to say "off".
    _C.MODEL.EAPM.CLS.MU = 1.5
    _C.MODEL.EAPM.REG = CN()
    # EAPM with balanced L1 loss on box regression (dw, dh modulated by Gap-over-Sum).
    # Requires the regression loss type "balanced_l1" (RetinaNet: MODEL.RETINANET.
    # BBOX_REG_LOSS_TYPE, R-CNN: MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE).
    _C.MODEL.EAPM.REG.ENABLED = False
    # theta >= 0 of MF_reg = 1 + tanh(theta) - tanh(theta * GoS),
    # GoS = |t - t*| / (|t| + |t*|). The paper's best value is 1.0 (one-stage) / 1.5 (R-CNN);
    # theta = 0 is exactly the balanced L1 loss (computed as with ENABLED False).
    _C.MODEL.EAPM.REG.THETA = 1.0
    # Log the histograms of Dif, GoS and MF to the event storage every this many
    # iterations (0 = never). Means are logged every iteration (cheap).
    _C.MODEL.EAPM.HISTOGRAM_PERIOD = 0
    # Run this model's fused EAPM loss kernels through torch.compile (each kernel is
    # compiled once per process; where the compiler fails, eager mode with one warning).
    # Per model: two models in one process can differ. Worth it for COCO-sized heads;
    # the quickstart configs turn it off (tiny tensors).
    _C.MODEL.EAPM.COMPILE = True
    # Keep the model's parameters (and so its convolutions' activations) in the channels-last
    # memory format: the same network and math, faster oneDNN convolutions on CPUs (the
    # quickstart configs turn it on; measured in tools/benchmark.py --only recipe). Applied by
    # EAPMTrainer.build_model (training and --eval-only).
    _C.MODEL.CHANNELS_LAST = False

    # -------------------------------------------------------- balanced L1
    _C.MODEL.BALANCED_L1 = CN()
    # mmdetection's balanced L1 loss (Libra R-CNN): alpha > 0 raises inlier gradients,
    _C.MODEL.BALANCED_L1.ALPHA = 0.5
    # gamma > 0 is the gradient bound for outliers,
    _C.MODEL.BALANCED_L1.GAMMA = 1.5
    # beta > 0 is the inlier/outlier threshold. 1.0 for Libra R-CNN, 0.11 for Libra RetinaNet.
    _C.MODEL.BALANCED_L1.BETA = 1.0

    # ------------------------------------------------ GHM (GHM RetinaNet, Table 3)
    # Gradient harmonizing losses (Li, Liu, Wang, AAAI 2019), mmdetection's formulation and
    # its RetinaNet settings; models with eapm.capabilities.SupportsGHM (EAPMRetinaNet).
    # Neither GHM loss is divided by the dense-head normaliser (MODEL.LOSS_NORMALIZER):
    # each is normalised by its own number of valid elements, as in mmdetection.
    _C.MODEL.GHM = CN()
    _C.MODEL.GHM.CLS = CN()
    # GHM-C instead of the focal loss on the classification branch (sigmoid BCE weighted by
    # the inverse gradient density over anchors x classes; ignored anchors excluded).
    # Cannot be combined with MODEL.EAPM.CLS.ENABLED.
    _C.MODEL.GHM.CLS.ENABLED = False
    # number of gradient-norm bins on [0, 1] (integer >= 1; mmdetection 30)
    _C.MODEL.GHM.CLS.BINS = 30
    # momentum in [0, 1) of the moving average of the bin counts (0 = this call's counts)
    _C.MODEL.GHM.CLS.MOMENTUM = 0.75
    # weight (>= 0) of loss_cls (mmdetection 1.0)
    _C.MODEL.GHM.CLS.LOSS_WEIGHT = 1.0
    # GHM-R is chosen as the box loss: MODEL.RETINANET.BBOX_REG_LOSS_TYPE "ghm_r"; on the
    # positive anchors' deltas (as the box transform gives them, MODEL.RETINANET.
    # BBOX_REG_WEIGHTS; mmdetection's GHM RetinaNet uses unit target stds = weights 1.0).
    _C.MODEL.GHM.REG = CN()
    # mu > 0 of the authentic smooth L1 sqrt(d^2 + mu^2) - mu (mmdetection 0.02)
    _C.MODEL.GHM.REG.MU = 0.02
    # number of gradient-norm bins (integer >= 1; mmdetection 10)
    _C.MODEL.GHM.REG.BINS = 10
    # momentum in [0, 1) of the moving average of the bin counts (mmdetection 0.7)
    _C.MODEL.GHM.REG.MOMENTUM = 0.7
    # weight (>= 0) of loss_box_reg (mmdetection 10.0)
    _C.MODEL.GHM.REG.LOSS_WEIGHT = 10.0
    # Under DDP: False = each process bins and averages its own elements (mmdetection);
    # True = the bin counts are summed over all processes (one all-reduce per loss call),
    # so the weights do not depend on the number of processes.
    _C.MODEL.GHM.ALL_REDUCE = False
    # True = one GHM call per FPN level, in order P3..P7, each normalised by its own count
    # and all updating the same moving average (mmdetection's AnchorHead calls its loss per
    # level); False = one call over all levels (the GHM paper's density over all anchors).
    _C.MODEL.GHM.PER_LEVEL = True

    # ------------------------------------------- dense-head loss normaliser
    _C.MODEL.LOSS_NORMALIZER = CN()
    # How RetinaNet / FCOS divide their losses by the number of foreground locations:
    #   "ema":        detectron2's per-process exponential moving average (default);
    #   "all_reduce": the positive count averaged over all processes this iteration
    #                 (mmdetection's convention; independent of the process count).
    _C.MODEL.LOSS_NORMALIZER.TYPE = "ema"

    # ------------------------------------------------------- FCOS (yacs)
    # Keys of EAPMFCOS (MODEL.META_ARCHITECTURE "EAPMFCOS"), detectron2's FCOS made
    # buildable from yacs; the defaults are those of detectron2's FCOS LazyConfig.
    # Its box loss is not modulated (EAPM regression is defined for anchor deltas):
    # MODEL.EAPM.REG.ENABLED must stay False; MODEL.EAPM.CLS applies to the classifier.
    _C.MODEL.FCOS = CN()
    # number of foreground classes (>= 1)
    _C.MODEL.FCOS.NUM_CLASSES = 80
    # backbone features the head reads (P3-P7 of build_fcos_resnet_fpn_backbone);
    # the i-th level is responsible for objects of size range (4, 8] x its stride
    # (first level from 0, last level to infinity), as in detectron2's FCOS
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # conv layers in each of the two head towers (>= 1; detectron2's head needs one)
    _C.MODEL.FCOS.NUM_CONVS = 4
    # normalisation in the head towers: "GN" (FCOS), "BN", "SyncBN", "" (none); GN (32
    # groups) needs MODEL.FPN.OUT_CHANNELS a multiple of 32 and >= 64
    _C.MODEL.FCOS.HEAD_NORM = "GN"
    # prior probability of the classification bias at initialisation, in (0, 1)
    _C.MODEL.FCOS.PRIOR_PROB = 0.01
    # center sampling radius in strides (> 0; detectron2 / FCOS default 1.5). detectron2
    # always samples centres: a location is positive only if it lies within radius x
    # stride of a box centre, so 0 would leave no positives; a large value (1e4) turns
    # center sampling off (the original FCOS rule: any location inside the box)
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # test: detections scored below this (score = sqrt(cls prob x centerness)) are dropped
    # before NMS, in [0, 1)
    _C.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    # test: top-k candidates per level before NMS (>= 1)
    _C.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    # test: NMS IoU threshold, in (0, 1]
    _C.MODEL.FCOS.NMS_THRESH_TEST = 0.6
    # box regression loss on the decoded boxes: "giou" (detectron2's FCOS), "diou", "ciou"
    _C.MODEL.FCOS.BOX_LOSS_TYPE = "giou"
    # focal loss alpha (in [0, 1]; < 0 disables the weighting, as fvcore) and gamma (>= 0)
    # of the classification branch, used by plain and EAPM focal loss alike
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0

    # ------------------------------------------------ balanced feature pyramid
    _C.MODEL.BFP = CN()
    # insert a Balanced Feature Pyramid after the FPN (Libra R-CNN / Libra RetinaNet); needs
    # MODEL.BACKBONE.NAME build_resnet_fpn_bfp_backbone (P2-P6) or
    # build_retinanet_resnet_fpn_bfp_backbone (P3-P7), which give the plain FPN when False
    _C.MODEL.BFP.ENABLED = False
    # index (into the FPN outputs, finest first) of the level the features are
    # integrated at: 2 (P4) for the R-CNN FPN P2-P6, 1 (P4) for RetinaNet's P3-P7
    _C.MODEL.BFP.REFINE_LEVEL = 2
    # refinement of the integrated map: "non_local", "conv" or "none"
    _C.MODEL.BFP.REFINE_TYPE = "non_local"

    # --------------------------------------- IoU-balanced sampling (Libra R-CNN)
    # (used by MODEL.ROI_HEADS.NAME "LibraROIHeads" only)
    # number of IoU bins of the IoU-balanced negative sampler (0 = detectron2's random sampler)
    _C.MODEL.ROI_HEADS.IOU_BALANCED_NUM_BINS = 3
    # negatives with max IoU below this are sampled at random (-1: no floor set, as mmdetection)
    _C.MODEL.ROI_HEADS.IOU_BALANCED_FLOOR_THRESH = -1.0
    # fraction of the sampled negatives taken from below the floor
    _C.MODEL.ROI_HEADS.IOU_BALANCED_FLOOR_FRACTION = 0.0
    # instance-balanced positive sampling: positives spread evenly over GT boxes
    _C.MODEL.ROI_HEADS.INSTANCE_BALANCED_POS = True

    # ------------------------------------------------------------- solver
    # "SGD" (detectron2's, used by every COCO config) or "ADAMW" (the quickstart configs:
    # from-scratch training on a CPU converges in far fewer iterations with AdamW)
    _C.SOLVER.OPTIMIZER = "SGD"

    # ------------------------------------------------- preemption and resume
    _C.SOLVER.PREEMPTION = CN()
    # signals on which training checkpoints after the current iteration (all processes
    # agree on it) and exits with EXIT_CODE: SLURM sends SIGTERM at preemption and, with
    # --signal=USR1@<seconds>, SIGUSR1 before the time limit. [] = the default handlers
    _C.SOLVER.PREEMPTION.SIGNALS = ["SIGTERM", "SIGUSR1"]
    # exit status of a preempted job (1-255; 75 = EX_TEMPFAIL, "try again"): a cluster
    # script requeues on it and reruns the command with --resume
    _C.SOLVER.PREEMPTION.EXIT_CODE = 75
    # True: the training loader's position (sample order, aspect-ratio buckets, the seeds of
    # the augmentations) is in every checkpoint and --resume continues at the exact sample
    # (eapm.data.resumable). False: detectron2's loader, which restarts its order on resume
    _C.DATALOADER.EXACT_RESUME = True

    # --------------------------------------------------------------- data
    # COCO-json datasets to register, each [name, json_file, image_root]; they can then
    # be used in DATASETS.TRAIN / DATASETS.TEST. Also from the command line:
    #   DATASETS.COCO_JSON "[['mine_train', 'a.json', 'imgs/']]"
    _C.DATASETS.COCO_JSON = []
    # where the embedded (generated) dataset lives; "" = $EAPM_DATASETS or ./datasets/eapm_shapes
    _C.DATASETS.EMBEDDED_ROOT = ""
    return cfg


# ---------------------------------------------------------------------------
# loading and validation
# ---------------------------------------------------------------------------
def load_config(
    config_file: str,
    opts: Sequence[str] = (),
    *,
    training: bool = True,
    world_size: int = 1,
    coco_json: Iterable[Sequence[str]] = (),
) -> CN:
    """The project's config: detectron2's defaults + ``add_eapm_config``, merged from
    ``config_file`` and the ``KEY VALUE`` list ``opts``, validated (``validate_config``).
    Cheap (no data, model or process group), so a bad value fails in seconds.

    Args:
        training: also check what only a training job needs (AMP, batch per process).
        world_size: the number of training processes (``--num-gpus x --num-machines``).
        coco_json: extra ``[name, json_file, image_root]`` entries appended to
            ``DATASETS.COCO_JSON``.

    Returns the (not yet frozen) config. MODEL.DEVICE falls back to "cpu" when CUDA is
    not available.
    """
    cfg = get_cfg()
    add_eapm_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE != "cpu":
        cfg.MODEL.DEVICE = "cpu"
    for entry in coco_json:
        cfg.DATASETS.COCO_JSON.append(list(entry))
    validate_config(cfg, training=training, world_size=world_size)
    return cfg


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


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num_in(cfg: CN, key: str, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    v = _get(cfg, key)
    ok = _is_num(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    _require(ok, key, f"must be a finite number in {rng}", v)


def _int_at_least(cfg: CN, key: str, lo: int) -> None:
    v = _get(cfg, key)
    _require(_is_int(v) and v >= lo, key, f"must be an integer >= {lo}", v)


def _int_in(cfg: CN, key: str, lo: int, hi: int) -> None:
    v = _get(cfg, key)
    _require(_is_int(v) and lo <= v <= hi, key, f"must be an integer in [{lo}, {hi}]", v)


# the signals a preemption handler can catch (not SIGKILL / SIGSTOP)
_CATCHABLE_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT")


def _one_of(cfg: CN, key: str, choices: Sequence) -> None:
    v = _get(cfg, key)
    _require(v in choices, key, f"must be one of {tuple(choices)}", v)


def validate_config(cfg: CN, *, training: bool = True, world_size: Optional[int] = None) -> None:
    """Raise ``ValueError`` naming the key for any value the project's modules cannot
    honour: out-of-range values, and switches the chosen (registered) classes do not
    support. ``training`` adds the checks of a training job; ``world_size`` (the number
    of processes) the checks of the batch per process."""
    _validate_values(cfg)
    _validate_capabilities(cfg)
    if training:
        _validate_training(cfg, world_size)


def _validate_values(cfg: CN) -> None:
    e = cfg.MODEL.EAPM
    _checked(cfg, "MODEL.EAPM.CLS.MU", lambda v: check_eapm_param(v, "mu"))
    _checked(cfg, "MODEL.EAPM.REG.THETA", lambda v: check_eapm_param(v, "theta"))
    _int_at_least(cfg, "MODEL.EAPM.HISTOGRAM_PERIOD", 0)
    _require(isinstance(e.COMPILE, bool), "MODEL.EAPM.COMPILE", "must be True or False", e.COMPILE)
    for k in ("ALPHA", "GAMMA", "BETA"):
        _checked(
            cfg, f"MODEL.BALANCED_L1.{k}", lambda v: check_balanced_l1_params(**{k.lower(): v})
        )
    _one_of(cfg, "SOLVER.OPTIMIZER", ("SGD", "ADAMW"))
    sigs = cfg.SOLVER.PREEMPTION.SIGNALS
    _require(
        isinstance(sigs, (list, tuple)) and all(s in _CATCHABLE_SIGNALS for s in sigs),
        "SOLVER.PREEMPTION.SIGNALS",
        f"must be a list of signal names among {_CATCHABLE_SIGNALS}",
        sigs,
    )
    _int_in(cfg, "SOLVER.PREEMPTION.EXIT_CODE", 1, 255)
    _require(
        not cfg.DATALOADER.EXACT_RESUME or cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler",
        "DATALOADER.SAMPLER_TRAIN",
        "DATALOADER.EXACT_RESUME True implements 'TrainingSampler' only (set EXACT_RESUME False "
        "for detectron2's other samplers)",
        cfg.DATALOADER.SAMPLER_TRAIN,
    )
    _one_of(cfg, "MODEL.LOSS_NORMALIZER.TYPE", LOSS_NORMALIZERS)
    _one_of(cfg, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", RETINANET_BOX_REG_LOSSES)
    for part, extra in (("CLS", {}), ("REG", {"mu": "MU"})):
        for arg, key in (
            ("bins", "BINS"),
            ("momentum", "MOMENTUM"),
            ("loss_weight", "LOSS_WEIGHT"),
            *extra.items(),
        ):
            _checked(
                cfg,
                f"MODEL.GHM.{part}.{key}",
                lambda v, arg=arg: check_ghm_params(**{arg: v}),
            )
    for key in ("MODEL.GHM.CLS.ENABLED", "MODEL.GHM.ALL_REDUCE", "MODEL.GHM.PER_LEVEL"):
        _require(isinstance(_get(cfg, key), bool), key, "must be True or False", _get(cfg, key))
    _require(
        not (cfg.MODEL.GHM.CLS.ENABLED and cfg.MODEL.EAPM.CLS.ENABLED),
        "MODEL.GHM.CLS.ENABLED",
        "GHM-C replaces the focal loss that EAPM modulates; it cannot be combined with "
        "MODEL.EAPM.CLS.ENABLED True",
        True,
    )
    _one_of(cfg, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", BOX_REG_LOSSES)
    # FCOS (EAPMFCOS reads these; detectron2's FCOS head checks none of them)
    fc = cfg.MODEL.FCOS
    _one_of(cfg, "MODEL.FCOS.BOX_LOSS_TYPE", FCOS_BOX_LOSSES)
    _int_at_least(cfg, "MODEL.FCOS.NUM_CLASSES", 1)
    _int_at_least(cfg, "MODEL.FCOS.NUM_CONVS", 1)
    _int_at_least(cfg, "MODEL.FCOS.TOPK_CANDIDATES_TEST", 1)
    _require(
        isinstance(fc.IN_FEATURES, (list, tuple)) and len(fc.IN_FEATURES) > 0,
        "MODEL.FCOS.IN_FEATURES",
        "must be a non-empty list of backbone feature names",
        fc.IN_FEATURES,
    )
    _num_in(cfg, "MODEL.FCOS.CENTER_SAMPLING_RADIUS", 0, math.inf, True, True)
    _num_in(cfg, "MODEL.FCOS.PRIOR_PROB", 0, 1, True, True)
    _num_in(cfg, "MODEL.FCOS.SCORE_THRESH_TEST", 0, 1, False, True)
    _num_in(cfg, "MODEL.FCOS.NMS_THRESH_TEST", 0, 1, True, False)
    _num_in(cfg, "MODEL.FCOS.FOCAL_LOSS_ALPHA", -math.inf, 1, True, False)  # < 0: no weighting
    _num_in(cfg, "MODEL.FCOS.FOCAL_LOSS_GAMMA", 0, math.inf, False, True)
    _one_of(cfg, "MODEL.FCOS.HEAD_NORM", ("", "GN", "BN", "SyncBN", "FrozenBN", "LN"))
    # BFP and Libra's sampler
    from .modeling.bfp import check_refine_type

    _checked(cfg, "MODEL.BFP.REFINE_TYPE", check_refine_type)
    _int_at_least(cfg, "MODEL.BFP.REFINE_LEVEL", 0)
    _int_at_least(cfg, "MODEL.ROI_HEADS.IOU_BALANCED_NUM_BINS", 0)
    _num_in(cfg, "MODEL.ROI_HEADS.IOU_BALANCED_FLOOR_FRACTION", 0, 1, False, False)
    for i, entry in enumerate(cfg.DATASETS.COCO_JSON):
        _require(
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and all(isinstance(x, str) for x in entry),
            f"DATASETS.COCO_JSON[{i}]",
            "each entry must be [name, json_file, image_root]",
            entry,
        )


def _registered(registry, key: str, name: str):
    try:
        return registry.get(name)
    except KeyError:
        _fail(key, name, f"not registered in detectron2's {registry._name} registry")


def _validate_capabilities(cfg: CN) -> None:
    """Each switched-on EAPM key must be honoured by the registered class that reads it."""
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, ROI_HEADS_REGISTRY
    from detectron2.modeling.meta_arch import GeneralizedRCNN, RetinaNet

    from .modeling.fcos import EAPMFCOS

    arch_name = cfg.MODEL.META_ARCHITECTURE
    arch = _registered(META_ARCH_REGISTRY, "MODEL.META_ARCHITECTURE", arch_name)
    where = f"MODEL.META_ARCHITECTURE {arch_name!r} ({arch.__module__}.{arch.__qualname__})"
    e = cfg.MODEL.EAPM
    if e.CLS.ENABLED and not issubclass(arch, SupportsEAPMFocal):
        _fail(
            "MODEL.EAPM.CLS.ENABLED",
            True,
            f"{where} has no EAPM focal loss and would train without it; use 'EAPMRetinaNet' "
            "or 'EAPMFCOS' (or a subclass)",
        )
    # the class that owns the box regression loss, and the key that selects its type
    if issubclass(arch, GeneralizedRCNN):
        heads_name = cfg.MODEL.ROI_HEADS.NAME
        owner = _registered(ROI_HEADS_REGISTRY, "MODEL.ROI_HEADS.NAME", heads_name)
        owner_key, loss_key = "MODEL.ROI_HEADS.NAME", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE"
        where = f"MODEL.ROI_HEADS.NAME {heads_name!r} ({owner.__module__}.{owner.__qualname__})"
        use = "'LibraROIHeads' (or a subclass)"
    else:
        owner, owner_key = arch, "MODEL.META_ARCHITECTURE"
        loss_key = "MODEL.RETINANET.BBOX_REG_LOSS_TYPE" if issubclass(arch, RetinaNet) else None
        use = "'EAPMRetinaNet' (or a subclass)"
    supports_bl1 = issubclass(owner, SupportsEAPMBalancedL1)
    if e.REG.ENABLED and not supports_bl1:
        _fail(
            "MODEL.EAPM.REG.ENABLED",
            True,
            f"{where} has no EAPM balanced L1 box loss and would train without it; use {use}",
        )
    if loss_key and _get(cfg, loss_key) == "balanced_l1" and not supports_bl1:
        _fail(
            owner_key,
            _get(cfg, owner_key),
            f"it has no 'balanced_l1' box loss ({loss_key}); use {use}",
        )
    # GHM: GHM-C (MODEL.GHM.CLS.ENABLED) and GHM-R (box loss "ghm_r") need SupportsGHM
    ghm_use = "'EAPMRetinaNet' (or a subclass)"
    if cfg.MODEL.GHM.CLS.ENABLED and not issubclass(arch, SupportsGHM):
        _fail(
            "MODEL.GHM.CLS.ENABLED",
            True,
            f"MODEL.META_ARCHITECTURE {arch_name!r} ({arch.__module__}.{arch.__qualname__}) has "
            f"no GHM-C loss and would train without it; use {ghm_use}",
        )
    if (
        issubclass(arch, RetinaNet)
        and cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE == "ghm_r"
        and not issubclass(arch, SupportsGHM)
    ):
        _fail(
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
            "ghm_r",
            f"MODEL.META_ARCHITECTURE {arch_name!r} ({arch.__module__}.{arch.__qualname__}) has "
            f"no GHM-R box loss; use {ghm_use}",
        )
    if supports_bl1:
        _checked(
            cfg,
            owner.box_loss_key,
            lambda v: owner.check_box_loss(v, float(e.REG.THETA) if e.REG.ENABLED else 0.0),
        )
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
    if issubclass(arch, EAPMFCOS) and cfg.MODEL.FCOS.HEAD_NORM == "GN":
        ch = cfg.MODEL.FPN.OUT_CHANNELS
        _require(
            ch % 32 == 0 and ch >= 64,
            "MODEL.FCOS.HEAD_NORM",
            f"'GN' (32 groups) needs MODEL.FPN.OUT_CHANNELS a multiple of 32 and >= 64, got {ch} "
            "(with 32 channels each group holds one channel, which fails on the 1x1 P7 maps of "
            "small images); use HEAD_NORM ''",
            "GN",
        )


def _head_norm_key(arch) -> Optional[str]:
    """The key of the dense head's normalisation, for the classes that have one."""
    from detectron2.modeling.meta_arch import RetinaNet

    from .modeling.fcos import EAPMFCOS

    if issubclass(arch, RetinaNet):
        return "MODEL.RETINANET.NORM"
    if issubclass(arch, EAPMFCOS):
        return "MODEL.FCOS.HEAD_NORM"
    return None


def _validate_training(cfg: CN, world_size: Optional[int]) -> None:
    from detectron2.modeling import META_ARCH_REGISTRY

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


# ---------------------------------------------------------------------------
# config -> constructor arguments
# ---------------------------------------------------------------------------
def eapm_kwargs(cfg: CN) -> Dict[str, Dict[str, Any]]:
    """The constructor arguments that the config gives each EAPM module, by class name:
    ``"EAPMRetinaNet"``, ``"EAPMFCOS"``, ``"EAPMFastRCNNOutputLayers"``,
    ``"LibraROIHeads"``, ``"BalancedFeaturePyramid"`` (the latter None when
    MODEL.BFP.ENABLED is False). The classes' ``from_config`` add them to detectron2's
    own arguments; a disabled EAPM switch gives strength 0.0 (off), a disabled GHM-C
    ``ghm_cls=None`` (GHM-R is on when the box loss type is "ghm_r")."""
    e, b = cfg.MODEL.EAPM, cfg.MODEL.BALANCED_L1
    mu = float(e.CLS.MU) if e.CLS.ENABLED else 0.0
    theta = float(e.REG.THETA) if e.REG.ENABLED else 0.0
    balanced_l1 = (float(b.ALPHA), float(b.GAMMA), float(b.BETA))
    common = {"histogram_period": int(e.HISTOGRAM_PERIOD), "compile_kernels": bool(e.COMPILE)}
    normalizer = cfg.MODEL.LOSS_NORMALIZER.TYPE
    fc, rh = cfg.MODEL.FCOS, cfg.MODEL.ROI_HEADS
    gh = cfg.MODEL.GHM
    ghm = dict(
        ghm_cls=(
            dict(bins=int(gh.CLS.BINS), momentum=float(gh.CLS.MOMENTUM)) if gh.CLS.ENABLED else None
        ),
        ghm_cls_loss_weight=float(gh.CLS.LOSS_WEIGHT),
        ghm_reg=dict(mu=float(gh.REG.MU), bins=int(gh.REG.BINS), momentum=float(gh.REG.MOMENTUM)),
        ghm_reg_loss_weight=float(gh.REG.LOSS_WEIGHT),
        ghm_all_reduce=bool(gh.ALL_REDUCE),
        ghm_per_level=bool(gh.PER_LEVEL),
    )
    return {
        "EAPMRetinaNet": dict(
            eapm_cls_mu=mu,
            eapm_reg_theta=theta,
            balanced_l1=balanced_l1,
            loss_normalizer=normalizer,
            **ghm,
            **common,
        ),
        "EAPMFCOS": dict(
            eapm_cls_mu=mu,
            box_loss_type=fc.BOX_LOSS_TYPE,
            loss_normalizer=normalizer,
            num_classes=fc.NUM_CLASSES,
            center_sampling_radius=fc.CENTER_SAMPLING_RADIUS,
            focal_loss_alpha=fc.FOCAL_LOSS_ALPHA,
            focal_loss_gamma=fc.FOCAL_LOSS_GAMMA,
            test_score_thresh=fc.SCORE_THRESH_TEST,
            test_topk_candidates=fc.TOPK_CANDIDATES_TEST,
            test_nms_thresh=fc.NMS_THRESH_TEST,
            **common,
        ),
        "EAPMFastRCNNOutputLayers": dict(eapm_reg_theta=theta, balanced_l1=balanced_l1, **common),
        "LibraROIHeads": dict(
            iou_balanced_num_bins=int(rh.IOU_BALANCED_NUM_BINS),
            iou_balanced_floor_thresh=float(rh.IOU_BALANCED_FLOOR_THRESH),
            iou_balanced_floor_fraction=float(rh.IOU_BALANCED_FLOOR_FRACTION),
            instance_balanced_pos=bool(rh.INSTANCE_BALANCED_POS),
        ),
        "BalancedFeaturePyramid": (
            dict(
                refine_level=int(cfg.MODEL.BFP.REFINE_LEVEL), refine_type=cfg.MODEL.BFP.REFINE_TYPE
            )
            if cfg.MODEL.BFP.ENABLED
            else None
        ),
    }
