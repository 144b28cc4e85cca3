"""The EAPM diagnostics the detectors put into detectron2's event storage equal the values
computed directly from the same logits / deltas and targets.

Classification (EAPMRetinaNet, EAPMFCOS): ``eapm/cls_{dif,mf}_{pos,neg}`` are the means of
Dif = |sigmoid(x) - p*| and MF = 1 + tanh(mu) - tanh(mu Dif) over the positive and the
negative elements (locations x classes, ignored anchors excluded) of the loss's input.
Regression (EAPMRetinaNet, Libra R-CNN's box head): ``eapm/reg_{gos,mf}`` are the means of
GoS = |t - t*| / (|t| + |t*|) (0 where both are 0) and MF = 1 + tanh(theta) - tanh(theta GoS)
over the dw, dh components of the foreground deltas. With HISTOGRAM_PERIOD 1 the histograms
hold exactly those values. The reference values are computed here in float64 from the
tensors recorded at the models' loss methods (the predictions and the targets of their own
matching)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from tests.helpers import make_batch, record, tiny_cfg

MU, THETA = 1.3, 0.7


def run(model, batch, monkeypatch):
    """One training forward inside an EventStorage; returns (storage, {histogram tag:
    the values put})."""
    hists = {}

    def put_histogram(self, tag, values, bins=1000):
        hists[tag] = values.detach().clone()

    monkeypatch.setattr(EventStorage, "put_histogram", put_histogram)
    model.train()
    torch.manual_seed(0)
    with EventStorage(0) as storage:
        model(batch)
    return storage, hists


def spread_box_predictions(layer: torch.nn.Module) -> None:
    """Box deltas of order 0.1-1 (at detectron2's initialisation they are ~0: GoS ~ 1)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.5)


def scalar(storage, key: str) -> float:
    return storage.history(key).latest()


def cls_reference(logits, onehot, mu):
    """{name: values} of Dif and MF of the positive and the negative elements (float64)."""
    x, t = logits.detach().double(), onehot.double()
    dif = (torch.sigmoid(x) - t).abs()
    mf = 1 + math.tanh(mu) - torch.tanh(mu * dif)
    pos = t > 0.5
    return {
        "dif_pos": dif[pos],
        "dif_neg": dif[~pos],
        "mf_pos": mf[pos],
        "mf_neg": mf[~pos],
    }


def reg_reference(pred, target, theta):
    """(GoS, MF) of the dw, dh components (float64)."""
    t, g = pred.detach().double()[:, 2:], target.double()[:, 2:]
    num, den = (t - g).abs(), t.abs() + g.abs()
    gos = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return gos, 1 + math.tanh(theta) - torch.tanh(theta * gos)


def assert_same_values(logged, expected):
    """The histogram got exactly these values (in any order), to float32 precision."""
    assert logged.numel() == expected.numel()
    torch.testing.assert_close(
        logged.double().flatten().sort().values,
        expected.flatten().sort().values,
        rtol=1e-5,
        atol=1e-6,
    )


def check_cls(storage, hists, reference):
    for name, values in reference.items():
        assert values.numel() > 0, name
        key = f"eapm/cls_{name}"
        assert math.isclose(scalar(storage, key), float(values.mean()), rel_tol=1e-5), key
        assert_same_values(hists[key], values)


def check_reg(storage, hists, gos, mf):
    assert gos.numel() > 0
    for key, values in (("eapm/reg_gos", gos), ("eapm/reg_mf", mf)):
        assert math.isclose(scalar(storage, key), float(values.mean()), rel_tol=1e-5), key
        assert_same_values(hists[key], values)
    assert 0.05 < float(gos.mean()) < 0.95  # a spread of attributes, not GoS ~ 1 everywhere


def test_retinanet_diagnostics_equal_direct_values(monkeypatch):
    cfg = tiny_cfg(
        "quickstart/eapm_retinanet.yaml",
        "MODEL.EAPM.CLS.MU", MU,
        "MODEL.EAPM.REG.THETA", THETA,
        "MODEL.EAPM.HISTOGRAM_PERIOD", 1,
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    spread_box_predictions(model.head.bbox_pred)
    seen = record(model, "losses")
    storage, hists = run(model, make_batch(2, num_boxes=(4, 2)), monkeypatch)
    anchors, pred_logits, gt_labels, pred_deltas, gt_boxes = seen["args"]

    k = model.num_classes
    labels = torch.stack(gt_labels)
    valid = labels >= 0
    assert int((~valid).sum()) > 0  # ignored anchors exist and must be left out
    logits = torch.cat(pred_logits, dim=1)[valid]
    onehot = F.one_hot(labels[valid], k + 1)[:, :-1]
    check_cls(storage, hists, cls_reference(logits, onehot, MU))

    pos = valid & (labels != k)
    transform = Box2BoxTransform(weights=cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS)
    all_anchors = Boxes.cat(anchors).tensor[None].expand(len(gt_labels), -1, -1)
    target = transform.get_deltas(all_anchors[pos], torch.stack(gt_boxes)[pos])
    pred = torch.cat(pred_deltas, dim=1)[pos]
    check_reg(storage, hists, *reg_reference(pred, target, THETA))


def test_fcos_diagnostics_equal_direct_values(monkeypatch):
    cfg = tiny_cfg(
        "quickstart/eapm_fcos.yaml",
        "MODEL.FPN.OUT_CHANNELS", 64,
        "MODEL.EAPM.CLS.MU", MU,
        "MODEL.EAPM.HISTOGRAM_PERIOD", 1,
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = record(model, "losses")
    storage, hists = run(model, make_batch(2, num_boxes=(3, 2)), monkeypatch)
    _, pred_logits, gt_labels, *_ = seen["args"]
    k = model.num_classes
    labels = torch.stack(gt_labels)
    logits = torch.cat(pred_logits, dim=1)  # every location
    onehot = F.one_hot(labels, k + 1)[..., :-1]
    check_cls(storage, hists, cls_reference(logits, onehot, MU))
    assert not any(key.startswith("eapm/reg") for key in storage.latest())  # FCOS: no EAPM box
