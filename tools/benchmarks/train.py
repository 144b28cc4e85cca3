"""the GPU check: seconds per iteration and peak memory of a training step (AMP:
float16 on cuda, bfloat16 on cpu, autocast + GradScaler) of RetinaNet R-50-FPN with
detectron2's losses and with EAPM mu 1.5 (compiled and eager), --batch images of
--height x --width (synthetic, no dataset or weights); peak memory on cuda only."""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

from eapm.utils.benchmark import interleaved, kernel_states, make_sync

from . import register

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


@register("train", cpu_default=False)
def run(args, reporter) -> None:
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
    reporter.timings(
        f"[train] training step, RetinaNet R-50-FPN, {shape}, {amp}, {args.device}", times, base
    )
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
    reporter.values(
        f"[train] peak memory of a training step, {shape}, {amp}", peak, base, "GiB", notes
    )
