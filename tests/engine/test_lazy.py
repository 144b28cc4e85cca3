"""LazyConfig twins of the yacs configs: each builds, from plain keyword arguments, the model
the matching yacs config builds (same parameters: the yacs weights load strictly), and with the
same weights and input gives the same losses and detections; the quickstart twin trains and
evaluates through train_net.py."""

from __future__ import annotations

import os
import re

import pytest
import torch

from eapm.utils.testing import tiny_lazy_cfg
from tests.helpers import REPO, make_batch, tiny_cfg

# (LazyConfig, its yacs twin, the yacs key of the number of classes, its lazy key)
RETINA = ("MODEL.RETINANET.NUM_CLASSES", "model.num_classes")
FCOS = ("MODEL.FCOS.NUM_CLASSES", "model.num_classes")
RCNN = ("MODEL.ROI_HEADS.NUM_CLASSES", "model.roi_heads.num_classes")
PAIRS = [
    ("COCO-Detection/retinanet_R_50_FPN_1x", RETINA),
    ("COCO-Detection/retinanet_R_50_FPN_1x_eapm_mu1.5", RETINA),
    ("COCO-Detection/libra_retinanet_R_50_FPN_1x", RETINA),
    ("COCO-Detection/libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0", RETINA),
    ("COCO-Detection/fcos_R_50_FPN_1x", FCOS),
    ("COCO-Detection/fcos_R_50_FPN_1x_eapm_mu1.5", FCOS),
    ("COCO-Detection/libra_rcnn_R_50_FPN_1x", RCNN),
    ("COCO-Detection/libra_rcnn_R_50_FPN_1x_eapm_theta1.5", RCNN),
    ("quickstart/eapm_retinanet", RETINA),
]


def _models(name, keys):
    from detectron2.config import instantiate
    from detectron2.modeling import build_model

    yacs_key, lazy_key = keys
    cfg = tiny_cfg(f"{name}.yaml", "MODEL.EAPM.COMPILE", False, yacs_key, 4)
    torch.manual_seed(0)
    ref = build_model(cfg)
    lazy = instantiate(tiny_lazy_cfg(f"{name}.py", f"{lazy_key}=4").model)
    lazy.load_state_dict(ref.state_dict(), strict=True)  # same modules, same shapes
    return ref, lazy


@pytest.mark.parametrize("name,keys", PAIRS, ids=[p[0].split("/")[1] for p in PAIRS])
def test_lazy_config_equals_yacs(name, keys, storage):
    ref, lazy = _models(name, keys)
    # the EAPM settings themselves, not only their effect on this batch
    for attr in ("eapm_cls_mu", "eapm_reg_theta", "balanced_l1", "box_reg_loss_type"):
        if hasattr(ref, attr):
            assert getattr(lazy, attr) == getattr(ref, attr), attr
    batch = make_batch(2, size=64, num_boxes=(3, 1), num_classes=4, seed=1)
    losses = []
    for model in (ref, lazy):
        model.train()
        torch.manual_seed(0)  # the R-CNN samplers draw random numbers
        losses.append({k: v.item() for k, v in model(batch).items()})
    assert losses[0].keys() == losses[1].keys()
    for k in losses[0]:
        assert losses[1][k] == pytest.approx(losses[0][k], rel=1e-5, abs=1e-7), k
    outs = []
    for model in (ref, lazy):
        model.eval()
        with torch.no_grad():
            outs.append(model([{"image": b["image"]} for b in batch]))
    for a, b in zip(*outs):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b)
        torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor)
        torch.testing.assert_close(b.scores, a.scores)


@pytest.mark.slow
def test_lazy_quickstart_trains_and_evaluates(tmp_path):
    """train_net.py with the .py quickstart on a tiny COCO-json dataset: checkpoints, COCO AP,
    then --eval-only of the final checkpoint and --resume of a finished run."""
    from tests.helpers import run_train_net, tail, tiny_datasets

    out = tmp_path / "out"
    common = [
        "--config-file",
        os.path.join(REPO, "configs/quickstart/eapm_retinanet.py"),
        *tiny_datasets(str(tmp_path / "data")),
    ]
    overrides = [
        "dataloader.train.dataset.names=tiny_train",
        "dataloader.test.dataset.names=tiny_val",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "model.num_classes=2",
        "train.max_iter=6",
        "train.checkpointer.period=3",
        "lr_multiplier.warmup_length=0.3",
        "lr_multiplier.scheduler.milestones=[4,5]",
        "lr_multiplier.scheduler.num_updates=6",
        f"train.output_dir={out}",
    ]
    env_root = {"EAPM_DATASETS": str(tmp_path / "never")}  # must not be generated
    os.environ.update(env_root)
    try:
        proc = run_train_net(*common, *overrides, timeout=600, threads=2)
    finally:
        os.environ.pop("EAPM_DATASETS")
    assert proc.returncode == 0, tail(proc)
    for f in ("model_0000002.pth", "model_0000005.pth", "model_final.pth", "last_checkpoint"):
        assert (out / f).is_file(), f
    text = proc.stdout + proc.stderr
    assert re.search(r"copypaste: AP,AP50,AP75,APs,APm,APl\s*\n.*copypaste: [\d.nan,]+", text)
    assert not (tmp_path / "never").exists()

    ev = run_train_net(
        *common,
        "--eval-only",
        *overrides,
        f"train.init_checkpoint={out / 'model_final.pth'}",
        timeout=300,
        threads=2,
    )
    assert ev.returncode == 0, tail(ev)
    assert "copypaste: AP,AP50" in ev.stdout + ev.stderr
