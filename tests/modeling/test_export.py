"""Export of every EAPM detector (detectron2.export): the exported TorchScript model, run on
a CPU image, gives the eager model's boxes and scores; scripting where detectron2 scripts the
base model; ONNX where the onnx package is installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tests.helpers import REPO, tiny_cfg

from eapm.export import eager_inference, export_scripting, export_tracing

# every EAPM detector, tiny (R-18, 32-channel FPN), with a score threshold that keeps
# detections of a randomly initialised head; the head norm "" (COCO's) where BN would be
# detectron2's CycleBatchNormList, which TorchScript cannot script
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
}
# what detectron2 scripts: RetinaNet; not its FCOS head, nor a GeneralizedRCNN without a mask
# head (TorchScript compiles StandardROIHeads' mask branch, whose attributes it never sets)
SCRIPTABLE = ["eapm_retinanet", "eapm_libra_retinanet"]


def _model(name):
    from detectron2.modeling import build_model

    config, opts = DETECTORS[name]
    torch.manual_seed(0)
    return build_model(tiny_cfg(config, "MODEL.EAPM.COMPILE", False, *opts)).eval()


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 64, 64), generator=g).float() for _ in range(2)]


def _assert_same(got, ref):
    assert len(ref) > 0  # a comparison of empty outputs would prove nothing
    assert len(got) == len(ref)
    torch.testing.assert_close(got.pred_boxes.tensor, ref.pred_boxes.tensor)
    torch.testing.assert_close(got.scores, ref.scores)
    assert torch.equal(got.pred_classes, ref.pred_classes)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_tracing_matches_eager(name, tmp_path):
    model = _model(name)
    trace_on, other = _images()
    path, run = export_tracing(model, trace_on, str(tmp_path))
    assert os.path.basename(path) == "model.ts"
    for image in (trace_on, other):  # also an image it was not traced on (same size)
        _assert_same(run(image), eager_inference(model, image))
    # the saved file runs on its own
    loaded = torch.jit.load(path)
    assert len(loaded(other)) > 0


@pytest.mark.parametrize("name", SCRIPTABLE)
def test_scripting_matches_eager(name, tmp_path):
    model = _model(name)
    _, run = export_scripting(model, str(tmp_path))
    for image in _images():
        _assert_same(run(image), eager_inference(model, image))


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_onnx_export(name, tmp_path):
    pytest.importorskip("onnx")
    model = _model(name)
    path, _ = export_tracing(model, _images()[0], str(tmp_path), fmt="onnx")
    import onnx

    onnx.checker.check_model(onnx.load(path))
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(path)
    image = _images()[0]
    outs = sess.run(None, {sess.get_inputs()[0].name: image.numpy()})
    ref = eager_inference(model, image)
    assert any(o.shape[0] == len(ref) for o in outs)


def test_export_model_tool(tmp_path):
    """tools/export_model.py with detectron2's flags on a LazyConfig, overrides last."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "export_model.py"),
            "--config-file",
            os.path.join(REPO, "configs", "quickstart", "eapm_retinanet.py"),
            "--export-method",
            "tracing",
            "--format",
            "torchscript",
            "--output",
            str(out),
            "model.test_score_thresh=0.001",
            "dataloader.test.mapper.augmentations.0.short_edge_length=64",
            "dataloader.test.mapper.augmentations.0.max_size=64",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "model.ts").is_file()
    assert "max |box diff| 0" in proc.stdout
