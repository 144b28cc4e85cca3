"""tools/export_model.py end to end (slow): a tiny model's checkpoint and its yacs config in,
an ONNX file out that onnxruntime runs with the checkpoint's weights; a LazyConfig to
TorchScript. (eapm.export itself: tests/test_export.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from eapm.export import compare_detections, eager_inference, load_exported
from tests.helpers import ONNX_BOX_ATOL, ONNX_SCORE_ATOL, REPO, env, require_module, tiny_cfg


def _run_tool(*args, timeout=300):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "export_model.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(2),
    )


@pytest.mark.slow
def test_export_model_tool_onnx_from_checkpoint(tmp_path):
    """tools/export_model.py end to end: a tiny model's checkpoint and its yacs config in, an
    ONNX file out that onnxruntime runs with the checkpoint's weights (a model built without
    them would not match), progress logged, both checks printed."""
    require_module("onnxruntime")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = tiny_cfg(
        "quickstart/eapm_retinanet.yaml",
        "MODEL.EAPM.COMPILE",
        False,
        "MODEL.RETINANET.SCORE_THRESH_TEST",
        0.001,
    )
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("tiny")
    (tmp_path / "tiny.yaml").write_text(cfg.dump())
    out = tmp_path / "out"
    proc = _run_tool(
        "--config-file",
        str(tmp_path / "tiny.yaml"),
        "--format",
        "onnx",
        "--output",
        str(out),
        "MODEL.WEIGHTS",
        str(tmp_path / "tiny.pth"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for line in ("building the model of", "loading the weights", "wrote", "running"):
        assert line in log, log[-3000:]
    assert "exported vs eager, sample (traced on) 64x64" in proc.stdout
    assert "exported vs eager, noise (not traced on) 96x128" in proc.stdout
    assert " 0 unmatched" in proc.stdout
    # the written file, run here, is the checkpoint's model
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 80, 112), generator=g).float()
    c = compare_detections(
        load_exported(str(out / "model.onnx"))(image), eager_inference(model, image)
    )
    assert c["unmatched"] == 0 and c["exported_detections"] == c["detections"] > 0, c
    assert c["max_box_diff"] <= ONNX_BOX_ATOL and c["max_score_diff"] <= ONNX_SCORE_ATOL, c


@pytest.mark.slow
def test_export_model_tool_lazy_torchscript(tmp_path):
    """tools/export_model.py with detectron2's flags on a LazyConfig, overrides last."""
    out = tmp_path / "out"
    proc = _run_tool(
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
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "model.ts").is_file()
    # TorchScript: bitwise the eager model's detections, also on the image it was not traced on
    assert proc.stdout.count(" 0 unmatched, max |box diff| 0 px, max |score diff| 0\n") == 2
