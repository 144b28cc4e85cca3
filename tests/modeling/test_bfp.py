"""eapm/modeling/bfp.py, the Balanced Feature Pyramid: fused non-local == direct formula, identity
at init, closed-form gather/integrate/scatter, shapes/strides, gradients, config errors; the
Libra R-CNN / Libra RetinaNet configs (each with its pyramid) load, validate and build."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from eapm.modeling.bfp import BalancedFeaturePyramid, NonLocalBlock2d
from tests.helpers import CONFIGS, tiny_cfg

RCNN_OPTS = (
    "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
    "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
)  # fmt: skip
RETINA_OPTS = (
    "MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
)  # fmt: skip


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_nonlocal_fused_equals_direct(dtype, tol):
    block = NonLocalBlock2d(8).to(dtype)
    _randomise(block)  # conv_out non-zero, attention far from uniform
    x = torch.randn(2, 8, 5, 7, dtype=dtype, requires_grad=True)
    fused = block(x, fused=True)
    direct = block(x, fused=False)
    assert fused.dtype == dtype
    torch.testing.assert_close(fused, direct, rtol=tol, atol=tol)
    # the gradients agree too (the training path)
    w = torch.randn_like(fused)
    gf = torch.autograd.grad((fused * w).sum(), [x, block.theta.weight, block.g.weight])
    gd = torch.autograd.grad((direct * w).sum(), [x, block.theta.weight, block.g.weight])
    for a, b in zip(gf, gd):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol)


def _graph_names(t):
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_nonlocal_fused_uses_a_fused_kernel():
    """SDPA silently falls back to its math backend (which materialises the HW x HW
    matrix) for some layouts, e.g. a strided last dim; the block must not trigger it."""
    block = NonLocalBlock2d(16)
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    names = _graph_names(block(x, fused=True))
    assert any("FlashAttention" in n or "EfficientAttention" in n for n in names), names
    assert not any("Softmax" in n for n in names), names
    assert any("Softmax" in n for n in _graph_names(block(x, fused=False)))


def test_nonlocal_has_no_scaling():
    """Direct formula by hand: softmax over j of <theta_i, phi_j> without 1/sqrt(C)."""
    block = NonLocalBlock2d(4).double()
    _randomise(block, seed=3)
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    th, ph, g = (m(x)[0].reshape(4, -1) for m in (block.theta, block.phi, block.g))  # (C, HW)
    y = torch.zeros(4, 6, dtype=torch.float64)
    for i in range(6):
        logits = torch.tensor([float(th[:, i] @ ph[:, j]) for j in range(6)], dtype=torch.float64)
        a = torch.exp(logits - logits.max())
        a = a / a.sum()
        y[:, i] = (g * a).sum(dim=1)
    expected = x + block.conv_out(y.reshape(1, 4, 2, 3))
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_nonlocal_zero_init_is_identity():
    block = NonLocalBlock2d(16)
    assert block.conv_out.weight.abs().sum() == 0 and block.conv_out.bias.abs().sum() == 0
    x = torch.randn(2, 16, 6, 5)
    assert torch.equal(block(x), x)


class _ConstFPN(torch.nn.Module):
    """A stand-in FPN: level i is a constant map of value values[i]."""

    def __init__(self, sizes, values, channels=3):
        super().__init__()
        self.sizes, self.values, self.c = sizes, values, channels

    def output_shape(self):
        from detectron2.layers import ShapeSpec

        return {
            f"p{i + 3}": ShapeSpec(channels=self.c, stride=2 ** (i + 3))
            for i in range(len(self.sizes))
        }

    def __call__(self, x):
        return {
            f"p{i + 3}": torch.full((1, self.c, s, s), v)
            for i, (s, v) in enumerate(zip(self.sizes, self.values))
        }


@pytest.mark.parametrize("refine_level", [0, 1, 4])
def test_bfp_constant_levels_closed_form(refine_level):
    """Gather/integrate/scatter of constant maps: every level gets + mean(values)."""
    values = [1.0, 2.0, 4.0, 8.0, 16.0]
    bfp = BalancedFeaturePyramid(_ConstFPN([16, 8, 4, 2, 1], values), refine_level, "none")
    out = bfp(None)
    mean = sum(values) / len(values)
    for i, k in enumerate(["p3", "p4", "p5", "p6", "p7"]):
        torch.testing.assert_close(out[k], torch.full_like(out[k], values[i] + mean))


def test_bfp_gather_uses_max_pool_and_nearest():
    """A single hot pixel in the finest level survives max-pooling to the refine level
    and comes back by nearest interpolation to the 2x2 block it was pooled from."""
    feats = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    feats[0][0, 0, 1, 0] = 2.0  # in the top-left 2x2 block
    bfp = BalancedFeaturePyramid(_ConstFPN([4, 2], [0.0, 0.0], channels=1), 1, "none")
    out = bfp.balance(feats)
    # integrated map at 2x2: mean(maxpool(level 0), level 1) = [[1, 0], [0, 0]]
    torch.testing.assert_close(out[1][0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    expected0 = torch.zeros(4, 4)
    expected0[:2, :2] = 1.0
    expected0[1, 0] += 2.0
    torch.testing.assert_close(out[0][0, 0], expected0)


@pytest.mark.parametrize(
    "name,level,opts",
    [
        ("build_retinanet_resnet_fpn_bfp_backbone", 1, RETINA_OPTS),
        ("build_resnet_fpn_bfp_backbone", 2, RCNN_OPTS),
    ],
)
@pytest.mark.parametrize("refine", ["non_local", "conv", "none"])
def test_bfp_backbone_shapes_and_grads(name, level, opts, refine):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone
    from detectron2.modeling.backbone.fpn import (
        build_resnet_fpn_backbone,
        build_retinanet_resnet_fpn_backbone,
    )

    cfg = tiny_cfg(None, "MODEL.BACKBONE.NAME", name, "MODEL.BFP.ENABLED", True,
                   "MODEL.BFP.REFINE_LEVEL", level, "MODEL.BFP.REFINE_TYPE", refine,
                   *opts)  # fmt: skip
    torch.manual_seed(0)
    bfp = build_backbone(cfg)
    assert isinstance(bfp, BalancedFeaturePyramid)
    plain = (
        build_retinanet_resnet_fpn_backbone if "retinanet" in name else build_resnet_fpn_backbone
    )(cfg, ShapeSpec(channels=3))
    assert bfp.output_shape() == plain.output_shape()
    assert bfp.size_divisibility == plain.size_divisibility
    levels = [3, 4, 5, 6, 7] if "retinanet" in name else [2, 3, 4, 5, 6]
    assert list(bfp.output_shape()) == [f"p{i}" for i in levels]
    x = torch.randn(1, 3, 64, 96)
    out = bfp(x)
    ref = bfp.fpn(x)
    assert list(out) == list(ref)
    for k in out:
        assert out[k].shape == ref[k].shape
    if refine == "non_local":  # the BFP's only effect at init: residual of the mean
        assert not torch.allclose(out["p4"], ref["p4"])
    sum(o.square().mean() for o in out.values()).backward()
    if refine == "non_local":
        # zero-initialised conv_out: it gets a gradient, g/theta/phi do not (yet)
        assert bfp.refine.conv_out.weight.grad.abs().sum() > 0
        assert bfp.refine.theta.weight.grad.abs().sum() == 0
    elif refine == "conv":
        assert bfp.refine.conv.weight.grad.abs().sum() > 0
    assert bfp.fpn.bottom_up.stem.conv1.weight.grad.abs().sum() > 0


def test_bfp_nonlocal_params_get_grads_once_conv_out_moves():
    cfg = tiny_cfg(None, "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_bfp_backbone",
                   "MODEL.BFP.ENABLED", True, "MODEL.BFP.REFINE_LEVEL", 1,
                   *RETINA_OPTS)  # fmt: skip
    from detectron2.modeling import build_backbone

    bfp = build_backbone(cfg)
    with torch.no_grad():
        bfp.refine.conv_out.weight.normal_(std=0.1)
    sum(o.square().mean() for o in bfp(torch.randn(1, 3, 64, 64)).values()).backward()
    for n in ("g", "theta", "phi", "conv_out"):
        assert getattr(bfp.refine, n).weight.grad.abs().sum() > 0, n


def test_bfp_disabled_gives_plain_fpn_and_config_errors():
    from detectron2.modeling import build_backbone
    from detectron2.modeling.backbone import FPN

    import eapm

    name = "build_retinanet_resnet_fpn_bfp_backbone"
    cfg = tiny_cfg(None, "MODEL.BACKBONE.NAME", name, "MODEL.BFP.ENABLED", False, *RETINA_OPTS)
    assert type(build_backbone(cfg)) is FPN
    cfg = tiny_cfg(None, "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_bfp_backbone",
                   "MODEL.BFP.ENABLED", True, "MODEL.BFP.REFINE_LEVEL", 5,
                   *RETINA_OPTS)  # fmt: skip
    with pytest.raises(ValueError, match=r"refine_level must be an integer in \[0, 5\)"):
        build_backbone(cfg)
    with pytest.raises(ValueError, match=r"^Invalid config MODEL\.BFP\.REFINE_LEVEL = 5: "):
        eapm.validate_config(cfg)
    cfg = tiny_cfg(
        "quickstart/retinanet.yaml",
        "MODEL.BACKBONE.NAME",
        "build_retinanet_resnet_fpn_backbone",
        "MODEL.BFP.ENABLED",
        True,
    )
    with pytest.raises(
        ValueError,
        match=r"^Invalid config MODEL\.BFP\.ENABLED = True: no class of this model reads .*use "
        r"MODEL\.BACKBONE\.NAME 'build_resnet_fpn_bfp_backbone' or "
        r"'build_retinanet_resnet_fpn_bfp_backbone'",
    ):
        eapm.validate_config(cfg)
    cfg = tiny_cfg("quickstart/libra_rcnn.yaml", "MODEL.BFP.REFINE_TYPE", "attention")
    with pytest.raises(ValueError, match="MODEL.BFP.REFINE_TYPE"):
        eapm.validate_config(cfg)


# ---------------- the Libra R-CNN / Libra RetinaNet configs (the balanced feature pyramid's)


NEW_CONFIGS = sorted(
    [
        os.path.relpath(p, CONFIGS)
        for p in glob.glob(os.path.join(CONFIGS, "COCO-Detection", "*libra*.yaml"))
    ]
    + ["quickstart/libra_rcnn.yaml", "quickstart/eapm_libra_rcnn.yaml"]
)


EXPECTED = {  # name -> (mu, theta)
    "libra_retinanet_R_50_FPN_1x": (None, None),
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.0": (1.0, None),
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.5": (1.5, None),
    "libra_retinanet_R_50_FPN_1x_eapm_mu2.0": (2.0, None),
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0": (1.5, 1.0),
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.5": (1.5, 1.5),
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta2.0": (1.5, 2.0),
    "libra_retinanet_R_101_FPN_1x": (None, None),
    "libra_retinanet_R_101_FPN_1x_eapm_mu1.5_theta1.0": (1.5, 1.0),
    "libra_rcnn_R_50_FPN_1x": (None, None),
    "libra_rcnn_R_50_FPN_1x_eapm_theta1.0": (None, 1.0),
    "libra_rcnn_R_50_FPN_1x_eapm_theta1.5": (None, 1.5),
    "libra_rcnn_R_50_FPN_1x_eapm_theta2.0": (None, 2.0),
    "libra_rcnn": (None, None),
    "eapm_libra_rcnn": (None, 1.5),
}


def test_all_table_rows_have_a_config():
    names = {os.path.splitext(os.path.basename(p))[0] for p in NEW_CONFIGS}
    assert set(EXPECTED) <= names


@pytest.mark.parametrize("path", NEW_CONFIGS)
def test_config_loads_and_builds(path):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import eapm
    from eapm.modeling.bfp import BalancedFeaturePyramid
    from eapm.modeling.roi_heads import EAPMFastRCNNOutputLayers, LibraROIHeads

    name = os.path.splitext(os.path.basename(path))[0]
    full = get_cfg()
    eapm.add_eapm_config(full)
    full.merge_from_file(os.path.join(CONFIGS, path))
    eapm.validate_config(full)
    mu, theta = EXPECTED[name]
    assert (full.MODEL.EAPM.CLS.MU if full.MODEL.EAPM.CLS.ENABLED else None) == mu
    assert (full.MODEL.EAPM.REG.THETA if full.MODEL.EAPM.REG.ENABLED else None) == theta
    assert full.MODEL.BFP.ENABLED and full.MODEL.BFP.REFINE_TYPE == "non_local"
    rcnn = "rcnn" in name
    assert full.MODEL.BALANCED_L1.BETA == (1.0 if rcnn else 0.11)
    if path.startswith("COCO"):
        depth = 101 if "R_101" in name else 50
        assert full.MODEL.RESNETS.DEPTH == depth and full.MODEL.WEIGHTS.endswith(f"R-{depth}.pkl")
        assert full.DATASETS.TRAIN == ("coco_2017_train",) and full.DATASETS.TEST == (
            "coco_2017_val",
        )
        assert full.SOLVER.MAX_ITER == 90000 and tuple(full.SOLVER.STEPS) == (60000, 80000)
        assert full.SOLVER.IMS_PER_BATCH == 16 and full.SOLVER.BASE_LR == (0.02 if rcnn else 0.01)
        assert name in full.OUTPUT_DIR

    cfg = tiny_cfg(path)  # build only, shrunk to R-18
    model = build_model(cfg)
    assert isinstance(model.backbone, BalancedFeaturePyramid)
    # the refine level is P4 in both pyramids
    assert model.backbone.in_features[model.backbone.refine_level] == "p4"
    if rcnn:
        assert isinstance(model.roi_heads, LibraROIHeads)
        assert isinstance(model.roi_heads.box_predictor, EAPMFastRCNNOutputLayers)
        assert model.roi_heads.box_predictor.eapm_reg_theta == (theta or 0.0)
        assert model.roi_heads.box_predictor.box_reg_loss_type == "balanced_l1"
        assert model.roi_heads.iou_balanced_num_bins == 3 and model.roi_heads.instance_balanced_pos
    else:
        assert type(model).__name__ == "EAPMRetinaNet"
        assert model.eapm_cls_mu == (mu or 0.0) and model.eapm_reg_theta == (theta or 0.0)
        assert model.box_reg_loss_type == "balanced_l1" and model.balanced_l1 == (0.5, 1.5, 0.11)
