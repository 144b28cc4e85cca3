"""The config keys of the EAPM project and their defaults: ``add_eapm_config(cfg)`` adds
them (call it on detectron2's default config before ``merge_from_file``); every key is
documented inline.

This module imports nothing of the package (as detectron2's ``config/`` never imports its
``modeling/``). The keys are read where they are used: each EAPM class's ``from_config``
(``eapm.modeling``) reads its own keys and owns the rules about their values;
``eapm.validation`` (``load_config``, ``validate_config``) sits above the models and checks a
loaded config against the registered classes, naming the key.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, List, Sequence

import yaml
from detectron2.config import CfgNode as CN

__all__ = [
    "ConfigFileError",
    "invalid",
    "default_config",
    "add_eapm_config",
    "add_module_configs",
    "config_file_chain",
    "import_modules",
    "merge_config_file",
]


def default_config() -> CN:
    """detectron2's yacs defaults with this project's keys (``add_eapm_config``): also the
    defaults of the ``train`` keys a LazyConfig leaves out."""
    from detectron2.config import get_cfg

    return add_eapm_config(get_cfg())


def invalid(key: str, value: Any, msg: str) -> ValueError:
    """The error of a config value a module cannot use: ``Invalid config KEY = VALUE: msg``
    (one format for every check of a key, wherever it lives)."""
    return ValueError(f"Invalid config {key} = {value!r}: {msg}")


def import_modules(names: Sequence[str]) -> List[ModuleType]:
    """Imports each module of ``names`` (``train_net.py --import``: a user's module that
    registers models, losses or datasets), in order, and returns them.

    Raises ``ImportError`` naming the module whose import failed, with its error."""
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except Exception as e:
            raise ImportError(
                f"--import {name}: importing it failed: {type(e).__name__}: {e}"
            ) from e
    return modules


def add_module_configs(cfg: CN, modules: Sequence[ModuleType]) -> CN:
    """Calls ``add_config(cfg)`` of each module of ``modules`` that defines it (a user's keys
    with their defaults, as ``add_eapm_config`` adds the project's), so that a config file and
    the command line can set them. Raises ``RuntimeError`` naming the module whose
    ``add_config`` failed. Returns ``cfg``."""
    for module in modules:
        add = getattr(module, "add_config", None)
        if add is None:
            continue
        try:
            add(cfg)
        except Exception as e:
            raise RuntimeError(
                f"{module.__name__}.add_config(cfg) failed: {type(e).__name__}: {e}"
            ) from e
    return cfg


class ConfigFileError(ValueError):
    """A yaml config file that cannot be read as data (``path``: the file at fault)."""

    def __init__(self, path: str, msg: str):
        super().__init__(f"config {path}: {msg}")
        self.path = path


def _read_yaml(path: str) -> Any:
    """The content of the yaml file ``path``, read with ``yaml.safe_load``: plain values
    only, never a Python object (``!!python/...`` tags are an error naming the tag)."""
    from detectron2.utils.file_io import PathManager

    try:
        with PathManager.open(path, "r") as f:
            return yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        line = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise ConfigFileError(
            path,
            f"{e.problem}{line}: configs are read as data, and a yaml tag that builds a "
            "Python object is not allowed",
        ) from None
    except (OSError, yaml.YAMLError, RecursionError, UnicodeDecodeError) as e:
        raise ConfigFileError(path, f"cannot be read ({type(e).__name__}: {e})") from None


def config_file_chain(path: str) -> List[str]:
    """``path`` and the files its ``_BASE_`` chain names, each resolved as detectron2 does
    (relative to the file that names it), every one read as data (``yaml.safe_load``).

    Raises ``ConfigFileError`` naming the file: a Python tag, a file that cannot be read,
    or a ``_BASE_`` loop (with the files of the loop)."""
    chain: List[str] = []
    while True:
        real = os.path.realpath(os.path.expanduser(path))
        if real in chain:
            loop = " -> ".join(chain[chain.index(real) :] + [real])
            raise ConfigFileError(path, f"its _BASE_ chain is a loop: {loop}")
        if len(chain) and "://" not in path and not os.path.isfile(path):
            raise ConfigFileError(chain[-1], f"its _BASE_ {path} is not a file")
        chain.append(real)
        data = _read_yaml(path)
        base = data.get("_BASE_") if isinstance(data, dict) else None
        if not base:
            return chain
        if not isinstance(base, str):
            raise ConfigFileError(path, f"_BASE_ must be a file name, got {base!r}")
        base = os.path.expanduser(base)
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(path), base)
        path = base


def merge_config_file(cfg: CN, path: str) -> CN:
    """``cfg.merge_from_file(path)`` with every file of the ``_BASE_`` chain read as data
    (detectron2's default retries with ``yaml.unsafe_load``, which runs ``!!python/...``
    tags). Raises ``ConfigFileError`` (see ``config_file_chain``); returns ``cfg``."""
    config_file_chain(path)
    cfg.merge_from_file(path, allow_unsafe=False)
    return cfg


def add_eapm_config(cfg: CN) -> CN:
    """Add the EAPM project's keys (in place) and return ``cfg``."""
    _C = cfg

    # ---------------------------------------------------------------- EAPM
    _C.MODEL.EAPM = CN()
    _C.MODEL.EAPM.CLS = CN()
    # EAPM on the classification loss. Dense detectors (RetinaNet, Libra RetinaNet, FCOS):
    # EAPM focal loss; False = plain focal loss. R-CNN models (MODEL.META_ARCHITECTURE
    # "GeneralizedRCNN"): EAPM softmax cross entropy in the ROI box predictor (every stage of a
    # cascade), with MODEL.ROI_HEADS.NAME "EAPMROIHeads", "EAPMCascadeROIHeads" or
    # "LibraROIHeads" (detectron2's ROI heads cannot: an error); False = detectron2's cross
    # entropy. The RPN's objectness is switched separately (MODEL.EAPM.RPN).
    _C.MODEL.EAPM.CLS.ENABLED = False
    # mu >= 0 of MF_cls = 1 + tanh(mu) - tanh(mu * Dif), Dif = |p - p*| (R-CNN: Dif = 1 - p_y,
    # the softmax probability of the ROI's label, background included). The paper's best value
    # is 1.5; mu = 0 is exactly the base loss, and is computed as with ENABLED False
    # (detectron2's focal loss / cross entropy): 0 is the one way to say "off".
    _C.MODEL.EAPM.CLS.MU = 1.5
    _C.MODEL.EAPM.REG = CN()
    # EAPM on box regression (dw, dh modulated by Gap-over-Sum).
    # Requires the regression loss type "balanced_l1" (RetinaNet: MODEL.RETINANET.
    # BBOX_REG_LOSS_TYPE, R-CNN: MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE) or one of detectron2's
    # IoU losses "giou", "diou", "ciou" (EAPMRetinaNet and the R-CNN ROI heads EAPMROIHeads,
    # EAPMCascadeROIHeads, LibraROIHeads): the deltas' dw, dh are modulated, then decoded for
    # the IoU loss.
    _C.MODEL.EAPM.REG.ENABLED = False
    # theta >= 0 of MF_reg = 1 + tanh(theta) - tanh(theta * GoS),
    # GoS = |t - t*| / (|t| + |t*|). The paper's best value is 1.0 (one-stage) / 1.5 (R-CNN);
    # theta = 0 is exactly the base box loss (computed as with ENABLED False).
    _C.MODEL.EAPM.REG.THETA = 1.0
    _C.MODEL.EAPM.RPN = CN()
    # EAPM binary cross entropy on the RPN's objectness (R-CNN models): the BCE evaluated at
    # p' = p* + MF_rpn (p - p*) over the sampled anchors, Dif = |p - p*|. Needs
    # MODEL.PROPOSAL_GENERATOR.NAME "EAPMRPN" (detectron2's "RPN" cannot: an error).
    # False = detectron2's binary cross entropy.
    _C.MODEL.EAPM.RPN.ENABLED = False
    # mu >= 0 of MF_rpn = 1 + tanh(mu) - tanh(mu * Dif); mu = 0 is exactly detectron2's RPN
    # loss (computed as with ENABLED False)
    _C.MODEL.EAPM.RPN.MU = 1.5
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
    # its RetinaNet settings; models whose from_config reads them (EAPMRetinaNet).
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

    # ------------------------------------------------- dense-head loss weights
    _C.MODEL.DENSE_HEAD = CN()
    # Weight (a finite number > 0) of the classification loss of the dense detectors
    # (EAPMRetinaNet: loss_cls, whatever computes it (focal, EAPM focal, GHM-C on top of
    # MODEL.GHM.CLS.LOSS_WEIGHT); EAPMFCOS: loss_fcos_cls): the loss and its gradient are
    # multiplied by it. 1.0 = detectron2's loss, bit for bit (no multiplication). A constant
    # equal to EAPM's mean MF is the gradient-scale control of an EAPM focal run
    # (tools/ablation.py's *_scale variants).
    _C.MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT = 1.0

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
    # how the images of the DATASETS.COCO_JSON datasets a run uses (DATASETS.TRAIN / TEST)
    # are checked before the model is built (eapm.data; cached per json file in $EAPM_CACHE
    # or ~/.cache/eapm): "decode" (every image fully decoded: also finds truncated / corrupt
    # files), "header" (exists, opens, size matches the json's: a few KB read per image),
    # "exists" (one stat per image)
    _C.DATASETS.CHECK_IMAGES = "decode"
    # threads of those checks (integer >= 0; 0 = one per CPU, at most 32)
    _C.DATASETS.CHECK_WORKERS = 0
    # where the embedded (generated) dataset lives; "" = $EAPM_DATASETS or ./datasets/eapm_shapes
    _C.DATASETS.EMBEDDED_ROOT = ""
    return cfg
