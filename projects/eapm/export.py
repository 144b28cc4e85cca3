"""Export of the EAPM detectors with detectron2's deployment API (``detectron2.export``):
TorchScript by tracing (``TracingAdapter``) or scripting (``scripting_with_instances``), and
ONNX by tracing when the ``onnx`` package is installed. ``tools/export_model.py`` is the
command line; the functions here are what it calls (and what the tests check).

The EAPM detectors change only training (losses, sampling) and the backbone (BFP), so their
inference is detectron2's: what detectron2 can export for RetinaNet, FCOS and
GeneralizedRCNN, it exports for EAPMRetinaNet, EAPMFCOS and Libra R-CNN (BFP included).
As in detectron2's ``tools/deploy/export_model.py``, a GeneralizedRCNN is exported without
its post-processing (``inference(do_postprocess=False)``: boxes in the coordinates of the
resized input), the dense detectors with theirs (boxes in the input image's coordinates,
which is the resized one: ``height`` / ``width`` are not inputs of the exported model).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling import GeneralizedRCNN

__all__ = [
    "EXPORT_METHODS",
    "FORMATS",
    "load_model",
    "sample_input",
    "eager_inference",
    "export_tracing",
    "export_scripting",
    "export_model",
]

logger = logging.getLogger(__name__)

EXPORT_METHODS = ("tracing", "scripting")
FORMATS = ("torchscript", "onnx")


def load_model(config_file: str, opts: Sequence[str] = ()) -> Tuple[torch.nn.Module, dict]:
    """The model of a yacs (``.yaml``: ``KEY VALUE`` opts) or LazyConfig (``.py``:
    ``key=value`` opts) config, in eval mode on the CPU, with its weights (``MODEL.WEIGHTS``
    / ``train.init_checkpoint``; none when empty). Returns (model, test input spec) where
    the spec is ``dict(min_size, max_size, format)`` of the config's test-time resize."""
    from detectron2.checkpoint import DetectionCheckpointer

    if config_file.endswith(".py"):
        from detectron2.config import instantiate

        from .lazy import load_lazy_config

        cfg = load_lazy_config(config_file, opts)
        model = instantiate(cfg.model)
        weights = cfg.train.get("init_checkpoint", "")
        aug = cfg.dataloader.test.mapper.augmentations[0]
        spec = dict(
            min_size=int(aug.short_edge_length),
            max_size=int(aug.max_size),
            format=cfg.dataloader.test.mapper.get("image_format", "BGR"),
        )
    else:
        from detectron2.modeling import build_model

        from .validation import load_config

        cfg = load_config(config_file, list(opts), training=False)
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
        weights = cfg.MODEL.WEIGHTS
        spec = dict(
            min_size=cfg.INPUT.MIN_SIZE_TEST,
            max_size=cfg.INPUT.MAX_SIZE_TEST,
            format=cfg.INPUT.FORMAT,
        )
    model.to("cpu").eval()
    if weights:
        DetectionCheckpointer(model).load(weights)
    return model, spec


def sample_input(spec: dict, image_path: Optional[str] = None, seed: int = 0) -> torch.Tensor:
    """A (3, H, W) float32 image as the model's test loader would give it: ``image_path``
    read in ``spec["format"]`` and resized (shortest edge ``min_size``, longest at most
    ``max_size``), or, without a path, uniform noise of ``min_size`` x ``min_size``."""
    if image_path is None:
        g = torch.Generator().manual_seed(seed)
        n = spec["min_size"]
        return torch.randint(0, 256, (3, n, n), generator=g).float()
    import detectron2.data.transforms as T
    from detectron2.data.detection_utils import read_image

    img = read_image(image_path, format=spec["format"])
    img = (
        T.ResizeShortestEdge(spec["min_size"], spec["max_size"]).get_transform(img).apply_image(img)
    )
    return torch.as_tensor(np.ascontiguousarray(img.astype("float32").transpose(2, 0, 1)))


def _inference_fn(model) -> Optional[Callable]:
    if isinstance(model, GeneralizedRCNN):

        def inference(model, inputs):
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

        return inference
    return None  # the dense detectors: their forward


def eager_inference(model, image: torch.Tensor):
    """The eager model's detections (an ``Instances``) on ``image``, as the exported model
    computes them (see the module docstring)."""
    with torch.no_grad():
        fn = _inference_fn(model)
        inputs = [{"image": image}]
        return (fn(model, inputs) if fn else model(inputs))[0]["instances"]


def export_tracing(model, image: torch.Tensor, output_dir: str, fmt: str = "torchscript"):
    """Traces ``model`` on ``image`` with ``TracingAdapter`` and writes ``model.ts``
    (TorchScript) or ``model.onnx`` (ONNX, opset 16) to ``output_dir``. Returns
    (path, run) where ``run(image)`` runs the exported TorchScript model and returns an
    ``Instances`` (for ONNX: None, run it with onnxruntime). The traced graph holds the
    shapes of ``image``'s size: export at the size you deploy at."""
    from detectron2.export import TracingAdapter

    adapter = TracingAdapter(model, [{"image": image}], _inference_fn(model))
    adapter.eval()
    os.makedirs(output_dir, exist_ok=True)
    if fmt == "onnx":
        path = os.path.join(output_dir, "model.onnx")
        with open(path, "wb") as f:
            torch.onnx.export(adapter, (image,), f, opset_version=16)
        return path, None
    with torch.no_grad():
        ts = torch.jit.trace(adapter, (image,), check_trace=False)
    path = os.path.join(output_dir, "model.ts")
    ts.save(path)
    schema = adapter.outputs_schema

    def run(img: torch.Tensor):
        with torch.no_grad():
            return schema(ts(img))[0]["instances"]

    return path, run


class _ScriptableAdapter(torch.nn.Module):
    """List of (3, H, W) images -> the detections' fields, as scripting needs them typed."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.eval()


class _ScriptableRCNN(_ScriptableAdapter):
    def forward(self, inputs: List[Dict[str, torch.Tensor]]):
        return [i.get_fields() for i in self.model.inference(inputs, do_postprocess=False)]


class _ScriptableDense(_ScriptableAdapter):
    def forward(self, inputs: List[Dict[str, torch.Tensor]]):
        # scripted, a dense detector's forward returns its List[Instances] directly
        return [i.get_fields() for i in self.model(inputs)]


def export_scripting(model, output_dir: str):
    """Scripts ``model`` (``detectron2.export.scripting_with_instances``) and writes
    ``model.ts`` to ``output_dir``. Returns (path, run) with ``run(image)`` -> ``Instances``.
    The dense detectors' scripted forward returns detections before detectron2's
    ``detector_postprocess`` (boxes not clipped to the image), as detectron2's own; ``run``
    applies it. Raises whatever TorchScript raises for a model it cannot script
    (detectron2's FCOS head; a RetinaNet head with BatchNorm, ``CycleBatchNormList``; a
    StandardROIHeads without a mask head, i.e. Faster R-CNN and Libra R-CNN: TorchScript
    compiles its mask branch, whose attributes it never sets)."""
    from detectron2.export import scripting_with_instances
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Boxes, Instances

    # the Instances fields of the detections (and of the RPN's proposals)
    fields = {
        "proposal_boxes": Boxes,
        "objectness_logits": torch.Tensor,
        "pred_boxes": Boxes,
        "scores": torch.Tensor,
        "pred_classes": torch.Tensor,
    }
    rcnn = isinstance(model, GeneralizedRCNN)
    cls = _ScriptableRCNN if rcnn else _ScriptableDense
    ts = scripting_with_instances(cls(model), fields)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model.ts")
    ts.save(path)

    def run(img: torch.Tensor):
        with torch.no_grad():
            fields = ts([{"image": img}])[0]
        for k in ("pred_boxes", "proposal_boxes"):
            if isinstance(fields.get(k), torch.Tensor):
                fields[k] = Boxes(fields[k])
        out = Instances(tuple(img.shape[1:]), **fields)
        # scripted, the dense detectors skip their post-processing (as detectron2's): do it
        return out if rcnn else detector_postprocess(out, *img.shape[1:])

    return path, run


def export_model(
    config_file: str,
    output_dir: str,
    *,
    method: str = "tracing",
    fmt: str = "torchscript",
    sample_image: Optional[str] = None,
    opts: Sequence[str] = (),
) -> dict:
    """Builds the config's model, exports it, runs the export (TorchScript) on the sample
    image and compares it with the eager model. Returns ``dict(path, detections,
    max_box_diff, max_score_diff)`` (the diffs None for ONNX). ``ValueError`` for an
    unknown method / format or scripting to ONNX; ``ImportError`` for ONNX without the
    ``onnx`` package."""
    if method not in EXPORT_METHODS:
        raise ValueError(f"export method must be one of {EXPORT_METHODS}, got {method!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        if method != "tracing":
            raise ValueError("ONNX is exported by tracing only (--export-method tracing)")
        import onnx  # noqa: F401  (torch.onnx needs it to write the file)
    model, spec = load_model(config_file, opts)
    image = sample_input(spec, sample_image)
    if method == "tracing":
        path, run = export_tracing(model, image, output_dir, fmt)
    else:
        path, run = export_scripting(model, output_dir)
    ref = eager_inference(model, image)
    out = dict(path=path, detections=len(ref), max_box_diff=None, max_score_diff=None)
    if run is not None:
        got = run(image)
        if len(got) != len(ref):
            raise RuntimeError(f"exported model: {len(got)} detections, eager: {len(ref)}")
        if len(ref):
            out["max_box_diff"] = float((got.pred_boxes.tensor - ref.pred_boxes.tensor).abs().max())
            out["max_score_diff"] = float((got.scores - ref.scores).abs().max())
        else:
            out["max_box_diff"] = out["max_score_diff"] = 0.0
    return out
