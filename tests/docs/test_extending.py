"""docs/extending.md runs as written: its python blocks are extracted from the page and
executed (a block that starts with ``# NAME.py`` is written as the module NAME and imported),
and its ``train_net.py --import`` command trains (slow)."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, env, tail, tiny_datasets, tiny_opts

PAGE = os.path.join(REPO, "docs", "extending.md")


def blocks(lang: str):
    with open(PAGE) as f:
        text = f.read()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_the_page_has_its_examples():
    py = blocks("python")
    assert len(py) == 3 and py[2].startswith("# my_eapm_sl1.py\n")
    assert len(blocks("bash")) == 1


@pytest.mark.parametrize("index", [0, 1])
def test_plain_pytorch_blocks_run(index):
    code = blocks("python")[index]
    exec(compile(code, f"{PAGE}:python-block-{index}", "exec"), {})


def _module(tmp_path, monkeypatch):
    code = blocks("python")[2]
    (tmp_path / "my_eapm_sl1.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module("my_eapm_sl1")


def test_the_module_block_replaces_only_the_box_loss(tmp_path, monkeypatch):
    from detectron2.utils.events import EventStorage

    from eapm.losses import eapm_loss
    from eapm.utils.testing import make_batch
    from eapm.validation import load_config

    mod = _module(tmp_path, monkeypatch)
    cfg = load_config(
        os.path.join(REPO, "configs", "quickstart", "eapm_retinanet.yaml"),
        ["MODEL.META_ARCHITECTURE", "SmoothL1EAPMRetinaNet", "MODEL.MY_SL1_THETA", "0.5",
         "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "smooth_l1", "MODEL.EAPM.REG.ENABLED", "False"],
        imports=["my_eapm_sl1"],
    )  # fmt: skip
    assert cfg.MODEL.MY_SL1_THETA == 0.5
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, mod.SmoothL1EAPMRetinaNet)
    model.train()
    seen = {}

    def spy(anchors, pred_anchor_deltas, gt_boxes, pos_mask, normalizer):
        _, _, pred, target = model.foreground_deltas(
            anchors, pred_anchor_deltas, gt_boxes, pos_mask
        )
        seen.update(pred=pred, target=target, normalizer=normalizer)
        return type(model).box_regression_loss(
            model, anchors, pred_anchor_deltas, gt_boxes, pos_mask, normalizer
        )

    model.box_regression_loss = spy
    with EventStorage(0):
        losses = model(make_batch(2, 128, (3, 2), seed=0))
    expected = eapm_loss(
        torch.nn.functional.smooth_l1_loss, "gap_over_sum", 0.5, modulated_columns=(2, 3)
    )(seen["pred"], seen["target"], beta=model.smooth_l1_beta, reduction="sum")
    assert seen["pred"].shape[0] > 0
    assert torch.allclose(losses["loss_box_reg"], expected / seen["normalizer"])
    losses["loss_box_reg"].backward()
    head = model.head.bbox_pred.weight.grad
    assert head is not None and torch.isfinite(head).all() and head.abs().sum() > 0


@pytest.mark.slow
def test_the_train_net_command_trains(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch)
    (cmd,) = blocks("bash")
    args = shlex.split(cmd.replace("\\\n", " "))
    assert args[:4] == ["python", "train_net.py", "--import", "my_eapm_sl1"]
    out = str(tmp_path / "out")
    extra = tiny_opts(out, 2, str(tmp_path / "embedded"), **{"DATASETS.TEST": "()"})
    full = [sys.executable, *args[1:4], *tiny_datasets(str(tmp_path / "data")), *args[4:], *extra]
    environ = dict(env(1), PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(full, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, tail(proc)
    assert os.path.exists(os.path.join(out, "model_final.pth"))
