"""Detections on single images with a trained model of either config system (what
``demo/demo.py`` draws).

``EAPMPredictor(cfg)`` is detectron2's ``DefaultPredictor`` (call it on a BGR ``HxWx3`` uint8
image: ``predictor(image)["instances"]``) for a yacs ``CfgNode`` or a LazyConfig, with the
model built as training builds it (``eapm.model_zoo.build_model``) and its weights loaded
as data through ``eapm.checkpoint.EAPMCheckpointer``.

    cfg = eapm.model_zoo.get_config("/abs/path/config.yaml", ["MODEL.WEIGHTS", "model_final.pth"])
    set_score_threshold(cfg, 0.5)
    predictor = EAPMPredictor(cfg)
    instances = predictor(cv2.imread("image.png"))["instances"]
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor

__all__ = ["EAPMPredictor", "weights_key", "set_score_threshold", "test_dataset_name"]


def _is_yacs(cfg) -> bool:
    return isinstance(cfg, CfgNode)


def weights_key(cfg) -> Tuple[str, str]:
    """(the key naming the weights, its value): ``("MODEL.WEIGHTS", ...)`` for a yacs
    config, ``("train.init_checkpoint", ...)`` for a LazyConfig ("" when it has none)."""
    if _is_yacs(cfg):
        return "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS
    train = cfg.get("train", None) or {}
    return "train.init_checkpoint", train.get("init_checkpoint", "") or ""


def _is_fcos(target) -> bool:
    """Whether a LazyConfig ``_target_`` (a class or its dotted name) is an FCOS."""
    from detectron2.modeling.meta_arch.fcos import FCOS
    from detectron2.utils.registry import locate

    target = locate(target) if isinstance(target, str) else target
    return isinstance(target, type) and issubclass(target, FCOS)


def set_score_threshold(cfg, threshold: float) -> List[str]:
    """Sets the test-time score threshold of every detector the config can describe to
    ``threshold`` (in [0, 1]); FCOS's must stay below 1, so it gets ``min(threshold, 0.999)``.
    yacs: MODEL.RETINANET / ROI_HEADS / FCOS.SCORE_THRESH_TEST; LazyConfig: the
    ``test_score_thresh`` of ``model`` (dense detectors) or of the R-CNN box predictor(s).
    Returns the keys set.

    Raises ``ValueError`` for a threshold outside [0, 1]."""
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"the score threshold must be in [0, 1], got {threshold!r}")
    if _is_yacs(cfg):
        cfg.defrost()
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = t
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = t
        cfg.MODEL.FCOS.SCORE_THRESH_TEST = min(t, 0.999)
        return [f"MODEL.{k}.SCORE_THRESH_TEST" for k in ("RETINANET", "ROI_HEADS", "FCOS")]
    keys = []
    model = cfg.model
    if "test_score_thresh" in model:
        model.test_score_thresh = min(t, 0.999) if _is_fcos(model._target_) else t
        keys.append("model.test_score_thresh")
    heads = model.get("roi_heads", None)
    if heads is not None:
        if "box_predictor" in heads:
            heads.box_predictor.test_score_thresh = t
            keys.append("model.roi_heads.box_predictor.test_score_thresh")
        for i, predictor in enumerate(heads.get("box_predictors", None) or ()):
            predictor.test_score_thresh = t
            keys.append(f"model.roi_heads.box_predictors[{i}].test_score_thresh")
    return keys


def test_dataset_name(cfg) -> Optional[str]:
    """The first test dataset of the config (yacs DATASETS.TEST, LazyConfig
    ``dataloader.test.dataset.names``), or None. The project's datasets (the embedded one,
    yacs DATASETS.COCO_JSON) are registered, without their image checks, so that its
    metadata (class names) is known."""
    from .data import register_coco_json, register_embedded

    if _is_yacs(cfg):
        register_embedded(cfg.DATASETS.EMBEDDED_ROOT or None)
        for name, json_file, image_root in cfg.DATASETS.COCO_JSON:
            register_coco_json(name, json_file, image_root, check_images="exists")
        return cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None
    register_embedded(None)
    try:
        names = cfg.dataloader.test.dataset.names
    except (AttributeError, KeyError):
        return None
    if isinstance(names, str):
        return names
    names = list(names)
    return names[0] if names else None


def _test_resize(cfg):
    """(the test-time augmentation, the model's input format) of the config."""
    import detectron2.data.transforms as T

    if _is_yacs(cfg):
        size = cfg.INPUT.MIN_SIZE_TEST
        return T.ResizeShortestEdge([size, size], cfg.INPUT.MAX_SIZE_TEST), cfg.INPUT.FORMAT
    from detectron2.config import instantiate

    mapper = cfg.dataloader.test.mapper
    augs = instantiate(mapper.augmentations)
    if len(augs) != 1:
        raise ValueError(
            "dataloader.test.mapper.augmentations must hold one augmentation (the test-time "
            f"resize) for the predictor, it holds {len(augs)}"
        )
    return augs[0], mapper.get("image_format", "BGR")


class EAPMPredictor(DefaultPredictor):
    """detectron2's ``DefaultPredictor`` (its ``__call__``: a BGR image in, the model's
    output dict for it out) for a yacs or a LazyConfig config:

    * the model of ``eapm.model_zoo.build_model`` on ``device`` (default: "cuda" when
      CUDA is available, else "cpu"), in eval mode;
    * the weights of MODEL.WEIGHTS / ``train.init_checkpoint`` loaded through
      ``EAPMCheckpointer`` (as data: ``eapm.safe_load``); a local file or a URL;
    * the test-time resize and input format of the config (yacs INPUT.MIN/MAX_SIZE_TEST and
      INPUT.FORMAT; LazyConfig ``dataloader.test.mapper``);
    * ``metadata``: that of the config's first test dataset (``test_dataset_name``).

    The score threshold is the config's (``set_score_threshold`` changes it).

    Raises:
        ValueError: the config names no weights (the message names the key).
        FileNotFoundError: the weights file does not exist (names the file and the key).
        and what ``EAPMCheckpointer.load`` raises for a damaged or unsafe file."""

    def __init__(self, cfg, device: Optional[str] = None):
        # not DefaultPredictor.__init__: it builds from a yacs config only and loads the
        # weights with torch.load; __call__ reads self.model, self.aug, self.input_format and
        # self.cfg.MODEL.DEVICE
        from .checkpoint import EAPMCheckpointer
        from .model_zoo import build_model, default_device

        key, weights = weights_key(cfg)
        if not weights:
            raise ValueError(
                f"{key} is empty: the config names no trained weights to predict with (name "
                "a checkpoint, e.g. a training's OUTPUT_DIR/model_final.pth)"
            )
        if "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file not found: {weights} ({key})")
        device = default_device(device)
        self.model = build_model(cfg, device)
        self.model.eval()
        EAPMCheckpointer(self.model).load(weights)
        self.aug, self.input_format = _test_resize(cfg)
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"the input format must be 'RGB' or 'BGR', got {self.input_format!r}")
        from detectron2.data import MetadataCatalog

        name = test_dataset_name(cfg)
        self.metadata = MetadataCatalog.get(name if name else "__unused")
        self.weights = weights
        self.device = device
        if _is_yacs(cfg):
            self.cfg = cfg.clone()
            self.cfg.defrost()
            self.cfg.MODEL.DEVICE = device
        else:
            self.cfg = CfgNode({"MODEL": {"DEVICE": device}})
