"""LazyConfig twins of the yacs configs (configs/*/*.py, run by eapm/lazy.py): each
builds, from plain keyword arguments, the model the matching yacs config builds (same
parameters: the yacs weights load strictly), and with the same weights and input gives the same
losses and detections (the dense detectors, Libra R-CNN, Faster / Mask / Cascade R-CNN and
their EAPM twins); the quickstart twin trains and evaluates through train_net.py."""

from __future__ import annotations

import os
import re

import pytest
import torch

from eapm.utils.testing import tiny_lazy_cfg
from tests.helpers import (
    RCNN_MU,
    RCNN_TWINS,
    REPO,
    assert_same_parameters,
    box_predictors,
    rcnn_batch,
    tiny_cfg,
)

# (LazyConfig, its yacs twin, the yacs key of the number of classes, its lazy key)
RETINA = ("MODEL.RETINANET.NUM_CLASSES", "model.num_classes")
FCOS = ("MODEL.FCOS.NUM_CLASSES", "model.num_classes")
RCNN = ("MODEL.ROI_HEADS.NUM_CLASSES", "model.roi_heads.num_classes")
# the R-CNN pairs with their baseline twins (the quickstart R-CNN configs are yacs only)
RCNN_LAZY_TWINS = sorted(
    path[: -len(".yaml")]
    for ours, (base, _, _) in RCNN_TWINS.items()
    for path in (ours, base)
    if path.startswith("COCO-")
)
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
] + [(path, RCNN) for path in RCNN_LAZY_TWINS]


def _models(name, keys):
    """(the yacs config, its model, the LazyConfig's model), both built at seed 0."""
    from detectron2.config import instantiate
    from detectron2.modeling import build_model

    yacs_key, lazy_key = keys
    cfg = tiny_cfg(f"{name}.yaml", "MODEL.EAPM.COMPILE", False, yacs_key, 4)
    torch.manual_seed(0)
    ref = build_model(cfg)
    torch.manual_seed(0)
    lazy = instantiate(tiny_lazy_cfg(f"{name}.py", f"{lazy_key}=4").model)
    return cfg, ref, lazy


@pytest.mark.parametrize("name,keys", PAIRS, ids=[p[0].split("/")[1] for p in PAIRS])
def test_lazy_config_equals_yacs(name, keys, storage):
    """Each LazyConfig builds its yacs twin's model: the same modules and parameter shapes (the
    yacs weights load strictly), the same EAPM settings (R-CNN: the same ROI heads, the same mu
    in every box predictor, the same mask head), and with the same weights and batch the same
    losses and detections. The R-CNN pairs with their baselines give bitwise the same losses,
    and Faster / Mask R-CNN initialise identically at the same seed (Cascade R-CNN's LazyConfig
    builds its stages' heads in another order, so only its shapes are compared)."""
    cfg, ref, lazy = _models(name, keys)
    rcnn_twin = name in RCNN_LAZY_TWINS
    sa, sb = ref.state_dict(), lazy.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].shape == sb[k].shape for k in sa)
    if rcnn_twin and "cascade" not in name:
        assert_same_parameters(ref, lazy)
    lazy.load_state_dict(sa, strict=True)  # same modules, same shapes
    # the EAPM settings themselves, not only their effect on this batch
    for attr in ("eapm_cls_mu", "eapm_reg_theta", "balanced_l1", "box_reg_loss_type"):
        if hasattr(ref, attr):
            assert getattr(lazy, attr) == getattr(ref, attr), attr
    if hasattr(ref, "roi_heads"):
        assert type(lazy.roi_heads) is type(ref.roi_heads)
        mus = [[getattr(p, "eapm_cls_mu", None) for p in box_predictors(m)] for m in (ref, lazy)]
        assert mus[0] == mus[1]
        assert ref.roi_heads.mask_on == lazy.roi_heads.mask_on == ("mask" in name)
        if rcnn_twin:
            assert mus[0] == [RCNN_MU if "eapm" in name else None] * len(box_predictors(ref))
    batch = rcnn_batch(cfg)  # with masks for Mask R-CNN
    losses = []
    for model in (ref, lazy):
        model.train()
        torch.manual_seed(0)  # the R-CNN samplers draw random numbers
        losses.append({k: v.detach() for k, v in model(batch).items()})
    assert losses[0].keys() == losses[1].keys()
    for k in losses[0]:
        a, b = losses[0][k], losses[1][k]
        assert b.item() == pytest.approx(a.item(), rel=1e-5, abs=1e-7), k
        if rcnn_twin:
            assert torch.equal(a, b), k
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
