"""Export of the EAPM detectors with detectron2's deployment API (``detectron2.export``):
TorchScript by tracing (``TracingAdapter``) or scripting (``scripting_with_instances``), and
ONNX by tracing. ``tools/export_model.py`` is the command line; the functions here are what
it calls (and what the tests check). ``docs/deployment.md`` says how to run each format.

The EAPM detectors change only training (losses, sampling) and the backbone (BFP), so their
inference is detectron2's: what detectron2 can export for RetinaNet, FCOS and
GeneralizedRCNN, it exports for EAPMRetinaNet, EAPMFCOS and Faster R-CNN with LibraROIHeads.
As in detectron2's ``tools/deploy/export_model.py``, a GeneralizedRCNN is exported without
its post-processing (``inference(do_postprocess=False)``: boxes in the coordinates of the
resized input), the dense detectors with theirs (boxes in the input image's coordinates,
which is the resized one: ``height`` / ``width`` are not inputs of the exported model).

A traced model (TorchScript or ONNX) takes one (3, H, W) float32 image (``INPUT_NAME``) of
any size and returns ``OUTPUT_NAMES``: pred_boxes (N, 4) float32 XYXY in input pixels,
pred_classes (N,) int64, scores (N,) float32, image_size (2,) int64 = (H, W).

A model with a Balanced Feature Pyramid (``MODEL.BFP.ENABLED``: Libra RetinaNet, Libra
R-CNN) exports to TorchScript but not to ONNX with torch 2.3's exporter: the BFP's
``adaptive_max_pool2d`` has an output size that depends on the input size, and ONNX has no
adaptive pooling (torch.onnx exports one only for a constant output size that divides the
input size). ``export_tracing`` raises ``RuntimeError`` saying so.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling import GeneralizedRCNN

__all__ = [
    "EXPORT_METHODS",
    "FORMATS",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "ONNX_OPSET",
    "load_model",
    "sample_input",
    "eager_inference",
    "export_tracing",
    "export_scripting",
    "load_exported",
    "compare_detections",
    "export_model",
]

logger = logging.getLogger(__name__)

EXPORT_METHODS = ("tracing", "scripting")
FORMATS = ("torchscript", "onnx")
# the traced model's input and outputs: detectron2's TracingAdapter flattens the detections'
# Instances into its fields in sorted order, then the image size
INPUT_NAME = "image"
OUTPUT_NAMES = ("pred_boxes", "pred_classes", "scores", "image_size")
ONNX_OPSET = 16

BFP_ONNX_ERROR = (
    "ONNX export of {model} failed in its Balanced Feature Pyramid (MODEL.BFP.ENABLED): "
    "F.adaptive_max_pool2d (BFP gather / scatter between pyramid levels) has an output size "
    "that depends on the input image's size, and ONNX has no adaptive pooling operator "
    "(torch.onnx exports one only for a constant output size that divides the input size). "
    "Export TorchScript instead (--format torchscript); see docs/deployment.md."
)


def load_model(config_file: str, opts: Sequence[str] = ()) -> Tuple[torch.nn.Module, dict]:
    """The model of a yacs (``.yaml``: ``KEY VALUE`` opts) or LazyConfig (``.py``:
    ``key=value`` opts) config, in eval mode on the CPU, with its weights (``MODEL.WEIGHTS``
    / ``train.init_checkpoint``; none when empty). Returns (model, test input spec) where
    the spec is ``dict(min_size, max_size, format)`` of the config's test-time resize."""
    from .checkpoint import EAPMCheckpointer
    from .lazy import is_lazy_config

    if is_lazy_config(config_file):
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
        logger.info(f"loading the weights {weights}")
        EAPMCheckpointer(model).load(weights)
    return model, spec


def sample_input(
    spec: dict,
    image_path: Optional[str] = None,
    seed: int = 0,
    size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """A (3, H, W) float32 image in [0, 255] as the model's test loader would give it:
    ``image_path`` read in ``spec["format"]`` and resized (shortest edge ``min_size``,
    longest at most ``max_size``), or, without a path, uniform noise (seeded by ``seed``)
    of ``size`` = (H, W), by default ``min_size`` x ``min_size``."""
    if image_path is None:
        g = torch.Generator().manual_seed(seed)
        h, w = size or (spec["min_size"], spec["min_size"])
        return torch.randint(0, 256, (3, h, w), generator=g).float()
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


def _check_outputs(adapter) -> None:
    # the exported outputs are named OUTPUT_NAMES: make sure the flattening is that one
    from detectron2.export.flatten import InstancesSchema

    schema = adapter.outputs_schema  # [{"instances": Instances}]
    inst = schema.schemas[0].schemas[0] if len(schema.schemas) == 1 else None
    if not isinstance(inst, InstancesSchema) or tuple(inst.keys) != OUTPUT_NAMES[:-1]:
        raise RuntimeError(f"unexpected outputs of the traced model: {schema}")


def _size_mb(path: str) -> float:
    return os.path.getsize(path) / 2**20


def export_tracing(model, image: torch.Tensor, output_dir: str, fmt: str = "torchscript"):
    """Traces ``model`` on ``image`` (3, H, W) with ``TracingAdapter`` and writes
    ``model.ts`` (TorchScript) or ``model.onnx`` (ONNX, opset ``ONNX_OPSET``, checked with
    ``onnx.checker``) to ``output_dir``. The exported model takes an image of any size
    (ONNX: dynamic axes "height" and "width" of ``INPUT_NAME``; its outputs' first axis is
    "detections"). Returns (path, run): ``run(image)`` loads the file with its runtime on
    first use (``load_exported``) and returns an ``Instances``.

    Raises ``RuntimeError`` (from torch.onnx's error) for ONNX of a model with a Balanced
    Feature Pyramid (see the module docstring), ``ImportError`` for ONNX without the
    ``onnx`` package."""
    from detectron2.export import TracingAdapter

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    adapter = TracingAdapter(model, [{"image": image}], _inference_fn(model))
    adapter.eval()
    os.makedirs(output_dir, exist_ok=True)
    name = type(model).__name__
    start = time.perf_counter()
    with warnings.catch_warnings():
        # detectron2's shape asserts and branches warn while traced; the traced graphs of
        # every EAPM detector are checked on images of other sizes (tests/test_export.py)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        path = (_write_onnx if fmt == "onnx" else _write_torchscript)(adapter, image, output_dir)
    _check_outputs(adapter)
    logger.info(
        f"traced {name} on a {tuple(image.shape)} image: wrote {path} "
        f"({_size_mb(path):.1f} MiB) in {time.perf_counter() - start:.1f} s"
    )
    return path, _lazy_runner(path)


def _write_torchscript(adapter, image: torch.Tensor, output_dir: str) -> str:
    path = os.path.join(output_dir, "model.ts")
    with torch.no_grad():
        ts = torch.jit.trace(adapter, (image,), check_trace=False)
    ts.save(path)
    return path


def _write_onnx(adapter, image: torch.Tensor, output_dir: str) -> str:
    import onnx

    path = os.path.join(output_dir, "model.onnx")
    dynamic = {INPUT_NAME: {1: "height", 2: "width"}}
    dynamic.update({k: {0: "detections"} for k in OUTPUT_NAMES[:-1]})
    try:
        torch.onnx.export(
            adapter,
            (image,),
            path,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
        )
    except torch.onnx.errors.SymbolicValueError as e:
        if os.path.exists(path):
            os.remove(path)
        if "adaptive pooling" in str(e) and _has_bfp(adapter.model):
            raise RuntimeError(BFP_ONNX_ERROR.format(model=type(adapter.model).__name__)) from e
        raise
    onnx.checker.check_model(path)
    return path


def _has_bfp(model) -> bool:
    from .modeling.bfp import BalancedFeaturePyramid

    return any(isinstance(m, BalancedFeaturePyramid) for m in model.modules())


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
    ``model.ts`` to ``output_dir``. The scripted model takes ``[{"image": (3, H, W)}]`` and
    returns a list (one per image) of dicts of the fields pred_boxes, scores, pred_classes.
    The dense detectors' scripted forward returns detections before detectron2's
    ``detector_postprocess`` (boxes not clipped to the image), as detectron2's own; the
    runner of ``load_exported`` applies it. Returns (path, run) as ``export_tracing``.
    Raises whatever TorchScript raises for a model it cannot script (detectron2's FCOS head;
    a RetinaNet head with BatchNorm, ``CycleBatchNormList``; a StandardROIHeads without a
    mask head, i.e. Faster R-CNN and Libra R-CNN: TorchScript compiles its mask branch,
    whose attributes it never sets)."""
    from detectron2.export import scripting_with_instances
    from detectron2.structures import Boxes

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
    start = time.perf_counter()
    ts = scripting_with_instances(cls(model), fields)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model.ts")
    ts.save(path)
    logger.info(
        f"scripted {type(model).__name__}: wrote {path} ({_size_mb(path):.1f} MiB) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return path, _lazy_runner(path)


def _lazy_runner(path: str) -> Callable:
    loaded: List[Callable] = []

    def run(image: torch.Tensor):
        if not loaded:
            loaded.append(load_exported(path))
        return loaded[0](image)

    return run


def _instances(boxes, classes, scores, size):
    from detectron2.structures import Boxes, Instances

    return Instances(
        (int(size[0]), int(size[1])), pred_boxes=Boxes(boxes), scores=scores, pred_classes=classes
    )


def load_exported(path: str) -> Callable[[torch.Tensor], "Instances"]:  # noqa: F821
    """Loads an exported model with its runtime, as a deployment does: ``.onnx`` with an
    onnxruntime ``InferenceSession`` (CPU), ``.ts`` with ``torch.jit.load`` after
    ``import torchvision`` (which registers the ``torchvision::nms`` op the graph calls).
    Returns ``run(image)``: (3, H, W) float32 image -> ``Instances`` of (H, W) with
    pred_boxes, scores, pred_classes. Raises ``ImportError`` without onnxruntime (ONNX)."""
    if path.endswith(".onnx"):
        import onnxruntime

        sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run_onnx(image: torch.Tensor):
            feed = {INPUT_NAME: np.ascontiguousarray(image.numpy(), dtype=np.float32)}
            boxes, classes, scores, size = sess.run(list(OUTPUT_NAMES), feed)
            return _instances(*(torch.from_numpy(o) for o in (boxes, classes, scores)), size)

        return run_onnx

    import torchvision  # noqa: F401  (registers torchvision::nms for the loaded graph)
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Boxes, Instances

    ts = torch.jit.load(path, map_location="cpu")
    if str(ts.forward.schema.arguments[1].type) == "Tensor":  # traced: image -> OUTPUT_NAMES

        def run_traced(image: torch.Tensor):
            with torch.no_grad():
                return _instances(*ts(image))

        return run_traced
    # scripted: [{"image": image}] -> [fields]; a dense detector's without its post-processing
    dense = not hasattr(ts.model, "roi_heads")

    def run_scripted(image: torch.Tensor):
        with torch.no_grad():
            fields = dict(ts([{"image": image}])[0])
        for k in ("pred_boxes", "proposal_boxes"):
            if isinstance(fields.get(k), torch.Tensor):
                fields[k] = Boxes(fields[k])
        out = Instances(tuple(image.shape[1:]), **fields)
        return detector_postprocess(out, *image.shape[1:]) if dense else out

    return run_scripted


def compare_detections(got, ref) -> dict:
    """Pairs each detection of ``ref`` (an ``Instances``: pred_boxes, scores, pred_classes)
    with one of ``got`` of the same class and the nearest box (greedy, in ``ref``'s order),
    so that detections of equal scores may come in either order. Returns ``dict(detections
    (len(ref)), exported_detections (len(got)), unmatched (ref's detections left without a
    partner of their class), max_box_diff (pixels, max |coordinate difference| over the
    pairs), max_score_diff)``; the diffs are 0.0 without pairs."""
    rb, gb = ref.pred_boxes.tensor.double(), got.pred_boxes.tensor.double()
    cost = (rb[:, None] - gb[None]).abs().amax(-1) if len(rb) and len(gb) else None
    taken = torch.zeros(len(got), dtype=torch.bool)
    box_diff = score_diff = 0.0
    unmatched = 0
    for i in range(len(ref)):
        ok = (got.pred_classes == ref.pred_classes[i]) & ~taken
        if not ok.any():
            unmatched += 1
            continue
        j = int(torch.where(ok, cost[i], torch.full_like(cost[i], float("inf"))).argmin())
        taken[j] = True
        box_diff = max(box_diff, float(cost[i, j]))
        score_diff = max(score_diff, abs(float(got.scores[j]) - float(ref.scores[i])))
    return dict(
        detections=len(ref),
        exported_detections=len(got),
        unmatched=unmatched,
        max_box_diff=box_diff,
        max_score_diff=score_diff,
    )


def export_model(
    config_file: str,
    output_dir: str,
    *,
    method: str = "tracing",
    fmt: str = "torchscript",
    sample_image: Optional[str] = None,
    opts: Sequence[str] = (),
) -> dict:
    """Builds the config's model (with its weights), exports it, loads the written file with
    its runtime (``load_exported``) and compares it with the eager model
    (``compare_detections``) on the sample image (``sample_input``: the traced one) and on
    noise of another size (32 px taller, 64 px wider, another seed: an image it was not
    traced on). Returns ``dict(path, checks)`` with ``checks`` a list of
    ``dict(image, size, **compare_detections(...))``. ``ValueError`` for an unknown method /
    format or scripting to ONNX; ``ImportError`` for ONNX without the ``onnx`` or
    ``onnxruntime`` package; ``RuntimeError`` as ``export_tracing``."""
    if method not in EXPORT_METHODS:
        raise ValueError(f"export method must be one of {EXPORT_METHODS}, got {method!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        if method != "tracing":
            raise ValueError("ONNX is exported by tracing only (--export-method tracing)")
        import onnx  # noqa: F401  (torch.onnx needs it to write the file)
        import onnxruntime  # noqa: F401  (runs the written file)
    logger.info(f"building the model of {config_file}")
    model, spec = load_model(config_file, opts)
    image = sample_input(spec, sample_image)
    h, w = image.shape[1:]
    other = sample_input(spec, seed=1, size=(h + 32, w + 64))
    if method == "tracing":
        logger.info(f"tracing to {fmt} on the {'sample' if sample_image else 'noise'} image")
        path, _ = export_tracing(model, image, output_dir, fmt)
    else:
        logger.info("scripting to torchscript")
        path, _ = export_scripting(model, output_dir)
    run = load_exported(path)
    checks = []
    for label, img in (("sample (traced on)", image), ("noise (not traced on)", other)):
        logger.info(f"running {path} and the eager model on the {label} image {tuple(img.shape)}")
        c = compare_detections(run(img), eager_inference(model, img))
        checks.append(dict(image=label, size=tuple(img.shape[1:]), **c))
    return dict(path=path, checks=checks)
