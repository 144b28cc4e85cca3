#!/usr/bin/env python
"""Side-by-side benchmarks of the EAPM losses and models against what they replace.

    bash tools/env.sh python tools/benchmark.py            # everything
    bash tools/env.sh python tools/benchmark.py --only a b --repeats 15

Every comparison is measured in this one run, interleaved (A, B, A, B, ...) so that
machine noise hits both sides alike; it prints the ratio of the medians first (with the spread of
the per-round ratios) and the absolute medians after. Ratios < 1 mean EAPM is cheaper.

(a) EAPM focal loss fwd+bwd vs fvcore's sigmoid_focal_loss_jit (detectron2's focal
    loss), on 50000 x 80 and 200000 x 80 logits; compiled and eager EAPM kernels.
(b) EAPM balanced L1 fwd+bwd vs detectron2's smooth L1 on 100000 x 4 deltas.
(c) one training step of EAPMRetinaNet (EAPM cls + reg on) vs detectron2's RetinaNet,
    same tiny config and weights, with 4 and with 80 classes; and, separately, the part
    of the step that differs (``losses``, forward + backward on the same head outputs).
(d) IoU-balanced sampler vs detectron2's random sampler, 2000 proposals x 20 boxes.
(e) BFP non-local refine peak memory vs the materialised attention at 800x1333.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Seconds of each callable in every round, measured in interleaved rounds; the
    order rotates from round to round, so no callable always runs first (after the
    others' memory has been freed) or last."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    names = list(fns)
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def _quantile(values, q: float) -> float:
    v = sorted(values)
    i = q * (len(v) - 1)
    lo = int(i)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (i - lo)


def report(title: str, times: dict, ref: str) -> dict:
    """Prints the ratios of the medians, then (with 5+ rounds) the spread of the
    per-round ratios (each round times both sides back to back, so slow phases of the
    machine cancel), then the absolute medians. Returns the ratios of the medians."""
    print(f"\n## {title}")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {}
    for k, v in times.items():
        if k == ref:
            continue
        ratios[k] = med[k] / med[ref]
        line = f"  ratio {k} / {ref}: {ratios[k]:.3f}x"
        if len(v) >= 5:
            paired = [a / b for a, b in zip(v, times[ref])]
            line += (f"   (per-round ratios: median {statistics.median(paired):.3f}x,"
                     f" 10-90% {_quantile(paired, 0.1):.3f}-{_quantile(paired, 0.9):.3f}x,"
                     f" below 1 in {sum(r < 1 for r in paired)} of {len(paired)} rounds)")  # fmt: skip
        print(line)
    for k, v in med.items():
        print(f"  {k:<42s} {v * 1e3:10.2f} ms (median of {len(times[k])})")
    return ratios


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
        times = interleaved(
            {"d2 fvcore sigmoid_focal_loss_jit": d2, "eapm focal (compiled)": eapm_with(True), "eapm focal (eager)": eapm_with(False)},
            repeats,
        )
        report(f"(a) focal loss fwd+bwd, {n} x 80, mu 1.5", times, "d2 fvcore sigmoid_focal_loss_jit")
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
    times = interleaved(
        {"d2 smooth_l1_loss": d2, "eapm balanced L1 (compiled)": eapm_with(True), "eapm balanced L1 (eager)": eapm_with(False)},
        repeats,
    )
    report("(b) box loss fwd+bwd, 100000 x 4, theta 1.0", times, "d2 smooth_l1_loss")
    losses.set_compile(False)


def _retinanet_pair(num_classes: int):
    """EAPMRetinaNet (EAPM focal mu 1.5 + EAPM balanced L1 theta 1.0) and detectron2's
    RetinaNet (focal + smooth L1) with the same tiny config and weights, and a batch."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import make_batch, tiny_cfg
    from detectron2.modeling import build_model

    cfg = tiny_cfg("quickstart/eapm_retinanet.yaml", "MODEL.EAPM.COMPILE", False)
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    ours = build_model(cfg)
    cfg_d2 = cfg.clone()
    cfg_d2.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg_d2.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "smooth_l1"
    theirs = build_model(cfg_d2)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs, make_batch(8, size=128, num_boxes=(4, 2, 0, 6))


def bench_step(repeats: int) -> None:
    """(c): the training step, and separately its only part that differs between the
    two models (``losses``: EAPMRetinaNet overrides nothing else), forward + backward
    on the same head outputs. The step is ~50x longer than its loss part, so its ratio
    carries the machine's noise; the loss part's ratio is the cost EAPM adds (or saves).
    A second, identical copy of detectron2's model is timed as a control: its ratio to
    the first is what noise alone gives."""
    from detectron2.utils.events import EventStorage

    from eapm import losses

    for num_classes, note in ((4, "the quickstart's classes"), (80, "COCO's classes")):
        ours, theirs, batch = _retinanet_pair(num_classes)
        captured = {}

        def capture(*args):
            captured["args"] = args
            return type(ours).losses(ours, *args)

        ours.losses = capture  # one forward to record what ``losses`` receives
        with EventStorage(0):
            ours(batch)
        del ours.losses
        anchors, logits, gt_labels, deltas, gt_boxes = captured["args"]
        leaves = [t.detach().requires_grad_() for t in logits + deltas]
        logits, deltas = leaves[: len(logits)], leaves[len(logits):]

        def loss_part(model, compiled=False):
            def f():
                losses.set_compile(compiled)
                with EventStorage(0):
                    sum(model.losses(anchors, logits, gt_labels, deltas, gt_boxes).values()).backward()
                for t in leaves:
                    t.grad = None

            return f

        def step(model, compiled=False):
            def f():
                losses.set_compile(compiled)
                with EventStorage(0):
                    sum(model(batch).values()).backward()
                model.zero_grad(set_to_none=True)

            return f

        step(ours, True)()  # compile the loss kernels (once per process)
        n = sum(t.numel() for t in logits)
        times = interleaved(
            {
                "d2 RetinaNet.losses": loss_part(theirs),
                "EAPMRetinaNet.losses (eager)": loss_part(ours),
                "EAPMRetinaNet.losses (compiled)": loss_part(ours, True),
            },
            3 * repeats,
        )
        report(f"(c) loss part of the step, fwd+bwd: {n} logits ({num_classes} classes, {note})", times, "d2 RetinaNet.losses")
        control = copy.deepcopy(theirs)
        times = interleaved(
            {
                "d2 RetinaNet step": step(theirs),
                "d2 RetinaNet step, 2nd copy (control)": step(control),
                "EAPMRetinaNet step (EAPM on, eager)": step(ours),
                "EAPMRetinaNet step (EAPM on, compiled)": step(ours, True),
            },
            repeats,
        )
        report(f"(c) training step fwd+bwd, R-18 FPN, 8 x 128x128 images, {num_classes} classes", times, "d2 RetinaNet step")
    losses.set_compile(False)


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
