"""Libra R-CNN's RoI samplers (Pang et al., CVPR 2019, Sec. 3.1), in tensor ops.

* IoU-balanced negative sampling: the negatives are split by their best IoU with any
  GT box into ``num_bins`` bins of width ``(max IoU - floor) / num_bins`` (the max over
  all proposals of the image, positives included); ``int(needed / num_bins)`` are drawn
  at random from each bin and the shortfall is topped up at random from the rest.
  ``floor_thresh`` < 0 (the paper's setting, -1) sets no floor and uses 0 for the bin
  edges; ``floor_thresh`` >= 0 sets aside the negatives below it (== 0 for
  ``floor_thresh`` 0) and draws ``floor_fraction`` of the negatives from them at random.
* Instance-balanced positive sampling: ``round(needed / #GT) + 1`` positives at most
  per GT instance, at random, then trimmed / topped up at random to ``needed``.

mmdetection implements both in NumPy with Python loops and sets; here every step is a
tensor op on the proposals' device. The only Python loop runs over the few bins.
Randomness comes from ``torch.randperm`` (the global generator, like detectron2's
``subsample_labels``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quota_sample", "iou_balanced_negatives", "instance_balanced_positives", "random_subset"]


def random_subset(idx: Tensor, num: int) -> Tensor:
    """``num`` (or all, if fewer) elements of ``idx`` drawn at random without replacement."""
    if idx.numel() <= num:
        return idx
    return idx[torch.randperm(idx.numel(), device=idx.device)[:num]]


def quota_sample(groups: Tensor, quota: Tensor, num: int) -> Tensor:
    """Positions (into ``groups``) of ``min(num, len(groups))`` elements drawn without
    replacement: at most ``quota[g]`` at random from each group ``g``; elements whose
    group is outside ``[0, len(quota))`` are in no group. If more than ``num`` were
    drawn, ``num`` of them are kept at random; if fewer, the rest is filled at random
    from the elements not drawn yet.
    """
    n = groups.numel()
    device = groups.device
    if n <= num:
        return torch.arange(n, device=device)
    g_count = quota.numel()
    perm = torch.randperm(n, device=device)
    g = groups[perm]
    key = torch.where((g >= 0) & (g < g_count), g, torch.full_like(g, g_count))  # no group -> last
    order = torch.argsort(key, stable=True)  # grouped, random order inside each group
    key = key[order]
    counts = torch.bincount(key, minlength=g_count + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - starts[key]  # rank inside the group
    limit = torch.cat(
        [
            quota.to(device=device, dtype=torch.long),
            quota.new_zeros(1, dtype=torch.long, device=device),
        ]
    )
    take = rank < limit[key]
    drawn = perm[order[take]]
    if drawn.numel() >= num:
        return random_subset(drawn, num)
    rest = random_subset(perm[order[~take]], num - drawn.numel())
    return torch.cat([drawn, rest])


def iou_balanced_negatives(
    neg_idx: Tensor,
    max_iou: Tensor,
    num: int,
    num_bins: int = 3,
    floor_thresh: float = -1.0,
    floor_fraction: float = 0.0,
) -> Tensor:
    """IoU-balanced sampling of ``num`` negatives.

    Args:
        neg_idx: (K,) indices of the negative proposals.
        max_iou: (N,) best IoU of every proposal of the image with any GT box (0 if
            the image has none); its maximum sets the bin width.
        num: how many negatives are needed.
        num_bins: IoU bins (< 2: no bins, random sampling above the floor).
        floor_thresh: negatives below it are sampled at random (< 0: no floor).
        floor_fraction: fraction of ``num`` drawn from below the floor.

    Returns:
        the sampled subset of ``neg_idx`` (all of it when ``K <= num``).
    """
    if neg_idx.numel() <= num:
        return neg_idx
    iou = max_iou[neg_idx]
    if floor_thresh > 0:
        floor_mask = iou < floor_thresh
    elif floor_thresh == 0:
        floor_mask = iou == 0
    else:  # no floor set; the bins start at 0
        floor_mask = torch.zeros_like(iou, dtype=torch.bool)
    floor = max(float(floor_thresh), 0.0)
    iou_cand = torch.nonzero(~floor_mask).squeeze(1)  # positions into neg_idx
    num_iou = int(num * (1.0 - floor_fraction))
    if iou_cand.numel() <= num_iou:
        picked = iou_cand
    elif num_bins >= 2:
        cand_iou = iou[iou_cand]
        width = (float(max_iou.max()) - floor) / num_bins
        bins = torch.full_like(iou_cand, -1)
        for i in range(num_bins):  # [start, end); the max IoU itself is in no bin (as mmdetection)
            start, end = floor + i * width, floor + (i + 1) * width
            bins[(cand_iou >= start) & (cand_iou < end)] = i
        quota = torch.full(
            (num_bins,), num_iou // num_bins, dtype=torch.long, device=neg_idx.device
        )
        picked = iou_cand[quota_sample(bins, quota, num_iou)]
    else:
        picked = random_subset(iou_cand, num_iou)
    short = num - picked.numel()
    floor_picked = random_subset(torch.nonzero(floor_mask).squeeze(1), short)
    picked = torch.cat([picked, floor_picked])
    short = num - picked.numel()
    if short > 0:  # not enough below the floor: top up from any negative not drawn yet
        left = torch.ones_like(iou, dtype=torch.bool)
        left[picked] = False
        picked = torch.cat([picked, random_subset(torch.nonzero(left).squeeze(1), short)])
    return neg_idx[picked]


def instance_balanced_positives(pos_idx: Tensor, pos_gt: Tensor, num: int) -> Tensor:
    """Instance-balanced sampling of ``num`` positives: at most
    ``round(num / #instances) + 1`` from each GT instance (``pos_gt``: the matched GT
    index of every positive), then trimmed or topped up at random to ``num``."""
    if pos_idx.numel() <= num:
        return pos_idx
    _, inst = torch.unique(pos_gt, return_inverse=True)
    num_inst = int(inst.max()) + 1
    per_inst = int(round(num / num_inst)) + 1
    quota = torch.full((num_inst,), per_inst, dtype=torch.long, device=pos_idx.device)
    return pos_idx[quota_sample(inst, quota, num)]
