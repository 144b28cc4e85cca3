"""The pieces of the quickstart's fast CPU recipe: the ResNet of any width
(``build_slim_resnet_backbone``), the channels-last model (MODEL.CHANNELS_LAST), the 0.3
recipe kept as a config, and the benchmark section that compares the two recipes."""

from __future__ import annotations

import math
import os

import pytest
import torch

from eapm.utils.testing import repo_cfg
from tests.helpers import make_batch, tiny_cfg


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _resnet_cfg(*opts):
    return tiny_cfg(
        None,
        "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
        *opts,
    )  # fmt: skip


@pytest.mark.parametrize("depth", [18, 34])
def test_slim_resnet_at_width_64_is_detectron2s_resnet(depth):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    from eapm.modeling import build_slim_resnet_backbone

    cfg = _resnet_cfg("MODEL.RESNETS.DEPTH", depth)
    ours = build_slim_resnet_backbone(cfg, ShapeSpec(channels=3))
    ref = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert _shapes(ours) == _shapes(ref)
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    for k in ref.output_shape():
        torch.testing.assert_close(a[k], b[k])
        assert ours.output_shape()[k] == ref.output_shape()[k]


def test_slim_resnet_width_and_depth_50():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import ResNet

    from eapm.modeling import build_slim_resnet_backbone

    cfg = _resnet_cfg("MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.RES2_OUT_CHANNELS", 24)
    net = build_slim_resnet_backbone(cfg, ShapeSpec(channels=3))
    widths = {k: s.channels for k, s in net.output_shape().items()}
    assert widths == {"res2": 24, "res3": 48, "res4": 96, "res5": 192}
    assert net.stem.conv1.weight.shape[0] == 16
    out = net(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape == (1, 192, 2, 2)
    # depth 50: detectron2's builder, its width rules included
    r50_cfg = _resnet_cfg("MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256)
    r50 = build_slim_resnet_backbone(r50_cfg, ShapeSpec(channels=3))
    assert isinstance(r50, ResNet) and r50.output_shape()["res5"].channels == 2048
    assert type(r50.res2[0]).__name__ == "BottleneckBlock"


@pytest.mark.parametrize(
    "key,value",
    [
        ("MODEL.RESNETS.RES5_DILATION", 2),
        ("MODEL.RESNETS.NUM_GROUPS", 2),
        ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, False, False, True]),
        ("MODEL.RESNETS.RES2_OUT_CHANNELS", 0),
    ],
)
def test_slim_resnet_rejects_what_basic_blocks_cannot_do(key, value):
    from detectron2.layers import ShapeSpec

    from eapm.modeling import build_slim_resnet_backbone

    with pytest.raises(ValueError, match=key.rsplit(".", 1)[1] if "RES2" not in key else ">= 1"):
        build_slim_resnet_backbone(_resnet_cfg(key, value), ShapeSpec(channels=3))


@pytest.mark.parametrize(
    "config",
    [
        "quickstart/eapm_retinanet.yaml",
        "quickstart/eapm_fcos.yaml",
        "quickstart/eapm_libra_rcnn.yaml",
    ],
)
def test_channels_last_model_gives_the_same_losses_and_gradients(config, storage):
    """MODEL.CHANNELS_LAST changes the memory format of the parameters (EAPMTrainer.
    build_model), not the network: the same weights give the same losses and gradients,
    for the dense detectors and for Libra R-CNN (RoIAlign on channels-last features)."""
    from eapm.engine import EAPMTrainer

    models = {}
    for cl in (False, True):
        cfg = tiny_cfg(config, "MODEL.EAPM.COMPILE", False, "MODEL.CHANNELS_LAST", cl)
        torch.manual_seed(0)
        models[cl] = EAPMTrainer.build_model(cfg)
    convs = [m.weight for m in models[True].modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(
        m.weight.is_contiguous() for m in models[False].modules() if isinstance(m, torch.nn.Conv2d)
    )
    batch = make_batch(2, size=64, num_boxes=(3, 1), num_classes=4, seed=2)
    losses, grads = {}, {}
    for cl, model in models.items():
        model.train()
        torch.manual_seed(1)  # the R-CNN samplers draw random numbers
        out = model(batch)
        sum(out.values()).backward()
        losses[cl] = {k: v.item() for k, v in out.items()}
        grads[cl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert losses[True].keys() == losses[False].keys() and len(losses[True]) >= 2
    for k, v in losses[False].items():
        assert math.isfinite(v)
        assert losses[True][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert grads[True].keys() == grads[False].keys()
    assert len(grads[True]) == len(list(models[True].parameters()))  # every parameter
    # float32 rounding differs between the memory formats' kernels. Measured here: parameters
    # with a real gradient agree to 1e-4 (relative norm), except the first ResNet stages of
    # Libra R-CNN, up to 1.5% (the losses to 1e-4, asserted above). A layout error would be
    # of order 1; conv biases before BatchNorm have a zero gradient up to rounding (atol).
    for n, g in grads[False].items():
        assert torch.isfinite(grads[True][n]).all(), n
        err = (grads[True][n] - g).norm().item()
        assert err <= 0.03 * g.norm().item() + 1e-6, (n, err, g.norm().item())
    flat = {cl: torch.cat([g.flatten() for g in grads[cl].values()]) for cl in grads}
    assert (flat[True] - flat[False]).norm() <= 5e-3 * flat[False].norm()
    assert flat[False].norm() > 0


def test_recipe_0_3_config_is_the_recipe_before_0_4():
    """configs/quickstart/eapm_retinanet_0.3.yaml rebuilds the quickstart model of 0.3
    (detectron2's R-18 at width 64, contiguous memory, one loader worker) and the 0.4 recipe
    is a narrower network in channels-last, loading in the main process; the rest (data,
    losses, schedule) is the same. The LazyConfig twin follows the 0.4 recipe."""
    from detectron2.modeling import build_model

    old = repo_cfg("quickstart/eapm_retinanet_0.3.yaml", "MODEL.EAPM.COMPILE", False)
    new = repo_cfg("quickstart/eapm_retinanet.yaml", "MODEL.EAPM.COMPILE", False)
    assert old.MODEL.BACKBONE.NAME == "build_retinanet_resnet_fpn_backbone"
    assert not old.MODEL.CHANNELS_LAST and new.MODEL.CHANNELS_LAST
    assert new.MODEL.BACKBONE.NAME == "build_retinanet_slim_resnet_fpn_backbone"
    for cfg in (old, new):
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    torch.manual_seed(0)
    n_old = sum(p.numel() for p in build_model(old).parameters())
    n_new = sum(p.numel() for p in build_model(new).parameters())
    assert n_new < n_old / 2
    for key in ("SOLVER", "DATASETS", "INPUT", "SEED"):
        assert old[key] == new[key], key
    # the batches do not depend on the number of workers (exactly resumable loader)
    assert old.DATALOADER.NUM_WORKERS == 1 and new.DATALOADER.NUM_WORKERS == 0
    assert new.DATALOADER.EXACT_RESUME
    old.DATALOADER.NUM_WORKERS = new.DATALOADER.NUM_WORKERS
    assert old.DATALOADER == new.DATALOADER
    assert old.MODEL.EAPM == new.MODEL.EAPM and old.MODEL.RETINANET == new.MODEL.RETINANET
    assert old.MODEL.ANCHOR_GENERATOR == new.MODEL.ANCHOR_GENERATOR
    from detectron2.config import LazyConfig

    from eapm.utils.testing import get_config_file

    lazy = LazyConfig.load(get_config_file("quickstart/eapm_retinanet.py"))
    assert lazy.train.channels_last is True
    assert lazy.dataloader.train.num_workers == new.DATALOADER.NUM_WORKERS
    stages = lazy.model.backbone.bottom_up.stages
    assert (stages.stem_channels, stages.res2_channels) == (
        new.MODEL.RESNETS.STEM_OUT_CHANNELS,
        new.MODEL.RESNETS.RES2_OUT_CHANNELS,
    )


@pytest.mark.slow
def test_benchmark_recipe_section_trains_both_recipes(tmp_path):
    """tools/benchmark.py --only recipe: both quickstart recipes take training steps on the
    embedded dataset (tiny batches here) and the ratios are printed and finite."""
    from eapm.data import shapes
    from tests.tools.test_benchmark import run_benchmark

    root = shapes.ensure_generated(str(tmp_path / "data" / "eapm_shapes"))
    stdout, reports, ratios = run_benchmark(
        tmp_path, "--only", "recipe", "--recipe-iters", "2", "--warmup", "1",
        "--recipe-opts", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.EMBEDDED_ROOT", root,
    )  # fmt: skip
    labels = [label for label, _ in ratios]
    new, old = "quickstart/eapm_retinanet.yaml", "quickstart/eapm_retinanet_0.3.yaml"
    assert labels == [f"{new} / {old}"], stdout
    assert all(math.isfinite(r) and r > 0 for _, r in ratios), ratios
    assert f"training time {new} / {old}: " in stdout
    total = reports["[recipe] training time"]
    assert math.isfinite(total["ratio"]) and total["ratio"] > 0
    assert os.path.isdir(root)
