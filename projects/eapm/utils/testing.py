"""Tiny configs and synthetic batches for tests, smoke tests and benchmarks (CPU, seconds).

Modelled on ``detectron2.utils.testing``: nothing here needs a dataset, pretrained weights
or a GPU. The tests (``tests/conftest.py``) and the tools (``tools/benchmark.py``) import
these helpers from here; the tools never import the tests.

Config files are named as ``eapm.model_zoo.get_config_file`` takes them (this module's
``get_config_file`` is that function): relative to the repository's ``configs/`` folder, or
the copy an installed wheel carries (``eapm.model_zoo.CONFIGS_DIR``), by file name alone
when unique, or by absolute path.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

__all__ = [
    "REPO_ROOT",
    "CONFIGS_DIR",
    "get_config_file",
    "repo_cfg",
    "tiny_cfg",
    "tiny_lazy_cfg",
    "make_batch",
    "synthetic_batch",
    "grad_norms",
    "HostSyncCounter",
]

# the repository's root and configs/ in a checkout (the packaged copy of configs/ in an
# installed wheel); config names resolved by eapm.model_zoo (their one owner)
from ..model_zoo import CONFIGS_DIR, REPO_ROOT, get_config_file  # noqa: E402


def repo_cfg(config_file: Optional[str] = None, *opts):
    """detectron2's defaults plus the project's keys (``eapm.add_eapm_config``), merged
    from ``config_file`` (see ``get_config_file``) when given, then from ``opts``
    (``KEY, VALUE, ...`` as on the command line). Nothing else is changed: the model is
    full size and ``MODEL.WEIGHTS`` / ``MODEL.DEVICE`` are the config's (pass
    ``"MODEL.WEIGHTS", ""`` to build without a checkpoint). Returns a detectron2 CfgNode."""
    from detectron2.config import get_cfg

    import eapm

    cfg = get_cfg()
    eapm.add_eapm_config(cfg)
    if config_file:
        eapm.config.merge_config_file(cfg, get_config_file(config_file))
    cfg.merge_from_list(list(opts))
    return cfg


def tiny_cfg(config_file: Optional[str] = None, *opts):
    """The project's config (optionally merged from a repo config file, see
    ``get_config_file``), shrunk to a tiny CPU model: R-18, 64-channel stem and res2, 32-channel
    FPN, 1 head conv, 64 px test inputs, no pretrained weights; ``opts`` (``KEY, VALUE,
    ...``) are merged last, over the shrinking. Returns a detectron2 CfgNode."""
    cfg = repo_cfg(config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.FCOS.NUM_CONVS = 1
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.FCOS.HEAD_NORM == "GN" and cfg.MODEL.FPN.OUT_CHANNELS < 64:
        cfg.MODEL.FCOS.HEAD_NORM = ""  # GN's 32 groups need 2 channels each: EAPMFCOS refuses
    return cfg


def tiny_lazy_cfg(config_file: str, *overrides: str):
    """The LazyConfig ``config_file`` (see ``get_config_file``) with its ``model`` shrunk as
    ``tiny_cfg`` shrinks a yacs config: R-18 at width 64 (BatchNorm, nothing frozen, no stride
    in the 1x1 conv), 32-channel FPN, 1 head conv (dense heads), 64 RoIs and 64 anchors per image,
    200 proposals in training and 64-wide box heads (R-CNN, every cascade stage; the mask
    head reads the 32-channel FPN); loss kernels not compiled.
    The ``key=value`` ``overrides`` are applied last. For RetinaNet-, FCOS- and
    GeneralizedRCNN-shaped models, with or without a ``BalancedFeaturePyramid`` around the
    FPN; returns the (not instantiated) config."""
    from detectron2.config import LazyConfig
    from detectron2.layers import ShapeSpec

    cfg = LazyConfig.load(get_config_file(config_file))
    model = cfg.model
    fpn = model.backbone.fpn if "fpn" in model.backbone else model.backbone
    bottom_up = fpn.bottom_up
    bottom_up.stem.norm = "BN"
    bottom_up.stages.depth = 18
    bottom_up.stages.norm = "BN"
    bottom_up.stages.pop("stride_in_1x1", None)
    bottom_up.stem.out_channels = 64
    for key in ("stem_channels", "res2_channels"):  # eapm.modeling.backbone.make_basic_stages
        if key in bottom_up.stages:
            bottom_up.stages[key] = 64
    bottom_up.freeze_at = 0
    fpn.out_channels = 32
    top = fpn.top_block
    if "in_channels" in top:  # LastLevelP6P7: from res5 (RetinaNet) or from p5 (FCOS)
        top.in_channels = 32 if top.get("in_feature", "res5") == "p5" else 512
    if "head" in model:  # dense detectors
        model.head.input_shape = [ShapeSpec(channels=32)] * len(model.head.input_shape)
        model.head.conv_dims = [32]
        if model.head.get("norm", None) == "GN":  # as tiny_cfg: no GN on 32 channels
            model.head.norm = ""
    if "compile_kernels" in model:
        model.compile_kernels = False
    if "roi_heads" in model:  # R-CNN
        rpn = model.proposal_generator
        rpn.head.in_channels = 32
        rpn.batch_size_per_image = 64
        rpn.post_nms_topk = (200, rpn.post_nms_topk[1])
        heads = model.roi_heads
        heads.batch_size_per_image = 64
        cascade = "box_heads" in heads  # CascadeROIHeads: one box head and predictor per stage
        for box_head in heads.box_heads if cascade else [heads.box_head]:
            box_head.input_shape = ShapeSpec(channels=32, height=7, width=7)
            box_head.fc_dims = [64, 64]
        for predictor in heads.box_predictors if cascade else [heads.box_predictor]:
            predictor.input_shape = ShapeSpec(channels=64)
            if "compile_kernels" in predictor:
                predictor.compile_kernels = False
        if "mask_head" in heads:  # Mask R-CNN: the mask head reads the 32-channel FPN
            heads.mask_head.input_shape = ShapeSpec(channels=32, width=14, height=14)
    return LazyConfig.apply_overrides(cfg, list(overrides))


def make_batch(
    num_images: int = 2,
    size: int = 64,
    num_boxes: Sequence[int] = (3, 0),
    num_classes: int = 4,
    seed: int = 0,
) -> List[dict]:
    """A list of ``num_images`` detectron2 training input dicts, deterministic in ``seed``:
    ``"image"`` a (3, size, size) uint8 tensor, ``"instances"`` an ``Instances`` with
    ``gt_boxes`` (XYXY, inside the image) and ``gt_classes`` (in [0, num_classes)),
    ``"height"`` and ``"width"`` = size. Image i has ``num_boxes[i % len(num_boxes)]``
    boxes (0 makes an image without objects)."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(num_images):
        n = num_boxes[i % len(num_boxes)]
        img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = 4 + torch.rand(n, 2, generator=g) * size * 0.4
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        batch.append({"image": img, "instances": inst, "height": size, "width": size})
    return batch


def synthetic_batch(
    num_images: int,
    height: int = 800,
    width: int = 1333,
    num_boxes: int = 8,
    num_classes: int = 80,
    seed: int = 0,
) -> List[dict]:
    """A COCO-like training batch at full resolution: ``num_images`` dicts, each with
    ``"image"`` a (3, height, width) uint8 tensor of noise and ``"instances"`` an
    ``Instances`` of ``num_boxes`` random XYXY boxes (at least 16 px a side, up to 30%
    of the image; a box may reach up to 16 px past the right / bottom border) with
    ``gt_classes`` in [0, num_classes). Deterministic in ``seed``."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_images):
        xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = 16 + torch.rand(num_boxes, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3])
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
        img = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        out.append({"image": img, "instances": inst})
    return out


def grad_norms(model: torch.nn.Module, prefixes: Sequence[str]) -> Dict[str, float]:
    """{prefix: L2 norm of the gradients of the parameters whose name starts with prefix}
    (0.0 where none of them has a gradient)."""
    out = {}
    for p in prefixes:
        norms = [
            q.grad.norm()
            for n, q in model.named_parameters()
            if n.startswith(p) and q.grad is not None
        ]
        out[p] = float(torch.stack(norms).norm()) if norms else 0.0
    return out


class HostSyncCounter:
    """Context manager counting the operations that make the host wait for the device
    (a "host synchronisation" on a GPU), as seen by a ``TorchDispatchMode``: reading a
    scalar (``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``bool(t)``,
    ``.tolist()`` of a device tensor), ops whose output size depends on the data
    (``nonzero``, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave``
    without ``output_size``, indexing with a boolean mask) and copies to the CPU from
    another device. Counted on any device (on a CPU these calls do not wait, but the same
    code on a GPU would). ``count`` is the total, ``ops`` the names in call order.

        with HostSyncCounter() as c:
            loss = GHMC()(x, t)
        assert c.count == 0
    """

    _SYNC_OPS = (
        "_local_scalar_dense",
        "nonzero",
        "nonzero_static",
        "masked_select",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "bincount",
        "histc",
    )

    def __init__(self):
        self.ops: List[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def __enter__(self) -> "HostSyncCounter":
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                if counter._is_sync(name, args, kwargs):
                    counter.ops.append(name)
                return func(*args, **kwargs)

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def _is_sync(self, name: str, args, kwargs) -> bool:
        if name in self._SYNC_OPS:
            return True
        if name == "repeat_interleave":
            return kwargs.get("output_size") is None
        if name in ("index", "index_put", "index_put_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in indices
            )
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst_dev = kwargs.get("device") if name == "_to_copy" else args[0].device
            return (
                isinstance(src, torch.Tensor)
                and src.device.type != "cpu"
                and dst_dev is not None
                and torch.device(dst_dev).type == "cpu"
            )
        return False
