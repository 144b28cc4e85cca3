#!/usr/bin/env python
"""Side-by-side benchmarks of the EAPM losses, models and Libra pieces against what they replace.

    python tools/benchmark.py                                  # the CPU sections
    python tools/benchmark.py --only focal box --repeats 15
    python tools/benchmark.py --device cuda --repeats 20 --warmup 5   # the GPU check
    # smoke test (what the test suite runs): tiny images, a few rounds, seconds
    python tools/benchmark.py --only train --batch 2 --height 64 --width 96 --repeats 2 --warmup 1

Every timed comparison is measured in this one run, in interleaved rounds (each round runs every
variant once, in an order that rotates from round to round) so that machine noise hits all sides
alike; it prints the ratio of the medians first (with the spread of the per-round ratios), then
the absolute medians. Memory figures are printed as ratios first too. Ratios < 1 mean EAPM (or
this project's version) is cheaper. With --device cuda the GPU is synchronised before every
reading of the clock.

Sections (--only; default: all but train on cpu, all on cuda):
  focal    EAPM focal loss fwd+bwd vs fvcore's sigmoid_focal_loss_jit (detectron2's focal loss),
           on 50000 x 80 and 200000 x 80 logits; compiled and eager EAPM kernels.
  box      EAPM balanced L1 fwd+bwd vs detectron2's smooth L1 on 100000 x 4 deltas.
  step     one training step of EAPMRetinaNet (EAPM cls + reg on) vs detectron2's RetinaNet, same
           tiny R-18 config and weights, 8 x 128x128 images, with 4 and with 80 classes; and,
           separately, the part of the step that differs (``losses``, forward + backward on the
           same head outputs). The compiled and the eager EAPM model are built with
           MODEL.EAPM.COMPILE True / False; a second copy of detectron2's model is a control.
  sampler  IoU-balanced RoI sampler (LibraROIHeads) vs detectron2's random sampler, 2000
           proposals x 20 boxes, alone and with the IoU matrix + matcher (20 x --repeats rounds).
  bfp      BFP non-local refine at the P4 map of an 800x1333 input (--bfp-batch x 256 x 50 x 84):
           fused scaled_dot_product_attention vs the materialised HW x HW attention, inference
           and training step. Peak memory in fresh subprocesses (cpu: peak RSS rise with a fixed
           mmap threshold; cuda: the allocator's peak), time in interleaved rounds here.
  ghm      GHM-C fwd+bwd (eapm.losses.GHMC, bins 30, momentum 0.75) vs fvcore's
           sigmoid_focal_loss_jit on --ghm-anchors x 80 logits (default 50000), and a per-bin
           loop of mmdetection's algorithm; host synchronisations per call of GHMC, GHMR and
           the loop, counted with eapm.utils.testing.HostSyncCounter.
  resume   wall time of train_net.py from its start to the end of its first new iteration:
           --resume from a checkpoint at iteration 20 vs a fresh start, the quickstart EAPM
           RetinaNet on the embedded dataset (DATALOADER.EXACT_RESUME: the loader's
           position is restored by index arithmetic, no image already used is loaded);
           each run is a fresh process, interleaved with the other. Not in the default set.
  recipe   the quickstart recipe of 0.4 vs the one before it: training steps (data loading,
           forward, backward, AdamW) of EAPMTrainers built from
           configs/quickstart/eapm_retinanet_0.3.yaml (the reference) and eapm_retinanet.yaml
           (--recipe-config: the reference, then any number of others), on the embedded
           dataset, interleaved step by step, --recipe-iters steps each after --warmup
           (--recipe-opts: overrides for all); prints the step-time ratios and the
           training-time ratios (step-time ratio x the ratio of the configs' SOLVER.MAX_ITER).
           Not in the default set.
  train    the GPU check: seconds per iteration and peak memory of a training step (AMP:
           float16 on cuda, bfloat16 on cpu, autocast + GradScaler) of RetinaNet R-50-FPN with
           detectron2's losses and with EAPM mu 1.5 (compiled and eager), --batch images of
           --height x --width (synthetic, no dataset or weights); peak memory on cuda only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

SECTIONS = ("focal", "box", "step", "sampler", "bfp", "ghm", "resume", "recipe", "train")
CPU_DEFAULT = ("focal", "box", "step", "sampler", "bfp", "ghm")
RESULTS: Dict[str, dict] = {}  # every report, by title (--json)


# ----------------------------------------------------------------------------
# measuring and reporting
# ----------------------------------------------------------------------------
def make_sync(device: str) -> Callable[[], None]:
    """What to call before reading the clock: waits for the GPU's queued work on cuda."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def interleaved(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    sync: Optional[Callable[[], None]] = None,
) -> Dict[str, List[float]]:
    """{name: [seconds of the callable in each round]}, ``repeats`` rounds after ``warmup``
    untimed ones. Every round runs each callable once; the order rotates from round to
    round, so no callable always runs first (after the others' memory has been freed) or
    last. ``sync`` (e.g. ``torch.cuda.synchronize``) is called before each clock reading."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for f in fns.values():
            f()
    names = list(fns)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def _quantile(values, q: float) -> float:
    v = sorted(values)
    i = q * (len(v) - 1)
    lo = int(i)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (i - lo)


def report(title: str, times: Dict[str, List[float]], ref: str) -> Dict[str, float]:
    """Prints the ratios of the medians to ``ref``'s, then (with 5+ rounds) the spread of
    the per-round ratios (each round times all sides back to back, so slow phases of the
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
            line += (
                f"   (per-round ratios: median {statistics.median(paired):.3f}x,"
                f" 10-90% {_quantile(paired, 0.1):.3f}-{_quantile(paired, 0.9):.3f}x,"
                f" below 1 in {sum(r < 1 for r in paired)} of {len(paired)} rounds)"
            )
        print(line)
    for k, v in med.items():
        print(f"  {k:<46s} {v * 1e3:10.3f} ms (median of {len(times[k])})")
    RESULTS[title] = {"ratios": ratios, "median_s": med, "rounds": len(times[ref])}
    sys.stdout.flush()
    return ratios


def report_values(
    title: str, values: Dict[str, float], ref: str, unit: str, notes: List[str] = ()
) -> Dict[str, float]:
    """Like ``report`` for one number per variant (a memory figure, in ``unit``): the
    ratios to ``ref``'s value first, then ``notes`` (extra lines), then the values."""
    print(f"\n## {title}")
    ratios = {
        k: v / values[ref] if values[ref] else math.nan for k, v in values.items() if k != ref
    }
    for k, r in ratios.items():
        print(f"  ratio {k} / {ref}: {r:.3f}x")
    for line in notes:
        print(f"  {line}")
    for k, v in values.items():
        print(f"  {k:<46s} {v:10.2f} {unit}")
    RESULTS[title] = {"ratios": ratios, "values": dict(values), "unit": unit}
    sys.stdout.flush()
    return ratios


def kernel_states() -> str:
    from eapm import losses

    names = ("_focal_sum", "_focal_terms", "_bl1_kernel")
    return ", ".join(f"{n}: {losses.compiled_kernel_state(n)}" for n in names)


# ----------------------------------------------------------------------------
# focal: EAPM focal loss vs fvcore's
# ----------------------------------------------------------------------------
def bench_focal(args) -> None:
    from fvcore.nn import sigmoid_focal_loss_jit

    from eapm import losses

    sync = make_sync(args.device)
    for n in (50000, 200000):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, 80, generator=g) * 3).to(args.device).requires_grad_()
        t = (torch.rand(n, 80, generator=g) < 0.01).float().to(args.device)

        def d2():
            sigmoid_focal_loss_jit(x, t, alpha=0.25, gamma=2.0, reduction="sum").backward()
            x.grad = None

        def eapm_with(compiled):
            def f():
                loss = losses.eapm_sigmoid_focal_loss(
                    x, t, 1.5, reduction="sum", compile_kernels=compiled
                )
                loss.backward()
                x.grad = None

            return f

        t0 = time.perf_counter()
        eapm_with(True)()  # compiles once (dynamic shapes: not again for the other size)
        sync()
        print(
            f"\n(first call of the compiled focal kernel at {n} x 80:"
            f" {time.perf_counter() - t0:.1f} s; {kernel_states()})"
        )
        fns = {
            "d2 fvcore sigmoid_focal_loss_jit": d2,
            "eapm focal (compiled)": eapm_with(True),
            "eapm focal (eager)": eapm_with(False),
        }
        times = interleaved(fns, args.repeats, args.warmup, sync)
        title = f"[focal] focal loss fwd+bwd, {n} x 80, mu 1.5, {args.device}"
        report(title, times, "d2 fvcore sigmoid_focal_loss_jit")


# ----------------------------------------------------------------------------
# box: EAPM balanced L1 vs detectron2's smooth L1
# ----------------------------------------------------------------------------
def bench_box(args) -> None:
    from fvcore.nn import smooth_l1_loss as fv_smooth_l1

    from eapm import losses

    sync = make_sync(args.device)
    g = torch.Generator().manual_seed(0)
    p = (torch.randn(100000, 4, generator=g) * 0.5).to(args.device).requires_grad_()
    q = (torch.randn(100000, 4, generator=g) * 0.5).to(args.device)

    def d2():
        fv_smooth_l1(p, q, beta=0.11, reduction="sum").backward()
        p.grad = None

    def eapm_with(compiled):
        def f():
            loss = losses.eapm_balanced_l1_loss(
                p, q, 1.0, beta=0.11, reduction="sum", compile_kernels=compiled
            )
            loss.backward()
            p.grad = None

        return f

    t0 = time.perf_counter()
    eapm_with(True)()
    sync()
    print(
        f"\n(first call of the compiled balanced L1 kernel: {time.perf_counter() - t0:.1f} s;"
        f" {kernel_states()})"
    )
    fns = {
        "d2 smooth_l1_loss": d2,
        "eapm balanced L1 (compiled)": eapm_with(True),
        "eapm balanced L1 (eager)": eapm_with(False),
    }
    times = interleaved(fns, args.repeats, args.warmup, sync)
    report(
        f"[box] box loss fwd+bwd, 100000 x 4, theta 1.0, {args.device}", times, "d2 smooth_l1_loss"
    )


# ----------------------------------------------------------------------------
# step: EAPMRetinaNet vs detectron2's RetinaNet (tiny R-18)
# ----------------------------------------------------------------------------
def _retinanet_models(num_classes: int, device: str):
    """EAPMRetinaNet (EAPM focal mu 1.5 + EAPM balanced L1 theta 1.0) with compiled and
    with eager loss kernels, and detectron2's RetinaNet (focal + smooth L1), all with the
    same tiny config and weights; and a batch of 8 images of 128x128."""
    from detectron2.modeling import build_model

    from eapm.utils.testing import make_batch, tiny_cfg

    def build(opts=(), meta=None):
        cfg = tiny_cfg("quickstart/eapm_retinanet.yaml", *opts)
        cfg.MODEL.DEVICE = device
        cfg.MODEL.RETINANET.NUM_CONVS = 2
        cfg.MODEL.FPN.OUT_CHANNELS = 64
        cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
        if meta:
            cfg.MODEL.META_ARCHITECTURE = meta
            cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "smooth_l1"
        return build_model(cfg)

    eager = build(("MODEL.EAPM.COMPILE", False))
    compiled = build(("MODEL.EAPM.COMPILE", True))
    theirs = build(meta="RetinaNet")
    compiled.load_state_dict(eager.state_dict())
    theirs.load_state_dict(eager.state_dict())
    return eager, compiled, theirs, make_batch(8, size=128, num_boxes=(4, 2, 0, 6))


def bench_step(args) -> None:
    """The training step, and separately its only part that differs between the models
    (``losses``: EAPMRetinaNet overrides nothing else), forward + backward on the same
    head outputs. The step is ~50x longer than its loss part, so its ratio carries the
    machine's noise; the loss part's ratio is the cost EAPM adds (or saves). A second,
    identical copy of detectron2's model is timed as a control: its ratio to the first
    is what noise alone gives."""
    from detectron2.utils.events import EventStorage

    sync = make_sync(args.device)
    for num_classes, note in ((4, "the quickstart's classes"), (80, "COCO's classes")):
        eager, compiled, theirs, batch = _retinanet_models(num_classes, args.device)
        captured = {}

        def capture(*a):
            captured["args"] = a
            return type(eager).losses(eager, *a)

        eager.losses = capture  # one forward to record what ``losses`` receives
        with EventStorage(0):
            eager(batch)
        del eager.losses
        anchors, logits, gt_labels, deltas, gt_boxes = captured["args"]
        leaves = [t.detach().requires_grad_() for t in logits + deltas]
        logits, deltas = leaves[: len(logits)], leaves[len(logits) :]

        def loss_part(model):
            def f():
                with EventStorage(0):
                    out = model.losses(anchors, logits, gt_labels, deltas, gt_boxes)
                    sum(out.values()).backward()
                for t in leaves:
                    t.grad = None

            return f

        def step(model):
            def f():
                with EventStorage(0):
                    sum(model(batch).values()).backward()
                model.zero_grad(set_to_none=True)

            return f

        t0 = time.perf_counter()
        step(compiled)()  # compiles the loss kernels (once per process)
        sync()
        print(
            f"\n(first step of the compiled EAPM model: {time.perf_counter() - t0:.1f} s;"
            f" {kernel_states()})"
        )
        n = sum(t.numel() for t in logits)
        fns = {
            "d2 RetinaNet.losses": loss_part(theirs),
            "EAPMRetinaNet.losses (eager)": loss_part(eager),
            "EAPMRetinaNet.losses (compiled)": loss_part(compiled),
        }
        times = interleaved(fns, 3 * args.repeats, args.warmup, sync)
        title = f"[step] loss part of the step, fwd+bwd: {n} logits ({num_classes} classes, {note})"
        report(title, times, "d2 RetinaNet.losses")
        fns = {
            "d2 RetinaNet step": step(theirs),
            "d2 RetinaNet step, 2nd copy (control)": step(copy.deepcopy(theirs)),
            "EAPMRetinaNet step (EAPM on, eager)": step(eager),
            "EAPMRetinaNet step (EAPM on, compiled)": step(compiled),
        }
        times = interleaved(fns, args.repeats, args.warmup, sync)
        title = f"[step] training step fwd+bwd, R-18 FPN, 8 x 128x128 images, {num_classes} classes"
        report(title, times, "d2 RetinaNet step")


# ----------------------------------------------------------------------------
# sampler: IoU-balanced vs random RoI sampling
# ----------------------------------------------------------------------------
def bench_sampler(args) -> None:
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import StandardROIHeads, build_roi_heads
    from detectron2.structures import Boxes, pairwise_iou

    from eapm.utils.testing import repo_cfg

    sync = make_sync(args.device)
    # one thread: the per-image sampling ops are tiny, and on a shared machine OpenMP's
    # barriers between 2 threads cost more than the ops (medians jump to ~100 ms)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = repo_cfg("COCO-Detection/libra_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16  # the box head is not timed; keep it small
    shapes = {f"p{i}": ShapeSpec(channels=256, stride=2**i) for i in range(2, 7)}
    heads = build_roi_heads(cfg, shapes)

    g = torch.Generator().manual_seed(0)
    h, w, n_gt, n_prop = 800, 1333, 20, 2000
    xy = torch.rand(n_gt, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = 16 + torch.rand(n_gt, 2, generator=g) * 300
    gt = torch.cat([xy, xy + wh], 1)
    # half the proposals jittered around the GT boxes (positives, hard negatives),
    # half anywhere (easy negatives), like RPN proposals late in training
    jit = gt[torch.randint(0, n_gt, (n_prop // 2,), generator=g)]
    size = (jit[:, 2:] - jit[:, :2]).repeat(1, 2)
    jit = jit + torch.randn(n_prop // 2, 4, generator=g) * size * 0.25
    rxy = torch.rand(n_prop // 2, 2, generator=g) * torch.tensor([w, h])
    rnd = torch.cat([rxy, rxy + 16 + torch.rand(n_prop // 2, 2, generator=g) * 300], 1)
    props = torch.cat([jit, rnd])
    props = torch.stack(
        [
            props[:, [0, 2]].min(1).values,
            props[:, [1, 3]].min(1).values,
            props[:, [0, 2]].max(1).values,
            props[:, [1, 3]].max(1).values,
        ],
        1,
    )
    gt_boxes, prop_boxes = Boxes(gt.to(args.device)), Boxes(props.to(args.device))
    gt_classes = torch.randint(0, 80, (n_gt,), generator=g).to(args.device)

    matched_idxs, matched_labels = heads.proposal_matcher(pairwise_iou(gt_boxes, prop_boxes))
    max_iou = heads.proposal_matcher.last_max_iou

    def sample_libra(idx, labels):
        return heads._sample_proposals(idx, labels, gt_classes)

    def sample_d2(idx, labels):
        return StandardROIHeads._sample_proposals(heads, idx, labels, gt_classes)

    def sample_only(sample):
        return lambda: sample(matched_idxs, matched_labels)

    def match_then(sample):
        return lambda: sample(*heads.proposal_matcher(pairwise_iou(gt_boxes, prop_boxes)))

    rounds, warmup = 20 * args.repeats, max(5, args.warmup)
    d2_name, libra_name = "detectron2 random (StandardROIHeads)", "LibraROIHeads._sample_proposals"
    fns = {d2_name: sample_only(sample_d2), libra_name: sample_only(sample_libra)}
    times = interleaved(fns, rounds, warmup, sync)
    times_m = interleaved(
        {
            "IoU matrix + matcher + detectron2 sampler": match_then(sample_d2),
            "IoU matrix + matcher + Libra sampler": match_then(sample_libra),
        },
        rounds,
        warmup,
        sync,
    )
    torch.set_num_threads(threads)

    # what each sampler did with the negatives (bins of width max IoU / 3); the matcher
    # ran again above: its IoUs are those of the same proposals
    edges = [i * float(max_iou.max()) / 3 for i in range(4)]
    per_bin = {}
    for name, sample in (("Libra", sample_libra), ("detectron2", sample_d2)):
        torch.manual_seed(0)
        idx, labels = sample(matched_idxs, matched_labels)
        neg_iou = heads.proposal_matcher.last_max_iou[idx[labels == heads.num_classes]]
        per_bin[name] = [
            int(((neg_iou >= a) & (neg_iou < b)).sum()) for a, b in zip(edges, edges[1:])
        ]

    where = f"{args.device}, 1 thread" if args.device == "cpu" else args.device
    print(
        f"\n(proposals: {int((matched_labels == 1).sum())} positives, "
        f"{int((matched_labels == 0).sum())} negatives, max IoU of a negative "
        f"{float(max_iou[matched_labels == 0].max()):.3f}; sampled negatives per IoU bin "
        f"(width max IoU / 3): Libra {per_bin['Libra']}, detectron2 {per_bin['detectron2']})"
    )
    report(
        f"[sampler] RoI sampling per image: 2000 proposals x 20 GT, 512 RoIs, {where}",
        times,
        d2_name,
    )
    report(
        f"[sampler] the same with the IoU matrix + matcher (label_and_sample_proposals), {where}",
        times_m,
        "IoU matrix + matcher + detectron2 sampler",
    )


# ----------------------------------------------------------------------------
# bfp: BFP non-local refine, fused vs materialised attention
# ----------------------------------------------------------------------------
BFP_VARIANTS = ("no_attention", "sdpa", "materialised")


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _bfp_block(device: str):
    from eapm.modeling.bfp import NonLocalBlock2d

    torch.manual_seed(0)
    block = NonLocalBlock2d(256).to(device)
    with torch.no_grad():
        block.conv_out.weight.normal_(std=0.01)  # a trained block is not the identity
    return block


def _bfp_step(block, mode: str, batch: int, device: str, fused: bool) -> Callable[[], None]:
    def step():
        x = torch.randn(batch, 256, 50, 84, device=device, requires_grad=(mode == "train"))
        if mode == "train":
            block(x, fused=fused).square().mean().backward()
            block.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                block(x, fused=fused)

    return step


def bfp_memory_child(variant: str, mode: str, batch: int, device: str) -> dict:
    """Runs in a fresh process (``--bfp-child``): the peak memory (MiB) of one step of the
    non-local block beyond what was allocated before it. cpu: the rise of the peak
    resident set size (VmHWM, reset through /proc/self/clear_refs where allowed, else the
    rise over the earlier peak), which includes the kernels' internal scratch buffers;
    cuda: torch.cuda.max_memory_allocated over memory_allocated before the step."""
    torch.set_num_threads(2)
    block = _bfp_block(device)
    if variant == "no_attention":
        # the same block with the attention replaced by the identity on g(x): what every
        # variant pays besides the attention (projections, output, autograd)
        import torch.nn.functional as F

        F.scaled_dot_product_attention = lambda q, k, v, scale=None: v
    step = _bfp_step(block, mode, batch, device, fused=variant != "materialised")
    step()  # warm-up at full size: thread pools / kernel caches allocate outside the peak
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20, "reset": True}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _proc_kib("VmRSS") if reset else _proc_kib("VmHWM")
    step()
    return {"peak_mib": (_proc_kib("VmHWM") - before) / 1024, "reset": reset}


def bench_bfp(args) -> None:
    sync = make_sync(args.device)
    b = args.bfp_batch
    where = "peak RSS rise, fresh process" if args.device == "cpu" else "CUDA allocator peak"
    hw = 50 * 84
    for mode in ("inference", "train"):
        peak, resettable = {}, True
        for variant in BFP_VARIANTS:
            # glibc's MALLOC_MMAP_THRESHOLD_=65536: every buffer above 64 KiB is its own
            # mapping, returned to the system when freed, so the peak RSS follows the live
            # buffers instead of malloc's cache
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--bfp-child", variant, mode, str(b)]
                + ["--device", args.device],
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            peak[variant], resettable = r["peak_mib"], resettable and r["reset"]
        attn_ref = peak["materialised"] - peak["no_attention"]
        attn = (peak["sdpa"] - peak["no_attention"]) / attn_ref if attn_ref > 0 else math.nan
        notes = [
            "ratio attention part only (minus the no-attention run) sdpa / materialised:"
            f" {attn:.3f}x",
            f"one HW x HW attention matrix: {hw}^2 x 4 B x {b} = {hw * hw * 4 * b / 2**20:.1f} MiB",
        ]
        if not resettable:
            notes.append("(peak not resettable here: rise over the earlier peak)")
        title = (
            f"[bfp] BFP non-local refine, {mode}, peak memory ({where}): P4 of an 800x1333 input,"
            f" {b} x 256 x 50 x 84 float32, {args.device}"
        )
        report_values(title, {f"{v} {mode}": peak[v] for v in BFP_VARIANTS}, f"materialised {mode}",
                      "MiB", notes)  # fmt: skip
    block = _bfp_block(args.device)
    for mode in ("inference", "train"):
        fns = {
            f"materialised {mode}": _bfp_step(block, mode, b, args.device, fused=False),
            f"sdpa {mode}": _bfp_step(block, mode, b, args.device, fused=True),
        }
        times = interleaved(fns, args.repeats, args.warmup, sync)
        title = f"[bfp] BFP non-local refine, {mode}, time: {b} x 256 x 50 x 84, {args.device}"
        report(title, times, f"materialised {mode}")


# ----------------------------------------------------------------------------
# train: seconds per iteration and peak memory of RetinaNet R-50-FPN (AMP)
# ----------------------------------------------------------------------------
TRAIN_VARIANTS = (  # (name, config in configs/COCO-Detection, opts); the first is the reference
    ("RetinaNet (detectron2 losses)", "retinanet_R_50_FPN_1x.yaml", ()),
    (
        "RetinaNet + EAPM mu 1.5 (compiled)",
        "retinanet_R_50_FPN_1x_eapm_mu1.5.yaml",
        ("MODEL.EAPM.COMPILE", True),
    ),
    (
        "RetinaNet + EAPM mu 1.5 (eager)",
        "retinanet_R_50_FPN_1x_eapm_mu1.5.yaml",
        ("MODEL.EAPM.COMPILE", False),
    ),
)


class _TrainStep:
    """One model with its optimizer and AMP state, as detectron2's AMPTrainer steps it:
    autocast forward (float16 on cuda, bfloat16 on cpu), GradScaler, SGD step (lr 0)."""

    def __init__(self, config: str, opts, batch, device: str):
        from detectron2.modeling import build_model
        from detectron2.utils.events import EventStorage

        from eapm.utils.testing import repo_cfg

        cfg = repo_cfg("COCO-Detection/" + config, "MODEL.WEIGHTS", "", "MODEL.DEVICE", device)
        cfg.merge_from_list(list(opts))
        torch.manual_seed(0)  # the same initial weights for every variant
        self.model = build_model(cfg)
        self.model.train()
        # lr 0: the update is computed and applied as in training (the same work), but the
        # weights stay put. Randomly initialised (no pretrained weights), this R-50 diverges
        # within a few steps at lr 1e-4 (NaN at the 4th), and inf / NaN change kernel timings
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.0, momentum=0.9)
        cuda = device == "cuda"
        # cuda: detectron2's AMPTrainer (GradScaler, default scale). cpu: bfloat16 needs no
        # loss scaling (scale 1), but the scaler skips steps with non-finite gradients as on
        # cuda (a random R-50's bfloat16 backward gives some on tiny images), so inf / NaN
        # never reach the weights
        if hasattr(torch.amp, "GradScaler"):
            kw = {} if cuda else {"init_scale": 1.0}
            self.scaler = torch.amp.GradScaler(device, **kw)
        else:  # pragma: no cover (torch < 2.3: no CPU GradScaler)
            self.scaler = torch.cuda.amp.GradScaler(enabled=cuda)
        self.dtype = torch.float16 if cuda else torch.bfloat16
        self.device, self.batch = device, batch
        self.storage = EventStorage(0)
        self.loss: Optional[torch.Tensor] = None
        self.steps = self.skipped = 0  # skipped: steps the GradScaler dropped (inf / NaN grads)

    def __call__(self) -> None:
        with self.storage:
            with torch.autocast(self.device, dtype=self.dtype):
                losses = self.model(self.batch)
            total = sum(losses.values())
            self.opt.zero_grad()
            self.scaler.scale(total).backward()
            self.scaler.step(self.opt)
            scale = self.scaler.get_scale()
            self.scaler.update()
            self.storage.iter += 1
        self.loss = total.detach()
        self.steps += 1
        self.skipped += int(self.scaler.get_scale() < scale)  # the scale backs off on a skip

    def static_bytes(self) -> int:
        """Parameters, gradients and optimizer state: what stays allocated between steps."""
        tensors = [p for p in self.model.parameters()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        for state in self.opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def bench_train(args) -> None:
    from eapm.utils.testing import synthetic_batch

    sync = make_sync(args.device)
    batch = synthetic_batch(args.batch, args.height, args.width)
    steps = {}
    for name, config, opts in TRAIN_VARIANTS:
        steps[name] = _TrainStep(config, opts, batch, args.device)
    t0 = time.perf_counter()
    steps[TRAIN_VARIANTS[1][0]]()  # compiles the EAPM loss kernels
    sync()
    print(
        f"\n(first step of the compiled EAPM model: {time.perf_counter() - t0:.1f} s;"
        f" {kernel_states()})"
    )
    times = interleaved(steps, args.repeats, args.warmup, sync)
    amp = "float16" if args.device == "cuda" else "bfloat16"
    amp += " autocast + GradScaler"
    shape = f"{args.batch} x {args.height}x{args.width}"
    base = TRAIN_VARIANTS[0][0]
    report(f"[train] training step, RetinaNet R-50-FPN, {shape}, {amp}, {args.device}", times, base)
    for name, step in steps.items():
        loss = float(step.loss)
        print(f"  loss (last step) {name}: {loss:.4f}")
        if step.skipped:  # the timed rounds include steps without the optimizer's update
            print(f"  ({name}: the GradScaler skipped {step.skipped} of {step.steps} steps)")
        if not math.isfinite(loss):
            raise RuntimeError(f"{name}: non-finite loss {loss}")
    if args.device != "cuda":
        print("  (peak memory: CUDA allocator statistics, measured with --device cuda only)")
        return
    peak = {}
    for name, step in steps.items():
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        peak[name] = (step.static_bytes() + torch.cuda.max_memory_allocated() - before) / 2**30
    notes = [
        "(a variant's peak: its parameters, gradients and momentum + the peak allocation of one"
        " step above what was allocated before it)"
    ]
    report_values(
        f"[train] peak memory of a training step, {shape}, {amp}", peak, base, "GiB", notes
    )


# ----------------------------------------------------------------------------
# ghm: GHM-C vs detectron2's focal loss; host synchronisations per call
# ----------------------------------------------------------------------------
def _ghmc_per_bin_loop(pred, target, valid, edges, acc, momentum):
    """GHM-C computed the way mmdetection's ``GHMC.forward`` does it (written from the
    formulation, for comparison): one mask, one ``.item()`` and one masked write per bin."""
    g = (pred.detach().sigmoid() - target).abs()
    tot = max(valid.float().sum().item(), 1.0)
    weights = torch.zeros_like(pred)
    n = 0
    for i in range(len(edges) - 1):
        inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
        count = inds.sum().item()
        if count > 0:
            acc[i] = momentum * acc[i] + (1 - momentum) * count
            weights[inds] = tot / acc[i]
            n += 1
    if n > 0:
        weights = weights / n
    return (
        torch.nn.functional.binary_cross_entropy_with_logits(pred, target, weights, reduction="sum")
        / tot
    )


def bench_ghm(args) -> None:
    from fvcore.nn import sigmoid_focal_loss_jit

    from eapm.losses import GHMC, GHMR
    from eapm.utils.testing import HostSyncCounter

    sync = make_sync(args.device)
    n = args.ghm_anchors
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, 80, generator=g) * 3).to(args.device).requires_grad_()
    t = (torch.rand(n, 80, generator=g) < 0.01).float().to(args.device)
    valid = (torch.rand(n, 1, generator=g) > 0.05).expand(n, 80).to(args.device)
    ghmc = GHMC(bins=30, momentum=0.75).to(args.device)
    loop_edges = ghmc.edges.clone()
    loop_acc = torch.zeros(30, device=args.device)

    def d2():
        sigmoid_focal_loss_jit(x, t, alpha=0.25, gamma=2.0, reduction="sum").backward()
        x.grad = None

    def ghm():
        ghmc(x, t, valid).backward()
        x.grad = None

    def loop():
        _ghmc_per_bin_loop(x, t, valid, loop_edges, loop_acc, 0.75).backward()
        x.grad = None

    fns = {"d2 fvcore sigmoid_focal_loss_jit": d2, "eapm GHMC": ghm, "GHM-C per-bin loop": loop}
    times = interleaved(fns, args.repeats, args.warmup, sync)
    report(
        f"[ghm] GHM-C fwd+bwd, {n} x 80, {args.device}", times, "d2 fvcore sigmoid_focal_loss_jit"
    )
    # host synchronisations per call (forward + backward)
    ghmr = GHMR().to(args.device)
    p = (torch.randn(n // 20, 4, generator=g) * 0.1).to(args.device).requires_grad_()
    q = torch.zeros_like(p)
    counts = {}
    for name, fn in (
        ("eapm GHMC", lambda: ghmc(x, t, valid).backward()),
        ("eapm GHMR", lambda: ghmr(p, q).backward()),
        (
            "GHM-C per-bin loop",
            lambda: _ghmc_per_bin_loop(x, t, valid, loop_edges, loop_acc, 0.75).backward(),
        ),
    ):
        with HostSyncCounter() as c:
            fn()
        counts[name] = c.count
        x.grad = p.grad = None
    print("\n## [ghm] host synchronisations per call (forward + backward)")
    for name, c in counts.items():
        print(f"  syncs {name}: {c}")
    RESULTS["[ghm] host synchronisations per call"] = {"syncs": counts}
    sys.stdout.flush()


# ----------------------------------------------------------------------------
# ----------------------------------------------------------------------------
# resume: time to the first new iteration, --resume vs a fresh start
# ----------------------------------------------------------------------------
def bench_resume(args) -> None:
    import tempfile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="eapm_bench_resume_")
    base = [
        sys.executable,
        os.path.join(repo, "train_net.py"),
        "--config-file",
        os.path.join(repo, "configs", "quickstart", "eapm_retinanet.yaml"),
    ]
    common = ["DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "100000", "MODEL.DEVICE", "cpu"]

    def run(out: str, max_iter: int, resume: bool) -> None:
        cmd = base + (["--resume"] if resume else []) + common
        cmd += ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", str(max_iter)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    source = os.path.join(tmp, "source")
    run(source, 20, False)  # model_final.pth at iteration 19: the checkpoint to resume from
    rounds = {"n": 0}

    def fresh():
        run(os.path.join(tmp, f"fresh{rounds['n']}"), 1, False)  # iteration 0 only

    def resumed():
        rounds["n"] += 1
        out = os.path.join(tmp, f"resumed{rounds['n']}")
        os.makedirs(out)
        for name in ("model_final.pth", "last_checkpoint"):
            with (
                open(os.path.join(source, name), "rb") as f,
                open(os.path.join(out, name), "wb") as g,
            ):
                g.write(f.read())
        run(out, 21, True)  # iteration 20 only

    times = interleaved({"fresh start": fresh, "--resume": resumed}, args.repeats, 0)
    report(
        "[resume] train_net.py start to the end of the first new iteration (quickstart EAPM "
        "RetinaNet, one process)",
        times,
        "fresh start",
    )


# ----------------------------------------------------------------------------
# recipe: the quickstart's training step, 0.4 recipe vs 0.3 recipe
# ----------------------------------------------------------------------------
RECIPES = ("quickstart/eapm_retinanet_0.3.yaml", "quickstart/eapm_retinanet.yaml")


class _TrainerStep:
    """One training step (``run_step``: next batch of its own loader, forward, backward,
    optimizer) of an EAPMTrainer built from a repository config, inside its own event
    storage; no hooks (no lr schedule, checkpoints or logs)."""

    def __init__(self, config: str, opts):
        from detectron2.utils.env import seed_all_rng
        from detectron2.utils.events import EventStorage

        import eapm
        from eapm.engine import EAPMTrainer
        from eapm.utils.testing import get_config_file

        cfg = eapm.load_config(get_config_file(config), list(opts), training=True)
        cfg.freeze()
        seed_all_rng(cfg.SEED)  # as train_net.py (default_setup): the same start every run
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.trainer = EAPMTrainer(cfg)
        self.storage = EventStorage(0)

    def __call__(self) -> None:
        with self.storage:
            self.trainer.iter = self.storage.iter
            self.trainer.run_step()
            self.storage.iter += 1

    def close(self) -> None:
        self.trainer.close_train_loader()


def bench_recipe(args) -> None:
    import tempfile

    if len(args.recipe_config) < 2:
        sys.exit("--recipe-config needs two configs or more (the first is the reference)")
    old, new = args.recipe_config[:2]
    tmp = tempfile.mkdtemp(prefix="eapm_bench_recipe_")
    steps = {}
    try:
        for i, config in enumerate(args.recipe_config):
            opts = list(args.recipe_opts) + ["OUTPUT_DIR", os.path.join(tmp, str(i))]
            steps[config] = _TrainerStep(config, opts)
        times = interleaved(steps, args.recipe_iters, args.warmup)
    finally:
        for step in steps.values():
            step.close()
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = report(
        f"[recipe] training step (data, forward, backward, AdamW) on the embedded dataset,"
        f" {args.recipe_iters} steps each, interleaved, {torch.get_num_threads()} threads",
        times,
        old,
    )
    training = {}
    for config, ratio in ratios.items():
        training[config] = ratio * steps[config].max_iter / steps[old].max_iter
        print(
            f"  training time {config} / {old}: {training[config]:.3f}x  (step-time ratio"
            f" {ratio:.3f}x x SOLVER.MAX_ITER {steps[config].max_iter} / {steps[old].max_iter})"
        )
    RESULTS["[recipe] training time"] = {"ratio": training[new], "step_ratio": ratios[new]}


BENCHES = {
    "focal": bench_focal,
    "box": bench_box,
    "step": bench_step,
    "sampler": bench_sampler,
    "bfp": bench_bfp,
    "ghm": bench_ghm,
    "resume": bench_resume,
    "recipe": bench_recipe,
    "train": bench_train,
}


def main(argv=None) -> Dict[str, dict]:
    doc = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                   help=f"sections to run, in this order: {' '.join(SECTIONS)} (default: all but"
                   " train on cpu, all on cuda)")  # fmt: skip
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--batch", type=int, default=16, help="train: images per step (default 16)")
    p.add_argument("--height", type=int, default=800, help="train: image height (default 800)")
    p.add_argument("--width", type=int, default=1333, help="train: image width (default 1333)")
    p.add_argument("--ghm-anchors", type=int, default=50000,
                   help="ghm: anchors of the N x 80 logits (default 50000)")  # fmt: skip
    p.add_argument("--bfp-batch", type=int, default=1, help="bfp: maps per step (default 1)")
    p.add_argument("--recipe-config", nargs="+", default=RECIPES, metavar="CONFIG",
                   help="recipe: the reference config, then the ones compared with it (under"
                   " configs/, or paths; default: %(default)s)")  # fmt: skip
    p.add_argument("--recipe-iters", type=int, default=100,
                   help="recipe: timed training steps of each config (default 100)")  # fmt: skip
    p.add_argument(
        "--recipe-opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="recipe: overrides for every config (e.g. DATALOADER.NUM_WORKERS 0)",
    )
    p.add_argument("--json", metavar="FILE", help="also write every report (ratios, medians) here")
    p.add_argument("--bfp-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU: --device cuda needs CUDA (--device cpu runs the CPU sections)")
    if args.bfp_child:
        variant, mode, batch = args.bfp_child
        print(json.dumps(bfp_memory_child(variant, mode, int(batch), args.device)))
        return {}
    only = args.only or (CPU_DEFAULT if args.device == "cpu" else SECTIONS)
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {dev}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; sections: {' '.join(s for s in SECTIONS if s in only)}"
    )
    t0 = time.perf_counter()
    for name in SECTIONS:
        if name in only:
            BENCHES[name](args)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)
    return RESULTS


if __name__ == "__main__":
    main()
