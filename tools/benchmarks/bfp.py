"""BFP non-local refine at the P4 map of an 800x1333 input (--bfp-batch x 256 x 50 x 84):
fused scaled_dot_product_attention vs the materialised HW x HW attention, inference
and training step. Peak memory in fresh subprocesses (cpu: peak RSS rise with a fixed
mmap threshold; cuda: the allocator's peak), time in interleaved rounds here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Callable

import torch

from eapm.utils.benchmark import interleaved, make_sync

from . import register

BFP_VARIANTS = ("no_attention", "sdpa", "materialised")
# the command line whose hidden --bfp-child runs ``memory_child`` in a fresh process
TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmark.py")


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


def memory_child(variant: str, mode: str, batch: int, device: str) -> dict:
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


@register("bfp")
def run(args, reporter) -> None:
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
            stdout = subprocess.run(
                [sys.executable, TOOL, "--bfp-child", variant, mode, str(b)]
                + ["--device", args.device],
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(stdout.strip().splitlines()[-1])
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
        values = {f"{v} {mode}": peak[v] for v in BFP_VARIANTS}
        reporter.values(title, values, f"materialised {mode}", "MiB", notes)
    block = _bfp_block(args.device)
    for mode in ("inference", "train"):
        fns = {
            f"materialised {mode}": _bfp_step(block, mode, b, args.device, fused=False),
            f"sdpa {mode}": _bfp_step(block, mode, b, args.device, fused=True),
        }
        times = interleaved(fns, args.repeats, args.warmup, sync)
        title = f"[bfp] BFP non-local refine, {mode}, time: {b} x 256 x 50 x 84, {args.device}"
        reporter.timings(title, times, f"materialised {mode}")
