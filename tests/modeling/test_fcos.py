"""EAPMFCOS: detectron2's FCOS built from yacs keys, with EAPM focal loss."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import diou_loss
from detectron2.modeling import build_model
from detectron2.structures import Boxes

from eapm.losses import eapm_sigmoid_focal_loss
from tests.helpers import (
    DISTINCT_FOCAL,
    DISTINCT_MU,
    DISTINCT_THETA,
    REPO,
    check_cls_diagnostics,
    close_loss,
    cls_diagnostics_reference,
    differs_loss,
    ema_first_update,
    forward_with_histograms,
    grad_norms,
    make_batch,
    record,
    tiny_cfg,
    train_forward,
)

LOSS_KEYS = ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr")
# 64 FPN channels: the quickstart head uses GN (32 groups), which needs >= 2 channels per group
TINY = ("MODEL.FPN.OUT_CHANNELS", 64)


def fcos_cfg(config="quickstart/fcos.yaml", *opts):
    return tiny_cfg(config, *TINY, *opts)


def build(cfg):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(cfg)


def losses_of(model, batch):
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        return model(batch)


def assert_finite(losses):
    assert set(losses) == set(LOSS_KEYS)
    for k, v in losses.items():
        assert torch.isfinite(v).all(), (k, v)


@pytest.fixture(scope="module")
def baseline():
    """(EAPMFCOS with EAPM off, its state dict) built from the quickstart config."""
    model = build(fcos_cfg())
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def twin(state, *opts, config="quickstart/fcos.yaml"):
    """An EAPMFCOS from ``config`` + opts with the baseline's weights."""
    model = build(fcos_cfg(config, *opts))
    model.load_state_dict(state)
    return model


def test_registered_and_built_from_yacs(baseline):
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY
    from detectron2.modeling.meta_arch.fcos import FCOS

    import eapm  # noqa: F401

    assert (
        "EAPMFCOS" in META_ARCH_REGISTRY and "build_fcos_resnet_fpn_backbone" in BACKBONE_REGISTRY
    )
    model, _ = baseline
    assert isinstance(model, FCOS) and model.eapm_cls_mu == 0.0
    shapes = model.backbone.output_shape()
    assert [shapes[f].stride for f in ("p3", "p4", "p5", "p6", "p7")] == [8, 16, 32, 64, 128]
    # P6 from P5 (FPN channels in), not from C5
    assert model.backbone.top_block.in_feature == "p5"
    assert model.backbone.top_block.p6.in_channels == 64
    assert model.num_classes == 4 and model.head_in_features == ["p3", "p4", "p5", "p6", "p7"]
    assert len(model.head.cls_subnet) == 3  # one conv (NUM_CONVS 1 in tiny_cfg) + GN + ReLU
    assert model.test_score_thresh == 0.05 and model.max_detections_per_image == 50


def test_eapm_off_equals_detectron2_fcos(baseline):
    """(a) Same weights, same batch: every loss equals detectron2's FCOS.losses, also
    over two iterations (the shared EMA normaliser, initial 300)."""
    from detectron2.modeling.meta_arch.fcos import FCOS

    from eapm.modeling.fcos import EAPMFCOS

    ours, state = baseline
    ours = twin(state)
    args = EAPMFCOS.from_config(fcos_cfg())
    for k in (
        "eapm_cls_mu",
        "box_loss_type",
        "loss_normalizer",
        "histogram_period",
        "compile_kernels",
        "cls_loss_weight",
    ):
        args.pop(k)
    ref = FCOS(**args)
    ref.load_state_dict(state)
    for seed in (0, 1):
        batch = make_batch(num_boxes=(3, 2), seed=seed)
        a, b = losses_of(ours, batch), losses_of(ref, batch)
        assert set(a) == set(b) == set(LOSS_KEYS)
        for k in LOSS_KEYS:
            assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8), (k, a[k], b[k])
    assert ours.loss_normalizer == pytest.approx(ref.loss_normalizer)


def test_training_step_eapm_on_reaches_head_and_backbone():
    """(b) A training step with EAPM on: finite losses, gradients in head and backbone,
    diagnostics in the event storage and not in the loss dict."""
    from detectron2.utils.events import EventStorage

    model = build(fcos_cfg("quickstart/eapm_fcos.yaml"))
    assert model.eapm_cls_mu == 1.5
    with EventStorage(0) as storage:
        losses = model(make_batch(num_boxes=(3, 1)))
        assert_finite(losses)
        sum(losses.values()).backward()
        logged = storage.latest()
    norms = grad_norms(
        model, ["head.cls_score", "head.bbox_pred", "head.ctrness", "head.cls_subnet", "backbone"]
    )
    assert all(v > 0 and math.isfinite(v) for v in norms.values()), norms
    assert "eapm/cls_mf_pos" in logged and "eapm/cls_dif_neg" in logged


@pytest.mark.parametrize("num_boxes", [(3, 0), (0, 0)], ids=["one-image-empty", "all-empty"])
@pytest.mark.parametrize("eapm_on", [False, True], ids=["focal", "eapm"])
def test_empty_images_give_finite_losses(baseline, num_boxes, eapm_on):
    """(c) Images without boxes, and batches without any positive location."""
    _, state = baseline
    model = twin(state, "MODEL.EAPM.CLS.ENABLED", eapm_on)
    losses = losses_of(model, make_batch(num_boxes=num_boxes))
    assert_finite(losses)
    sum(losses.values()).backward()
    assert grad_norms(model, ["head.cls_score"])["head.cls_score"] > 0
    if num_boxes == (0, 0):
        assert losses["loss_fcos_loc"] == 0 and losses["loss_fcos_ctr"] == 0


def test_eapm_changes_loss_cls_and_mu0_is_focal(baseline):
    """(d) EAPM (mu 1.5) changes only loss_fcos_cls; mu = 0 is the focal loss."""
    _, state = baseline
    batch = make_batch(num_boxes=(3, 2))
    off = losses_of(twin(state), batch)
    on = losses_of(twin(state, config="quickstart/eapm_fcos.yaml"), batch)
    mu0 = losses_of(twin(state, "MODEL.EAPM.CLS.ENABLED", True, "MODEL.EAPM.CLS.MU", 0.0), batch)
    assert not torch.allclose(on["loss_fcos_cls"], off["loss_fcos_cls"], rtol=1e-3)
    # EAPM raises MF >= 1 for every example: the modulated loss is larger
    assert on["loss_fcos_cls"] > off["loss_fcos_cls"]
    for k in ("loss_fcos_loc", "loss_fcos_ctr"):
        assert torch.allclose(on[k], off[k], rtol=1e-6, atol=1e-8)
    for k in LOSS_KEYS:
        assert torch.allclose(mu0[k], off[k], rtol=1e-5, atol=1e-7), (k, mu0[k], off[k])


def test_all_reduce_normaliser_single_process(baseline):
    """LOSS_NORMALIZER "all_reduce" divides by this iteration's positive count (one
    process: the count itself), "ema" by 0.9 * 300 + 0.1 * count at the first step."""
    from detectron2.utils.events import EventStorage

    _, state = baseline
    batch = make_batch(num_boxes=(3, 2))
    ema = losses_of(twin(state), batch)
    model = twin(state, "MODEL.LOSS_NORMALIZER.TYPE", "all_reduce")
    with EventStorage(0) as storage:
        ar = model(batch)
        num_pos = storage.latest()["num_pos_anchors"][0] * len(batch)
    assert num_pos > 0
    for k in LOSS_KEYS:
        expected = ema[k] * (0.9 * 300 + 0.1 * num_pos) / num_pos
        assert torch.allclose(ar[k], expected, rtol=1e-5), k


@pytest.mark.parametrize(
    "key,value",
    [
        ("MODEL.FCOS.PRIOR_PROB", 1.5),
        ("MODEL.EAPM.CLS.MU", -1.0),
        ("MODEL.FCOS.CENTER_SAMPLING_RADIUS", 0.0),
        ("MODEL.FCOS.NUM_CONVS", 0),
        ("MODEL.FCOS.BOX_LOSS_TYPE", "smooth_l1"),
        ("MODEL.EAPM.REG.ENABLED", True),
    ],
)
def test_bad_config_raises_naming_the_key(key, value):
    """(e) Out-of-range values fail where the config is validated, naming the key."""
    import eapm

    cfg = fcos_cfg("quickstart/eapm_fcos.yaml", key, value)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        eapm.validate_config(cfg)


def test_in_features_the_backbone_lacks_fail_when_built():
    """Only the built backbone knows its features: EAPMFCOS.from_config owns this check."""
    cfg = fcos_cfg("quickstart/eapm_fcos.yaml", "MODEL.FCOS.IN_FEATURES", ["p2", "p3"])
    with pytest.raises(
        ValueError, match=r"MODEL\.FCOS\.IN_FEATURES = \['p2', 'p3'\]: \['p2'\] not produced"
    ):
        build(cfg)


def test_gn_head_needs_two_channels_per_group():
    import eapm

    cfg = fcos_cfg()  # GN on 64 channels
    cfg.MODEL.FPN.OUT_CHANNELS = 32  # GN would be instance norm
    with pytest.raises(ValueError, match=r"^Invalid config MODEL\.FCOS\.HEAD_NORM = 'GN': "):
        eapm.validate_config(cfg)
    cfg = tiny_cfg("quickstart/fcos.yaml", "MODEL.FCOS.HEAD_NORM", "")
    eapm.validate_config(cfg)
    assert len(build(cfg).head.cls_subnet) == 2  # one conv + ReLU, no norm


def test_coco_configs_load():
    """The COCO configs are self-contained (this repo's _BASE_ only) and valid."""
    import eapm

    base = os.path.join(REPO, "configs", "COCO-Detection")
    for name, mu in [("fcos_R_50_FPN_1x", None)] + [
        (f"fcos_R_50_FPN_1x_eapm_mu{m}", float(m)) for m in ("1.0", "1.5", "2.0")
    ]:
        from detectron2.config import get_cfg

        cfg = eapm.add_eapm_config(get_cfg())
        cfg.merge_from_file(os.path.join(base, name + ".yaml"))
        eapm.validate_config(cfg)
        assert cfg.MODEL.META_ARCHITECTURE == "EAPMFCOS" and cfg.MODEL.FCOS.NUM_CLASSES == 80
        assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (
            16,
            0.01,
            90000,
        )
        assert tuple(cfg.SOLVER.STEPS) == (60000, 80000)
        assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == (
            "coco_2017_val",
        )
        assert cfg.MODEL.EAPM.CLS.ENABLED == (mu is not None)
        if mu is not None:
            assert cfg.MODEL.EAPM.CLS.MU == mu


# ---------------------------------------------------------------- losses against eapm.losses


def test_fcos_losses_are_eapm_focal_on_its_own_targets():
    cfg = tiny_cfg(
        "quickstart/eapm_fcos.yaml",
        "MODEL.FPN.OUT_CHANNELS", 64,  # GN head: 2 channels per group
        "MODEL.EAPM.CLS.MU", DISTINCT_MU,
        "MODEL.FCOS.FOCAL_LOSS_ALPHA", DISTINCT_FOCAL["alpha"],
        "MODEL.FCOS.FOCAL_LOSS_GAMMA", DISTINCT_FOCAL["gamma"],
        "MODEL.FCOS.BOX_LOSS_TYPE", "diou",
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = record(model, "losses")
    batch = make_batch(2, num_boxes=(3, 2))
    out = train_forward(model, batch)
    anchors, pred_logits, gt_labels, pred_deltas, gt_boxes, pred_ctr = seen["args"]

    # the targets are those of detectron2's FCOS.label_anchors (center sampling) on this batch
    labels_again, boxes_again = model.label_anchors(anchors, [b["instances"] for b in batch])
    for a, b in zip(gt_labels + gt_boxes, labels_again + boxes_again):
        assert torch.equal(a, b)

    k = cfg.MODEL.FCOS.NUM_CLASSES
    labels = torch.stack(gt_labels)
    pos = (labels >= 0) & (labels != k)
    num_pos = int(pos.sum())
    assert num_pos > 0
    norm = ema_first_update(300.0, num_pos)  # detectron2's FCOS starts its EMA at 300
    with torch.no_grad():
        logits = torch.cat(pred_logits, dim=1)  # every location (FCOS ignores none)
        onehot = F.one_hot(labels, k + 1)[..., :-1].to(logits.dtype)
        cls = (
            eapm_sigmoid_focal_loss(logits, onehot, DISTINCT_MU, reduction="sum", **DISTINCT_FOCAL)
            / norm
        )
        cls_wrong = eapm_sigmoid_focal_loss(
            logits, onehot, DISTINCT_THETA, reduction="sum", **DISTINCT_FOCAL
        )
        all_anchors = Boxes.cat(anchors).tensor
        deltas = torch.cat(pred_deltas, dim=1)
        pred_boxes = torch.stack(
            [model.box2box_transform.apply_deltas(d, all_anchors) for d in deltas]
        )
        loc = diou_loss(pred_boxes[pos], torch.stack(gt_boxes)[pos], reduction="sum") / norm
        ctr_target = model.compute_ctrness_targets(anchors, gt_boxes)
        ctr_logits = torch.cat(pred_ctr, dim=1).squeeze(2)
        ctr = (
            F.binary_cross_entropy_with_logits(ctr_logits[pos], ctr_target[pos], reduction="sum")
            / norm
        )
    assert set(out) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    close_loss(out["loss_fcos_cls"], cls)
    close_loss(out["loss_fcos_loc"], loc)
    close_loss(out["loss_fcos_ctr"], ctr)
    differs_loss(out["loss_fcos_cls"], cls_wrong / norm)


# ------------------------------------------------------------------------------- diagnostics


def test_fcos_diagnostics_equal_direct_values(monkeypatch):
    cfg = tiny_cfg(
        "quickstart/eapm_fcos.yaml",
        "MODEL.FPN.OUT_CHANNELS", 64,
        "MODEL.EAPM.CLS.MU", DISTINCT_MU,
        "MODEL.EAPM.HISTOGRAM_PERIOD", 1,
        "MODEL.EAPM.COMPILE", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = record(model, "losses")
    storage, hists = forward_with_histograms(model, make_batch(2, num_boxes=(3, 2)), monkeypatch)
    _, pred_logits, gt_labels, *_ = seen["args"]
    k = model.num_classes
    labels = torch.stack(gt_labels)
    logits = torch.cat(pred_logits, dim=1)  # every location
    onehot = F.one_hot(labels, k + 1)[..., :-1]
    check_cls_diagnostics(storage, hists, cls_diagnostics_reference(logits, onehot, DISTINCT_MU))
    assert not any(key.startswith("eapm/reg") for key in storage.latest())  # FCOS: no EAPM box


@pytest.mark.slow
def test_train_then_eval_only_through_train_net(tmp_path):
    """(f) train_net.py trains a tiny EAPM FCOS (4 iterations, which also generates the
    embedded dataset) and evaluates it with --eval-only on 16 images of the embedded val
    split, registered as a COCO-json dataset from the command line (the 200-image split
    would take a minute on 2 shared cores)."""
    out, data = tmp_path / "out", tmp_path / "data"
    common = [
        "MODEL.FCOS.NUM_CONVS", "1",
        "MODEL.FPN.OUT_CHANNELS", "64",
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(out),
        "DATASETS.EMBEDDED_ROOT", str(data),
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
        "TEST.DETECTIONS_PER_IMAGE", "5",
    ]  # fmt: skip
    cmd = [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        os.path.join(REPO, "configs/quickstart/eapm_fcos.yaml"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    run = lambda args: subprocess.run(
        cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )  # noqa: E731

    # DATASETS.TEST () skips the evaluation DefaultTrainer runs after the last iteration
    r = run(common + ["SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()"])
    assert r.returncode == 0, r.stderr[-3000:]
    weights = out / "model_final.pth"
    assert weights.is_file()

    val = json.loads((data / "annotations" / "instances_val.json").read_text())
    keep = {im["id"] for im in val["images"][:16]}
    val["images"] = [im for im in val["images"] if im["id"] in keep]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in keep]
    (tmp_path / "val16.json").write_text(json.dumps(val))
    subset = f"[['fcos_val16', '{tmp_path / 'val16.json'}', '{data / 'val'}']]"
    r = run(
        ["--eval-only"]
        + common
        + [
            "MODEL.WEIGHTS",
            str(weights),
            "DATASETS.COCO_JSON",
            subset,
            "DATASETS.TEST",
            "('fcos_val16',)",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "inference" / "fcos_val16" / "coco_instances_results.json").is_file()
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in r.stdout + r.stderr
