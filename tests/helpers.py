"""The helpers the tests share (``from tests.helpers import ...``); fixtures are in
``tests/conftest.py``:

* the tiny configs, synthetic batches and gradient norms of ``eapm.utils.testing`` (the
  tools use those too; the tools never import the tests), re-exported;
* ``REPO`` / ``CONFIGS``: the repository root and its configs folder; ``load_tool``: a
  script of ``tools/`` imported as a module;
* tiny COCO-json datasets written to a temporary folder, and train_net.py run as a
  subprocess on them with a tiny model, so that a run (model build, a few iterations,
  COCO evaluation) takes seconds on two CPU cores; run folders as the tools read them;
* the detectors' references: the loss methods' arguments recorded, float64 formulas of the
  EAPM losses written from the definitions, the diagnostics' values, EAPM regression with an
  IoU loss by hand (``eapm_iou_reference``), GHM's rule in float64 loops (``RefGHM``);
* the R-CNN configs and batches, their twins and training steps;
* files that attack the checkpoint readers; the quickstart's initial weights; the export
  tolerances."""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from eapm.model_zoo import REPO_ROOT as REPO  # the one owner
from eapm.utils.testing import grad_norms, make_batch, tiny_cfg  # noqa: F401  (re-exported)

CONFIGS = os.path.join(REPO, "configs")
TOOLS = os.path.join(REPO, "tools")


def load_tool(name: str):
    """``tools/<name>.py`` executed as the module ``eapm_tool_<name>`` (a fresh one per call)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"eapm_tool_{name}", os.path.join(TOOLS, f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def rel_err(a, b) -> float:
    """|a - b| / |b| of two numbers (tensors of one element, floats or mpmath numbers)."""
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


SIZE = 64


def make_coco(
    root: str,
    name: str,
    num_images: int = 4,
    seed: int = 0,
    cat_ids: Sequence[int] = (1, 2),
    boxes_per_image: Sequence[int] = (2, 1),
    write: bool = True,
) -> Dict:
    """Write ``num_images`` 64x64 PNGs (filled rectangles on noise) under ``root/name/``
    and return the COCO dict of their boxes (not yet written: see ``dump``)."""
    import cv2

    rng = np.random.default_rng(seed)
    img_dir = os.path.join(root, name)
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        img = rng.integers(0, 60, size=(SIZE, SIZE, 3)).astype(np.uint8)
        n = boxes_per_image[i % len(boxes_per_image)]
        for _ in range(n):
            w, h = (int(v) for v in rng.integers(10, 40, size=2))
            x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
            k = int(rng.integers(0, len(cat_ids)))
            color = (255, 80 + 100 * k, 40) if k % 2 == 0 else (40, 200, 255)
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), color, -1)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(cat_ids[k]),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
        fname = f"{i:03d}.png"
        if write:
            cv2.imwrite(os.path.join(img_dir, fname), img)
        images.append({"id": i + 1, "file_name": fname, "width": SIZE, "height": SIZE})
    cats = [{"id": int(c), "name": f"class{c}"} for c in cat_ids]
    return {"images": images, "annotations": anns, "categories": cats}


def dump(coco: Dict, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(coco, f)
    return path


def dataset_in(tmp_path, num_images=3, **kw):
    """(a ``make_coco`` dataset of ``num_images`` images in ``tmp_path``/imgs, that folder)."""
    coco = make_coco(str(tmp_path), "imgs", num_images=num_images, **kw)
    return coco, str(tmp_path / "imgs")


def truncate_file(path: str, keep: float = 0.5) -> None:
    """Cuts the file ``path`` to the fraction ``keep`` of its bytes."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def dataset_cfg(entries, train=(), test=(), embedded=""):
    """The project's config with the COCO-json datasets ``entries`` ([name, json, image root])
    and the ``train`` / ``test`` datasets of a run."""
    from detectron2.config import get_cfg

    from eapm.config import add_eapm_config

    cfg = get_cfg()
    add_eapm_config(cfg)
    cfg.DATASETS.COCO_JSON = [list(e) for e in entries]
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    cfg.DATASETS.EMBEDDED_ROOT = embedded
    return cfg


def tiny_datasets(root: str) -> List[str]:
    """A train (8 images, one without boxes) and a val (4 images) split under ``root``;
    returns the ``--register-coco`` arguments of both (names tiny_train / tiny_val)."""
    args = []
    for split, n, seed, per_image in (("train", 8, 0, (2, 1, 3, 0)), ("val", 4, 1, (2, 1))):
        js = dump(
            make_coco(root, split, n, seed, boxes_per_image=per_image),
            os.path.join(root, f"{split}.json"),
        )
        args += ["--register-coco", f"tiny_{split}", js, os.path.join(root, split)]
    return args


def tiny_opts(out_dir: str, max_iter: int, embedded_root: str, **extra) -> List[str]:
    """Command-line overrides: tiny model (32-channel FPN, 1 head conv), 64 px images,
    2 images per batch, the tiny datasets, no data-loader workers."""
    opts = {
        "DATASETS.TRAIN": "('tiny_train',)",
        "DATASETS.TEST": "('tiny_val',)",
        # never touched: fails the test if anything generates the embedded dataset
        "DATASETS.EMBEDDED_ROOT": embedded_root,
        "MODEL.RETINANET.NUM_CLASSES": "2",
        "MODEL.RETINANET.NUM_CONVS": "1",
        # one image per process in the multi-process tests: no BatchNorm in the head
        "MODEL.RETINANET.NORM": "",
        "MODEL.FPN.OUT_CHANNELS": "32",
        "INPUT.MIN_SIZE_TRAIN": "(64,)",
        "INPUT.MAX_SIZE_TRAIN": "64",
        "INPUT.MIN_SIZE_TEST": "64",
        "INPUT.MAX_SIZE_TEST": "64",
        "SOLVER.IMS_PER_BATCH": "2",
        "SOLVER.MAX_ITER": str(max_iter),
        "SOLVER.WARMUP_ITERS": "2",
        "SOLVER.STEPS": "()",
        "SOLVER.CHECKPOINT_PERIOD": str(max_iter + 1),
        "DATALOADER.NUM_WORKERS": "0",
        "TEST.DETECTIONS_PER_IMAGE": "10",
        "OUTPUT_DIR": out_dir,
    }
    opts.update({k: str(v) for k, v in extra.items()})
    flat = []
    for k, v in opts.items():
        if v is not None:
            flat += [k, v]
    return flat


def env(threads: int = 1) -> Dict[str, str]:
    # one thread per process: on a shared 2-core machine, OpenMP's spinning threads make a
    # tiny model 10x slower under load (measured: 0.12 s/it with 1 thread, 1.9 s/it with 2)
    return dict(
        os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1"
    )


def train_net_cmd(*args) -> List[str]:
    return [sys.executable, os.path.join(REPO, "train_net.py"), *args]


def run_train_net(*args, timeout: float = 240, threads: int = 1) -> subprocess.CompletedProcess:
    """train_net.py in its own process group: on a timeout the group is killed, also the
    processes launch() spawned."""
    proc = subprocess.Popen(
        train_net_cmd(*args),
        cwd=REPO,
        env=env(threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (started with start_new_session=True)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(out_dir: str) -> List[Dict]:
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tail(proc) -> str:
    return (proc.stdout or "")[-3000:] + "\n----- stderr -----\n" + (proc.stderr or "")[-4000:]


def record(obj, method: str) -> dict:
    """Wraps ``obj.method`` (an instance attribute shadowing the method) so that the
    arguments of its last call are in the returned dict under "args"."""
    seen = {}
    original = getattr(obj, method)

    def wrapper(*args):
        seen["args"] = args
        return original(*args)

    setattr(obj, method, wrapper)
    return seen


def eapm_iou_reference(t, t_star, theta, boxes, gt, box2box_transform, loss_type):
    """EAPM regression with detectron2's ``loss_type`` IoU loss, by hand, on (P, 4) predicted
    deltas ``t``, targets ``t_star``, anchor / proposal ``boxes`` and ``gt`` boxes: dw, dh
    modulated, ``t' = t* + MF (t - t*)``, ``MF = 1 + tanh(theta) - tanh(theta GoS)``, decoded,
    summed IoU loss. Returns a dict: "loss" (at t'), "grad" (its gradient w.r.t. t'),
    "plain" (the IoU loss at t), "gos" and "mf" ((P, 4); only columns 2, 3 are used)."""
    import math

    import torch
    from detectron2.layers import ciou_loss, diou_loss
    from fvcore.nn import giou_loss

    t = t.detach()
    gos = (t - t_star).abs() / (t.abs() + t_star.abs())
    mf = 1 + math.tanh(theta) - torch.tanh(theta * gos)
    t_mod = t.clone()
    t_mod[:, 2:] = t_star[:, 2:] + mf[:, 2:] * (t - t_star)[:, 2:]
    leaf = t_mod.clone().requires_grad_()
    fn = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}[loss_type]
    loss = fn(box2box_transform.apply_deltas(leaf, boxes), gt, reduction="sum")
    loss.backward()
    plain = fn(box2box_transform.apply_deltas(t, boxes), gt, reduction="sum")
    return {"loss": loss.detach(), "grad": leaf.grad, "plain": plain, "gos": gos, "mf": mf}


# ---------------------------------------------------------------------------- export
# onnxruntime against the eager model (tests/test_export.py's docstring has the measurements)
ONNX_BOX_ATOL = 1e-2  # pixels
ONNX_SCORE_ATOL = 2e-4


def require_module(module: str):
    """The module; a skip where it is not installed, a failure under CI=true (the CI
    environment has it: a skip there would hide that exports no longer run)."""
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is not installed (CI=true): {e}")
        pytest.skip(f"{module} is not installed")


# ---------------------------------------------------------------------------- predictor
QUICKSTART_YAML = "quickstart/eapm_retinanet.yaml"  # by its eapm.model_zoo name
QUICKSTART_LAZY = os.path.join(CONFIGS, "quickstart", "eapm_retinanet.py")  # by its path


def save_initial_weights(config: str, path: str) -> str:
    """The weights of the randomly initialised model of ``config``, saved by EAPMCheckpointer
    as ``path``.pth; returns that file."""
    from eapm.checkpoint import EAPMCheckpointer
    from eapm.model_zoo import build_model, get_config

    model = build_model(get_config(config), "cpu")
    folder, name = os.path.split(path)
    EAPMCheckpointer(model, save_dir=folder).save(name)
    return path + ".pth"


def weights_opts(kind: str, path: str):
    """The overrides that load the weights file ``path`` (kind "yaml" or "lazy")."""
    return ["MODEL.WEIGHTS", path] if kind == "yaml" else [f"train.init_checkpoint={path}"]


# ---------------------------------------------------------------------------- runs on disk
def copypaste_log(blocks) -> str:
    """A detectron2 log.txt holding one "copypaste" bbox evaluation per (dataset, [AP, AP50,
    AP75, APs, APm, APl]) of ``blocks``, in order."""
    lines = ["[11/29 05:43:03 detectron2]: Rank of current process: 0. World size: 1"]
    for ds, vals in blocks:
        lines += [
            f"[11/29 05:45:06 d2.engine.defaults]: Evaluation results for {ds} in csv format:",
            "[11/29 05:45:06 d2.evaluation.testing]: copypaste: Task: bbox",
            "[11/29 05:45:06 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl",
            "[11/29 05:45:06 d2.evaluation.testing]: copypaste: "
            + ",".join(f"{v:.4f}" for v in vals),
        ]
    return "\n".join(lines) + "\n"


def config_yaml(output_dir, test=("coco_2017_val",)) -> str:
    """The part of a run's config.yaml that tools/collect_results.py reads."""
    return (
        "DATASETS:\n  TEST:\n"
        + "".join(f"  - {t}\n" for t in test)
        + f"OUTPUT_DIR: {output_dir}\nSEED: 1\n"
    )


# the EAPM diagnostics of a RetinaNet with EAPM focal loss and EAPM balanced L1
EAPM_TAGS = (
    "eapm/cls_dif_pos",
    "eapm/cls_dif_neg",
    "eapm/cls_mf_pos",
    "eapm/cls_mf_neg",
    "eapm/reg_gos",
    "eapm/reg_mf",
)


def event_tags(folder):
    """{(tag, plugin)} of every summary in the folder's TensorBoard event files."""
    import glob

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = set()
    for f in glob.glob(os.path.join(str(folder), "events.out.tfevents.*")):
        for ev in EventFileLoader(f).Load():
            for v in ev.summary.value:
                tags.add((v.tag, v.metadata.plugin_data.plugin_name))
    return tags


# ---------------------------------------------------------------------------- detectors
# Distinct strengths and loss parameters: a swapped, ignored or hard-coded value misses the
# expected losses (tests of the detectors' losses against eapm.losses and float64 formulas).
DISTINCT_MU, DISTINCT_THETA = 1.3, 0.7
DISTINCT_FOCAL = dict(alpha=0.3, gamma=1.7)
DISTINCT_BL1 = dict(alpha=0.4, gamma=1.8, beta=0.6)
DISTINCT_STRENGTHS = ("MODEL.EAPM.CLS.MU", DISTINCT_MU, "MODEL.EAPM.REG.THETA", DISTINCT_THETA)
DISTINCT_BL1_OPTS = ("MODEL.BALANCED_L1.ALPHA", 0.4, "MODEL.BALANCED_L1.GAMMA", 1.8,
                     "MODEL.BALANCED_L1.BETA", 0.6)  # fmt: skip
# the two-stage model of the float64 tests: different RPN and ROI strengths, so that a model
# that read one for the other misses the closed form
RPN_MU, CLS_MU = 0.7, 2.0


def train_forward(model, batch):
    """One training forward at seed 0 inside an EventStorage: the loss dict."""
    from detectron2.utils.events import EventStorage

    model.train()
    torch.manual_seed(0)
    with EventStorage(0):
        return model(batch)


def swap_class(model, cls):
    """A copy of ``model`` whose class is the subclass ``cls`` (same weights and state)."""
    import copy

    twin = copy.deepcopy(model)
    twin.__class__ = cls
    return twin


def build_and_train_step(cfg, batch):
    """The model of ``cfg`` built at seed 0, one training forward and backward on ``batch``
    (finite losses asserted): (model, losses). Call it inside an EventStorage."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    return model, losses


def ema_first_update(initial: float, num_pos: int) -> float:
    """detectron2's ``DenseDetector._ema_update`` (momentum 0.9) at its first call."""
    return initial * 0.9 + 0.1 * max(num_pos, 1)


def spread_box_predictions(layer: torch.nn.Module, seed: int = 0) -> None:
    """Box deltas of order 0.1-1 from a box regressor ``layer`` (a Linear or Conv2d with a
    bias). detectron2 initialises it with std 0.001 or 0.01: deltas ~ 0 give GoS ~ 1 and
    MF ~ 1 for every theta, which would hide the strength."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.5)


# what the detectors' losses are compared with: eapm.losses (LOSS_TOL) or float64 formulas
# written from the definitions (F64_TOL: float32 kernels against float64, relative 1e-5; the
# gradients per element are ~1e-7, a loss divided by ~100 positives, hence an absolute floor far
# below them)
LOSS_TOL = dict(rtol=2e-5, atol=1e-7)
F64_TOL = dict(rtol=1e-5, atol=1e-12)


def close_loss(actual, expected):
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), **LOSS_TOL)


def differs_loss(actual, wrong):
    """``wrong`` misses ``actual`` by more than 10x the tolerance of ``close_loss``."""
    a, w = float(actual), float(wrong)
    assert abs(a - w) > 10 * (LOSS_TOL["atol"] + LOSS_TOL["rtol"] * abs(w)), (a, w)


def close_f64(actual, expected):
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), **F64_TOL)


def misses_f64(actual, wrong):
    """``wrong`` is far outside the tolerance of ``close_f64`` (the test can fail)."""
    a, w = float(actual), float(wrong)
    assert abs(a - w) > 100 * (F64_TOL["atol"] + F64_TOL["rtol"] * abs(w)), (a, w)


def tanh_mf(attribute: torch.Tensor, strength: float) -> torch.Tensor:
    return 1 + math.tanh(strength) - torch.tanh(strength * attribute)


def modulated_logit(x: torch.Tensor, t: torch.Tensor, mu: float) -> torch.Tensor:
    """x' = logit(p'), p' = t + MF (p - t), Dif = |p - t| (float64 ``x``, ``t`` in {0, 1})."""
    p = torch.sigmoid(x)
    pm = t + tanh_mf((p - t).abs(), mu) * (p - t)
    return torch.log(pm) - torch.log1p(-pm)


def focal_of_logit(z: torch.Tensor, t: torch.Tensor, alpha: float, gamma: float):
    """Lin et al.'s focal loss per element as a function of the logit ``z``: -alpha_t (1 -
    p_t)^gamma log p_t (alpha < 0: no alpha_t)."""
    p = torch.sigmoid(z)
    p_t = torch.where(t > 0.5, p, 1 - p)
    a_t = 1.0 if alpha < 0 else alpha * t + (1 - alpha) * (1 - t)  # t in {0, 1}
    return -a_t * (1 - p_t) ** gamma * torch.log(p_t)


def eapm_focal_sum(x: torch.Tensor, t: torch.Tensor, mu: float, alpha: float, gamma: float):
    """(summed EAPM focal loss, its gradient w.r.t. x) in float64: the focal loss at the
    modulated logit and its derivative there."""
    xm = modulated_logit(x.double(), t.double(), mu).requires_grad_()
    value = focal_of_logit(xm, t.double(), alpha, gamma).sum()
    (grad,) = torch.autograd.grad(value, xm)
    return value.detach(), grad


def balanced_l1_of_error(d: torch.Tensor, alpha: float, gamma: float, beta: float):
    """mmdetection's balanced L1 of the error ``d`` (b = e^(gamma / alpha) - 1): alpha / b (b
    |d| + 1) ln(b |d| / beta + 1) - alpha |d| below beta, gamma |d| + gamma / b - alpha beta
    above."""
    b = math.exp(gamma / alpha) - 1
    a = d.abs()
    inlier = alpha / b * (b * a + 1) * torch.log(b * a / beta + 1) - alpha * a
    return torch.where(a < beta, inlier, gamma * a + gamma / b - alpha * beta)


def eapm_bl1_sum(t: torch.Tensor, t_star: torch.Tensor, theta: float, **bl1):
    """(summed EAPM balanced L1, its gradient w.r.t. t) of (P, 4) deltas in float64: dw, dh
    at t* + MF (t - t*), MF from GoS; dx, dy as predicted."""
    t, t_star = t.double(), t_star.double()
    gos = (t - t_star).abs() / (t.abs() + t_star.abs())
    mf = tanh_mf(gos, theta)
    mf[:, :2] = 1.0
    tm = (t_star + mf * (t - t_star)).requires_grad_()
    value = balanced_l1_of_error(tm - t_star, **bl1).sum()
    (grad,) = torch.autograd.grad(value, tm)
    return value.detach(), grad


def eapm_ce_mean(scores: torch.Tensor, labels: torch.Tensor, mu: float):
    """(mean EAPM softmax cross entropy, its gradient w.r.t. the scores) in float64: per row
    Dif = 1 - p_y, p' = Y + MF (p - Y), the cross entropy -log softmax(x')_y at the logits
    x' = log p' (softmax(x') = p'), its gradient there; the mean over the rows."""
    import torch.nn.functional as F

    x = scores.double()
    p = torch.softmax(x, dim=1)
    y = F.one_hot(labels, x.shape[1]).double()
    dif = 1 - (p * y).sum(1)
    pm = y + tanh_mf(dif, mu)[:, None] * (p - y)
    xm = torch.log(pm).requires_grad_()
    value = -(torch.log_softmax(xm, dim=1) * y).sum(1).mean()
    (grad,) = torch.autograd.grad(value, xm)
    return value.detach(), grad


# ---------------------------------------------------------------------------- diagnostics
def forward_with_histograms(model, batch, monkeypatch):
    """One training forward at seed 0 inside an EventStorage (``train_step`` without its
    backward); returns (storage, {histogram tag: the values put})."""
    hists = {}
    _, storage = train_step(model, batch, hists, monkeypatch, backward=False)
    return storage, hists


def latest_scalar(storage, key: str) -> float:
    return storage.history(key).latest()


def cls_diagnostics_reference(logits, onehot, mu):
    """{name: values} of Dif and MF of the positive and the negative elements (float64)."""
    x, t = logits.detach().double(), onehot.double()
    dif = (torch.sigmoid(x) - t).abs()
    mf = 1 + math.tanh(mu) - torch.tanh(mu * dif)
    pos = t > 0.5
    return {
        "dif_pos": dif[pos],
        "dif_neg": dif[~pos],
        "mf_pos": mf[pos],
        "mf_neg": mf[~pos],
    }


def reg_diagnostics_reference(pred, target, theta):
    """(GoS, MF) of the dw, dh components (float64)."""
    t, g = pred.detach().double()[:, 2:], target.double()[:, 2:]
    num, den = (t - g).abs(), t.abs() + g.abs()
    gos = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return gos, 1 + math.tanh(theta) - torch.tanh(theta * gos)


def assert_same_values(logged, expected):
    """The histogram got exactly these values (in any order), to float32 precision."""
    assert logged.numel() == expected.numel()
    torch.testing.assert_close(
        logged.double().flatten().sort().values,
        expected.flatten().sort().values,
        rtol=1e-5,
        atol=1e-6,
    )


def check_cls_diagnostics(storage, hists, reference):
    for name, values in reference.items():
        assert values.numel() > 0, name
        key = f"eapm/cls_{name}"
        assert math.isclose(latest_scalar(storage, key), float(values.mean()), rel_tol=1e-5), key
        assert_same_values(hists[key], values)


def check_reg_diagnostics(storage, hists, gos, mf):
    assert gos.numel() > 0
    for key, values in (("eapm/reg_gos", gos), ("eapm/reg_mf", mf)):
        assert math.isclose(latest_scalar(storage, key), float(values.mean()), rel_tol=1e-5), key
        assert_same_values(hists[key], values)
    assert 0.05 < float(gos.mean()) < 0.95  # a spread of attributes, not GoS ~ 1 everywhere


# ---------------------------------------------------------------------------- R-CNN
RCNN_MU = 1.5  # the mu of the R-CNN EAPM configs
MASK_EAPM = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml"


# the R-CNN EAPM configs -> (their baseline twin, EAPM ROI heads class, detectron2's class)
RCNN_TWINS = {
    "COCO-Detection/faster_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml": (
        "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
        "EAPMROIHeads",
        "StandardROIHeads",
    ),
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml": (
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
        "EAPMROIHeads",
        "StandardROIHeads",
    ),
    "COCO-Detection/cascade_rcnn_R_50_FPN_1x_eapm_mu1.5.yaml": (
        "COCO-Detection/cascade_rcnn_R_50_FPN_1x.yaml",
        "EAPMCascadeROIHeads",
        "CascadeROIHeads",
    ),
    "quickstart/faster_rcnn_eapm_mu1.5.yaml": (
        "quickstart/faster_rcnn.yaml",
        "EAPMROIHeads",
        "StandardROIHeads",
    ),
    "quickstart/cascade_rcnn_eapm_mu1.5.yaml": (
        "quickstart/cascade_rcnn.yaml",
        "EAPMCascadeROIHeads",
        "CascadeROIHeads",
    ),
}


RPN_OPTS = ("MODEL.PROPOSAL_GENERATOR.NAME", "EAPMRPN", "MODEL.EAPM.RPN.ENABLED", True)


def with_masks(batch):
    """Adds ``gt_masks`` (BitMasks: each box filled) to every image of a make_batch batch."""
    from detectron2.structures import BitMasks

    for d in batch:
        inst = d["instances"]
        h, w = inst.image_size
        masks = torch.zeros(len(inst), h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(inst.gt_boxes.tensor.round().long().tolist()):
            masks[i, y0 : y1 + 1, x0 : x1 + 1] = True
        inst.gt_masks = BitMasks(masks)
    return batch


def rcnn_batch(cfg, num_boxes=(3, 1), seed=1):
    """Two 64-px images with boxes of 4 classes (and their masks for Mask R-CNN)."""
    batch = make_batch(2, size=64, num_boxes=num_boxes, num_classes=4, seed=seed)
    return with_masks(batch) if cfg.MODEL.MASK_ON else batch


def rcnn_cfg(path, *opts):
    """The tiny config of an R-CNN config file, with 4 classes."""
    return tiny_cfg(path, "MODEL.ROI_HEADS.NUM_CLASSES", 4, *opts)


def box_predictors(model):
    p = model.roi_heads.box_predictor
    return list(p) if isinstance(p, torch.nn.ModuleList) else [p]


def record_box_cls(model) -> list:
    """Wraps every box predictor's ``losses``: the returned list gets, per call, the (scores,
    labels) the predictor's classification loss sees."""
    from detectron2.layers import cat

    seen = []
    for p in box_predictors(model):
        original = p.losses

        def losses(predictions, proposals, _original=original):
            labels = cat([q.gt_classes for q in proposals], dim=0)
            seen.append((predictions[0].detach().clone(), labels.clone()))
            return _original(predictions, proposals)

        p.losses = losses
    return seen


def record_rpn(model) -> dict:
    """Wraps the RPN's ``losses``: the returned dict gets the objectness logits and the
    sampled anchor labels of its last call."""
    seen = {}
    rpn = model.proposal_generator
    original = rpn.losses

    def losses(anchors, logits, gt_labels, deltas, gt_boxes):
        seen["logits"] = [x.detach().clone() for x in logits]
        seen["labels"] = [x.clone() for x in gt_labels]
        return original(anchors, logits, gt_labels, deltas, gt_boxes)

    rpn.losses = losses
    return seen


def train_step(model, batch, hists=None, monkeypatch=None, backward=True):
    """One training forward (+ backward) at seed 0 inside an EventStorage; returns
    (losses, storage). With ``monkeypatch``: the histograms put go to ``hists``."""
    from detectron2.utils.events import EventStorage

    if monkeypatch is not None:

        def put_histogram(self, tag, values, bins=1000):
            hists[tag] = values.detach().clone()

        monkeypatch.setattr(EventStorage, "put_histogram", put_histogram)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with EventStorage(0) as storage:
        losses = model(batch)
    if backward:
        sum(losses.values()).backward()
    return losses, storage


def build_pair(eapm_path, base_path, *opts):
    """(detectron2's model, the EAPM model), both built at seed 0 from tiny configs."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    base = build_model(rcnn_cfg(base_path))
    torch.manual_seed(0)
    ours = build_model(rcnn_cfg(eapm_path, *opts))
    return base, ours


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def eapm_mask_rcnn():
    """A tiny EAPM Mask R-CNN with EAPM cross entropy and the EAPM RPN (mu 1.5), seed 0."""
    from detectron2.modeling import build_model

    cfg = tiny_cfg(MASK_EAPM, "MODEL.ROI_HEADS.NUM_CLASSES", 4, *RPN_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.roi_heads.box_predictor.eapm_cls_mu == RCNN_MU
    assert model.proposal_generator.eapm_rpn_mu == RCNN_MU
    return model


def filled_features(model, fill: float, size: int = 64):
    """(ImageList, {feature: tensor filled with ``fill``}) of one size x size image."""
    from detectron2.structures import ImageList

    shapes = model.backbone.output_shape()
    images = ImageList(torch.zeros(1, 3, size, size), [(size - 2, size - 2)])
    feats = {
        k: torch.full((1, s.channels, size // s.stride, size // s.stride), fill)
        for k, s in shapes.items()
    }
    return images, feats


def one_proposal():
    """One proposal box in a 62 x 62 image."""
    from detectron2.structures import Boxes, Instances

    props = Instances((62, 62))
    props.proposal_boxes = Boxes(torch.tensor([[10.0, 10.0, 20.0, 20.0]]))
    props.objectness_logits = torch.tensor([1.0])
    return props


def load_config_raises(path, opts, pattern):
    """``eapm.load_config`` of the repository config ``path`` with ``opts`` raises a ValueError
    matching ``pattern``."""
    import pytest

    import eapm

    with pytest.raises(ValueError, match=pattern):
        eapm.load_config(os.path.join(CONFIGS, path), list(opts))


# ---------------------------------------------------------------------------- dense detectors


def build_for_training(cfg, state=None):
    """The model of ``cfg`` built at seed 0 (with the weights ``state`` when given), in
    training mode."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    return model


def losses_and_grads(model, batch, key):
    """The loss dict and the gradient of ``loss[key]`` alone for every parameter (None where
    it does not reach)."""
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        losses = model(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(losses[key], params, allow_unused=True)
    return {k: v.detach() for k, v in losses.items()}, grads


def warm_up_focal(cfg, state, batch, key) -> None:
    """One throwaway step of a fresh model: fvcore's focal loss is TorchScript, whose first
    (profiling) call rounds differently from the optimised ones after it (measured: gradients
    1e-11 apart); every compared call is then an optimised one."""
    losses_and_grads(build_for_training(cfg, state), batch, key)


# ---------------------------------------------------------------------------- GHM
# the reference: mmdetection's rule written out element by element in float64
def ref_edges(bins, last):
    """float32 edges i / bins as mmdetection builds them (torch.arange(bins + 1).float() /
    bins), computed here with numpy's float32 division; the last raised by 1e-6 (GHM-C)
    or set to 1e3 (GHM-R)."""
    e = [float(np.float32(i) / np.float32(bins)) for i in range(bins + 1)]
    e[-1] = float(np.float32(e[-1]) + np.float32(1e-6)) if last is None else last
    return e


class RefGHM:
    """One GHM module's state and its loss, in plain Python float64 loops."""

    def __init__(self, bins, momentum, last=None):
        self.bins, self.m, self.edges = bins, momentum, ref_edges(bins, last)
        self.acc = [0.0] * bins

    def weights(self, g, valid):
        tot = max(sum(valid), 1.0)
        w = [0.0] * len(g)
        n = 0
        for i in range(self.bins):
            inds = [
                k for k in range(len(g)) if valid[k] and self.edges[i] <= g[k] < self.edges[i + 1]
            ]
            if inds:
                n += 1
                if self.m > 0:
                    self.acc[i] = self.m * self.acc[i] + (1 - self.m) * len(inds)
                    wi = tot / self.acc[i]
                else:
                    wi = tot / len(inds)
                for k in inds:
                    w[k] = wi
        if n:
            w = [x / n for x in w]
        return w, tot

    def ghmc(self, x, t, valid):
        """(loss, d loss / d x) of GHM-C."""
        p = [1 / (1 + math.exp(-v)) for v in x]
        g = [abs(pi - ti) for pi, ti in zip(p, t)]
        w, tot = self.weights(g, valid)
        bce = [max(v, 0) - v * ti + math.log1p(math.exp(-abs(v))) for v, ti in zip(x, t)]
        loss = sum(wi * b for wi, b in zip(w, bce)) / tot
        grad = [wi * (pi - ti) / tot for wi, pi, ti in zip(w, p, t)]
        return loss, grad

    def ghmr(self, x, t, valid, mu):
        d = [a - b for a, b in zip(x, t)]
        root = [math.sqrt(v * v + mu * mu) for v in d]
        g = [abs(v) / r for v, r in zip(d, root)]
        w, tot = self.weights(g, valid)
        loss = sum(wi * (r - mu) for wi, r in zip(w, root)) / tot
        grad = [wi * v / r / tot for wi, v, r in zip(w, d, root)]
        return loss, grad


# ---------------------------------------------------------------------------- checkpoints


class Call:
    """Pickles as the call ``func(*args)`` (a REDUCE): what a malicious file holds."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)

    def __call__(self, *args):  # pickle wants the reduced function to be callable
        raise AssertionError("never called")


class WritesOnLoad(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) creates the
    file it names: the write primitive of a TorchScript checkpoint."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.mapped = torch.zeros(8, dtype=torch.uint8)

    @torch.jit.export
    def __getstate__(self):
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]):
        self.path = state[0]
        self.training = state[1]
        self.mapped = torch.from_file(state[0], shared=True, size=8)  # creates the file

    def forward(self, x):
        return x


def write_torchscript(path: str, marker: str) -> str:
    torch.jit.save(torch.jit.script(WritesOnLoad(marker)), path)
    os.remove(marker)  # scripting itself ran nothing, saving did not either: start clean
    return path


def evil_files(tmp_path, marker: str) -> Dict[str, str]:
    """A TorchScript archive and a protocol-4 pickle payload, each as a .pth file."""
    open(marker, "w").close()
    ts = write_torchscript(str(tmp_path / "model_0000009.pth"), marker)
    p4 = str(tmp_path / "p4.pth")
    torch.save({"model": {}, "x": Call(os.system, f"touch {marker}")}, p4, pickle_protocol=4)
    return {"torchscript": ts, "protocol 4": p4}


class RunsCommand:
    """Unpickling this runs ``touch <marker>`` (as a malicious checkpoint would)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: str, marker: str, protocol: int = pickle.HIGHEST_PROTOCOL) -> str:
    """A checkpoint of the right shape whose loading would create ``marker``: ``.pkl`` as
    detectron2's model zoo format, anything else as ``torch.save`` writes it."""
    payload = {"model": {"w": np.ones(2, np.float32)}, "__author__": "x", "x": RunsCommand(marker)}
    if path.endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=protocol)
    else:
        payload["model"] = {"w": torch.ones(2)}
        torch.save(payload, path)
    return path


def last_checkpoint(out):
    try:
        return (out / "last_checkpoint").read_text().strip()
    except OSError:
        return ""


def take(iterator, n):
    return [next(iterator) for _ in range(n)]
