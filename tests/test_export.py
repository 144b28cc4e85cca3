"""eapm/export.py: export of every EAPM detector (detectron2.export), each written file run by
its runtime (``torch.jit.load`` after ``import torchvision``; onnxruntime) and compared with the
eager model on the image it was traced on and on one it was not (other content, other size:
every export here takes images of any size).

Tolerances. TorchScript runs the eager model's ATen kernels in the eager order: bitwise equal
(measured 0.0 for every detector), so the TorchScript tests ask for exact equality.
onnxruntime runs the same float32 operations with its own kernels (MLAS convolutions, other
summation orders); the scale of such differences is what the eager model itself shows when
only its memory layout changes (channels-last vs contiguous, oneDNN's other kernels): measured
here up to 9.2e-4 px (boxes) and 2.6e-5 (scores), and onnxruntime vs eager up to 1.25e-3 px
and 2.5e-5 (docs/deployment.md has the table). ONNX_BOX_ATOL / ONNX_SCORE_ATOL are ~8x those:
far below anything a detection metric sees (1.6e-4 of a 64 px image), far above rounding.
Detections are paired by class and box (``compare_detections``) since the random tiny heads
give near-equal scores whose order float32 rounding may swap. (tools/export_model.py end to
end: tools/test_export_model.py.)
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import pytest
import torch

from eapm.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    compare_detections,
    eager_inference,
    export_model,
    export_scripting,
    export_tracing,
    load_exported,
)
from tests.helpers import ONNX_BOX_ATOL, ONNX_SCORE_ATOL, env, require_module, tiny_cfg

# every EAPM detector, tiny (R-18, 32-channel FPN), with a score threshold that keeps
# detections of a randomly initialised head. FCOS's head norm "" (not the config's GN): GN
# with 32 groups of the tiny 32-channel FPN has one value per group on the 1x1 P7 of a 64 px
# image, which torch refuses.
DETECTORS = {
    "eapm_retinanet": (
        "COCO-Detection/retinanet_R_50_FPN_1x_eapm_mu1.5.yaml",
        ["MODEL.RETINANET.NUM_CLASSES", 4, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.001],
    ),
    "eapm_libra_retinanet": (
        "COCO-Detection/libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0.yaml",
        ["MODEL.RETINANET.NUM_CLASSES", 4, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.001],
    ),
    "eapm_fcos": (
        "quickstart/eapm_fcos.yaml",
        ["MODEL.FCOS.HEAD_NORM", "", "MODEL.FCOS.SCORE_THRESH_TEST", 0.01],
    ),
    "eapm_libra_rcnn": (
        "COCO-Detection/libra_rcnn_R_50_FPN_1x_eapm_theta1.5.yaml",
        ["MODEL.ROI_HEADS.NUM_CLASSES", 4],
    ),
    # Faster R-CNN with LibraROIHeads (IoU-balanced sampling, EAPM balanced L1) on a plain FPN
    "eapm_libra_roi_heads_fpn": (
        "COCO-Detection/libra_rcnn_R_50_FPN_1x_eapm_theta1.5.yaml",
        ["MODEL.ROI_HEADS.NUM_CLASSES", 4, "MODEL.BFP.ENABLED", False],
    ),
}
# with a Balanced Feature Pyramid: no ONNX (docs/deployment.md; eapm.export's docstring)
NO_ONNX = ["eapm_libra_rcnn", "eapm_libra_retinanet"]
ONNX = sorted(set(DETECTORS) - set(NO_ONNX))
# what detectron2 scripts: RetinaNet (with a head without norm: a BN head's CycleBatchNormList
# indexes its ModuleList with a variable); not its FCOS head (forward(features) unannotated,
# called with a list), nor a GeneralizedRCNN without a mask head (TorchScript compiles
# StandardROIHeads' mask branch, whose attributes it never sets)
SCRIPTABLE = ["eapm_retinanet", "eapm_libra_retinanet"]
NOT_SCRIPTABLE = {
    "eapm_fcos": "Expected a value of type 'Tensor (inferred)' for argument 'features'",
    "eapm_libra_rcnn": "Module 'LibraROIHeads' has no attribute 'mask_pooler'",
    "eapm_libra_roi_heads_fpn": "Module 'LibraROIHeads' has no attribute 'mask_pooler'",
}


@functools.lru_cache(maxsize=None)
def _model(name):
    """The detector ``name`` (built once per test process; the exports do not change it)."""
    from detectron2.modeling import build_model

    config, opts = DETECTORS[name]
    torch.manual_seed(0)
    return build_model(tiny_cfg(config, "MODEL.EAPM.COMPILE", False, *opts)).eval()


def _images():
    """(the image the exports are traced on: 64x64, another one: 96x128), uniform noise."""
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.randint(0, 256, (3, h, w), generator=g).float() for h, w in [(64, 64), (96, 128)]
    )


def _check(run, model, box_atol=0.0, score_atol=0.0):
    for image in _images():
        c = compare_detections(run(image), eager_inference(model, image))
        assert c["detections"] > 0  # a comparison of empty outputs would prove nothing
        assert c["exported_detections"] == c["detections"], c
        assert c["unmatched"] == 0, c  # paired one to one, each pair of one class
        assert c["max_box_diff"] <= box_atol, c
        assert c["max_score_diff"] <= score_atol, c


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_torchscript_tracing(name, tmp_path):
    model = _model(name)
    path, _ = export_tracing(model, _images()[0], str(tmp_path))
    assert os.path.basename(path) == "model.ts"
    _check(load_exported(path), model)  # torch.jit.load of the written file: bitwise equal


@pytest.mark.parametrize("name", SCRIPTABLE)
def test_torchscript_scripting(name, tmp_path):
    model = _model(name)
    path, _ = export_scripting(model, str(tmp_path))
    _check(load_exported(path), model)


@pytest.mark.parametrize("name", sorted(NOT_SCRIPTABLE))
def test_torchscript_scripting_unsupported(name, tmp_path):
    """The TorchScript compiler's error for the detectors detectron2 does not script (tracing
    exports them, above)."""
    with pytest.raises(RuntimeError, match=re.escape(NOT_SCRIPTABLE[name])):
        export_scripting(_model(name), str(tmp_path))


@pytest.mark.parametrize("name", ONNX)
def test_onnx(name, tmp_path):
    onnx = require_module("onnx")
    ort = require_module("onnxruntime")
    model = _model(name)
    path, _ = export_tracing(model, _images()[0], str(tmp_path), fmt="onnx")
    onnx.checker.check_model(onnx.load(path))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # the interface docs/deployment.md gives: one image of any size in, four outputs
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [(INPUT_NAME, [3, "height", "width"])]
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    _check(load_exported(path), model, ONNX_BOX_ATOL, ONNX_SCORE_ATOL)


@pytest.mark.parametrize("name", NO_ONNX)
def test_onnx_bfp_not_exportable(name, tmp_path):
    """torch.onnx (2.3) cannot export the BFP's adaptive_max_pool2d, whose output size is the
    input-dependent size of another pyramid level: the documented error, no file left."""
    require_module("onnx")
    with pytest.raises(RuntimeError, match="adaptive_max_pool2d") as e:
        export_tracing(_model(name), _images()[0], str(tmp_path), fmt="onnx")
    assert isinstance(e.value.__cause__, torch.onnx.errors.SymbolicValueError)
    assert "adaptive pooling, since output_size is not constant" in str(e.value.__cause__)
    assert not (tmp_path / "model.onnx").exists()


def test_onnx_non_local_block_sdpa_scale(tmp_path):
    """The BFP's second ONNX blocker, behind the first: torch 2.3's ONNX symbolic of
    scaled_dot_product_attention fails on an explicit float ``scale`` (the non-local block's
    scale=1.0; pytorch issue 125158, fixed in torch 2.5). When this test fails, torch exports
    it: update docs/deployment.md."""
    require_module("onnx")
    from eapm.modeling.bfp import NonLocalBlock2d

    block = NonLocalBlock2d(8).eval()
    with pytest.raises(TypeError, match="scaled_dot_product_attention"):
        torch.onnx.export(
            block, (torch.rand(1, 8, 4, 4),), str(tmp_path / "nl.onnx"), opset_version=16
        )


def test_deployment_snippets(tmp_path):
    """The exported files run in a process that imports only what docs/deployment.md says
    (torch + torchvision; onnxruntime + numpy), not detectron2 or eapm; torch.jit.load
    without ``import torchvision`` fails on torchvision's nms op."""
    require_module("onnxruntime")
    model = _model("eapm_retinanet")
    trace_on, image = _images()
    ts, _ = export_tracing(model, trace_on, str(tmp_path / "ts"))
    onnx_path, _ = export_tracing(model, trace_on, str(tmp_path / "onnx"), fmt="onnx")
    torch.save(image, tmp_path / "image.pt")
    script = f"""
import sys
import torch
try:
    torch.jit.load({ts!r})
    sys.exit("loaded without torchvision")
except RuntimeError as e:
    assert "torchvision::nms" in str(e), e
import torchvision  # registers torchvision::nms
import numpy as np
import onnxruntime as ort
assert not any(m.startswith(("detectron2", "eapm")) for m in sys.modules)
image = torch.load({str(tmp_path / "image.pt")!r})
with torch.no_grad():
    ts_out = torch.jit.load({ts!r})(image)
sess = ort.InferenceSession({onnx_path!r}, providers=["CPUExecutionProvider"])
onnx_out = sess.run(None, {{"image": image.numpy()}})
torch.save([[o.numpy() for o in ts_out], onnx_out], {str(tmp_path / "out.pt")!r})
"""
    # the same thread count as this process: the reference below is bitwise only then
    threads = torch.get_num_threads()
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(threads),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ts_out, onnx_out = torch.load(tmp_path / "out.pt")
    ref = eager_inference(model, image)
    for outs, box_atol, score_atol in ((ts_out, 0, 0), (onnx_out, ONNX_BOX_ATOL, ONNX_SCORE_ATOL)):
        boxes, classes, scores, size = (torch.as_tensor(o) for o in outs)
        assert size.tolist() == list(image.shape[1:])
        from detectron2.structures import Boxes, Instances

        got = Instances(
            tuple(size.tolist()), pred_boxes=Boxes(boxes), pred_classes=classes, scores=scores
        )
        c = compare_detections(got, ref)
        assert c["unmatched"] == 0 and c["exported_detections"] == c["detections"] > 0, c
        assert c["max_box_diff"] <= box_atol and c["max_score_diff"] <= score_atol, c


def test_compare_detections_pairs_by_class_and_box():
    """Closed-form pairing: a swapped order of equal scores is no difference; a changed
    class is unmatched; the diffs are those of the pairs."""
    from detectron2.structures import Boxes, Instances

    def inst(boxes, classes, scores):
        return Instances(
            (10, 10),
            pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
            pred_classes=torch.tensor(classes),
            scores=torch.tensor(scores),
        )

    ref = inst([[0, 0, 4, 4], [5, 5, 9, 9]], [1, 1], [0.5, 0.5])
    got = inst([[5, 5, 9, 9.25], [0, 0, 4, 4]], [1, 1], [0.5, 0.5 + 2**-10])
    c = compare_detections(got, ref)
    assert c == dict(
        detections=2, exported_detections=2, unmatched=0, max_box_diff=0.25, max_score_diff=2**-10
    )
    c = compare_detections(inst([[0, 0, 4, 4], [5, 5, 9, 9]], [1, 2], [0.5, 0.5]), ref)
    assert c["unmatched"] == 1 and c["max_box_diff"] == 0.0


def test_export_model_rejects_scripting_to_onnx(tmp_path):
    with pytest.raises(ValueError, match="tracing only"):
        export_model("unused.yaml", str(tmp_path), method="scripting", fmt="onnx")
