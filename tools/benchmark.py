#!/usr/bin/env python
"""Side-by-side benchmarks of the EAPM losses and models against what they replace.

    bash tools/env.sh python tools/benchmark.py            # everything
    bash tools/env.sh python tools/benchmark.py --only a b --repeats 15

Every comparison is measured in this one run, interleaved (A, B, A, B, ...) so that
machine noise hits both sides alike; it prints the ratio of the medians first and
the absolute medians after. Ratios < 1 mean EAPM is cheaper.

(a) EAPM focal loss fwd+bwd vs fvcore's sigmoid_focal_loss_jit (detectron2's focal
    loss), on 50000 x 80 and 200000 x 80 logits; compiled and eager EAPM kernels.
(b) EAPM balanced L1 fwd+bwd vs detectron2's smooth L1 on 100000 x 4 deltas.
(c) one training step of EAPMRetinaNet (EAPM cls + reg on) vs detectron2's RetinaNet,
    same tiny config and weights.
(d) IoU-balanced sampler vs detectron2's random sampler, 2000 proposals x 20 boxes.
(e) BFP non-local refine peak memory vs the materialised attention at 800x1333.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each callable, measured in interleaved rounds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title: str, med: dict, ref: str) -> None:
    print(f"\n## {title}")
    for k, v in med.items():
        if k != ref:
            print(f"  ratio {k} / {ref}: {v / med[ref]:.3f}x")
    for k, v in med.items():
        print(f"  {k:<34s} {v * 1e3:10.2f} ms (median)")


def bench_focal(repeats: int) -> None:
    from fvcore.nn import sigmoid_focal_loss_jit

    from eapm import losses

    for n in (50000, 200000):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, 80, generator=g) * 3).requires_grad_()
        t = (torch.rand(n, 80, generator=g) < 0.01).float()

        def d2():
            sigmoid_focal_loss_jit(x, t, alpha=0.25, gamma=2.0, reduction="sum").backward()
            x.grad = None

        def eapm_with(compiled):
            def f():
                losses.set_compile(compiled)
                losses.eapm_sigmoid_focal_loss(x, t, 1.5, reduction="sum").backward()
                x.grad = None

            return f

        t0 = time.perf_counter()
        eapm_with(True)()  # compile once (dynamic shapes: not again for the other size)
        print(f"\n(first call of the compiled focal kernel at {n} x 80: {time.perf_counter() - t0:.1f} s)")
        med = interleaved(
            {"d2 fvcore sigmoid_focal_loss_jit": d2, "eapm focal (compiled)": eapm_with(True), "eapm focal (eager)": eapm_with(False)},
            repeats,
        )
        report(f"(a) focal loss fwd+bwd, {n} x 80, mu 1.5", med, "d2 fvcore sigmoid_focal_loss_jit")
    losses.set_compile(False)


def bench_bl1(repeats: int) -> None:
    from fvcore.nn import smooth_l1_loss as fv_smooth_l1

    from eapm import losses

    g = torch.Generator().manual_seed(0)
    p = (torch.randn(100000, 4, generator=g) * 0.5).requires_grad_()
    q = torch.randn(100000, 4, generator=g) * 0.5

    def d2():
        fv_smooth_l1(p, q, beta=0.11, reduction="sum").backward()
        p.grad = None

    def eapm_with(compiled):
        def f():
            losses.set_compile(compiled)
            losses.eapm_balanced_l1_loss(p, q, 1.0, beta=0.11, reduction="sum").backward()
            p.grad = None

        return f

    eapm_with(True)()
    med = interleaved(
        {"d2 smooth_l1_loss": d2, "eapm balanced L1 (compiled)": eapm_with(True), "eapm balanced L1 (eager)": eapm_with(False)},
        repeats,
    )
    report("(b) box loss fwd+bwd, 100000 x 4, theta 1.0", med, "d2 smooth_l1_loss")
    losses.set_compile(False)


def bench_step(repeats: int) -> None:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import make_batch, tiny_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from eapm import losses

    cfg = tiny_cfg("quickstart/eapm_retinanet.yaml", "MODEL.EAPM.COMPILE", False)
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    ours = build_model(cfg)
    cfg_d2 = cfg.clone()
    cfg_d2.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg_d2.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "smooth_l1"
    theirs = build_model(cfg_d2)
    theirs.load_state_dict(ours.state_dict())
    batch = make_batch(8, size=128, num_boxes=(4, 2, 0, 6))

    def step(model, compiled=False):
        def f():
            losses.set_compile(compiled)
            with EventStorage(0):
                sum(model(batch).values()).backward()
            model.zero_grad(set_to_none=True)

        return f

    step(ours, True)()  # compile the loss kernels once
    med = interleaved(
        {
            "d2 RetinaNet step": step(theirs),
            "EAPMRetinaNet step (EAPM on, eager)": step(ours),
            "EAPMRetinaNet step (EAPM on, compiled)": step(ours, True),
        },
        repeats,
    )
    losses.set_compile(False)
    report("(c) training step fwd+bwd, R-18 FPN, 8 x 128x128 images", med, "d2 RetinaNet step")


def bench_libra() -> None:
    """(d) and (e) are measured by tools/bench_libra.py (fresh subprocesses for memory)."""
    print("\n## (d) sampler and (e) BFP memory: tools/bench_libra.py")
    sys.stdout.flush()
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_libra.py")], check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=list("abcde"), choices=list("abcde"))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if "a" in args.only:
        bench_focal(args.repeats)
    if "b" in args.only:
        bench_bl1(args.repeats)
    if "c" in args.only:
        bench_step(args.repeats)
    if "d" in args.only or "e" in args.only:
        bench_libra()


if __name__ == "__main__":
    main()
