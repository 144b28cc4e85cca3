"""MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT (``cls_loss_weight`` of EAPMRetinaNet and EAPMFCOS): 1.0
is detectron2's loss bit for bit (value and gradient), a weight w multiplies the classification
loss and its gradient by w and leaves the other losses alone, bad values fail naming the key;
and the mean MF over all examples that a scale control's weight is read from."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tests.helpers import make_batch, tiny_cfg

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


def _build(cfg, state=None):
    torch.manual_seed(0)
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    return model


def _losses_and_grads(model, batch, key):
    """The loss dict and the gradient of ``loss[key]`` alone for every parameter (None where
    it does not reach)."""
    with EventStorage(0):
        losses = model(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(losses[key], params, allow_unused=True)
    return {k: v.detach() for k, v in losses.items()}, grads


def _warm(cfg, state, batch, key) -> None:
    """One throwaway step of a fresh model: fvcore's focal loss is TorchScript, whose first
    (profiling) call rounds differently from the optimised ones after it (measured: gradients
    1e-11 apart); every compared call is then an optimised one."""
    _losses_and_grads(_build(cfg, state), batch, key)


def test_weight_one_is_detectron2_retinanet_bit_for_bit():
    """Explicit 1.0 against detectron2's own RetinaNet (same weights, same batch): the losses
    and the classification loss's gradient of every parameter are bitwise equal."""
    cfg = tiny_cfg(RETINA, KEY, 1.0)
    ours = _build(cfg)
    assert ours.cls_loss_weight == 1.0
    d2 = cfg.clone()
    d2.MODEL.META_ARCHITECTURE = "RetinaNet"
    theirs = _build(d2, ours.state_dict())
    assert type(theirs).__name__ == "RetinaNet"
    batch = make_batch(2, num_boxes=(3, 2))
    _warm(cfg, ours.state_dict(), batch, "loss_cls")
    a, ga = _losses_and_grads(ours, batch, "loss_cls")
    b, gb = _losses_and_grads(theirs, batch, "loss_cls")
    assert set(a) == set(b) == {"loss_cls", "loss_box_reg"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    reached = 0
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)
            reached += 1
    assert reached > 10


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
    base = _build(_cfg(arch, eapm))
    state = base.state_dict()
    batch = make_batch(2, num_boxes=(3, 2), seed=3)
    _warm(_cfg(arch, eapm), state, batch, key)
    ref, gref = _losses_and_grads(base, batch, key)
    assert float(ref[key]) > 0
    total = torch.cat([g.flatten() for g in gref if g is not None]).norm()
    for w, exact in ((2.0, True), (0.25, True), (1.7, False)):
        model = _build(_cfg(arch, eapm, KEY, w), state)
        assert model.cls_loss_weight == w
        out, grads = _losses_and_grads(model, batch, key)
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
