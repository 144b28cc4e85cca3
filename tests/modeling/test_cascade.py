"""eapm/modeling/cascade.py: EAPMCascadeROIHeads, each stage's EAPM diagnostics named after
the stage; non-finite features stop the cascade as detectron2's. (Its configs, a training step
and the bitwise equality with detectron2's at mu 0 are checked with the ROI heads,
test_roi_heads.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.modeling import build_model

import eapm
from tests.helpers import (
    RCNN_MU,
    box_predictors,
    filled_features,
    one_proposal,
    rcnn_batch,
    rcnn_cfg,
    record_box_cls,
    tiny_cfg,
    train_step,
)


def test_cascade_diagnostics_carry_the_stage(monkeypatch):
    """Every stage's EAPM scalars and histograms are named stage<k>/eapm/... (as detectron2's
    stage<k>/fast_rcnn/...), and each equals the values of that stage's own logits; with
    balanced L1 + EAPM regression too (class-agnostic deltas)."""
    path = "quickstart/cascade_rcnn_eapm_mu1.5.yaml"
    opts = (
        "MODEL.EAPM.HISTOGRAM_PERIOD", 1, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "balanced_l1",
        "MODEL.EAPM.REG.ENABLED", True,
    )  # fmt: skip
    cfg = rcnn_cfg(path, *opts)
    eapm.validate_config(cfg)
    model = build_model(cfg)
    assert [p.stage_name for p in box_predictors(model)] == ["stage0", "stage1", "stage2"]
    seen, hists = record_box_cls(model), {}
    losses, storage = train_step(model, rcnn_batch(cfg), hists, monkeypatch)
    assert all(torch.isfinite(v) for v in losses.values())
    latest = storage.latest()
    assert not any(k.startswith("eapm/") for k in list(latest) + list(hists))
    for k, (scores, labels) in enumerate(seen):
        p = torch.softmax(scores.double(), dim=1)
        mf = (
            1
            + math.tanh(RCNN_MU)
            - torch.tanh(RCNN_MU * (1 - p.gather(1, labels[:, None]).squeeze(1)))
        )
        fg = labels < 4
        for part, mask in (("fg", fg), ("bg", ~fg)):
            name = f"stage{k}/eapm/roi_cls_mf_{part}"
            assert latest[name][0] == pytest.approx(mf[mask].mean().item(), rel=2e-6)
            torch.testing.assert_close(
                hists[name].double().sort().values, mf[mask].sort().values, rtol=2e-6, atol=1e-7
            )
        for name in ("gos", "mf"):
            assert f"stage{k}/eapm/reg_{name}" in latest and f"stage{k}/eapm/reg_{name}" in hists


@pytest.mark.parametrize("fill", [math.inf, math.nan], ids=["inf", "nan"])
def test_cascade_roi_heads_inf_nan_data_as_detectron2(fill):
    """detectron2's cascade turns a stage's non-finite boxes into the next stage's proposals
    and stops there (``Boxes.clip`` asserts finite boxes): EAPMCascadeROIHeads the same."""
    path = "COCO-Detection/cascade_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml"
    errors = []
    for heads in ("CascadeROIHeads", "EAPMCascadeROIHeads"):
        model = build_model(tiny_cfg(path, "MODEL.ROI_HEADS.NAME", heads))
        assert type(model.roi_heads).__name__ == heads
        model.eval()
        images, feats = filled_features(model, fill)
        with torch.no_grad(), pytest.raises(AssertionError) as e:
            model.roi_heads(images, feats, [one_proposal()])
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "infinite or NaN" in errors[0]
