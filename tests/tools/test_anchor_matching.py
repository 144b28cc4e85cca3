"""tools/anchor_matching.py: positives and low-quality matches counted per box."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import load_tool


def test_anchor_matching_counts_positives_and_low_quality_matches():
    """detectron2's Matcher (RetinaNet's 0.4 / 0.5, low-quality matches on): a box equal to
    an anchor gets it (IoU 1); a box whose best IoU is 0.25 gets only its low-quality match;
    an anchor is counted for the box it is matched to; each image is matched on its own."""
    from detectron2.modeling.matcher import Matcher

    tool = load_tool("anchor_matching")
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60], [0, 0, 11, 10.0]])
    boxes = [
        torch.tensor([[0, 0, 10, 10], [50, 50, 70, 70.0]]),  # IoU 1 (+0.909, 0.25); 0.25
        torch.zeros((0, 4)),  # an image without boxes is skipped
        torch.tensor([[0, 0, 5, 20.0]]),  # best IoU 1/3 (with [0, 0, 10, 10]): low quality
    ]
    stats = tool.match_stats(anchors, boxes, Matcher([0.4, 0.5], [0, -1, 1], True))
    assert stats["best_iou"].tolist() == pytest.approx([1.0, 0.25, 1 / 3])
    # box 0: anchors 0 and 3 (IoU 1 and 10/11); box 1: anchor 2 (its best, 0.25); box 2, in
    # an image of its own: anchor 0 (IoU 1/3, its best)
    assert stats["positives"].tolist() == [2, 1, 1]
    rows = tool.summarize(stats, [0.4, 0.5])
    assert rows["all"]["boxes"] == 3
    assert rows["all"]["best IoU < 0.5 (%)"] == pytest.approx(200 / 3)
    assert rows["all"]["no positive (%)"] == 0.0
    assert rows["all"]["positives mean"] == pytest.approx(4 / 3)
    assert rows["aspect 4+"]["boxes"] == 1  # the 5 x 20 box
    assert rows["long side 16-32 px"]["boxes"] == 2
