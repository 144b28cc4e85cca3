"""The embedded dataset "eapm_shapes": generated deterministically, in COCO json.

It is designed to exercise what EAPM targets:

* strongly varying aspect ratios: thin horizontal / vertical bars (1:3 to 1:10),
  ellipses (1:1 to 1:3), triangles, rings;
* strongly varying scales: long sides from 8 to ~110 px (short sides down to 3 px) on a
  128 px image;
* easy and hard examples: most objects are high contrast, ~25% are low contrast
  (blended into the background) or partly occluded; the background carries clutter
  (faint lines and blobs) that looks like the objects' parts;
* some images without any object.

Usage: ``python -m eapm.data.shapes --root DIR`` (also generated on first use by
the dataset registration).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

logger = logging.getLogger(__name__)

# bump when the generator changes: the stamp makes old copies regenerate
GENERATOR_VERSION = 1
CLASSES = ("bar", "ellipse", "triangle", "ring")
# base colour (BGR) of each class; instances jitter around it
_BASE_COLORS = np.array(
    [[40, 200, 240], [230, 120, 40], [60, 210, 60], [200, 60, 200]], dtype=np.float32
)


@dataclass(frozen=True)
class SplitSpec:
    name: str
    num_images: int
    seed: int


SPLITS = (SplitSpec("train", 800, 1234), SplitSpec("val", 200, 5678))
IMAGE_SIZE = 128


def default_root() -> str:
    """$EAPM_DATASETS/eapm_shapes, else ./datasets/eapm_shapes."""
    base = os.environ.get("EAPM_DATASETS", os.path.join(os.getcwd(), "datasets"))
    return os.path.join(os.path.expanduser(base), "eapm_shapes")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    import cv2

    c0, c1 = rng.uniform(40, 200, size=3), rng.uniform(40, 200, size=3)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if rng.random() < 0.5:
        ramp = ramp[:, None] * np.ones((1, size), np.float32)
    else:
        ramp = np.ones((size, 1), np.float32) * ramp[None, :]
    img = c0[None, None, :] * (1 - ramp[..., None]) + c1[None, None, :] * ramp[..., None]
    img += rng.normal(0, 8, size=img.shape)
    # clutter: faint short lines and blobs (hard negatives)
    for _ in range(int(rng.integers(0, 6))):
        col = tuple(float(v) for v in rng.uniform(0, 255, size=3))
        p1 = tuple(int(v) for v in rng.integers(0, size, size=2))
        p2 = (
            int(np.clip(p1[0] + rng.integers(-20, 21), 0, size - 1)),
            int(np.clip(p1[1] + rng.integers(-20, 21), 0, size - 1)),
        )
        overlay = img.copy()
        if rng.random() < 0.5:
            cv2.line(overlay, p1, p2, col, 1)
        else:
            cv2.circle(overlay, p1, int(rng.integers(2, 6)), col, -1)
        img = 0.6 * img + 0.4 * overlay
    return img


def _object_size(rng: np.random.Generator, cls: int) -> Tuple[int, int]:
    """(w, h) with the class's aspect-ratio range and a log-uniform scale."""
    scale = float(np.exp(rng.uniform(np.log(8), np.log(56))))  # sqrt(area)
    if cls == 0:  # bar: 1:3 .. 1:10, horizontal or vertical
        ar = float(rng.uniform(3, 10))
    elif cls == 1:  # ellipse: 1:1 .. 1:3
        ar = float(rng.uniform(1, 3))
    elif cls == 2:  # triangle: 1:1 .. 1:2
        ar = float(rng.uniform(1, 2))
    else:  # ring: 1:1 .. 1:2.5
        ar = float(rng.uniform(1, 2.5))
    long_side, short_side = scale * np.sqrt(ar), scale / np.sqrt(ar)
    long_side = min(long_side, IMAGE_SIZE * 0.85)
    short_side = max(short_side, 3.0)
    w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    return max(int(round(w)), 3), max(int(round(h)), 3)


def _draw(img: np.ndarray, cls: int, box: Tuple[int, int, int, int], color, thickness: int) -> None:
    import cv2

    x0, y0, x1, y1 = box
    if cls == 0:
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), color, -1)
    elif cls == 1:
        center = ((x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0)
        axes = ((x1 - x0) / 2.0, (y1 - y0) / 2.0)
        cv2.ellipse(img, (center, (axes[0] * 2, axes[1] * 2), 0.0), color, -1)
    elif cls == 2:
        pts = np.array([[x0, y1 - 1], [x1 - 1, y1 - 1], [(x0 + x1 - 1) // 2, y0]], np.int32)
        cv2.fillPoly(img, [pts], color)
    else:
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), color, thickness)


def _make_image(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, List[Dict]]:
    img = _background(rng, size)
    anns: List[Dict] = []
    n = 0 if rng.random() < 0.08 else int(rng.integers(1, 7))
    for _ in range(n):
        cls = int(rng.integers(0, len(CLASSES)))
        w, h = _object_size(rng, cls)
        x0 = int(rng.integers(0, max(size - w, 0) + 1))
        y0 = int(rng.integers(0, max(size - h, 0) + 1))
        box = (x0, y0, min(x0 + w, size), min(y0 + h, size))
        color = np.clip(_BASE_COLORS[cls] + rng.normal(0, 25, size=3), 0, 255)
        hard = rng.random() < 0.25
        layer = img.copy()
        _draw(layer, cls, box, tuple(float(c) for c in color), thickness=max(2, min(w, h) // 5))
        opacity = float(rng.uniform(0.35, 0.55)) if hard else 1.0
        img = img * (1 - opacity) + layer * opacity
        bw, bh = box[2] - box[0], box[3] - box[1]
        anns.append(
            {
                "category_id": cls + 1,
                "bbox": [float(box[0]), float(box[1]), float(bw), float(bh)],
                "area": float(bw * bh),
                "iscrowd": 0,
                "hard": int(hard),
            }
        )
    img = np.clip(img + rng.normal(0, 4, size=img.shape), 0, 255).astype(np.uint8)
    return img, anns


def _generate_split(root: str, spec: SplitSpec, size: int) -> None:
    import cv2

    rng = np.random.default_rng(spec.seed)
    img_dir = os.path.join(root, spec.name)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(spec.num_images):
        img, anns = _make_image(rng, size)
        fname = f"{i:05d}.png"
        cv2.imwrite(os.path.join(img_dir, fname), img)
        images.append({"id": i + 1, "file_name": fname, "width": size, "height": size})
        for a in anns:
            a.update(id=len(annotations) + 1, image_id=i + 1)
            annotations.append(a)
    coco = {
        "info": {
            "description": (
                f"eapm_shapes {spec.name} (generator v{GENERATOR_VERSION}, seed {spec.seed})"
            )
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)],
    }
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{spec.name}.json"), "w") as f:
        json.dump(coco, f)


def _stamp() -> str:
    return json.dumps(
        {"version": GENERATOR_VERSION, "size": IMAGE_SIZE, "splits": [s.__dict__ for s in SPLITS]}
    )


def is_generated(root: str) -> bool:
    try:
        with open(os.path.join(root, "STAMP")) as f:
            return f.read() == _stamp()
    except OSError:
        return False


def ensure_generated(root: str | None = None) -> str:
    """Generate the dataset under ``root`` unless an up-to-date copy is there.

    Safe under concurrent calls (several training processes): each generates into a
    private temporary folder and moves it into place atomically."""
    root = os.path.abspath(root or default_root())
    if is_generated(root):
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    logger.info("Generating the embedded dataset eapm_shapes under %s ...", root)
    tmp = tempfile.mkdtemp(prefix=".eapm_shapes-", dir=parent)
    try:
        for spec in SPLITS:
            _generate_split(tmp, spec, IMAGE_SIZE)
        with open(os.path.join(tmp, "STAMP"), "w") as f:
            f.write(_stamp())
        if os.path.isdir(root) and not is_generated(root):
            shutil.rmtree(root, ignore_errors=True)  # an outdated copy
        try:
            os.rename(tmp, root)
        except OSError:
            if not is_generated(root):  # lost a race to another process: theirs is identical
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "Generated eapm_shapes: %s", ", ".join(f"{s.name} {s.num_images} images" for s in SPLITS)
    )
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=None,
        help="output folder (default: %(default)s -> $EAPM_DATASETS/eapm_shapes)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(ensure_generated(args.root))


if __name__ == "__main__":
    main()
