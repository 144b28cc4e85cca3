#!/usr/bin/env python
"""Export an EAPM detector (yacs .yaml or LazyConfig .py config) to TorchScript or ONNX, with
the flags of detectron2's tools/deploy/export_model.py (thin over ``eapm.export``):

    python tools/export_model.py --config-file configs/quickstart/eapm_retinanet.yaml \\
        --export-method tracing --format torchscript --output output/export \\
        MODEL.WEIGHTS output/quickstart/eapm_retinanet/model_final.pth

The exported model is run on the sample image (--sample-image, else noise of the test size)
and compared with the eager model; the differences are printed.
"""

from __future__ import annotations

import argparse
import time

from eapm.export import EXPORT_METHODS, FORMATS, export_model


def main(argv=None):
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
    if r["max_box_diff"] is not None:
        print(
            f"exported vs eager on the sample image: {r['detections']} detections, "
            f"max |box diff| {r['max_box_diff']:g}, max |score diff| {r['max_score_diff']:g}"
        )
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
