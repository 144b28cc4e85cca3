"""pytest configuration: two threads per test process, the ``storage`` fixture
(detectron2's event storage, which the models' diagnostics write to) and ``tiny_coco`` (a
4-image COCO-json dataset for the tools' runs). The helpers the tests share live in
``tests/helpers.py`` (those the tools use too, in ``eapm.utils.testing``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def storage():
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as s:
        yield s


@pytest.fixture(autouse=True, scope="session")
def _dataset_check_cache(tmp_path_factory):
    """The dataset checks' cache (``eapm.data``) in a temporary folder, not the user's
    ``~/.cache/eapm``; subprocesses inherit it through the environment."""
    import os

    old = os.environ.get("EAPM_CACHE")
    os.environ["EAPM_CACHE"] = str(tmp_path_factory.mktemp("eapm_cache"))
    yield
    if old is None:
        os.environ.pop("EAPM_CACHE", None)
    else:
        os.environ["EAPM_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """A 4-image COCO-json dataset (64 px, one or two boxes each): (json, image_root)."""
    import cv2

    from eapm.data import shapes

    root = tmp_path_factory.mktemp("tiny_coco")
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(4):
        img = rng.integers(60, 120, size=(64, 64, 3), dtype=np.uint8)
        for j in range(1 + i % 2):
            x, y = int(rng.integers(2, 30)), int(rng.integers(2, 30))
            w, h = int(rng.integers(8, 30)), int(rng.integers(4, 30))
            img[y : y + h, x : x + w] = (40 + 60 * j, 200, 240)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + (i + j) % 4,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
        cv2.imwrite(str(imgs / f"img{i}.png"), img)
        images.append({"id": i + 1, "file_name": f"img{i}.png", "width": 64, "height": 64})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(shapes.CLASSES)]
    js = root / "instances.json"
    js.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(js), str(imgs)
