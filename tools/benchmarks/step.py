"""one training step of EAPMRetinaNet (EAPM cls + reg on) vs detectron2's RetinaNet, same
tiny R-18 config and weights, 8 x 128x128 images, with 4 and with 80 classes; and,
separately, the part of the step that differs (``losses``, forward + backward on the
same head outputs). The compiled and the eager EAPM model are built with
MODEL.EAPM.COMPILE True / False; a second copy of detectron2's model is a control."""

from __future__ import annotations

import copy
import time

from eapm.utils.benchmark import interleaved, kernel_states, make_sync

from . import register


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


@register("step")
def run(args, reporter) -> None:
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
        reporter.timings(title, times, "d2 RetinaNet.losses")
        fns = {
            "d2 RetinaNet step": step(theirs),
            "d2 RetinaNet step, 2nd copy (control)": step(copy.deepcopy(theirs)),
            "EAPMRetinaNet step (EAPM on, eager)": step(eager),
            "EAPMRetinaNet step (EAPM on, compiled)": step(compiled),
        }
        times = interleaved(fns, args.repeats, args.warmup, sync)
        title = f"[step] training step fwd+bwd, R-18 FPN, 8 x 128x128 images, {num_classes} classes"
        reporter.timings(title, times, "d2 RetinaNet step")
