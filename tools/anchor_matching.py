#!/usr/bin/env python
"""Anchor-matching statistics of a RetinaNet config on a dataset's ground-truth boxes: how many
boxes get a positive anchor at the config's IoU thresholds, how many only through the
low-quality rule, how many positives each box gets, by size and aspect ratio.

    python tools/anchor_matching.py --config-file configs/quickstart/retinanet.yaml
    python tools/anchor_matching.py --config-file configs/quickstart/retinanet.yaml \\
        MODEL.RETINANET.IOU_THRESHOLDS "[0.3, 0.4]"

The anchors are the model's own (its anchor generator on its backbone's feature maps for an
image of the dataset's size after the test-time resize); the matching is the model's own
``anchor_matcher`` (detectron2's ``Matcher``: IoU thresholds, labels, low-quality matches)
on the boxes of the first dataset of ``DATASETS.TRAIN`` (``--dataset`` for another).
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from typing import Dict, List, Sequence

import torch

# long-side bins (px) of the report: the embedded dataset's objects span 8 to ~110 px
SIZE_BINS = ((0, 16), (16, 32), (32, 64), (64, 1e9))
# aspect (long / short side) bins: the embedded dataset's bars reach 1:10
ASPECT_BINS = ((1, 2), (2, 4), (4, 1e9))


def match_stats(anchors: torch.Tensor, boxes_per_image: Sequence[torch.Tensor], matcher) -> Dict:
    """Per-box matching figures of ``anchors`` (A, 4) against each image's (G, 4) XYXY boxes
    with ``matcher`` (a detectron2 ``Matcher``): for every box its best IoU with any anchor
    (``best_iou``) and the number of anchors labelled positive (1) and matched to it
    (``positives``: what RetinaNet trains the box with)."""
    from detectron2.structures import Boxes, pairwise_iou

    best, positives, sizes = [], [], []
    for boxes in boxes_per_image:
        if len(boxes) == 0:
            continue
        iou = pairwise_iou(Boxes(boxes), Boxes(anchors))  # (G, A)
        matches, labels = matcher(iou)
        pos = labels == 1
        counts = torch.bincount(matches[pos], minlength=len(boxes))
        best.append(iou.max(dim=1).values)
        positives.append(counts)
        sizes.append(boxes[:, 2:] - boxes[:, :2])
    return {
        "best_iou": torch.cat(best),
        "positives": torch.cat(positives),
        "wh": torch.cat(sizes),
    }


def summarize(stats: Dict, thresholds: Sequence[float]) -> "OrderedDict[str, Dict]":
    """Rows (all boxes, then by long side, then by aspect) of: boxes, % with best IoU below
    each threshold, % with no positive anchor, mean and median positives per box."""
    wh = stats["wh"]
    long_side = wh.max(dim=1).values
    aspect = long_side / wh.min(dim=1).values.clamp(min=1e-6)
    rows: "OrderedDict[str, Dict]" = OrderedDict()
    masks = [("all", torch.ones_like(long_side, dtype=torch.bool))]
    masks += [(f"long side {lo:g}-{hi:g} px", (long_side >= lo) & (long_side < hi))
              for lo, hi in SIZE_BINS]  # fmt: skip
    masks += [(f"aspect {lo:g}-{hi:g}", (aspect >= lo) & (aspect < hi)) for lo, hi in ASPECT_BINS]
    for name, m in masks:
        n = int(m.sum())
        if n == 0:
            continue
        pos = stats["positives"][m].float()
        row = {"boxes": n}
        for t in thresholds:
            row[f"best IoU < {t:g} (%)"] = 100.0 * float((stats["best_iou"][m] < t).float().mean())
        row["no positive (%)"] = 100.0 * float((pos == 0).float().mean())
        row["positives mean"] = float(pos.mean())
        row["positives median"] = float(pos.median())
        rows[name.replace("-1e+09", "+")] = row
    return rows


def model_anchors(cfg):
    """All anchors (A, 4) of the model ``cfg`` builds, for one image of
    ``INPUT.MAX_SIZE_TEST`` x ``INPUT.MAX_SIZE_TEST`` (the quickstart's square images), and
    the model's ``anchor_matcher``."""
    from detectron2.modeling import build_model

    model = build_model(cfg).eval()
    size = cfg.INPUT.MAX_SIZE_TEST
    with torch.no_grad():
        x = torch.zeros(1, 3, size, size)
        feats = model.backbone(x)
        anchors = model.anchor_generator([feats[f] for f in model.head_in_features])
    return torch.cat([a.tensor for a in anchors]), model.anchor_matcher


def dataset_boxes(name: str) -> List[torch.Tensor]:
    """The XYXY boxes (absolute pixels) of every image of a registered dataset."""
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BoxMode

    out = []
    for d in DatasetCatalog.get(name):
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                 for a in d.get("annotations", []) if not a.get("iscrowd", 0)]  # fmt: skip
        out.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    return out


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--dataset", help="default: the first of DATASETS.TRAIN")
    p.add_argument("--json", metavar="FILE", help="also write the table here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = p.parse_args(argv)

    import eapm
    from eapm.data import register_from_config

    cfg = eapm.load_config(args.config_file, args.opts, training=False)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    register_from_config(cfg)
    anchors, matcher = model_anchors(cfg)
    name = args.dataset or cfg.DATASETS.TRAIN[0]
    thresholds = sorted(set(float(t) for t in cfg.MODEL.RETINANET.IOU_THRESHOLDS))
    rows = summarize(match_stats(anchors, dataset_boxes(name), matcher), thresholds)
    print(f"{args.config_file} {' '.join(args.opts)}: {len(anchors)} anchors per image, {name},"
          f" IoU thresholds {list(cfg.MODEL.RETINANET.IOU_THRESHOLDS)}")  # fmt: skip
    cols = list(next(iter(rows.values())))
    print("| subset | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name_, row in rows.items():
        cells = [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        print(f"| {name_} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
