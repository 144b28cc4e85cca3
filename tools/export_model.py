#!/usr/bin/env python
"""Export an EAPM detector (yacs .yaml or LazyConfig .py config) to TorchScript or ONNX, with
the flags of detectron2's tools/deploy/export_model.py (thin over ``eapm.export``):

    python tools/export_model.py --config-file configs/quickstart/eapm_retinanet.yaml \\
        --export-method tracing --format onnx --output output/export \\
        MODEL.WEIGHTS output/quickstart/eapm_retinanet/model_final.pth

The written file is loaded with its runtime (onnxruntime, or torch.jit.load) and compared
with the eager model on the sample image (--sample-image, else noise of the test size: the
image it is traced on) and on noise of another size; the differences are printed. Exits
with status 1 when the exported model's detections do not pair one to one with the eager
model's (see ``eapm.export.compare_detections``). How to run the file: docs/deployment.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from detectron2.utils.logger import setup_logger

from eapm.export import EXPORT_METHODS, FORMATS, export_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export an EAPM detector")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--export-method", choices=EXPORT_METHODS, default="tracing")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--sample-image", default=None, metavar="IMAGE")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE for yacs, key=value)"
    )
    args = parser.parse_args(argv)
    setup_logger(name="fvcore")  # the checkpointer's missing / unexpected keys
    setup_logger(name="detectron2", abbrev_name="d2")
    logger = setup_logger(name="eapm")
    start = time.perf_counter()
    r = export_model(
        args.config_file,
        args.output,
        method=args.export_method,
        fmt=args.format,
        sample_image=args.sample_image,
        opts=args.opts,
    )
    print(f"exported {args.export_method}/{args.format}: {r['path']}")
    ok = True
    for c in r["checks"]:
        h, w = c["size"]
        print(
            f"exported vs eager, {c['image']} {h}x{w}: {c['exported_detections']} / "
            f"{c['detections']} detections, {c['unmatched']} unmatched, "
            f"max |box diff| {c['max_box_diff']:g} px, max |score diff| {c['max_score_diff']:g}"
        )
        ok &= c["unmatched"] == 0 and c["exported_detections"] == c["detections"]
    if not ok:
        logger.error("the exported model's detections differ from the eager model's")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
