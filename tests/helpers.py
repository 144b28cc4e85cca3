"""The helpers the tests share (``from tests.helpers import ...``):

* the tiny configs, synthetic batches and gradient norms of ``eapm.utils.testing`` (the
  tools use those too; the tools never import the tests), re-exported;
* ``REPO`` / ``CONFIGS``: the repository root and its configs folder; ``load_tool``: a
  script of ``tools/`` imported as a module;
* ``eapm_iou_reference``: EAPM regression with an IoU loss computed by hand;
* tiny COCO-json datasets written to a temporary folder, and train_net.py run as a
  subprocess on them with a tiny model, so that a run (model build, a few iterations,
  COCO evaluation) takes seconds on two CPU cores."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Dict, List, Sequence

import numpy as np

from eapm.utils.testing import grad_norms, make_batch, tiny_cfg  # noqa: F401  (re-exported)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
