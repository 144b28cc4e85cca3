"""Shared test helpers: tiny configs and synthetic batches (CPU, seconds)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_cfg(config_file: str | None = None, *opts):
    """The project's config (optionally merged from a repo config file), shrunk to a
    tiny CPU model: R-18, 64-channel res2, 32-channel FPN, 1 head conv, 64 px inputs."""
    from detectron2.config import get_cfg

    import eapm

    cfg = get_cfg()
    eapm.add_eapm_config(cfg)
    if config_file:
        cfg.merge_from_file(os.path.join(CONFIGS, config_file) if not os.path.isabs(config_file) else config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
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
    return cfg


def make_batch(num_images=2, size=64, num_boxes=(3, 0), num_classes=4, seed=0):
    """A list of detectron2 input dicts with random boxes (an entry of 0 boxes makes
    an image without objects)."""
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


def grad_norms(model, prefixes):
    """{prefix: total grad norm of the parameters whose name starts with prefix}."""
    out = {}
    for p in prefixes:
        norms = [q.grad.norm() for n, q in model.named_parameters() if n.startswith(p) and q.grad is not None]
        out[p] = float(torch.stack(norms).norm()) if norms else 0.0
    return out


@pytest.fixture
def storage():
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as s:
        yield s


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
