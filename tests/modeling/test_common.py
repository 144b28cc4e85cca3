"""eapm/modeling/common.py: the loss pieces the dense detectors (EAPMRetinaNet, EAPMFCOS) share,
and the contract both keep. MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT (``cls_loss_weight``,
``weighted_loss``): a weight w multiplies the classification loss and its gradient by w and
leaves the other losses alone, 1.0 is the loss itself, bad values fail naming the key; the mean MF
over all examples (``dense_focal_loss_sum``) that a scale control's weight is read from; the loss
seams (a subclass that overrides one loss method changes that loss only). The detectors' own
behaviour (detectron2's losses bit for bit with EAPM off, their EAPM losses, diagnostics, configs)
is in test_retinanet.py and test_fcos.py."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from eapm.modeling import EAPMFCOS, EAPMRetinaNet
from tests.helpers import (
    build_for_training,
    losses_and_grads,
    make_batch,
    swap_class,
    tiny_cfg,
    train_forward,
    warm_up_focal,
)

KEY = "MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT"


RETINA = "quickstart/retinanet.yaml"


EAPM_RETINA = "quickstart/eapm_retinanet.yaml"


FCOS_TINY = ("MODEL.FPN.OUT_CHANNELS", 64)  # the quickstart FCOS head's GN needs 64 channels


CLS_KEY = {"retinanet": "loss_cls", "fcos": "loss_fcos_cls"}


def _cfg(arch: str, eapm: bool, *opts):
    if arch == "retinanet":
        return tiny_cfg(EAPM_RETINA if eapm else RETINA, *opts)
    return tiny_cfg("quickstart/eapm_fcos.yaml" if eapm else "quickstart/fcos.yaml",
                    *FCOS_TINY, *opts)  # fmt: skip


# ---------------------------------------------------------- MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT


def test_weight_one_returns_the_loss_itself():
    """The default adds no operation: the very tensor (FCOS's bitwise equality with the
    unweighted loss rests on it)."""
    from eapm.modeling.common import weighted_loss

    x = torch.tensor(0.3, requires_grad=True) * 3
    assert weighted_loss(x, 1.0) is x
    assert torch.equal(weighted_loss(x, 2.0), x * 2)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
@pytest.mark.parametrize("eapm", [False, True], ids=["focal", "eapm_focal"])
def test_weight_multiplies_cls_loss_and_its_gradient(arch, eapm):
    """Weights 2 and 0.25 (powers of two: the scaling is exact in floating point) give exactly
    w x the classification loss and w x its gradient in every parameter; 1.7 to rounding (1e-5
    of each gradient tensor's norm); the other losses are the same bits."""
    key = CLS_KEY[arch]
    base = build_for_training(_cfg(arch, eapm))
    state = base.state_dict()
    batch = make_batch(2, num_boxes=(3, 2), seed=3)
    warm_up_focal(_cfg(arch, eapm), state, batch, key)
    ref, gref = losses_and_grads(base, batch, key)
    assert float(ref[key]) > 0
    total = torch.cat([g.flatten() for g in gref if g is not None]).norm()
    for w, exact in ((2.0, True), (0.25, True), (1.7, False)):
        model = build_for_training(_cfg(arch, eapm, KEY, w), state)
        assert model.cls_loss_weight == w
        out, grads = losses_and_grads(model, batch, key)
        assert set(out) == set(ref)
        for k in out:
            if k != key:
                assert torch.equal(out[k], ref[k]), (w, k)
        n = 0
        for g, g0 in zip(grads, gref):
            assert (g is None) == (g0 is None)
            if g is None:
                continue
            n += 1
            if exact:
                assert torch.equal(g, w * g0), (w, n)
            else:
                # rounding: elementwise up to cancellation, so per tensor, relative to its norm;
                # conv biases before BatchNorm have a zero gradient up to rounding (absolute
                # part, relative to the whole gradient's norm)
                err = (g - w * g0).norm()
                assert err <= 1e-5 * (w * g0).norm() + 1e-7 * w * total, (w, n)
        assert n > 10 and any(g is not None and g.abs().sum() > 0 for g in grads)
        if exact:
            assert torch.equal(out[key], w * ref[key])
        else:
            assert float(out[key]) == pytest.approx(w * float(ref[key]), rel=1e-6)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_weight_rejected_naming_the_key(arch, value):
    import eapm

    with pytest.raises(ValueError, match="^Invalid config " + KEY.replace(".", r"\.")):
        eapm.validate_config(_cfg(arch, True, KEY, value))


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_constructor_checks_the_weight(arch):
    """Built from keyword arguments (no config), the model checks the weight itself."""
    from eapm.modeling import EAPMFCOS, EAPMRetinaNet

    cls = EAPMRetinaNet if arch == "retinanet" else EAPMFCOS
    args = cls.from_config(_cfg(arch, False))
    assert args["cls_loss_weight"] == 1.0
    with pytest.raises(ValueError, match="cls_loss_weight must be a finite number > 0"):
        cls(**{**args, "cls_loss_weight": 0.0})
    assert cls(**{**args, "cls_loss_weight": 3}).cls_loss_weight == 3.0


def test_mean_mf_over_all_examples_is_logged():
    """``eapm/cls_mf``: MF averaged over every element (positives and negatives), the closed
    form 1 + tanh(mu) - tanh(mu |p - p*|) computed here; the positive and negative means
    beside it weigh into it by their counts."""
    from eapm.modeling.common import dense_focal_loss_sum

    torch.manual_seed(0)
    logits = torch.randn(300, 4) * 3
    targets = torch.zeros(300, 4)
    targets[torch.arange(20), torch.arange(20) % 4] = 1
    mu = 1.5
    with EventStorage(0) as storage:
        dense_focal_loss_sum(logits, targets, mu, 0.25, 2.0)
    latest = storage.latest()
    dif = (torch.sigmoid(logits.double()) - targets.double()).abs()
    mf = 1 + math.tanh(mu) - torch.tanh(mu * dif)
    assert latest["eapm/cls_mf"][0] == pytest.approx(float(mf.mean()), rel=1e-5)
    pos = targets > 0.5
    assert latest["eapm/cls_mf_pos"][0] == pytest.approx(float(mf[pos].mean()), rel=1e-5)
    mixed = (latest["eapm/cls_mf_pos"][0] * 20 + latest["eapm/cls_mf_neg"][0] * 1180) / 1200
    assert latest["eapm/cls_mf"][0] == pytest.approx(mixed, rel=1e-5)


# ---------------------------------------------------------------------------- the loss seams


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
    box_model, cls_model = swap_class(base, MyBoxLoss), swap_class(base, MyClsLoss)
    ref = train_forward(base, batch)
    out = train_forward(box_model, batch)
    assert out[box_key].item() == 7.0 and seen["pos"] > 0 and seen["normalizer"] > 0
    torch.testing.assert_close(out[cls_key], ref[cls_key], rtol=0, atol=0)
    out = train_forward(cls_model, batch)
    assert out[cls_key].item() == 2.0 * 3.0  # the classification loss weight still applies
    assert seen["labels"][0] == 2 and seen["cls_normalizer"] > 0
    torch.testing.assert_close(out[box_key], ref[box_key], rtol=0, atol=0)
