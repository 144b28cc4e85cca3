"""eapm/modeling/sampling.py: Libra R-CNN's RoI samplers, IoU-balanced negatives and
instance-balanced positives. (Their use by LibraROIHeads: test_roi_heads.py.)"""

from __future__ import annotations

import torch

from eapm.modeling.sampling import instance_balanced_positives, iou_balanced_negatives, quota_sample


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
