"""Libra R-CNN's RoI samplers: IoU-balanced negatives, instance-balanced positives,
and their use by LibraROIHeads (known IoUs, too few negatives, no GT at all)."""

from __future__ import annotations

import pytest
import torch

from eapm.modeling.sampling import instance_balanced_positives, iou_balanced_negatives, quota_sample
from tests.helpers import tiny_cfg

RCNN = "quickstart/libra_rcnn.yaml"


def _bin_counts(iou, edges):
    return [int(((iou >= lo) & (iou < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]


def test_quota_sample_basics():
    torch.manual_seed(0)
    groups = torch.tensor([0] * 10 + [1] * 3 + [-1] * 5 + [7] * 2)
    got = quota_sample(groups, torch.tensor([4, 4]), 12)
    assert got.numel() == 12 and got.unique().numel() == 12
    g = groups[got]
    assert int((g == 1).sum()) == 3 and int((g == 0).sum()) >= 4
    assert torch.equal(quota_sample(groups, torch.tensor([4, 4]), 100), torch.arange(20))  # all
    assert quota_sample(groups, torch.tensor([4, 4]), 2).numel() == 2  # trimmed at random


def test_iou_balanced_negatives_spread_over_bins():
    """max IoU 0.6, 3 bins of width 0.2; 90 needed -> 30 per bin, bin 3 has only 10
    (all taken), the 20 missing are topped up from the rest of bins 1-2."""
    torch.manual_seed(0)
    neg_iou = torch.cat(
        [torch.rand(400) * 0.2, 0.2 + torch.rand(100) * 0.2, 0.4 + torch.rand(10) * 0.1]
    )
    pos_iou = torch.tensor([0.55, 0.6])
    max_iou = torch.cat([pos_iou, neg_iou])[torch.randperm(512)]
    neg_idx = torch.nonzero(max_iou < 0.5).squeeze(1)
    assert neg_idx.numel() == 510
    for seed in range(5):
        torch.manual_seed(seed)
        got = iou_balanced_negatives(neg_idx, max_iou, 90, num_bins=3, floor_thresh=-1)
        assert got.numel() == 90 and got.unique().numel() == 90
        assert bool(torch.isin(got, neg_idx).all())
        c = _bin_counts(max_iou[got], [0.0, 0.2, 0.4, 0.6])
        assert c[2] == 10 and c[1] >= 30 and c[0] >= 30 and sum(c) == 90
    # random sampling would take ~90 * 10/510 = 1.8 from the top bin
    torch.manual_seed(0)
    rnd = neg_idx[torch.randperm(510)[:90]]
    assert _bin_counts(max_iou[rnd], [0.0, 0.2, 0.4, 0.6])[2] < 10


def test_iou_balanced_negatives_exact_quota_when_bins_are_full():
    """All three bins richer than the quota: exactly int(99 / 3) = 33 from each."""
    torch.manual_seed(1)
    max_iou = torch.cat(
        [torch.rand(200) * 0.3, 0.3 + torch.rand(200) * 0.3, 0.6 + torch.rand(200) * 0.3]
    )
    max_iou = torch.cat([max_iou, torch.tensor([0.9])])
    neg_idx = torch.arange(600)  # the generic sampler takes any "negative" set
    got = iou_balanced_negatives(neg_idx, max_iou, 99, num_bins=3)
    assert _bin_counts(max_iou[got], [0.0, 0.3, 0.6, 0.9]) == [33, 33, 33]


def test_iou_balanced_negatives_floor():
    """floor 0.1, floor fraction 0.5: 20 of 40 from the IoU bins above 0.1 and 20 at
    random from below; floor 0 sets aside exactly the IoU-0 negatives."""
    torch.manual_seed(0)
    max_iou = torch.cat(
        [torch.zeros(100), torch.rand(300) * 0.1, 0.1 + torch.rand(300) * 0.4, torch.tensor([0.7])]
    )
    neg_idx = torch.arange(700)
    got = iou_balanced_negatives(
        neg_idx, max_iou, 40, num_bins=3, floor_thresh=0.1, floor_fraction=0.5
    )
    assert int((max_iou[got] < 0.1).sum()) == 20 and got.unique().numel() == 40
    got = iou_balanced_negatives(
        neg_idx, max_iou, 40, num_bins=3, floor_thresh=0.0, floor_fraction=0.25
    )
    assert int((max_iou[got] == 0).sum()) == 10
    # floor fraction 1: everything from below the floor
    got = iou_balanced_negatives(
        neg_idx, max_iou, 40, num_bins=3, floor_thresh=0.1, floor_fraction=1.0
    )
    assert bool((max_iou[got] < 0.1).all())


def test_iou_balanced_negatives_few_or_degenerate():
    max_iou = torch.tensor([0.0, 0.1, 0.2, 0.8])
    neg = torch.tensor([0, 1, 2])
    assert torch.equal(iou_balanced_negatives(neg, max_iou, 5), neg)  # fewer than needed: all
    assert iou_balanced_negatives(neg[:0], max_iou, 5).numel() == 0
    # no GT: every IoU is 0, zero-width bins -> all drawn by the random top-up
    got = iou_balanced_negatives(torch.arange(50), torch.zeros(50), 10)
    assert got.numel() == 10 and got.unique().numel() == 10


def test_instance_balanced_positives():
    """gt0: 200 positives, gt1: 10, gt2: 50; 64 needed -> round(64/3)+1 = 22 per
    instance (gt1 gives all 10), then 10 topped up from gt0/gt2."""
    gt = torch.cat([torch.zeros(200), torch.ones(10), torch.full((50,), 2)]).long()
    perm = torch.randperm(260, generator=torch.Generator().manual_seed(0))
    gt = gt[perm]
    pos = torch.arange(1000, 1260)
    for seed in range(5):
        torch.manual_seed(seed)
        got = instance_balanced_positives(pos, gt, 64)
        assert got.numel() == 64 and got.unique().numel() == 64
        counts = torch.bincount(gt[got - 1000], minlength=3)
        assert counts[1] == 10 and counts[0] >= 22 and counts[2] >= 22
    # equal instances: exactly the quota from each when it fits: 3 x 21 + 3 of 4 x 22 ...
    gt = torch.arange(4).repeat_interleave(100)
    torch.manual_seed(0)
    got = instance_balanced_positives(
        torch.arange(400), gt, 40
    )  # 11 per instance -> 44 -> trimmed to 40
    counts = torch.bincount(gt[got], minlength=4)
    assert counts.sum() == 40 and counts.max() <= 11 and counts.min() >= 7
    assert torch.equal(instance_balanced_positives(torch.arange(5), gt[:5], 40), torch.arange(5))


# ------------------------------------------------------------- LibraROIHeads
def _heads(*opts):
    from detectron2.modeling import build_model

    cfg = tiny_cfg(RCNN, *opts)
    torch.manual_seed(0)
    return build_model(cfg).roi_heads


def _shifted_proposals(gt, shifts):
    """Boxes gt shifted right by s: IoU with gt = (w - s) / (w + s)."""
    from detectron2.structures import Boxes

    b = gt.repeat(len(shifts), 1)
    b[:, 0] += shifts
    b[:, 2] += shifts
    return Boxes(b)


def _instances(size, **fields):
    from detectron2.structures import Instances

    inst = Instances(size)
    for k, v in fields.items():
        inst.set(k, v)
    return inst


def test_roi_heads_sample_known_ious(storage):
    """One GT box; proposals at known IoUs. 256 RoIs: <= 64 positives, and the
    negatives spread over bins of width max IoU / 3 = 1/3 (the GT is appended)."""
    from detectron2.structures import Boxes

    heads = _heads("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 256)
    assert type(heads).__name__ == "LibraROIHeads"
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    # IoU (100 - s) / (100 + s): s in [0, 20] -> IoU >= 0.67 (positives), s in
    # [40, 50) -> IoU in (0.33, 0.43] (bin 2), s in [60, 200) -> IoU < 0.25 (bin 1)
    shifts = torch.cat(
        [torch.linspace(0, 20, 100), torch.linspace(40, 49.9, 30), torch.linspace(60, 199, 870)]
    )
    target = _instances((300, 400), gt_boxes=Boxes(gt), gt_classes=torch.tensor([2]))
    boxes = _shifted_proposals(gt[0], shifts)
    proposal = _instances((300, 400), proposal_boxes=boxes, objectness_logits=torch.zeros(1000))
    torch.manual_seed(0)
    out = heads.label_and_sample_proposals([proposal], [target])[0]
    from detectron2.structures import pairwise_iou

    iou = pairwise_iou(out.proposal_boxes, Boxes(gt))[:, 0]
    fg = out.gt_classes == 2
    assert int(fg.sum()) == 64 and len(out) == 256
    assert bool((out.gt_classes[~fg] == heads.num_classes).all())
    neg_iou = iou[~fg]
    # 192 negatives, int(192 / 3) = 64 per bin: all 30 of (1/3, 2/3), 64+ of [0, 1/3)
    assert int(((neg_iou >= 1 / 3) & (neg_iou < 2 / 3)).sum()) == 30
    assert int((neg_iou < 1 / 3).sum()) == 162
    # the random sampler would take ~192 * 30/900 = 6.4 of the 30
    heads_rnd = _heads("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 256,
                       "MODEL.ROI_HEADS.IOU_BALANCED_NUM_BINS", 0,
                       "MODEL.ROI_HEADS.INSTANCE_BALANCED_POS", False)  # fmt: skip
    torch.manual_seed(0)
    out = heads_rnd.label_and_sample_proposals([proposal], [target])[0]
    iou = pairwise_iou(out.proposal_boxes, Boxes(gt))[:, 0]
    assert int(((iou >= 1 / 3) & (iou < 0.5)).sum()) < 20


def test_roi_heads_positives_balanced_over_instances(storage):
    from detectron2.structures import Boxes

    heads = _heads(
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 128, "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", False
    )
    gts = torch.tensor([[0.0, 0.0, 100.0, 100.0], [300.0, 0.0, 400.0, 100.0]])
    # GT 0: 150 positives, GT 1: 5 positives; plus 300 far negatives
    props = torch.cat([
        _shifted_proposals(gts[0], torch.linspace(0, 20, 150)).tensor,
        _shifted_proposals(gts[1], torch.linspace(0, 10, 5)).tensor,
        _shifted_proposals(torch.tensor([0.0, 200.0, 50.0, 250.0]),
                           torch.linspace(0, 300, 300)).tensor,
    ])  # fmt: skip
    target = _instances((300, 800), gt_boxes=Boxes(gts), gt_classes=torch.tensor([0, 1]))
    proposal = _instances(
        (300, 800), proposal_boxes=Boxes(props), objectness_logits=torch.zeros(455)
    )
    torch.manual_seed(0)
    out = heads.label_and_sample_proposals([proposal], [target])[0]
    # 32 positives: round(32 / 2) + 1 = 17 per instance -> all 5 of GT 1, 27 of GT 0
    assert int((out.gt_classes == 1).sum()) == 5 and int((out.gt_classes == 0).sum()) == 27
    assert len(out) == 128


def test_roi_heads_fewer_negatives_than_needed_and_no_gt(storage):
    from detectron2.structures import Boxes

    heads = _heads("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 256)
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    shifts = torch.cat([torch.linspace(0, 10, 20), torch.linspace(60, 150, 50)])
    target = _instances((300, 400), gt_boxes=Boxes(gt), gt_classes=torch.tensor([1]))
    boxes = _shifted_proposals(gt[0], shifts)
    proposal = _instances((300, 400), proposal_boxes=boxes, objectness_logits=torch.zeros(70))
    out = heads.label_and_sample_proposals([proposal], [target])[0]
    # 21 positives (20 + the appended GT), all 50 negatives; nothing twice
    assert len(out) == 71 and int((out.gt_classes == heads.num_classes).sum()) == 50
    # an image without any GT box: everything is background, sampled at random
    empty = _instances(
        (300, 400), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long)
    )
    many = _instances((300, 400),
                      proposal_boxes=_shifted_proposals(gt[0], torch.linspace(0, 300, 400)),
                      objectness_logits=torch.zeros(400))  # fmt: skip
    out = heads.label_and_sample_proposals([many], [empty])[0]
    assert len(out) == 256 and bool((out.gt_classes == heads.num_classes).all())
    assert not out.has("gt_boxes")
    assert heads.proposal_matcher.last_max_iou.abs().sum() == 0


def test_roi_heads_random_mode_is_detectron2(storage):
    """NUM_BINS 0 + no instance balancing: the very same draw as StandardROIHeads."""
    from detectron2.modeling.roi_heads import StandardROIHeads

    heads = _heads(
        "MODEL.ROI_HEADS.IOU_BALANCED_NUM_BINS", 0, "MODEL.ROI_HEADS.INSTANCE_BALANCED_POS", False
    )
    g = torch.Generator().manual_seed(0)
    matched_idxs = torch.randint(0, 3, (500,), generator=g)
    matched_labels = torch.randint(-1, 2, (500,), generator=g).to(torch.int8)
    gt_classes = torch.tensor([0, 3, 1])
    torch.manual_seed(5)
    a = heads._sample_proposals(matched_idxs, matched_labels, gt_classes.clone())
    torch.manual_seed(5)
    b = StandardROIHeads._sample_proposals(heads, matched_idxs, matched_labels, gt_classes.clone())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("opts", [(), ("MODEL.ROI_HEADS.INSTANCE_BALANCED_POS", False)])
def test_roi_heads_labels_match_detectron2(storage, opts):
    """Same labels (fg class / background / ignored never sampled) as detectron2."""
    heads = _heads(*opts)
    g = torch.Generator().manual_seed(1)
    matched_idxs = torch.randint(0, 3, (300,), generator=g)
    matched_labels = torch.randint(-1, 2, (300,), generator=g).to(torch.int8)
    heads.proposal_matcher.last_max_iou = torch.rand(300, generator=g)
    idx, labels = heads._sample_proposals(matched_idxs, matched_labels, torch.tensor([0, 3, 1]))
    expected = torch.tensor([0, 3, 1])[matched_idxs[idx]]
    expected[matched_labels[idx] == 0] = heads.num_classes
    assert bool((matched_labels[idx] != -1).all()) and torch.equal(labels, expected)
    assert (
        idx.unique().numel()
        == idx.numel()
        == min(heads.batch_size_per_image, int((matched_labels != -1).sum()))
    )
