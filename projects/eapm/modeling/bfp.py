"""Balanced Feature Pyramid (BFP, Libra R-CNN: Pang et al., CVPR 2019, Sec. 3.2).

A detectron2 ``Backbone`` that wraps an FPN (any backbone whose outputs are maps of one
channel count at strides growing by 2) and balances its levels:

1. gather: every level is resized to the size of the refine level -- finer levels by
   adaptive max-pooling, coarser ones by nearest interpolation;
2. integrate: the mean of the gathered maps;
3. refine: an embedded-Gaussian non-local block, a 3x3 conv, or nothing;
4. scatter: the refined map is resized back to every level (finer: nearest
   interpolation, coarser: adaptive max-pooling) and added to it as a residual.

The non-local block never materialises its HW x HW attention matrix: it calls
``torch.nn.functional.scaled_dot_product_attention`` (fused / flash kernels on CPU and
GPU) with ``scale=1.0``, because Libra's block has no 1/sqrt(C) scaling. At 800x1333
the P4 map is 50x84 = 4200 positions, so the materialised matrix is 4200^2 floats
per image, plus as much again for its softmax and their saved copies for the backward
pass (``tools/benchmark.py --only bfp`` measures the difference). The projections are
batched matmuls on the (N, HW, C) token view, so the map is not copied into token
layout and back. ``NonLocalBlock2d.forward(x, fused=False)`` keeps the direct formula
(same projections, materialised attention) for tests and the benchmark.

Registered builders (``MODEL.BACKBONE.NAME``):

* ``build_resnet_fpn_bfp_backbone``: detectron2's R-CNN FPN (P2-P6) + BFP;
* ``build_retinanet_resnet_fpn_bfp_backbone``: RetinaNet's FPN (P3-P7) + BFP.

Both read ``MODEL.BFP.{ENABLED, REFINE_LEVEL, REFINE_TYPE}`` (``add_bfp``); with
``ENABLED: False`` they return the plain FPN (an ablation switch). ``add_bfp(cfg, fpn)``
wraps any other FPN-like backbone.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import (
    build_resnet_fpn_backbone,
    build_retinanet_resnet_fpn_backbone,
)
from torch import nn

__all__ = [
    "check_refine_type",
    "NonLocalBlock2d",
    "BalancedFeaturePyramid",
    "add_bfp",
    "build_resnet_fpn_bfp_backbone",
    "build_retinanet_resnet_fpn_bfp_backbone",
]

REFINE_TYPES = ("non_local", "conv", "none")


def check_refine_type(refine_type: str) -> str:
    """``refine_type`` if it is one of ``REFINE_TYPES``, else ``ValueError``."""
    if refine_type not in REFINE_TYPES:
        raise ValueError(f"refine_type must be one of {REFINE_TYPES}, got {refine_type!r}")
    return refine_type


def _project(tokens: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """A 1x1 conv (``weight`` (C', C, 1, 1), ``bias`` (C',)) applied to (N, HW, C) tokens ->
    (N, HW, C'), contiguous, as one batched matmul: ``bmm`` reads the transposed (strided)
    token view in place, where ``conv`` + ``transpose`` + ``contiguous`` would write the map
    twice. A free function (not a method taking the conv) so that TorchScript can script it."""
    w = weight.flatten(1).t().expand(tokens.shape[0], -1, -1)  # (N, C, C')
    if bias is None:
        return torch.bmm(tokens, w)
    return torch.baddbmm(bias, tokens, w)


class NonLocalBlock2d(nn.Module):
    """Embedded-Gaussian non-local block as used by Libra's BFP (mmcv ``NonLocal2d`` with
    reduction 1, no scaling, no norm, no sub-sampling):

        y = x + conv_out( softmax(theta(x)^T phi(x)) g(x) )

    with 1x1 convs g, theta, phi, conv_out (C -> C, with bias). g/theta/phi are
    initialised N(0, 0.01) and conv_out with zeros, so the block starts as the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.g = nn.Conv2d(channels, channels, 1)
        self.theta = nn.Conv2d(channels, channels, 1)
        self.phi = nn.Conv2d(channels, channels, 1)
        self.conv_out = nn.Conv2d(channels, channels, 1)
        for m in (self.g, self.theta, self.phi):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        n, c, h, w = x.shape
        # (N, HW, C) tokens with a unit-stride channel dim: SDPA's fused CPU / GPU kernels
        # need that (with a strided last dim it falls back to its math backend, which
        # materialises the attention matrix)
        tokens = x.flatten(2).transpose(1, 2)
        q = _project(tokens, self.theta.weight, self.theta.bias)
        k = _project(tokens, self.phi.weight, self.phi.bias)
        v = _project(tokens, self.g.weight, self.g.bias)
        if fused:
            # one "head"; scale=1.0: Libra's pairwise function has no 1/sqrt(C)
            y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1.0)[:, 0]
        else:
            # the direct formula: materialises the (N, HW, HW) attention matrix (tests and
            # the memory benchmark; the projections are the same as above)
            y = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
        del q, k, v  # inference: free them before the output projection
        out = _project(y, self.conv_out.weight, self.conv_out.bias)  # (N, HW, C)
        return x + out.transpose(1, 2).view(n, c, h, w)


class _ConvRefine(nn.Module):
    """The "conv" refinement: a 3x3 conv followed by ReLU (mmcv ConvModule's default
    activation), Xavier-uniform initialised as mmdetection's BFP."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        # ``fused`` (unused) gives both refinements one signature (TorchScript calls either)
        return F.relu(self.conv(x))


class BalancedFeaturePyramid(Backbone):
    """Wraps ``fpn`` (a Backbone) and balances all its output levels.

    Args:
        fpn: the wrapped backbone; its outputs, ordered by stride, are the levels.
        refine_level: index (finest first) of the level the features are integrated at.
        refine_type: "non_local", "conv" or "none".
    """

    def __init__(self, fpn: Backbone, refine_level: int = 2, refine_type: str = "non_local"):
        super().__init__()
        shapes = fpn.output_shape()
        self.fpn = fpn
        self.in_features = sorted(shapes, key=lambda k: shapes[k].stride)
        channels = {shapes[k].channels for k in self.in_features}
        if len(channels) != 1:
            raise ValueError(f"BFP needs levels of one channel count, got {channels}")
        num_levels = len(self.in_features)
        if not (isinstance(refine_level, int) and 0 <= refine_level < num_levels):
            raise ValueError(
                f"refine_level must be an integer in [0, {num_levels}) (the levels "
                f"{self.in_features}), got {refine_level!r}"
            )
        self.refine_level = refine_level
        self.refine_type = check_refine_type(refine_type)
        c = channels.pop()
        if refine_type == "non_local":
            self.refine = NonLocalBlock2d(c)
        elif refine_type == "conv":
            self.refine = _ConvRefine(c)
        else:
            self.refine = None
        self._out_features = list(self.in_features)
        self._out_feature_channels = {k: shapes[k].channels for k in self.in_features}
        self._out_feature_strides = {k: shapes[k].stride for k in self.in_features}

    @property
    def size_divisibility(self) -> int:
        return self.fpn.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return self.fpn.padding_constraints

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return self.fpn.output_shape()

    def balance(self, feats: List[torch.Tensor], fused: bool = True) -> List[torch.Tensor]:
        """BFP on a list of maps (finest first): returns the balanced list."""
        r = self.refine_level
        size = feats[r].shape[-2:]
        gathered: List[torch.Tensor] = []
        for i, f in enumerate(feats):
            if i < r:
                gathered.append(F.adaptive_max_pool2d(f, size))
            else:
                gathered.append(F.interpolate(f, size=size, mode="nearest"))
        bsf = torch.stack(gathered).mean(dim=0)
        if self.refine is not None:
            bsf = self.refine(bsf, fused)
        out: List[torch.Tensor] = []
        for i, f in enumerate(feats):
            if i < r:
                out.append(f + F.interpolate(bsf, size=f.shape[-2:], mode="nearest"))
            else:
                out.append(f + F.adaptive_max_pool2d(bsf, f.shape[-2:]))
        return out

    def forward(self, x):
        out = self.fpn(x)
        balanced = self.balance([out[k] for k in self.in_features])
        ret: Dict[str, torch.Tensor] = {}
        for k, v in zip(self.in_features, balanced):
            ret[k] = v
        return ret


def add_bfp(cfg, fpn: Backbone) -> Backbone:
    """``fpn`` wrapped in a BFP configured by MODEL.BFP.* (REFINE_LEVEL, REFINE_TYPE), or
    ``fpn`` itself when MODEL.BFP.ENABLED is false."""
    b = cfg.MODEL.BFP
    if not b.ENABLED:
        logging.getLogger(__name__).info("MODEL.BFP.ENABLED is False: plain FPN, no BFP")
        return fpn
    return BalancedFeaturePyramid(fpn, refine_level=b.REFINE_LEVEL, refine_type=b.REFINE_TYPE)


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_bfp_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's ResNet FPN (P2-P6, as Faster R-CNN) followed by a BFP (Libra R-CNN)."""
    return add_bfp(cfg, build_resnet_fpn_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fpn_bfp_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's RetinaNet ResNet FPN (P3-P7) followed by a BFP (Libra RetinaNet)."""
    return add_bfp(cfg, build_retinanet_resnet_fpn_backbone(cfg, input_shape))
