"""Config keys of the EAPM project and their validation.

Call ``add_eapm_config(cfg)`` on detectron2's default config before
``merge_from_file``. Every key is documented inline; ``validate_eapm_config`` rejects
out-of-range values with an error that names the key, before anything is built.
"""
from __future__ import annotations

import math

from detectron2.config import CfgNode as CN

__all__ = ["add_eapm_config", "validate_eapm_config", "validate_train_config"]

# regression losses the dense heads accept; the first four are detectron2's own
DENSE_BOX_LOSSES = ("smooth_l1", "giou", "diou", "ciou", "balanced_l1")
# regression losses the ROI box head accepts
ROI_BOX_LOSSES = ("smooth_l1", "giou", "diou", "ciou", "balanced_l1")
# regression losses FCOS accepts (on decoded boxes; detectron2's FCOS uses giou)
FCOS_BOX_LOSSES = ("giou", "diou", "ciou")


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
    # The paper's best value is 1.5; mu = 0 is exactly the focal loss.
    _C.MODEL.EAPM.CLS.MU = 1.5
    _C.MODEL.EAPM.REG = CN()
    # EAPM with balanced L1 loss on box regression (dw, dh modulated by Gap-over-Sum).
    # Requires the regression loss type "balanced_l1" (RetinaNet: MODEL.RETINANET.
    # BBOX_REG_LOSS_TYPE, R-CNN: MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE).
    _C.MODEL.EAPM.REG.ENABLED = False
    # theta >= 0 of MF_reg = 1 + tanh(theta) - tanh(theta * GoS),
    # GoS = |t - t*| / (|t| + |t*|). The paper's best value is 1.0 (one-stage) / 1.5 (R-CNN).
    _C.MODEL.EAPM.REG.THETA = 1.0
    # Log the histograms of Dif, GoS and MF to the event storage every this many
    # iterations (0 = never). Means are logged every iteration (cheap).
    _C.MODEL.EAPM.HISTOGRAM_PERIOD = 0
    # Run the fused EAPM loss kernels through torch.compile (compiled once per process;
    # falls back to eager mode with a warning where compilation fails). Worth it for
    # COCO-sized heads; the quickstart configs turn it off (tiny tensors).
    _C.MODEL.EAPM.COMPILE = True

    # -------------------------------------------------------- balanced L1
    _C.MODEL.BALANCED_L1 = CN()
    # mmdetection's balanced L1 loss (Libra R-CNN): alpha > 0 raises inlier gradients,
    _C.MODEL.BALANCED_L1.ALPHA = 0.5
    # gamma > 0 is the gradient bound for outliers,
    _C.MODEL.BALANCED_L1.GAMMA = 1.5
    # beta > 0 is the inlier/outlier threshold. 1.0 for Libra R-CNN, 0.11 for Libra RetinaNet.
    _C.MODEL.BALANCED_L1.BETA = 1.0

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

    # --------------------------------------------------------------- data
    # COCO-json datasets to register, each [name, json_file, image_root]; they can then
    # be used in DATASETS.TRAIN / DATASETS.TEST. Also from the command line:
    #   DATASETS.COCO_JSON "[['mine_train', 'a.json', 'imgs/']]"
    _C.DATASETS.COCO_JSON = []
    # where the embedded (generated) dataset lives; "" = $EAPM_DATASETS or ./datasets/eapm_shapes
    _C.DATASETS.EMBEDDED_ROOT = ""
    return cfg


def _require(cond: bool, key: str, msg: str, value) -> None:
    if not cond:
        raise ValueError(f"Invalid config {key} = {value!r}: {msg}")


def _finite_nonneg(cfg: CN, key: str) -> None:
    v = _get(cfg, key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    _require(ok, key, "must be a finite number >= 0", v)


def _finite_pos(cfg: CN, key: str) -> None:
    v = _get(cfg, key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    _require(ok, key, "must be a finite number > 0", v)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate_eapm_config(cfg: CN) -> None:
    """Raise ``ValueError`` naming the key for any out-of-range EAPM-project value."""
    _finite_nonneg(cfg, "MODEL.EAPM.CLS.MU")
    _finite_nonneg(cfg, "MODEL.EAPM.REG.THETA")
    _finite_nonneg(cfg, "MODEL.EAPM.HISTOGRAM_PERIOD")
    for k in ("ALPHA", "GAMMA", "BETA"):
        _finite_pos(cfg, f"MODEL.BALANCED_L1.{k}")
    opt = cfg.SOLVER.OPTIMIZER
    _require(opt in ("SGD", "ADAMW"), "SOLVER.OPTIMIZER", "must be 'SGD' or 'ADAMW'", opt)
    norm = cfg.MODEL.LOSS_NORMALIZER.TYPE
    _require(norm in ("ema", "all_reduce"), "MODEL.LOSS_NORMALIZER.TYPE", "must be 'ema' or 'all_reduce'", norm)
    rt = cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE
    _require(rt in DENSE_BOX_LOSSES, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", f"must be one of {DENSE_BOX_LOSSES}", rt)
    rb = cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE
    _require(rb in ROI_BOX_LOSSES, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", f"must be one of {ROI_BOX_LOSSES}", rb)
    _require(
        not (cfg.MODEL.EAPM.REG.ENABLED and "FCOS" in cfg.MODEL.META_ARCHITECTURE),
        "MODEL.EAPM.REG.ENABLED",
        "FCOS has no anchor deltas to modulate (EAPM regression is for anchor-based detectors)",
        cfg.MODEL.EAPM.REG.ENABLED,
    )
    if cfg.MODEL.EAPM.REG.ENABLED:
        arch = cfg.MODEL.META_ARCHITECTURE
        key, loss = (
            ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", rb)
            if "RCNN" in arch
            else ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", rt)
        )
        _require(
            loss == "balanced_l1",
            key,
            "MODEL.EAPM.REG.ENABLED needs the 'balanced_l1' regression loss (EAPM modulates its deltas)",
            loss,
        )
    fc = cfg.MODEL.FCOS
    _require(
        fc.BOX_LOSS_TYPE in FCOS_BOX_LOSSES, "MODEL.FCOS.BOX_LOSS_TYPE", f"must be one of {FCOS_BOX_LOSSES}", fc.BOX_LOSS_TYPE
    )
    _require(_is_int(fc.NUM_CLASSES) and fc.NUM_CLASSES >= 1, "MODEL.FCOS.NUM_CLASSES", "must be an integer >= 1", fc.NUM_CLASSES)
    _require(_is_int(fc.NUM_CONVS) and fc.NUM_CONVS >= 1, "MODEL.FCOS.NUM_CONVS", "must be an integer >= 1", fc.NUM_CONVS)
    _require(
        isinstance(fc.IN_FEATURES, (list, tuple)) and len(fc.IN_FEATURES) > 0,
        "MODEL.FCOS.IN_FEATURES",
        "must be a non-empty list of backbone feature names",
        fc.IN_FEATURES,
    )
    _finite_pos(cfg, "MODEL.FCOS.CENTER_SAMPLING_RADIUS")
    p = fc.PRIOR_PROB
    _require(_is_num(p) and 0 < p < 1, "MODEL.FCOS.PRIOR_PROB", "must be in (0, 1)", p)
    st = fc.SCORE_THRESH_TEST
    _require(_is_num(st) and 0 <= st < 1, "MODEL.FCOS.SCORE_THRESH_TEST", "must be in [0, 1)", st)
    nt = fc.NMS_THRESH_TEST
    _require(_is_num(nt) and 0 < nt <= 1, "MODEL.FCOS.NMS_THRESH_TEST", "must be in (0, 1]", nt)
    k = fc.TOPK_CANDIDATES_TEST
    _require(_is_int(k) and k >= 1, "MODEL.FCOS.TOPK_CANDIDATES_TEST", "must be an integer >= 1", k)
    a = fc.FOCAL_LOSS_ALPHA
    _require(_is_num(a) and a <= 1, "MODEL.FCOS.FOCAL_LOSS_ALPHA", "must be <= 1 (< 0 disables the weighting)", a)
    _finite_nonneg(cfg, "MODEL.FCOS.FOCAL_LOSS_GAMMA")
    _require(
        fc.HEAD_NORM in ("", "GN", "BN", "SyncBN", "FrozenBN", "LN"), "MODEL.FCOS.HEAD_NORM", "unknown norm", fc.HEAD_NORM
    )
    if fc.HEAD_NORM == "GN" and "FCOS" in cfg.MODEL.META_ARCHITECTURE:
        ch = cfg.MODEL.FPN.OUT_CHANNELS
        _require(
            ch % 32 == 0 and ch >= 64,
            "MODEL.FCOS.HEAD_NORM",
            f"'GN' (32 groups) needs MODEL.FPN.OUT_CHANNELS a multiple of 32 and >= 64, got {ch} (with 32 channels "
            "each group holds one channel, which fails on the 1x1 P7 maps of small images); use HEAD_NORM ''",
            fc.HEAD_NORM,
        )
    bfp = cfg.MODEL.BFP
    _require(
        bfp.REFINE_TYPE in ("non_local", "conv", "none"),
        "MODEL.BFP.REFINE_TYPE",
        "must be 'non_local', 'conv' or 'none'",
        bfp.REFINE_TYPE,
    )
    _require(int(bfp.REFINE_LEVEL) >= 0, "MODEL.BFP.REFINE_LEVEL", "must be >= 0", bfp.REFINE_LEVEL)
    bb = cfg.MODEL.BACKBONE.NAME
    _require(
        not bfp.ENABLED or bb.endswith("_bfp_backbone"),
        "MODEL.BACKBONE.NAME",
        "MODEL.BFP.ENABLED needs a BFP backbone builder (build_resnet_fpn_bfp_backbone or "
        "build_retinanet_resnet_fpn_bfp_backbone); with this one BFP would silently be off",
        bb,
    )
    rh = cfg.MODEL.ROI_HEADS
    _require(int(rh.IOU_BALANCED_NUM_BINS) >= 0, "MODEL.ROI_HEADS.IOU_BALANCED_NUM_BINS", "must be >= 0", rh.IOU_BALANCED_NUM_BINS)
    ff = rh.IOU_BALANCED_FLOOR_FRACTION
    _require(0 <= ff <= 1, "MODEL.ROI_HEADS.IOU_BALANCED_FLOOR_FRACTION", "must be in [0, 1]", ff)
    for i, entry in enumerate(cfg.DATASETS.COCO_JSON):
        _require(
            isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(e, str) for e in entry),
            f"DATASETS.COCO_JSON[{i}]",
            "each entry must be [name, json_file, image_root]",
            entry,
        )


# detectron2's own meta-architectures and ROI heads: they never read MODEL.EAPM.* or
# MODEL.BALANCED_L1.* (an EAPM switch there would be silently ignored)
_D2_ARCHS = ("RetinaNet", "GeneralizedRCNN", "ProposalNetwork", "PanopticFPN", "SemanticSegmentor")
_D2_ROI_HEADS = ("StandardROIHeads", "Res5ROIHeads", "CascadeROIHeads")


def validate_train_config(cfg: CN) -> None:
    """``validate_eapm_config`` plus the checks that concern a whole training job; raise
    ``ValueError`` naming the key. Called by ``train_net.py`` before any process is
    spawned and by ``EAPMTrainer`` before anything is built:

    * the chosen meta-architecture / ROI heads must actually use the EAPM and balanced-L1
      settings that are switched on (detectron2's ``RetinaNet`` would silently train the
      plain focal loss; its ROI heads would fail at the first iteration on "balanced_l1");
    * SOLVER.AMP.ENABLED needs CUDA: detectron2's AMPTrainer fails at the first iteration
      on a CPU model.
    """
    validate_eapm_config(cfg)
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in _D2_ARCHS:
        _require(
            not cfg.MODEL.EAPM.CLS.ENABLED,
            "MODEL.META_ARCHITECTURE",
            "MODEL.EAPM.CLS.ENABLED is True, but detectron2's meta-architectures ignore it (EAPM focal loss "
            "is in 'EAPMRetinaNet' and 'EAPMFCOS')",
            arch,
        )
    reg = cfg.MODEL.EAPM.REG.ENABLED
    if arch in ("RetinaNet", "ProposalNetwork", "SemanticSegmentor"):
        _require(
            not reg and not (arch == "RetinaNet" and cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE == "balanced_l1"),
            "MODEL.META_ARCHITECTURE",
            f"detectron2's {arch} has no 'balanced_l1' / EAPM box loss (MODEL.EAPM.REG.ENABLED would be ignored); "
            "use 'EAPMRetinaNet'",
            arch,
        )
    if arch in ("GeneralizedRCNN", "PanopticFPN") and cfg.MODEL.ROI_HEADS.NAME in _D2_ROI_HEADS:
        _require(
            not reg and cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE != "balanced_l1",
            "MODEL.ROI_HEADS.NAME",
            "detectron2's ROI heads have no 'balanced_l1' / EAPM box loss; use 'LibraROIHeads'",
            cfg.MODEL.ROI_HEADS.NAME,
        )
    _require(
        not (cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"),
        "SOLVER.AMP.ENABLED",
        "mixed-precision training (detectron2's AMPTrainer) needs CUDA, and MODEL.DEVICE is 'cpu' (set when no "
        "GPU is available)",
        cfg.SOLVER.AMP.ENABLED,
    )
