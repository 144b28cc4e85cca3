#!/usr/bin/env python
"""Micro-benchmarks of the Libra pieces, on CPU, in well under two minutes.

(a) Peak memory of BFP's non-local refine at an 800x1333 input (the P4 map: 256
    channels, 50x84 = 4200 positions), fused ``scaled_dot_product_attention`` (this
    project) vs the materialised HW x HW attention (the direct formula, as
    mmcv's NonLocal2d), for inference (no grad) and for a training step
    (forward + backward).

    How it is measured: each variant runs in a fresh subprocess, and the number is the
    rise of the process's peak resident set size (Linux VmHWM) over its resident size
    just before the measured step, after resetting the peak through /proc/self/clear_refs
    (or, where that is not allowed, over the peak before the step). The step (input
    included) runs once before, at full size, so that thread pools and kernel caches are
    allocated outside the measurement, and the child runs with glibc's
    MALLOC_MMAP_THRESHOLD_=65536: every buffer above 64 KiB is its own mapping, returned
    to the system when freed, so the peak RSS follows the live buffers instead of
    malloc's cache (without it the threshold grows after the first large free and freed
    blocks stay resident). Unlike a tensor-level count, this includes the kernels'
    internal scratch buffers (the flash kernels allocate some). tracemalloc only sees
    Python's allocator, and torch.profiler's CPU memory events do not give a live peak.

(b) Time per image of the RoI sampler for 2000 proposals x 20 GT boxes:
    LibraROIHeads._sample_proposals (IoU-balanced negatives + instance-balanced
    positives, tensor ops) vs detectron2's random sampler
    (StandardROIHeads._sample_proposals), medians over repeats; also with the
    IoU matrix + matcher included (what label_and_sample_proposals pays per image).

    python tools/bench_libra.py [--repeats 200] [--batch 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects"))


# ------------------------------------------------------------------ (a) memory
def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(variant: str, mode: str, batch: int) -> dict:
    import torch

    from eapm.modeling.bfp import NonLocalBlock2d

    torch.set_num_threads(2)
    torch.manual_seed(0)
    block = NonLocalBlock2d(256)
    with torch.no_grad():
        block.conv_out.weight.normal_(std=0.01)  # a trained block is not the identity
    fused = variant != "materialised"
    if variant == "no_attention":
        # the same block with the attention replaced by the identity on g(x): what every
        # variant pays besides the attention (projections, output, autograd)
        import torch.nn.functional as F

        F.scaled_dot_product_attention = lambda q, k, v, scale=None: v

    def step():
        x = torch.randn(batch, 256, 50, 84, requires_grad=(mode == "train"))
        if mode == "train":
            block(x, fused=fused).square().mean().backward()
            block.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                block(x, fused=fused)

    step()  # warm-up at full size: thread pools / kernel caches allocate outside the peak
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _proc_kib("VmRSS") if reset else _proc_kib("VmHWM")
    t0 = time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    peak = _proc_kib("VmHWM")
    return {"peak_mib": (peak - before) / 1024, "seconds": dt, "peak_reset": reset}


def bench_memory(batch: int) -> list:
    rows = []
    for mode in ("inference", "train"):
        for variant in ("no_attention", "sdpa", "materialised"):
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", variant, mode, str(batch)],
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows.append({"mode": mode, "variant": variant, **json.loads(out.strip().splitlines()[-1])})
    return rows


# ----------------------------------------------------------------- (b) sampler
def bench_sampler(repeats: int) -> dict:
    import torch
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import StandardROIHeads, build_roi_heads
    from detectron2.structures import Boxes, pairwise_iou

    import eapm

    # one thread: the per-image sampling ops are tiny, and on a shared machine OpenMP's
    # barriers between 2 threads cost more than the ops (medians jump to ~100 ms)
    torch.set_num_threads(1)
    cfg = get_cfg()
    eapm.add_eapm_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "COCO-Detection", "libra_rcnn_R_50_FPN_1x.yaml"))
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
    props = torch.stack([props[:, [0, 2]].min(1).values, props[:, [1, 3]].min(1).values,
                         props[:, [0, 2]].max(1).values, props[:, [1, 3]].max(1).values], 1)  # fmt: skip
    gt_boxes, prop_boxes = Boxes(gt), Boxes(props)
    gt_classes = torch.randint(0, 80, (n_gt,), generator=g)

    def libra():
        return heads._sample_proposals(matched_idxs, matched_labels, gt_classes)

    def d2():
        return StandardROIHeads._sample_proposals(heads, matched_idxs, matched_labels, gt_classes)

    iou = pairwise_iou(gt_boxes, prop_boxes)
    matched_idxs, matched_labels = heads.proposal_matcher(iou)
    stats = {
        "positives": int((matched_labels == 1).sum()),
        "negatives": int((matched_labels == 0).sum()),
        "max_iou_of_negatives": float(heads.proposal_matcher.last_max_iou[matched_labels == 0].max()),
    }

    def match_then(sample):
        def run():
            m_idx, m_lab = heads.proposal_matcher(pairwise_iou(gt_boxes, prop_boxes))
            return sample(m_idx, m_lab)

        return run

    def median_ms(fn):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    sample_libra = lambda i, l: heads._sample_proposals(i, l, gt_classes)  # noqa: E731
    sample_d2 = lambda i, l: StandardROIHeads._sample_proposals(heads, i, l, gt_classes)  # noqa: E731
    stats["libra_ms"] = median_ms(libra)
    stats["d2_ms"] = median_ms(d2)
    stats["libra_match_ms"] = median_ms(match_then(sample_libra))
    stats["d2_match_ms"] = median_ms(match_then(sample_d2))
    # what the IoU-balanced sampler did with the negatives (bins of width max IoU / 3)
    torch.manual_seed(0)
    idx, labels = libra()
    neg_iou = heads.proposal_matcher.last_max_iou[idx[labels == heads.num_classes]]
    edges = [i * float(heads.proposal_matcher.last_max_iou.max()) / 3 for i in range(4)]
    stats["neg_per_bin"] = [int(((neg_iou >= a) & (neg_iou < b)).sum()) for a, b in zip(edges[:-1], edges[1:])]
    torch.manual_seed(0)
    idx, labels = d2()
    neg_iou = heads.proposal_matcher.last_max_iou[idx[labels == heads.num_classes]]
    stats["neg_per_bin_d2"] = [int(((neg_iou >= a) & (neg_iou < b)).sum()) for a, b in zip(edges[:-1], edges[1:])]
    return stats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200, help="timed repeats of the sampler (median)")
    p.add_argument("--batch", type=int, default=1, help="images in the non-local memory benchmark")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        variant, mode, batch = args.child
        print(json.dumps(_memory_child(variant, mode, int(batch))))
        return

    t0 = time.perf_counter()
    mem = bench_memory(args.batch)
    smp = bench_sampler(args.repeats)
    by = {(r["mode"], r["variant"]): r for r in mem}
    hw = 50 * 84
    print("== ratios ==")
    for mode in ("inference", "train"):
        a, b, z = by[(mode, "materialised")], by[(mode, "sdpa")], by[(mode, "no_attention")]
        print(f"non-local {mode:9s} peak memory sdpa / materialised: {b['peak_mib'] / max(a['peak_mib'], 1e-9):6.3f}x"
              f"   attention part only (minus the no-attention run): "
              f"{(b['peak_mib'] - z['peak_mib']) / max(a['peak_mib'] - z['peak_mib'], 1e-9):6.3f}x"
              f"   time materialised / sdpa: {a['seconds'] / b['seconds']:5.2f}x")  # fmt: skip
    print(f"sampler time libra / detectron2 random: {smp['libra_ms'] / smp['d2_ms']:6.2f}x"
          f"   (with IoU + matcher: {smp['libra_match_ms'] / smp['d2_match_ms']:5.2f}x)")  # fmt: skip
    print()
    print(f"== (a) BFP non-local refine, P4 of an 800x1333 input: {args.batch} x 256 x 50 x 84, float32, CPU ==")
    print(f"one HW x HW attention matrix: {hw}^2 x 4 B x {args.batch} = {hw * hw * 4 * args.batch / 2**20:.1f} MiB")
    for r in mem:
        print(f"  {r['mode']:9s} {r['variant']:12s} peak RSS rise {r['peak_mib']:8.1f} MiB   {r['seconds']:6.2f} s"
              + ("" if r["peak_reset"] else "   (peak not resettable: rise over the earlier peak)"))  # fmt: skip
    print()
    print(f"== (b) RoI sampling per image: 2000 proposals x 20 GT, 512 RoIs, median of {args.repeats} ==")
    print(f"  proposals: {smp['positives']} positives, {smp['negatives']} negatives "
          f"(max IoU of a negative {smp['max_iou_of_negatives']:.3f})")  # fmt: skip
    print(f"  LibraROIHeads._sample_proposals           {smp['libra_ms']:8.3f} ms")
    print(f"  detectron2 random (StandardROIHeads)      {smp['d2_ms']:8.3f} ms")
    print(f"  IoU matrix + matcher + Libra sampler      {smp['libra_match_ms']:8.3f} ms")
    print(f"  IoU matrix + matcher + detectron2 sampler {smp['d2_match_ms']:8.3f} ms")
    print(f"  sampled negatives per IoU bin (width max IoU / 3): Libra {smp['neg_per_bin']}, "
          f"detectron2 {smp['neg_per_bin_d2']}")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - t0:.1f} s; torch threads: 2 for (a), 1 for (b)")


if __name__ == "__main__":
    main()
