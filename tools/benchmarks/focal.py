"""EAPM focal loss fwd+bwd vs fvcore's sigmoid_focal_loss_jit (detectron2's focal loss),
on 50000 x 80 and 200000 x 80 logits; compiled and eager EAPM kernels."""

from __future__ import annotations

import time

import torch

from eapm.utils.benchmark import interleaved, kernel_states, make_sync

from . import register


@register("focal")
def run(args, reporter) -> None:
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
        reporter.timings(title, times, "d2 fvcore sigmoid_focal_loss_jit")
