"""EAPM in the two-stage detectors: EAPM cross entropy in the ROI box predictor of
Faster / Mask / Cascade R-CNN (``EAPMROIHeads``, ``EAPMCascadeROIHeads``, ``LibraROIHeads``),
EAPM binary cross entropy on the RPN objectness (``EAPMRPN``), their configs, diagnostics and
validation, and the two-stage variants of tools/ablation.py.

Reference values: the losses equal ``eapm.losses`` evaluated on the tensors recorded at the
models' own loss methods (the head's logits and its own sampled labels); the diagnostics equal
float64 values computed from those tensors; with EAPM off (or mu 0) every loss and gradient is
detectron2's bitwise."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import cat
from detectron2.modeling import ROI_HEADS_REGISTRY, build_model
from detectron2.structures import BitMasks
from detectron2.utils.events import EventStorage

import eapm
from eapm.losses import eapm_binary_cross_entropy_with_logits, eapm_cross_entropy
from tests.helpers import CONFIGS, eapm_iou_reference, grad_norms, make_batch, tiny_cfg

MU = 1.5

# EAPM config -> (its baseline twin, EAPM ROI heads class name, detectron2's class name)
TWINS = {
    "COCO-Detection/faster_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml": (
        "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
        "EAPMROIHeads",
        "StandardROIHeads",
    ),
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml": (
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
        "EAPMROIHeads",
        "StandardROIHeads",
    ),
    "COCO-Detection/cascade_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml": (
        "COCO-Detection/cascade_rcnn_R_50_FPN_1x.yaml",
        "EAPMCascadeROIHeads",
        "CascadeROIHeads",
    ),
    "quickstart/faster_rcnn_eapm_mu1.5.yaml": (
        "quickstart/faster_rcnn.yaml",
        "EAPMROIHeads",
        "StandardROIHeads",
    ),
    "quickstart/cascade_rcnn_eapm_mu1.5.yaml": (
        "quickstart/cascade_rcnn.yaml",
        "EAPMCascadeROIHeads",
        "CascadeROIHeads",
    ),
}
RPN_OPTS = ("MODEL.PROPOSAL_GENERATOR.NAME", "EAPMRPN", "MODEL.EAPM.RPN.ENABLED", True)


# ---------------------------------------------------------------------------- helpers
def with_masks(batch):
    """Adds ``gt_masks`` (BitMasks: each box filled) to every image of a make_batch batch."""
    for d in batch:
        inst = d["instances"]
        h, w = inst.image_size
        masks = torch.zeros(len(inst), h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(inst.gt_boxes.tensor.round().long().tolist()):
            masks[i, y0 : y1 + 1, x0 : x1 + 1] = True
        inst.gt_masks = BitMasks(masks)
    return batch


def batch_for(cfg, num_boxes=(3, 1), seed=1):
    batch = make_batch(2, size=64, num_boxes=num_boxes, num_classes=4, seed=seed)
    return with_masks(batch) if cfg.MODEL.MASK_ON else batch


def cfg_of(path, *opts):
    return tiny_cfg(path, "MODEL.ROI_HEADS.NUM_CLASSES", 4, *opts)


def predictors(model):
    p = model.roi_heads.box_predictor
    return list(p) if isinstance(p, torch.nn.ModuleList) else [p]


def record_cls(model) -> list:
    """Wraps every box predictor's ``losses``: the returned list gets, per call, the (scores,
    labels) the predictor's classification loss sees."""
    seen = []
    for p in predictors(model):
        original = p.losses

        def losses(predictions, proposals, _original=original):
            labels = cat([q.gt_classes for q in proposals], dim=0)
            seen.append((predictions[0].detach().clone(), labels.clone()))
            return _original(predictions, proposals)

        p.losses = losses
    return seen


def record_rpn(model) -> dict:
    seen = {}
    rpn = model.proposal_generator
    original = rpn.losses

    def losses(anchors, logits, gt_labels, deltas, gt_boxes):
        seen["logits"] = [x.detach().clone() for x in logits]
        seen["labels"] = [x.clone() for x in gt_labels]
        return original(anchors, logits, gt_labels, deltas, gt_boxes)

    rpn.losses = losses
    return seen


def train_step(model, batch, hists=None, monkeypatch=None, backward=True):
    """One training forward (+ backward) at seed 0 inside an EventStorage; returns
    (losses, storage). With ``monkeypatch``: the histograms put go to ``hists``."""
    if monkeypatch is not None:

        def put_histogram(self, tag, values, bins=1000):
            hists[tag] = values.detach().clone()

        monkeypatch.setattr(EventStorage, "put_histogram", put_histogram)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with EventStorage(0) as storage:
        losses = model(batch)
    if backward:
        sum(losses.values()).backward()
    return losses, storage


def build_pair(eapm_path, base_path, *opts):
    """(detectron2's model, the EAPM model), both built at seed 0 from tiny configs."""
    torch.manual_seed(0)
    base = build_model(cfg_of(base_path))
    torch.manual_seed(0)
    ours = build_model(cfg_of(eapm_path, *opts))
    return base, ours


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", sorted(TWINS))
def test_configs_name_their_baseline_twin_and_load(path):
    base_path, ours, theirs = TWINS[path]
    assert (
        os.path.basename(path) == os.path.basename(base_path)[: -len(".yaml")] + "_eapm_mu1.5.yaml"
    )
    for p, heads, enabled in ((path, ours, True), (base_path, theirs, False)):
        cfg = eapm.load_config(os.path.join(CONFIGS, p))  # validated, full size
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        assert cfg.MODEL.ROI_HEADS.NAME == heads
        assert cfg.MODEL.EAPM.CLS.ENABLED is enabled and cfg.MODEL.EAPM.CLS.MU == MU
        assert not cfg.MODEL.EAPM.RPN.ENABLED and not cfg.MODEL.EAPM.REG.ENABLED
        assert cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN"
        assert cfg.MODEL.MASK_ON == ("mask_rcnn" in p)
        assert os.path.basename(p)[: -len(".yaml")] in cfg.OUTPUT_DIR
        if p.startswith("COCO"):
            assert cfg.MODEL.WEIGHTS.endswith("R-50.pkl") and cfg.MODEL.RESNETS.DEPTH == 50
            assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.SOLVER.MAX_ITER == 90000
        else:
            assert cfg.DATASETS.TRAIN == ("eapm_shapes_train",) and cfg.MODEL.RESNETS.DEPTH == 18
        if "cascade" in p:
            assert cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG


CASES = [(p, ()) for p in sorted(TWINS)] + [("quickstart/faster_rcnn_eapm_mu1.5.yaml", RPN_OPTS)]


@pytest.mark.parametrize(
    "path,opts", CASES, ids=[os.path.basename(p)[:-5] + ("+rpn" if o else "") for p, o in CASES]
)
def test_config_trains_a_step_and_only_loss_cls_changes(path, opts):
    """Built at the same seed, the EAPM config and its baseline twin hold the same
    parameters; on the same batch every loss but loss_cls (loss_rpn_cls with EAPM-RPN) is
    bitwise the same, and loss_cls is eapm_cross_entropy on the head's own sampled labels
    (detectron2's: F.cross_entropy) with the configured mu."""
    from eapm.modeling import EAPMCascadeROIHeads, EAPMFastRCNNOutputLayers, EAPMROIHeads

    base_path, heads, _ = TWINS[path]
    cfg = cfg_of(path, *opts)
    base, ours = build_pair(path, base_path, *opts)
    assert_same_parameters(base, ours)
    cls = EAPMROIHeads if heads == "EAPMROIHeads" else EAPMCascadeROIHeads
    assert type(ours.roi_heads) is cls
    assert all(type(p) is EAPMFastRCNNOutputLayers for p in predictors(ours))
    assert all(p.eapm_cls_mu == MU for p in predictors(ours))
    batch = batch_for(cfg)
    seen_base, seen_ours = record_cls(base), record_cls(ours)
    rpn_base = record_rpn(base) if opts else None
    rpn_ours = record_rpn(ours) if opts else None
    lb, _ = train_step(base, batch)
    lo, storage = train_step(ours, batch)
    assert lb.keys() == lo.keys()
    assert all(torch.isfinite(v) for v in lo.values()), lo
    changed = {k for k in lo if k.startswith("loss_cls") or (opts and k == "loss_rpn_cls")}
    for k in lo:
        if k not in changed:
            assert torch.equal(lo[k], lb[k]), k
    stages = sorted(k for k in lo if k.startswith("loss_cls"))
    assert len(stages) == len(seen_ours) == len(seen_base) == (3 if "cascade" in path else 1)
    for k, (sb, yb), (so, yo) in zip(stages, seen_base, seen_ours):
        assert torch.equal(yb, yo) and torch.equal(sb, so)  # same ROIs, labels and logits
        assert (yo < 4).any() and (yo == 4).any()  # foreground and background ROIs
        assert torch.equal(lb[k], F.cross_entropy(sb, yb))
        assert torch.equal(lo[k], eapm_cross_entropy(so, yo, MU))
        assert abs(lo[k].item() - lb[k].item()) > 1e-3, k
    if opts:
        valid = torch.stack(rpn_ours["labels"]) >= 0
        logits = cat(rpn_ours["logits"], dim=1)[valid]
        targets = torch.stack(rpn_ours["labels"])[valid].float()
        expected = eapm_binary_cross_entropy_with_logits(logits, targets, MU) / (64 * 2)
        torch.testing.assert_close(lo["loss_rpn_cls"], expected, rtol=1e-6, atol=0)
        base_expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 128
        assert torch.equal(lb["loss_rpn_cls"], base_expected)
        assert torch.equal(cat(rpn_base["logits"], dim=1), cat(rpn_ours["logits"], dim=1))
        assert abs(lo["loss_rpn_cls"].item() - lb["loss_rpn_cls"].item()) > 1e-3
    # gradients reach the ROI heads (every stage), the RPN and the backbone
    parts = ["backbone.bottom_up", "proposal_generator.rpn_head", "roi_heads.box_head"]
    parts += [n for n, _ in ours.named_modules() if n.endswith("cls_score")]
    if cfg.MODEL.MASK_ON:
        parts.append("roi_heads.mask_head")
    norms = grad_norms(ours, parts)
    assert all(v > 0 and math.isfinite(v) for v in norms.values()), norms
    latest = storage.latest()
    scope = "stage2/" if "cascade" in path else ""
    assert latest[f"{scope}eapm/roi_cls_mf_fg"][0] > 1.0
    assert ("eapm/rpn_mf_pos" in latest) == bool(opts)


# ------------------------------------------------------------------ mu 0 == detectron2
OFF = [
    ("faster", "quickstart/faster_rcnn_eapm_mu1.5.yaml", ("MODEL.EAPM.CLS.ENABLED", False)),
    ("faster_mu0", "quickstart/faster_rcnn_eapm_mu1.5.yaml", ("MODEL.EAPM.CLS.MU", 0.0)),
    (
        "mask_mu0",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml",
        ("MODEL.EAPM.CLS.MU", 0.0),
    ),
    (
        "cascade",
        "COCO-Detection/cascade_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml",
        ("MODEL.EAPM.CLS.ENABLED", False),
    ),
    ("cascade_mu0", "quickstart/cascade_rcnn_eapm_mu1.5.yaml", ("MODEL.EAPM.CLS.MU", 0.0)),
    (
        "rpn_mu0",
        "quickstart/faster_rcnn_eapm_mu1.5.yaml",
        RPN_OPTS + ("MODEL.EAPM.RPN.MU", 0.0, "MODEL.EAPM.CLS.MU", 0.0),
    ),
    (
        "rpn_off",
        "quickstart/faster_rcnn_eapm_mu1.5.yaml",
        RPN_OPTS[:2] + ("MODEL.EAPM.CLS.ENABLED", False),
    ),
]


@pytest.mark.parametrize("name,path,opts", OFF, ids=[o[0] for o in OFF])
def test_eapm_off_is_detectron2_bitwise(name, path, opts):
    """mu 0 or ENABLED False: every loss and every parameter's gradient is detectron2's
    bitwise (same seed, same batch), and no EAPM diagnostic is logged."""
    base, ours = build_pair(path, TWINS[path][0], *opts)
    assert_same_parameters(base, ours)
    assert all(p.eapm_cls_mu == 0.0 for p in predictors(ours))
    if "rpn" in name:
        assert type(ours.proposal_generator).__name__ == "EAPMRPN"
        assert ours.proposal_generator.eapm_rpn_mu == 0.0
    batch = batch_for(cfg_of(path), num_boxes=(4, 2))
    lb, _ = train_step(base, batch)
    lo, storage = train_step(ours, batch)
    assert lb.keys() == lo.keys()
    for k in lb:
        assert torch.equal(lo[k], lb[k]), k
    grads_b = dict(base.named_parameters())
    for n, p in ours.named_parameters():
        gb = grads_b[n].grad
        assert (p.grad is None) == (gb is None), n
        if gb is not None:
            assert torch.equal(p.grad, gb), n
    assert not any(k.startswith("eapm/") or "/eapm/" in k for k in storage.latest())


# -------------------------------------------- the upstream definitions the overrides mirror
# detectron2's FastRCNNOutputLayers.losses / RPN.losses compute loss_cls / loss_rpn_cls
# inline; EAPMFastRCNNOutputLayers.cls_loss and EAPMRPN.objectness_loss replace them with the
# same definition (mean over the sampled ROIs; sum over the sampled anchors divided by
# batch_size_per_image x images). Checked bitwise at mu 0 below, and pinned to the source.
UPSTREAM = {
    "FastRCNNOutputLayers.losses": "20720939a4c16eac46dad07f57046c282e47955e",
    "RPN.losses": "14d863a2f2543e9939697d12b8b503cc5afbd1a6",
}


def test_mirrored_upstream_losses_are_pinned():
    from detectron2.modeling.proposal_generator import RPN
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    from eapm.upstream import source_sha1

    now = {
        "FastRCNNOutputLayers.losses": source_sha1(FastRCNNOutputLayers.losses),
        "RPN.losses": source_sha1(RPN.losses),
    }
    assert now == UPSTREAM, (
        "detectron2 changed a loss that EAPMFastRCNNOutputLayers.cls_loss / "
        "EAPMRPN.objectness_loss mirror: check their definitions, then update UPSTREAM"
    )


def test_cls_loss_and_objectness_loss_at_mu0_are_detectron2s(storage):
    from detectron2.layers import cross_entropy as d2_cross_entropy
    from detectron2.modeling.proposal_generator import RPN
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    path = "quickstart/faster_rcnn_eapm_mu1.5.yaml"
    model = build_model(cfg_of(path, *RPN_OPTS, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", 2.0))
    predictor, rpn = model.roi_heads.box_predictor, model.proposal_generator
    args = {}
    for obj, key in ((predictor, "roi"), (rpn, "rpn")):
        original = obj.losses

        def wrapper(*a, _original=original, _key=key):
            args[_key] = a
            return _original(*a)

        obj.losses = wrapper
    model.train()
    torch.manual_seed(0)
    model(make_batch(2, size=64, num_boxes=(3, 1), num_classes=4, seed=1))
    predictions, proposals = args["roi"]
    upstream = FastRCNNOutputLayers.losses(predictor, predictions, proposals)
    labels = cat([p.gt_classes for p in proposals], dim=0)
    ours = EAPMLossesAt(predictor, 0.0)
    assert torch.equal(ours.cls_loss(predictions[0], labels), upstream["loss_cls"])
    # the loss weight applies to the replaced loss as to detectron2's
    predictor.loss_weight = {"loss_cls": 3.0, "loss_box_reg": 1.0}
    with_weight = predictor.losses(predictions, proposals)
    predictor.loss_weight = {"loss_cls": 1.0, "loss_box_reg": 1.0}
    assert torch.equal(
        with_weight["loss_cls"], 3.0 * predictor.losses(predictions, proposals)["loss_cls"]
    )
    # no ROI at all: detectron2's cross_entropy gives 0 with a gradient path, so does ours
    empty = predictions[0][:0]
    zero = ours.cls_loss(empty, labels[:0])
    assert torch.equal(zero, d2_cross_entropy(empty, labels[:0])) and zero.requires_grad
    anchors, logits, gt_labels, deltas, gt_boxes = args["rpn"]
    upstream = RPN.losses(rpn, anchors, logits, gt_labels, deltas, gt_boxes)
    assert torch.equal(
        EAPMLossesAt(rpn, 0.0).objectness_loss(logits, gt_labels), upstream["loss_rpn_cls"]
    )


class EAPMLossesAt:
    """The module's mirrored loss with its mu set to ``mu`` for the call."""

    def __init__(self, module, mu):
        self.module, self.mu = module, mu

    def _call(self, name, *args):
        attr = "eapm_cls_mu" if hasattr(self.module, "eapm_cls_mu") else "eapm_rpn_mu"
        old = getattr(self.module, attr)
        setattr(self.module, attr, self.mu)
        try:
            return getattr(self.module, name)(*args)
        finally:
            setattr(self.module, attr, old)

    def cls_loss(self, *args):
        return self._call("cls_loss", *args)

    def objectness_loss(self, *args):
        return self._call("objectness_loss", *args)


# ---------------------------------------------------------------------------- diagnostics
def test_roi_and_rpn_diagnostics_equal_float64_values(monkeypatch):
    """eapm/roi_cls_{dif,mf}_{fg,bg}: the means of Dif = 1 - softmax(x)_y and MF over the
    foreground / background sampled ROIs; eapm/rpn_{dif,mf}_{pos,neg}: Dif = |sigmoid(x) - t|
    and MF over the positive / negative sampled anchors; histograms (period 1) hold exactly
    those values."""
    path = "quickstart/faster_rcnn_eapm_mu1.5.yaml"
    model = build_model(cfg_of(path, *RPN_OPTS, "MODEL.EAPM.HISTOGRAM_PERIOD", 1))
    seen, rpn_seen, hists = record_cls(model), record_rpn(model), {}
    _, storage = train_step(model, batch_for(cfg_of(path)), hists, monkeypatch, backward=False)
    ((scores, labels),) = seen
    p = torch.softmax(scores.double(), dim=1)
    dif = 1 - p.gather(1, labels[:, None]).squeeze(1)
    mf = 1 + math.tanh(MU) - torch.tanh(MU * dif)
    fg = labels < 4
    t = torch.stack(rpn_seen["labels"])
    valid = t >= 0
    x = cat(rpn_seen["logits"], dim=1)[valid].double()
    t = t[valid].double()
    rdif = (torch.sigmoid(x) - t).abs()
    rmf = 1 + math.tanh(MU) - torch.tanh(MU * rdif)
    pos = t > 0.5
    expected = {
        "eapm/roi_cls_dif_fg": dif[fg],
        "eapm/roi_cls_dif_bg": dif[~fg],
        "eapm/roi_cls_mf_fg": mf[fg],
        "eapm/roi_cls_mf_bg": mf[~fg],
        "eapm/rpn_dif_pos": rdif[pos],
        "eapm/rpn_dif_neg": rdif[~pos],
        "eapm/rpn_mf_pos": rmf[pos],
        "eapm/rpn_mf_neg": rmf[~pos],
    }
    for name, values in expected.items():
        assert values.numel() > 0, name
        assert storage.history(name).latest() == pytest.approx(values.mean().item(), rel=2e-6)
        got = hists[name].double().sort().values
        torch.testing.assert_close(got, values.sort().values, rtol=2e-6, atol=1e-7)
    assert set(hists) == set(expected)


def test_cascade_diagnostics_carry_the_stage(monkeypatch):
    """Every stage's EAPM scalars and histograms are named stage<k>/eapm/... (as detectron2's
    stage<k>/fast_rcnn/...), and each equals the values of that stage's own logits; with
    balanced L1 + EAPM regression too (class-agnostic deltas)."""
    path = "quickstart/cascade_rcnn_eapm_mu1.5.yaml"
    opts = (
        "MODEL.EAPM.HISTOGRAM_PERIOD", 1, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "balanced_l1",
        "MODEL.EAPM.REG.ENABLED", True,
    )  # fmt: skip
    cfg = cfg_of(path, *opts)
    eapm.validate_config(cfg)
    model = build_model(cfg)
    assert [p.stage_name for p in predictors(model)] == ["stage0", "stage1", "stage2"]
    seen, hists = record_cls(model), {}
    losses, storage = train_step(model, batch_for(cfg), hists, monkeypatch)
    assert all(torch.isfinite(v) for v in losses.values())
    latest = storage.latest()
    assert not any(k.startswith("eapm/") for k in list(latest) + list(hists))
    for k, (scores, labels) in enumerate(seen):
        p = torch.softmax(scores.double(), dim=1)
        mf = 1 + math.tanh(MU) - torch.tanh(MU * (1 - p.gather(1, labels[:, None]).squeeze(1)))
        fg = labels < 4
        for part, mask in (("fg", fg), ("bg", ~fg)):
            name = f"stage{k}/eapm/roi_cls_mf_{part}"
            assert latest[name][0] == pytest.approx(mf[mask].mean().item(), rel=2e-6)
            torch.testing.assert_close(
                hists[name].double().sort().values, mf[mask].sort().values, rtol=2e-6, atol=1e-7
            )
        for name in ("gos", "mf"):
            assert f"stage{k}/eapm/reg_{name}" in latest and f"stage{k}/eapm/reg_{name}" in hists


# ---------------------------------------------------------------------------- validation
def _raises(path, opts, pattern):
    with pytest.raises(ValueError, match=pattern):
        eapm.load_config(os.path.join(CONFIGS, path), list(opts))


def test_eapm_cls_on_detectron2_roi_heads_is_rejected_naming_the_key():
    for path in ("quickstart/faster_rcnn.yaml", "quickstart/cascade_rcnn.yaml"):
        _raises(
            path,
            ["MODEL.EAPM.CLS.ENABLED", "True"],
            r"^Invalid config MODEL\.EAPM\.CLS\.ENABLED = True: no class of this model reads "
            r"MODEL\.EAPM\.CLS\.ENABLED \(.*MODEL\.ROI_HEADS\.NAME '(Standard|Cascade)ROIHeads'"
            r".*\): it would train without it; use MODEL\.ROI_HEADS\.NAME .*'EAPM",
        )
    # Libra R-CNN's heads have it
    cfg = eapm.load_config(
        os.path.join(CONFIGS, "quickstart/libra_rcnn.yaml"), ["MODEL.EAPM.CLS.ENABLED", "True"]
    )
    tiny = tiny_cfg("quickstart/libra_rcnn.yaml", "MODEL.EAPM.CLS.ENABLED", True)
    assert (
        cfg.MODEL.EAPM.CLS.ENABLED and build_model(tiny).roi_heads.box_predictor.eapm_cls_mu == MU
    )


def test_eapm_rpn_needs_an_eapm_rpn_naming_the_key():
    _raises(
        "quickstart/faster_rcnn_eapm_mu1.5.yaml",
        ["MODEL.EAPM.RPN.ENABLED", "True"],
        r"^Invalid config MODEL\.EAPM\.RPN\.ENABLED = True: no class of this model reads "
        r"MODEL\.EAPM\.RPN\.ENABLED \(.*MODEL\.PROPOSAL_GENERATOR\.NAME 'RPN'.*\): it would "
        r"train without it; use MODEL\.PROPOSAL_GENERATOR\.NAME 'EAPMRPN' \(or a subclass\)",
    )
    _raises(
        "quickstart/retinanet.yaml",
        ["MODEL.EAPM.RPN.ENABLED", "True"],
        r"^Invalid config MODEL\.EAPM\.RPN\.ENABLED = True: no class of this model reads "
        r"MODEL\.EAPM\.RPN\.ENABLED \(MODEL\.META_ARCHITECTURE 'EAPMRetinaNet'",
    )
    cfg = eapm.load_config(
        os.path.join(CONFIGS, "quickstart/faster_rcnn.yaml"), [str(v) for v in RPN_OPTS]
    )
    assert cfg.MODEL.EAPM.RPN.ENABLED


@pytest.mark.parametrize(
    "opts,key",
    [
        (
            [
                "MODEL.EAPM.RPN.ENABLED",
                "True",
                "MODEL.PROPOSAL_GENERATOR.NAME",
                "EAPMRPN",
                "MODEL.EAPM.RPN.MU",
                "-1.0",
            ],
            "MODEL.EAPM.RPN.MU",
        ),  # fmt: skip
        (["MODEL.EAPM.CLS.MU", "1e999"], "MODEL.EAPM.CLS.MU"),
        (["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True"], "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE"),
    ],
)
def test_bad_two_stage_values_are_named(opts, key):
    _raises(
        "quickstart/faster_rcnn_eapm_mu1.5.yaml",
        opts,
        f"^Invalid config {key.replace('.', '[.]')} = ",
    )


def test_constructors_apply_the_same_rules():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform

    from eapm.modeling import EAPMFastRCNNOutputLayers

    args = dict(box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), num_classes=3)
    with pytest.raises(ValueError, match="use_sigmoid_ce"):
        EAPMFastRCNNOutputLayers(
            ShapeSpec(channels=8), eapm_cls_mu=1.0, use_sigmoid_ce=True, **args
        )
    with pytest.raises(ValueError, match="eapm_cls_mu"):
        EAPMFastRCNNOutputLayers(ShapeSpec(channels=8), eapm_cls_mu=-0.5, **args)
    with pytest.raises(ValueError, match="eapm_rpn_mu"):
        build_model(cfg_of("quickstart/faster_rcnn.yaml", *RPN_OPTS, "MODEL.EAPM.RPN.MU", -2.0))


@ROI_HEADS_REGISTRY.register()
class UserEAPMROIHeads(__import__("eapm").modeling.EAPMROIHeads):
    """A user's own ROI heads built on EAPMROIHeads: inherits its capabilities."""


def test_user_subclass_of_eapm_roi_heads_is_accepted():
    opts = ["MODEL.ROI_HEADS.NAME", "UserEAPMROIHeads"]
    eapm.load_config(os.path.join(CONFIGS, "quickstart/faster_rcnn_eapm_mu1.5.yaml"), opts)
    model = build_model(cfg_of("quickstart/faster_rcnn_eapm_mu1.5.yaml", *opts))
    assert type(model.roi_heads) is UserEAPMROIHeads
    assert model.roi_heads.box_predictor.eapm_cls_mu == MU


def test_lazy_eapm_roi_heads_need_the_eapm_predictor():
    from detectron2.config import instantiate

    from eapm.modeling import EAPMROIHeads
    from eapm.utils.testing import tiny_lazy_cfg

    lazy = tiny_lazy_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x.py")
    lazy.model.roi_heads._target_ = EAPMROIHeads  # the predictor left detectron2's
    with pytest.raises(TypeError, match=r"box_predictor must be a .*EAPMFastRCNNOutputLayers"):
        instantiate(lazy.model)


# ------------------------------------------------------------------ LazyConfig twins
LAZY_TWINS = [  # the COCO pairs (the quickstart R-CNN configs are yacs only)
    path[: -len(".yaml")]
    for ours, (base, _, _) in TWINS.items()
    for path in (ours, base)
    if path.startswith("COCO-")
]


@pytest.mark.parametrize("path", sorted(LAZY_TWINS))
def test_rcnn_lazy_twins_equal_yacs(path):
    """Each R-CNN pair's .py builds the .yaml's model: same modules and parameter shapes, the
    same ROI heads and mu in every box predictor, and the same losses at the same weights.
    Faster / Mask R-CNN also initialise identically at the same seed (Cascade R-CNN's
    LazyConfig builds its stages' heads in another order, so only its shapes are compared)."""
    from detectron2.config import instantiate

    from eapm.utils.testing import tiny_lazy_cfg

    torch.manual_seed(0)
    ref = build_model(cfg_of(f"{path}.yaml"))
    torch.manual_seed(0)
    lazy = instantiate(tiny_lazy_cfg(f"{path}.py", "model.roi_heads.num_classes=4").model)
    sa, sb = ref.state_dict(), lazy.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].shape == sb[k].shape for k in sa)
    if "cascade" not in path:
        assert_same_parameters(ref, lazy)
    lazy.load_state_dict(sa)
    assert type(lazy.roi_heads) is type(ref.roi_heads)
    mus = [[getattr(p, "eapm_cls_mu", None) for p in predictors(m)] for m in (ref, lazy)]
    assert mus[0] == mus[1] == [MU if "eapm" in path else None] * len(predictors(ref))
    assert ref.roi_heads.mask_on == lazy.roi_heads.mask_on == ("mask" in path)
    batch = batch_for(cfg_of(f"{path}.yaml"))
    la, _ = train_step(ref, batch, backward=False)
    lb, _ = train_step(lazy, batch, backward=False)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


# ------------------------------------------------------ tools/ablation.py two-stage variants


# ------------------------------------------- EAPM regression with detectron2's IoU losses
@pytest.mark.parametrize("loss_type", ["giou", "diou", "ciou"])
def test_eapm_iou_box_loss_is_the_iou_loss_at_the_modulated_deltas(loss_type, storage):
    """Value: detectron2's IoU loss of the boxes decoded from t' (dw, dh: t* + MF (t - t*),
    MF = 1 + tanh(theta) - tanh(theta GoS); dx, dy: t), summed over the foreground ROIs and
    divided by the sampled ROIs. Gradient w.r.t. the predicted deltas: the IoU loss's gradient
    w.r.t. t' (MF not differentiated); zero for the background ROIs and the other classes."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform

    from eapm.modeling import EAPMFastRCNNOutputLayers

    theta, weights = 1.0, (10.0, 10.0, 5.0, 5.0)
    layer = EAPMFastRCNNOutputLayers(
        ShapeSpec(channels=8),
        box2box_transform=Box2BoxTransform(weights=weights),
        num_classes=3,
        box_reg_loss_type=loss_type,
        eapm_reg_theta=theta,
    )
    g = torch.Generator().manual_seed(0)
    proposals = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 40.0, 20.0], [2.0, 3.0, 9.0, 30.0], [1, 1, 8, 8.0]]
    )
    gt = torch.tensor(
        [[-5.0, 1.0, 15.0, 12.0], [3.0, 6.0, 30.0, 25.0], [1.0, 1.0, 12.0, 20.0], [0, 0, 5, 5.0]]
    )
    classes = torch.tensor([1, 0, 2, 3])  # the last ROI is background
    pred = torch.randn(4, 12, generator=g) * 0.3  # other classes: noise
    fg = torch.arange(3)
    t_star = layer.box2box_transform.get_deltas(proposals[fg], gt[fg])
    # each ROI's own class: the target's sign, another magnitude (GoS in (0, 1): MF > 1)
    pred.view(4, 3, 4)[fg, classes[fg]] = t_star * torch.tensor([0.5, 1.5, 0.6, 1.7])
    pred.requires_grad_()
    loss = layer.box_reg_loss(proposals, gt, pred, classes)
    loss.backward()

    ref = eapm_iou_reference(
        pred.view(4, 3, 4)[fg, classes[fg]],
        t_star,
        theta,
        proposals[fg],
        gt[fg],
        layer.box2box_transform,
        loss_type,
    )
    gos, mf = ref["gos"], ref["mf"]
    assert (mf[:, 2:] > 1.05).all()
    torch.testing.assert_close(loss, ref["loss"] / 4, rtol=1e-6, atol=1e-7)
    expected = torch.zeros(4, 3, 4)
    expected[fg, classes[fg]] = ref["grad"] / 4
    torch.testing.assert_close(pred.grad.view(4, 3, 4), expected, rtol=1e-5, atol=1e-7)
    # not the plain IoU loss: the modulation changed the value
    assert abs(loss.item() - ref["plain"].item() / 4) > 1e-4
    latest = storage.latest()
    assert latest["eapm/reg_mf"][0] == pytest.approx(mf[:, 2:].mean().item(), rel=1e-6)
    assert latest["eapm/reg_gos"][0] == pytest.approx(gos[:, 2:].mean().item(), rel=1e-6)


def test_eapm_iou_regression_in_the_roi_heads_configs():
    """giou + MODEL.EAPM.REG with the EAPM ROI heads: valid and trains; at theta 0 it is
    detectron2's giou bitwise; smooth L1 cannot be modulated (RetinaNet or ROI heads)."""
    path = "quickstart/faster_rcnn_eapm_mu1.5.yaml"
    opts = ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "giou", "MODEL.EAPM.REG.ENABLED", "True"]
    eapm.load_config(os.path.join(CONFIGS, path), opts)
    base, ours = build_pair(path, "quickstart/faster_rcnn.yaml", *opts)
    assert ours.roi_heads.box_predictor.eapm_reg_theta == 1.0
    batch = batch_for(cfg_of(path))
    losses, storage = train_step(ours, batch)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box_reg"] > 0
    assert (
        grad_norms(ours, ["roi_heads.box_predictor.bbox_pred"])["roi_heads.box_predictor.bbox_pred"]
        > 0
    )
    assert storage.latest()["eapm/reg_mf"][0] > 1.0
    zero = build_pair(path, "quickstart/faster_rcnn.yaml", *opts, "MODEL.EAPM.REG.THETA", 0.0)[1]
    base.roi_heads.box_predictor.box_reg_loss_type = "giou"
    l0, _ = train_step(zero, batch, backward=False)
    lb, _ = train_step(base, batch, backward=False)
    assert torch.equal(l0["loss_box_reg"], lb["loss_box_reg"])
    _raises(
        "quickstart/retinanet.yaml",
        ["MODEL.EAPM.REG.ENABLED", "True"],
        r"^Invalid config MODEL\.RETINANET\.BBOX_REG_LOSS_TYPE = 'smooth_l1': "
        r".*box_reg_loss_type must be one of \('balanced_l1', 'giou', 'diou', 'ciou'\)",
    )
    _raises(
        path,
        ["MODEL.EAPM.REG.ENABLED", "True"],
        r"^Invalid config MODEL\.ROI_BOX_HEAD\.BBOX_REG_LOSS_TYPE = 'smooth_l1': "
        r".*box_reg_loss_type must be one of \('balanced_l1', 'giou', 'diou', 'ciou'\)",
    )
