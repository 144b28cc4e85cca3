"""The seams for one loss: a subclass of EAPMRetinaNet, EAPMFCOS or the EAPM box predictor
that overrides one loss method changes that loss only, receives the matched targets and the
normaliser, and its result is used as the detector's loss (weights applied as for the base)."""

from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from eapm.modeling import EAPMFCOS, EAPMRetinaNet
from tests.helpers import make_batch, tiny_cfg


def _step(model, batch):
    torch.manual_seed(0)
    model.train()
    with EventStorage(0):
        return model(batch)


@pytest.mark.parametrize(
    "config, cls, cls_key, box_key",
    [
        ("quickstart/eapm_retinanet.yaml", EAPMRetinaNet, "loss_cls", "loss_box_reg"),
        ("quickstart/eapm_fcos.yaml", EAPMFCOS, "loss_fcos_cls", "loss_fcos_loc"),
    ],
)
def test_a_dense_subclass_replaces_one_loss(config, cls, cls_key, box_key):
    cfg = tiny_cfg(config, "MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT", 2.0)
    torch.manual_seed(0)
    base = build_model(cfg)
    seen = {}

    class MyBoxLoss(cls):
        def box_regression_loss(self, anchors, pred_anchor_deltas, gt_boxes, pos_mask, normalizer):
            seen.update(pos=int(pos_mask.sum()), normalizer=float(normalizer))
            return torch.cat([d.flatten() for d in pred_anchor_deltas]).sum() * 0 + 7.0

    class MyClsLoss(cls):
        def classification_loss(self, pred_logits, gt_labels, normalizer):
            seen.update(labels=gt_labels.shape, cls_normalizer=float(normalizer))
            return torch.cat([x.flatten() for x in pred_logits]).sum() * 0 + 3.0

    batch = make_batch(2, num_boxes=(3, 2))
    # copies before any step: the EMA normaliser's state is part of the model
    box_model, cls_model = _swap(base, MyBoxLoss), _swap(base, MyClsLoss)
    ref = _step(base, batch)
    out = _step(box_model, batch)
    assert out[box_key].item() == 7.0 and seen["pos"] > 0 and seen["normalizer"] > 0
    torch.testing.assert_close(out[cls_key], ref[cls_key], rtol=0, atol=0)
    out = _step(cls_model, batch)
    assert out[cls_key].item() == 2.0 * 3.0  # the classification loss weight still applies
    assert seen["labels"][0] == 2 and seen["cls_normalizer"] > 0
    torch.testing.assert_close(out[box_key], ref[box_key], rtol=0, atol=0)


def _swap(model, cls):
    """A copy of ``model`` whose class is the subclass ``cls`` (same weights and state)."""
    import copy

    twin = copy.deepcopy(model)
    twin.__class__ = cls
    return twin
