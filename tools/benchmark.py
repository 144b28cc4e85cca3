#!/usr/bin/env python
"""Side-by-side benchmarks of the EAPM losses, models and Libra pieces against what they replace.

    python tools/benchmark.py                                  # the CPU sections
    python tools/benchmark.py --only focal box --repeats 15
    python tools/benchmark.py --device cuda --repeats 20 --warmup 5   # the GPU check
    python tools/benchmark.py --only recipe --recipe-train   # old vs new quickstart: time and AP
    # smoke test (what the test suite runs): tiny images, a few rounds, seconds
    python tools/benchmark.py --only train --batch 2 --height 64 --width 96 --repeats 2 --warmup 1

Every timed comparison is measured in this one run, in interleaved rounds (each round runs every
variant once, in an order that rotates from round to round) so that machine noise hits all sides
alike; it prints the ratio of the medians first (with the spread of the per-round ratios), then
the absolute medians. Memory figures are printed as ratios first too. Ratios < 1 mean EAPM (or
this project's version) is cheaper. With --device cuda the GPU is synchronised before every
reading of the clock.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict

import torch
from benchmarks import SECTIONS, help_text
from benchmarks.bfp import memory_child
from benchmarks.recipe import RECIPES

from eapm.utils.benchmark import Reporter

# The harness (interleaved rounds, ratios, reports) is eapm.utils.benchmark; each section is a
# module of tools/benchmarks/ whose docstring is its entry in --help, after this header.
SECTIONS_HEADER = "Sections (--only; default: all but train on cpu, all on cuda):"


def main(argv=None) -> Dict[str, dict]:
    """Runs the sections ``argv`` asks for (default: ``sys.argv[1:]``), prints their reports
    and returns them, by title (what ``--json`` writes; ``{}`` for ``--bfp-child``)."""
    names = tuple(SECTIONS)
    description, epilog = __doc__.split("\n\n", 1)
    epilog = f"{epilog.rstrip()}\n\n{SECTIONS_HEADER}\n{help_text()}\n"
    p = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="+", choices=names, metavar="SECTION",
                   help=f"sections to run, in this order: {' '.join(names)} (default: all but"
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
    p.add_argument("--recipe-train", action="store_true",
                   help="recipe: train every config in full (interleaved) and evaluate it:"
                   " training time and AP side by side")  # fmt: skip
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
        print(json.dumps(memory_child(variant, mode, int(batch), args.device)))
        return {}
    cpu_default = tuple(s.name for s in SECTIONS.values() if s.cpu_default)
    only = args.only or (cpu_default if args.device == "cpu" else names)
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {dev}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; sections: {' '.join(s for s in names if s in only)}"
    )
    reporter = Reporter()
    t0 = time.perf_counter()
    for name in names:
        if name in only:
            SECTIONS[name].run(args, reporter)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reporter.results, f, indent=1)
    return reporter.results


if __name__ == "__main__":
    main()
