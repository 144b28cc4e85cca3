"""EAPM balanced L1 fwd+bwd vs detectron2's smooth L1 on 100000 x 4 deltas."""

from __future__ import annotations

import time

import torch

from eapm.utils.benchmark import interleaved, kernel_states, make_sync

from . import register


@register("box")
def run(args, reporter) -> None:
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
    reporter.timings(
        f"[box] box loss fwd+bwd, 100000 x 4, theta 1.0, {args.device}", times, "d2 smooth_l1_loss"
    )
