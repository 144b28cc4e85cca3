"""eapm/modeling/backbone.py: the ResNet of any width (``build_slim_resnet_backbone``, basic
blocks at the widths MODEL.RESNETS.STEM_OUT_CHANNELS / RES2_OUT_CHANNELS) and its FPNs: at width
64 detectron2's ResNet / ResNet-FPN (same parameters and outputs), depth 50 detectron2's
builder, what basic blocks cannot do rejected naming the key."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_cfg


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
