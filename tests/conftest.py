"""pytest configuration: two threads per test process, and the fixtures the test files share:
``storage`` (detectron2's event storage, which the models' diagnostics write to), ``one_thread``
(torch on one thread for the test), ``initial_weights`` (the quickstart RetinaNet's initial
weights, yacs and LazyConfig), ``two_stage_step`` (a tiny Faster R-CNN with EAPM RPN and EAPM box
predictor after one training forward, for the float64 checks of both losses), ``tiny_coco`` (a
4-image COCO-json dataset for the tools' runs), and the session's dataset-check cache. The
helpers the tests share live in ``tests/helpers.py`` (those the tools use too, in
``eapm.utils.testing``)."""

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


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run much faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    """The quickstart RetinaNet's initial weights, saved from its yacs config and from its
    LazyConfig twin: {"yaml": file, "lazy": file}."""
    from tests.helpers import QUICKSTART_LAZY, QUICKSTART_YAML, save_initial_weights

    root = tmp_path_factory.mktemp("weights")
    return {
        "yaml": save_initial_weights(QUICKSTART_YAML, str(root / "yaml_init")),
        "lazy": save_initial_weights(QUICKSTART_LAZY, str(root / "lazy_init")),
    }


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


@pytest.fixture(scope="module")
def two_stage_step():
    """A tiny Faster R-CNN with EAPM cross entropy in the box predictor (mu 2.0) and EAPM
    binary cross entropy on the RPN objectness (mu 0.7), after one training forward: its
    losses, what its RPN and box predictor losses saw, and the gradients of loss_rpn_cls /
    loss_cls w.r.t. the raw objectness logits / class scores (test_rpn.py, test_roi_heads.py)."""
    from detectron2.layers import cat
    from detectron2.modeling import build_model

    from tests.helpers import CLS_MU, RPN_MU, make_batch, record, tiny_cfg, train_forward

    cfg = tiny_cfg(
        "quickstart/faster_rcnn_eapm_mu1.5.yaml",
        "MODEL.ROI_HEADS.NUM_CLASSES", 4,
        "MODEL.PROPOSAL_GENERATOR.NAME", "EAPMRPN",
        "MODEL.EAPM.RPN.ENABLED", True,
        "MODEL.EAPM.RPN.MU", RPN_MU,
        "MODEL.EAPM.CLS.MU", CLS_MU,
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    rpn_seen = record(model.proposal_generator, "losses")
    roi_seen = record(model.roi_heads.box_predictor, "losses")
    out = train_forward(model, make_batch(2, size=64, num_boxes=(3, 1), num_classes=4, seed=1))
    _, logits, gt_labels, _, _ = rpn_seen["args"]
    (scores, _), proposals = roi_seen["args"]
    return {
        "cfg": cfg,
        "out": out,
        "logits": [x.detach() for x in logits],
        "gt_labels": gt_labels,
        "scores": scores.detach(),
        "classes": cat([p.gt_classes for p in proposals], dim=0),
        "grad_logits": torch.autograd.grad(out["loss_rpn_cls"], logits, retain_graph=True),
        "grad_scores": torch.autograd.grad(out["loss_cls"], scores),
    }
