"""Bad input and numerics: invalid configs fail fast naming the key, broken COCO-json
datasets fail naming the file and annotation (or are handled as documented), mixed
precision, EAPM never turning a finite loss non-finite, and determinism."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time

import pytest
import torch

from tests.helpers import (
    REPO,
    dump,
    grad_norms,
    make_batch,
    make_coco,
    read_metrics,
    run_train_net,
    tail,
    tiny_cfg,
    tiny_opts,
)

QUICKSTART = os.path.join(REPO, "configs", "quickstart", "eapm_retinanet.yaml")


def _train_net_module():
    spec = importlib.util.spec_from_file_location(
        "eapm_train_net", os.path.join(REPO, "train_net.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run much faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def train_net():
    return _train_net_module()


# ---------------------------------------------------------------------------
# 1. invalid configs: rejected before training, the key named
# ---------------------------------------------------------------------------
BAD_OPTS = [
    # (overrides, the key the error must name)
    (["MODEL.EAPM.CLS.MU", "-1.0"], "MODEL.EAPM.CLS.MU"),
    (["MODEL.EAPM.CLS.MU", "1e999"], "MODEL.EAPM.CLS.MU"),  # inf
    (["MODEL.EAPM.CLS.MU", "nan"], "MODEL.EAPM.CLS.MU"),  # yacs: a string for a float key
    (["MODEL.EAPM.REG.THETA", "-0.5"], "MODEL.EAPM.REG.THETA"),
    (["MODEL.EAPM.REG.THETA", "1e999"], "MODEL.EAPM.REG.THETA"),
    (["MODEL.EAPM.HISTOGRAM_PERIOD", "-1"], "MODEL.EAPM.HISTOGRAM_PERIOD"),
    (["MODEL.BALANCED_L1.ALPHA", "0.0"], "MODEL.BALANCED_L1.ALPHA"),
    (["MODEL.BALANCED_L1.GAMMA", "-1.5"], "MODEL.BALANCED_L1.GAMMA"),
    (["MODEL.BALANCED_L1.BETA", "1e999"], "MODEL.BALANCED_L1.BETA"),
    (["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "l2"], "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"),
    (["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "balanced_L1"],
     "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "configs/quickstart/eapm_libra_rcnn.yaml"),
    (["MODEL.FCOS.BOX_LOSS_TYPE", "smooth_l1"], "MODEL.FCOS.BOX_LOSS_TYPE",
     "configs/quickstart/eapm_fcos.yaml"),
    (["MODEL.LOSS_NORMALIZER.TYPE", "sum"], "MODEL.LOSS_NORMALIZER.TYPE"),
    (["MODEL.EAPM.CLS.MUU", "1.0"], "MODEL.EAPM.CLS.MUU"),  # typo: yacs "Non-existent key"
    # EAPM regression on a loss it cannot modulate
    (["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "smooth_l1"], "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"),
    # EAPM switched on for detectron2's own RetinaNet: would silently train without EAPM
    (["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.EAPM.REG.ENABLED", "False",
      "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "smooth_l1"], "MODEL.EAPM.CLS.ENABLED"),
    (["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.EAPM.CLS.ENABLED", "False"],
     "MODEL.EAPM.REG.ENABLED"),
    (["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.EAPM.CLS.ENABLED", "False",
      "MODEL.EAPM.REG.ENABLED", "False"], "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"),
    # detectron2's ROI heads with balanced L1: would fail only at the first iteration
    (["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "balanced_l1"],
     "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "configs/quickstart/faster_rcnn.yaml"),
    # detectron2's AMPTrainer needs CUDA (this machine has none: MODEL.DEVICE is cpu)
    (["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu"], "SOLVER.AMP.ENABLED"),
]  # fmt: skip


# an entry may name its config (default QUICKSTART): a value is checked by the model reading it
BAD = [(o[0], o[1], os.path.join(REPO, o[2]) if len(o) > 2 else QUICKSTART) for o in BAD_OPTS]


@pytest.mark.parametrize(
    "opts,key,config",
    BAD,
    ids=[" ".join(o[0][:2]) + (" ..." if len(o[0]) > 2 else "") for o in BAD],
)
def test_bad_config_rejected_naming_key(train_net, opts, key, config):
    args = train_net.build_parser().parse_args(["--config-file", config, *opts])
    with pytest.raises((ValueError, KeyError, AssertionError)) as e:  # yacs asserts on unknown keys
        train_net.load_config(args)
    assert key in str(e.value)
    if isinstance(e.value, ValueError) and "Invalid config" in str(e.value):
        assert str(e.value).startswith(f"Invalid config {key}"), str(e.value)


def test_total_batch_not_divisible_by_processes(train_net):
    args = train_net.build_parser().parse_args(
        [
            "--num-gpus",
            "2",
            "--num-machines",
            "2",
            "--config-file",
            QUICKSTART,
            "SOLVER.IMS_PER_BATCH",
            "6",
        ]
    )
    with pytest.raises(
        ValueError, match=r"SOLVER.IMS_PER_BATCH = 6: .* divisible by their number \(4 = "
    ):
        train_net.load_config(args)
    args.opts += ["SOLVER.IMS_PER_BATCH", "8"]
    train_net.load_config(args)


def test_batchnorm_head_needs_two_images_per_process(train_net):
    """The quickstart head uses BN: one image per process would fail inside torch on the
    1x1 top level at iteration 0; it is rejected up front instead."""
    args = train_net.build_parser().parse_args(
        ["--num-gpus", "4", "--config-file", QUICKSTART, "SOLVER.IMS_PER_BATCH", "4"]
    )
    with pytest.raises(
        ValueError, match=r"SOLVER.IMS_PER_BATCH = 4: the head's BatchNorm needs at least 2 images"
    ):
        train_net.load_config(args)
    args.opts += ["MODEL.RETINANET.NORM", "GN"]
    train_net.load_config(args)


@pytest.mark.parametrize(
    "yaml_value,key", [(".nan", "MODEL.EAPM.REG.THETA"), (".inf", "MODEL.BALANCED_L1.BETA")]
)
def test_non_finite_values_from_yaml_rejected(train_net, tmp_path, yaml_value, key):
    """YAML can spell nan / inf as floats (yacs' type check lets them through)."""
    *parents, leaf = key.split(".")
    text = f"_BASE_: {json.dumps(QUICKSTART)}\n"
    for depth, p in enumerate(parents):
        text += "  " * depth + f"{p}:\n"
    text += "  " * len(parents) + f"{leaf}: {yaml_value}\n"
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    args = train_net.build_parser().parse_args(["--config-file", str(cfg_file)])
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*finite"):
        train_net.load_config(args)


def test_good_configs_pass(train_net):
    import glob

    files = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
    assert len(files) >= 30
    for f in files:
        args = train_net.build_parser().parse_args(["--config-file", f, "MODEL.DEVICE", "cpu"])
        cfg = train_net.load_config(args)
        assert cfg.MODEL.DEVICE == "cpu" and not cfg.is_frozen()
        # the file's own values arrive (not only the defaults)
        assert cfg.MODEL.META_ARCHITECTURE in ("EAPMRetinaNet", "EAPMFCOS", "GeneralizedRCNN"), f
    # AMP is only checked for training; --eval-only ignores it
    args = train_net.build_parser().parse_args(
        ["--config-file", QUICKSTART, "--eval-only", "SOLVER.AMP.ENABLED", "True"]
    )
    assert train_net.load_config(args).SOLVER.AMP.ENABLED is True


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher,opts,key",
    [
        ([], ["MODEL.EAPM.CLS.MU", "1e999"], "MODEL.EAPM.CLS.MU"),
        ([], ["MODEL.BALANCED_L1.BETA", "0.0"], "MODEL.BALANCED_L1.BETA"),
        ([], ["MODEL.LOSS_NORMALIZER.TYPE", "sum"], "MODEL.LOSS_NORMALIZER.TYPE"),
        # with several processes the check runs before any is spawned
        (
            ["--num-gpus", "2", "--dist-url", "auto"],
            ["MODEL.EAPM.REG.THETA", "-1.0"],
            "MODEL.EAPM.REG.THETA",
        ),
    ],
)
def test_train_net_fails_fast(tmp_path, launcher, opts, key):
    out, data = tmp_path / "out", tmp_path / "embedded"
    t0 = time.time()
    proc = run_train_net(
        *launcher,
        "--config-file",
        QUICKSTART,
        *opts,
        "OUTPUT_DIR",
        str(out),
        "DATASETS.EMBEDDED_ROOT",
        str(data),
        timeout=120,
    )
    elapsed = time.time() - t0
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: Invalid config " + key), proc.stderr[-3000:]
    assert "Process 0 terminated" not in proc.stderr  # nothing was spawned
    assert not out.exists() and not data.exists()  # before default_setup, dataset or model
    assert elapsed < 60, elapsed


# ---------------------------------------------------------------------------
# 2. broken COCO-json datasets
# ---------------------------------------------------------------------------
def _register(tmp_path, coco, tag):
    from eapm.data import register_coco_json

    name = f"robust_{tag}_{abs(hash(str(tmp_path))) % 10**8}"
    js = dump(coco, str(tmp_path / f"{tag}.json"))
    register_coco_json(name, js, str(tmp_path / "imgs"))
    return name, js


def _get(name):
    from detectron2.data import DatasetCatalog

    return DatasetCatalog.get(name)


def test_missing_image_file(tmp_path):
    coco = make_coco(str(tmp_path), "imgs", num_images=3)
    os.remove(tmp_path / "imgs" / "001.png")
    name, js = _register(tmp_path, coco, "missing")
    msg = rf"Dataset '{name}' \({re.escape(js)}\): image file not found: .*imgs/001\.png$"
    with pytest.raises(FileNotFoundError, match=msg):
        _get(name)


@pytest.mark.parametrize(
    "bbox", [[5.0, 5.0, -3.0, 10.0], [5.0, 5.0, 10.0, -0.5], [5.0, float("nan"), 10.0, 10.0]]
)
def test_box_of_negative_size_or_non_finite(tmp_path, bbox):
    coco = make_coco(str(tmp_path), "imgs", num_images=2)
    coco["annotations"][1]["bbox"] = bbox
    ann_id = coco["annotations"][1]["id"]
    fname = [
        im["file_name"] for im in coco["images"] if im["id"] == coco["annotations"][1]["image_id"]
    ][0]
    name, js = _register(tmp_path, coco, "negbox")
    with pytest.raises(
        ValueError,
        match=rf"\({re.escape(js)}\): annotation {ann_id} of .*{fname} has an invalid box",
    ):
        _get(name)


def test_unknown_category_id(tmp_path):
    coco = make_coco(str(tmp_path), "imgs", num_images=2, cat_ids=(1, 2))
    coco["annotations"][2]["category_id"] = 7
    ann = coco["annotations"][2]
    name, js = _register(tmp_path, coco, "unknowncat")
    with pytest.raises(
        ValueError,
        match=rf"\({re.escape(js)}\): annotation {ann['id']} "
        rf"of image 00{ann['image_id'] - 1}\.png has "
        r"category_id 7, which is not among the file's 'categories' \(ids \[1, 2\]\)",
    ):
        _get(name)


def test_no_categories_or_invalid_json(tmp_path):
    from eapm.data import register_coco_json

    coco = make_coco(str(tmp_path), "imgs", num_images=1)
    coco["categories"] = []
    with pytest.raises(ValueError, match="has no 'categories'"):
        _register(tmp_path, coco, "nocats")
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        register_coco_json(
            "robust_broken_json", str(tmp_path / "broken.json"), str(tmp_path / "imgs")
        )


def test_category_ids_from_zero_are_mapped_to_contiguous_ids(tmp_path):
    """Category ids {0, 3}: detectron2's load_coco_json maps them to the contiguous
    training ids {0, 1} and records the map in the metadata (used by the evaluator to
    write results with the file's ids)."""
    from detectron2.data import MetadataCatalog

    coco = make_coco(str(tmp_path), "imgs", num_images=4, cat_ids=(0, 3), boxes_per_image=(3,))
    name, _ = _register(tmp_path, coco, "fromzero")
    dicts = _get(name)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["class0", "class3"]
    assert meta.thing_dataset_id_to_contiguous_id == {0: 0, 3: 1}
    by_id = {a["id"]: a["category_id"] for a in coco["annotations"]}
    got = {a["id"]: a["category_id"] for d in dicts for a in d["annotations"]}
    assert got == {k: {0: 0, 3: 1}[v] for k, v in by_id.items()} and set(got.values()) == {0, 1}


@pytest.mark.slow
def test_train_and_evaluate_ids_from_zero_and_images_without_annotations(tmp_path):
    """train_net.py on a dataset with category ids {0, 3} where most images have no
    annotation (FILTER_EMPTY_ANNOTATIONS False): trains with finite losses and writes
    results with the file's category ids."""
    root = str(tmp_path)
    train = make_coco(
        root, "train", num_images=6, seed=3, cat_ids=(0, 3), boxes_per_image=(2, 0, 0)
    )
    val = make_coco(root, "val", num_images=2, seed=4, cat_ids=(0, 3), boxes_per_image=(2,))
    reg = [
        "--register-coco",
        "z_train",
        dump(train, f"{root}/train.json"),
        f"{root}/train",
        "--register-coco",
        "z_val",
        dump(val, f"{root}/val.json"),
        f"{root}/val",
    ]
    out = tmp_path / "out"
    opts = tiny_opts(
        str(out),
        4,
        str(tmp_path / "no_embedded"),
        **{
            "DATASETS.TRAIN": "('z_train',)",
            "DATASETS.TEST": "('z_val',)",
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS": "False",
            "MODEL.RETINANET.SCORE_THRESH_TEST": "0.0",
        },
    )
    proc = run_train_net("--config-file", QUICKSTART, *reg, *opts, timeout=240)
    assert proc.returncode == 0, tail(proc)
    assert "Removed" not in (out / "log.txt").read_text()  # no image was filtered out
    losses = [m["total_loss"] for m in read_metrics(str(out)) if "total_loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)
    preds = json.loads((out / "inference" / "z_val" / "coco_instances_results.json").read_text())
    assert preds and {p["category_id"] for p in preds} <= {0, 3}


# ---------------------------------------------------------------------------
# 3. mixed precision
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eapm_losses_compute_in_float32_for_half_inputs(dtype):
    from eapm.losses import eapm_balanced_l1_loss, eapm_sigmoid_focal_loss

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 4, generator=g) * 5).to(dtype).requires_grad_()
    t = (torch.rand(256, 4, generator=g) < 0.3).to(dtype)
    gt = torch.randn(256, 4, generator=g).to(dtype)
    for fn, args in ((eapm_sigmoid_focal_loss, (t, 1.5)), (eapm_balanced_l1_loss, (gt, 1.0))):
        for ctx in (
            torch.autocast("cpu", dtype=torch.bfloat16),
            torch.autocast("cpu", enabled=False),
        ):
            with ctx:
                loss = fn(x, *args, reduction="sum")
            ref = fn(
                x.detach().float().requires_grad_(),
                *(a.float() if torch.is_tensor(a) else a for a in args),
                reduction="sum",
            )
            assert loss.dtype == torch.float32
            torch.testing.assert_close(
                loss, ref.detach(), rtol=1e-6, atol=0
            )  # float32 math on the same values
            (gx,) = torch.autograd.grad(loss, x)
            assert gx.dtype == dtype and torch.isfinite(gx.float()).all() and gx.abs().sum() > 0


def test_eapm_retinanet_under_bf16_autocast(one_thread):
    """Forward + backward of EAPMRetinaNet (EAPM focal + EAPM balanced L1) under CPU
    bf16 autocast: the head's outputs are bf16, the losses float32 and finite, every
    parameter's gradient finite, non-zero in head and backbone, the losses close to float32's.

    The images are 128 px, not 64: at 64 px P7's conv (3x3, stride 2, padding 1) gets a
    1x1 input, and for a bf16 convolution whose input is 1 px wide with stride 2 the
    backward-weights kernel of oneDNN 3.3.6 (torch 2.3.1, AVX-512 CPUs: ``jit_bf16:
    avx512_core_bf16``) leaves the padding columns' weight gradients uninitialised: P7's
    gradient then held whatever memory oneDNN read (non-finite in some runs, whatever the
    test order or seed). At 128 px every stride-2 convolution sees at least 2 px."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)  # the initial weights; the batch has its own generator
    # the all-reduced normaliser (= this batch's positive count on one process) is stateless,
    # unlike the EMA: both forward passes are divided by the same number
    model = build_model(
        tiny_cfg("quickstart/eapm_retinanet.yaml", "MODEL.LOSS_NORMALIZER.TYPE", "all_reduce")
    )
    batch = make_batch(2, size=128, num_boxes=(3, 1))
    dtypes = []
    model.head.register_forward_hook(lambda m, i, o: dtypes.append(o[0][0].dtype))
    with EventStorage(0):
        ref = {k: float(v) for k, v in model(batch).items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(batch)
    assert dtypes == [torch.float32, torch.bfloat16]
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    for k, v in losses.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
        assert float(v) == pytest.approx(ref[k], rel=0.25), k
    sum(losses.values()).backward()
    norms = grad_norms(
        model, ["head.cls_score", "head.bbox_pred", "head.cls_subnet", "backbone.bottom_up"]
    )
    for k, n in norms.items():
        assert math.isfinite(n) and n > 0, (k, n)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == sum(1 for p in model.parameters() if p.requires_grad)
    assert [n for n, g in grads.items() if not torch.isfinite(g).all()] == []


# ---------------------------------------------------------------------------
# 4. EAPM never turns a finite base loss into NaN / Inf (fp16 / bf16 inputs)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_eapm_finite_for_extreme_half_inputs(dtype):
    """Extends test_losses' float32 property test to half inputs: logits up to +-1e4
    (and +-max of the dtype's safe range), exact 0/1 targets, deltas where the prediction,
    the target or both are 0 (GoS 1 or 0/0), huge deltas."""
    from eapm.losses import (
        balanced_l1_loss,
        eapm_balanced_l1_loss,
        eapm_sigmoid_focal_loss,
        sigmoid_focal_loss,
    )

    g = torch.Generator().manual_seed(7)
    for scale in (1e-3, 1.0, 30.0, 1e4):
        x = torch.randn(3000, generator=g) * scale
        x[:4] = torch.tensor([scale, -scale, 0.0, -0.0])
        x = x.to(dtype).requires_grad_()
        t = (torch.rand(3000, generator=g) < 0.5).to(dtype)
        base = sigmoid_focal_loss(x, t)
        assert torch.isfinite(base).all()
        for mu in (0.1, 1.5, 20.0):
            loss = eapm_sigmoid_focal_loss(x, t, mu)
            (gr,) = torch.autograd.grad(loss.sum(), x)
            assert torch.isfinite(loss).all() and torch.isfinite(gr.float()).all(), (
                dtype,
                scale,
                mu,
            )
        p = torch.randn(999, 4, generator=g) * scale
        q = torch.randn(999, 4, generator=g) * scale
        p[0::3] = 0.0  # prediction 0
        q[1::3] = 0.0  # target 0
        p[2::9], q[2::9] = 0.0, 0.0  # both 0 (GoS 0/0)
        p = p.to(dtype).requires_grad_()
        q = q.to(dtype)
        assert torch.isfinite(balanced_l1_loss(p, q, beta=0.11)).all()
        for theta in (0.5, 1.0, 20.0):
            loss = eapm_balanced_l1_loss(p, q, theta, beta=0.11)
            (gr,) = torch.autograd.grad(loss.sum(), p)
            assert torch.isfinite(loss).all() and torch.isfinite(gr.float()).all(), (
                dtype,
                scale,
                theta,
            )


# ---------------------------------------------------------------------------
# 5. determinism
# ---------------------------------------------------------------------------
def test_same_seed_same_first_losses(one_thread):
    """Two model builds with the same seed (detectron2's seed_all_rng) give bit-identical
    losses and gradients on the same batch; another seed gives other losses."""
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    cfg = tiny_cfg("quickstart/eapm_retinanet.yaml")
    batch = make_batch(2, num_boxes=(3, 1))

    def run(seed):
        seed_all_rng(seed)
        model = build_model(cfg)
        with EventStorage(0):
            losses = model(batch)
        sum(losses.values()).backward()
        return {k: v.item() for k, v in losses.items()}, [
            p.grad.clone() for p in model.parameters() if p.grad is not None
        ]

    (a, ga), (b, gb), (c, _) = run(1), run(1), run(2)
    assert a == b
    assert len(ga) == len(gb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert a != c


def test_trainer_is_deterministic(tmp_path, one_thread):
    """The whole training step (data order, augmentation, initialisation, losses) of
    EAPMTrainer repeats exactly with the same SEED: the first iterations' losses."""
    from detectron2.utils.env import seed_all_rng

    from eapm.engine import EAPMTrainer

    root = str(tmp_path)
    js = dump(
        make_coco(root, "train", num_images=8, seed=5, boxes_per_image=(2, 1, 0)),
        f"{root}/train.json",
    )

    def run(seed, tag):
        cfg = tiny_cfg("quickstart/eapm_retinanet.yaml")
        cfg.merge_from_list(
            tiny_opts(
                f"{root}/out_{tag}",
                3,
                f"{root}/no_embedded",
                **{"DATASETS.TRAIN": "('det_train',)", "DATASETS.TEST": "()", "SEED": str(seed)},
            )
        )
        cfg.DATASETS.COCO_JSON = [["det_train", js, f"{root}/train"]]
        seed_all_rng(cfg.SEED)  # what default_setup does in train_net.py
        trainer = EAPMTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        return [v for v, _ in trainer.storage.history("total_loss").values()]

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    assert len(a) == 3 and a == b
    assert a != c
