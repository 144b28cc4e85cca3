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


def test_slim_resnet_fpn_at_width_64_is_detectron2s_resnet_fpn():
    """build_slim_resnet_fpn_backbone (P2-P6, P6 max-pooled) at width 64 is detectron2's
    build_resnet_fpn_backbone: the same parameters and outputs; at width 32 the same levels."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

    from eapm.modeling import build_slim_resnet_fpn_backbone

    cfg = _resnet_cfg("MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"])
    ours = build_slim_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    ref = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    assert _shapes(ours) == _shapes(ref)
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert list(a) == ["p2", "p3", "p4", "p5", "p6"] == list(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    slim = build_slim_resnet_fpn_backbone(
        _resnet_cfg(
            "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
            "MODEL.RESNETS.STEM_OUT_CHANNELS", 32, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
        ),
        ShapeSpec(channels=3),
    )  # fmt: skip
    strides = {k: s.stride for k, s in slim.output_shape().items()}
    assert strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert slim.bottom_up.res2[0].conv1.weight.shape[0] == 32


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
    # measured: 0.47% of the whole gradient's norm with the head on P3-P7, 0.73% on P2-P6 (the
    # stem and res2 then get the head's gradient at stride 4: the first stages, as Libra's)
    assert (flat[True] - flat[False]).norm() <= 1e-2 * flat[False].norm()
    assert flat[False].norm() > 0


def test_recipe_0_3_config_is_the_recipe_before_0_4():
    """configs/quickstart/eapm_retinanet_0.3.yaml rebuilds the quickstart model of 0.3
    (detectron2's R-18 at width 64, contiguous memory, one loader worker) and the 0.4 / 0.5
    recipe (eapm_retinanet_0.5.yaml) is a narrower network in channels-last, loading in the main
    process; the rest (data, losses, schedule) is the same."""
    from detectron2.modeling import build_model

    old = repo_cfg("quickstart/eapm_retinanet_0.3.yaml", "MODEL.EAPM.COMPILE", False)
    new = repo_cfg("quickstart/eapm_retinanet_0.5.yaml", "MODEL.EAPM.COMPILE", False)
    assert old.MODEL.BACKBONE.NAME == "build_retinanet_resnet_fpn_backbone"
    assert not old.MODEL.CHANNELS_LAST and new.MODEL.CHANNELS_LAST
    assert new.MODEL.BACKBONE.NAME == "build_retinanet_slim_resnet_fpn_backbone"
    torch.manual_seed(0)
    n_old = sum(p.numel() for p in build_model(old).parameters())
    n_new = sum(p.numel() for p in build_model(new).parameters())
    assert n_new < n_old / 2
    for key in ("SOLVER", "DATASETS", "INPUT", "SEED"):
        assert old[key] == new[key], key
    assert (new.SOLVER.MAX_ITER, new.SOLVER.STEPS, new.SOLVER.WARMUP_ITERS) == (
        1000,
        (750, 900),
        50,
    )
    # the batches do not depend on the number of workers (exactly resumable loader)
    assert old.DATALOADER.NUM_WORKERS == 1 and new.DATALOADER.NUM_WORKERS == 0
    assert new.DATALOADER.EXACT_RESUME
    old.DATALOADER.NUM_WORKERS = new.DATALOADER.NUM_WORKERS
    assert old.DATALOADER == new.DATALOADER
    assert old.MODEL.EAPM == new.MODEL.EAPM and old.MODEL.RETINANET == new.MODEL.RETINANET
    assert old.MODEL.ANCHOR_GENERATOR == new.MODEL.ANCHOR_GENERATOR


def test_recipe_0_5_config_is_the_recipe_before_the_p2_head():
    """eapm_retinanet_0.5.yaml is the quickstart with the head (two convs per tower) on P3-P7
    (RetinaNet's FPN, P6 and P7 from res5) for 1000 iterations; the quickstart's head (one conv
    per tower) reads P2-P6 (the R-CNN FPN on the same ResNet, P6 max-pooled) for 600. Nothing
    else differs; the baseline is the same network; the LazyConfig twin follows the quickstart."""
    from detectron2.config import LazyConfig

    from eapm.utils.testing import get_config_file

    old = repo_cfg("quickstart/eapm_retinanet_0.5.yaml")
    new = repo_cfg("quickstart/eapm_retinanet.yaml")
    base = repo_cfg("quickstart/retinanet.yaml")
    assert new.MODEL.BACKBONE.NAME == base.MODEL.BACKBONE.NAME == "build_slim_resnet_fpn_backbone"
    assert new.MODEL.RETINANET.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]
    assert old.MODEL.RETINANET.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"]
    assert new.MODEL.RESNETS.OUT_FEATURES == new.MODEL.FPN.IN_FEATURES == [
        "res2", "res3", "res4", "res5"
    ]  # fmt: skip
    assert (new.SOLVER.MAX_ITER, new.SOLVER.STEPS, new.SOLVER.WARMUP_ITERS) == (600, (450, 540), 30)
    assert (new.MODEL.RETINANET.NUM_CONVS, old.MODEL.RETINANET.NUM_CONVS) == (1, 2)
    changed = {
        "MODEL.BACKBONE.NAME", "MODEL.RESNETS.OUT_FEATURES", "MODEL.FPN.IN_FEATURES",
        "MODEL.RETINANET.IN_FEATURES", "MODEL.RETINANET.NUM_CONVS", "SOLVER.MAX_ITER",
        "SOLVER.STEPS",
        "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD", "OUTPUT_DIR",
    }  # fmt: skip

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            if hasattr(v, "items"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    assert {k for k in a if a[k] != b[k]} == changed
    lazy = LazyConfig.load(get_config_file("quickstart/eapm_retinanet.py"))
    assert lazy.train.channels_last is True
    assert lazy.dataloader.train.num_workers == new.DATALOADER.NUM_WORKERS
    assert lazy.model.head_in_features == new.MODEL.RETINANET.IN_FEATURES
    assert lazy.model.backbone.in_features == new.MODEL.FPN.IN_FEATURES
    assert lazy.model.anchor_generator.strides == [4, 8, 16, 32, 64]
    assert lazy.model.head.conv_dims == [64] * new.MODEL.RETINANET.NUM_CONVS
    assert lazy.train.max_iter == new.SOLVER.MAX_ITER
    sched = lazy.lr_multiplier
    assert sched.scheduler.milestones == list(new.SOLVER.STEPS)
    assert sched.warmup_length * new.SOLVER.MAX_ITER == new.SOLVER.WARMUP_ITERS
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
    new, old = "quickstart/eapm_retinanet.yaml", "quickstart/eapm_retinanet_0.5.yaml"
    assert labels == [f"{new} / {old}"], stdout
    assert all(math.isfinite(r) and r > 0 for _, r in ratios), ratios
    assert f"training time {new} / {old}: " in stdout
    total = reports["[recipe] training time"]
    assert math.isfinite(total["ratio"]) and total["ratio"] > 0
    assert os.path.isdir(root)


def test_interleaved_trainings_rotate_and_run_every_training_to_its_end(monkeypatch):
    """tools/benchmarks/recipe.py --recipe-train: one iteration of each training in turn, the
    first of a round rotating over those with iterations left; each runs exactly its
    max_iter; the times are the clock's differences around each step."""
    from tests.helpers import TOOLS

    monkeypatch.syspath_prepend(TOOLS)  # tools/benchmarks, as tools/benchmark.py imports it
    from benchmarks.recipe import _interleaved_trainings

    log, clock = [], [0.0]

    class Fake:
        def __init__(self, name, max_iter, cost):
            self.name, self.max_iter, self.cost, self.next_iter = name, max_iter, cost, 0

        def step(self):
            log.append((self.name, self.next_iter))
            clock[0] += self.cost
            self.next_iter += 1

    times = _interleaved_trainings(
        {"a": Fake("a", 3, 0.5), "b": Fake("b", 2, 0.25)}, clock=lambda: clock[0]
    )
    assert log == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2)]
    assert times == {"a": [0.5, 0.5, 0.5], "b": [0.25, 0.25]}


@pytest.mark.slow
def test_benchmark_recipe_train_prints_time_and_ap_side_by_side(tmp_path):
    """tools/benchmark.py --only recipe --recipe-train: both recipes train to their end (2
    iterations here), are evaluated, and the report has each one's time, AP and the ratio."""
    from eapm.data import shapes
    from tests.tools.test_benchmark import run_benchmark

    root = shapes.ensure_generated(str(tmp_path / "data" / "eapm_shapes"))
    stdout, reports, _ = run_benchmark(
        tmp_path, "--only", "recipe", "--recipe-train",
        "--recipe-opts", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
        "TEST.DETECTIONS_PER_IMAGE", "5", "DATASETS.EMBEDDED_ROOT", root,
    )  # fmt: skip
    new, old = "quickstart/eapm_retinanet.yaml", "quickstart/eapm_retinanet_0.5.yaml"
    report = reports["[recipe] whole trainings"]
    assert set(report) == {new, old}
    for r in report.values():
        assert r["iters"] == 2 and r["train_s"] > 0 and r["eval_s"] > 0
        assert 1.0 < r["mean_mf"] <= 1 + math.tanh(1.5)  # both train EAPM focal mu 1.5
    assert report[old]["train_ratio"] == 1.0
    assert report[new]["train_ratio"] == pytest.approx(
        report[new]["train_s"] / report[old]["train_s"]
    )
    assert f"training time {new} / {old}: " in stdout
