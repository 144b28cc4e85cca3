#!/usr/bin/env python
"""GPU check (one command, a few minutes): seconds per iteration and peak memory of
RetinaNet R-50-FPN with and without EAPM, batch 16 at 800x1333, AMP, on one GPU.

    python tools/gpu_benchmark.py [--iters 20] [--batch 16]

    # smoke test on a CPU (tiny images, bfloat16 autocast, no memory figure): what the
    # test suite runs, so the script is known to work before GPU time is spent on it
    python tools/gpu_benchmark.py --device cpu --batch 2 --height 64 --width 96 --iters 1 --warmup 0

Synthetic images with random boxes (no dataset, no pretrained weights needed), the
COCO configs of this repository, detectron2's AMPTrainer step semantics (autocast +
GradScaler). Prints, per variant, the median seconds per iteration over the timed
iterations and torch.cuda.max_memory_allocated, then the ratios EAPM / baseline.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_batch(n, h=800, w=1333, boxes=8, seed=0):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xy = torch.rand(boxes, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(boxes, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, 80, (boxes,), generator=g)
        out.append({"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "instances": inst})
    return out


def run(config, opts, batch, iters, warmup, device="cuda"):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    import eapm

    cuda = device == "cuda"
    cfg = get_cfg()
    eapm.add_eapm_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "COCO-Detection", config))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", device] + opts)
    model = build_model(cfg)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    # detectron2's AMPTrainer: float16 autocast + GradScaler on CUDA (bfloat16 on a CPU)
    scaler = torch.cuda.amp.GradScaler(enabled=cuda)
    dtype = torch.float16 if cuda else torch.bfloat16
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with EventStorage(0) as storage:
        for i in range(warmup + iters):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=dtype):
                losses = model(batch)
            total = sum(losses.values())
            opt.zero_grad()
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            storage.iter += 1
    if not torch.isfinite(total):
        raise RuntimeError(f"{config}: non-finite loss {losses}")
    return statistics.median(times), (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU: this check needs CUDA (--device cpu runs the smoke test)")
    print(torch.__version__, torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU")
    batch = make_batch(args.batch, args.height, args.width)
    variants = [
        ("RetinaNet (detectron2 losses)", "retinanet_R_50_FPN_1x.yaml", []),
        ("RetinaNet + EAPM mu 1.5 (compiled)", "retinanet_R_50_FPN_1x_eapm_mu1.5.yaml", []),
        ("RetinaNet + EAPM mu 1.5 (eager)", "retinanet_R_50_FPN_1x_eapm_mu1.5.yaml", ["MODEL.EAPM.COMPILE", "False"]),
    ]
    res = {}
    for name, config, opts in variants:
        res[name] = run(config, opts, batch, args.iters, args.warmup, args.device)
        print(f"{name:<38s} {res[name][0]:.3f} s/iter  peak {res[name][1]:.2f} GiB", flush=True)
    base = res[variants[0][0]]
    for name, (t, m) in list(res.items())[1:]:
        print(f"ratio {name} / baseline: time {t / base[0]:.3f}x  memory {m / base[1]:.3f}x")


if __name__ == "__main__":
    main()
