"""Checks of loaded COCO-json dataset dicts that detectron2 would otherwise only
trip over deep inside training (or silently train on)."""

from __future__ import annotations

import os
from typing import Dict, List


def validate_dataset_dicts(dicts: List[Dict], name: str, json_file: str) -> None:
    """Raise a ValueError / FileNotFoundError naming the image or annotation at fault.

    * every image file must exist;
    * every box must have a non-negative width and height (XYWH) and finite values.
    Images without annotations are fine (they train as all-background)."""
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"Dataset '{name}' ({json_file}): image file not found: {missing[0]}{more}"
        )
    for d in dicts:
        for ann in d.get("annotations", []):
            box = ann.get("bbox", None)
            if box is None or len(box) != 4:
                raise ValueError(
                    f"Dataset '{name}' ({json_file}): annotation {ann.get('id')} of "
                    f"{d['file_name']} has no 4-value bbox"
                )
            x, y, w, h = (float(v) for v in box)
            if not all(map(_finite, (x, y, w, h))) or w < 0 or h < 0:
                raise ValueError(
                    f"Dataset '{name}' ({json_file}): annotation {ann.get('id')} of "
                    f"{d['file_name']} has an invalid "
                    f"box {list(box)} (XYWH with negative size or non-finite value)"
                )


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")
