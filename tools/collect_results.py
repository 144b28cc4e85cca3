#!/usr/bin/env python
"""Collect the COCO box AP of training / evaluation output folders into a Markdown table.

    python tools/collect_results.py output/COCO-Detection/retinanet_R_50_FPN_1x \\
        output/COCO-Detection/retinanet_R_50_FPN_1x_eapm_mu1.5 --paper
    python tools/collect_results.py output/quickstart/* --baseline retinanet

For each OUT_DIR the result is the last bbox evaluation in ``log.txt`` (the
``copypaste:`` block detectron2 prints after every evaluation, training and
--eval-only alike), else the last ``bbox/AP...`` entry of ``metrics.json``. The
table lists AP, AP50, AP75, APs, APm, APl (percent) and, in brackets, the difference
to the baseline row (--baseline: a row name, a folder, or a 0-based index; default
the first folder; "none" for no differences).

A run is named after its config: the basename of OUTPUT_DIR in the folder's
``config.yaml`` (written by detectron2), else the folder's name. With --paper, the
paper's numbers for that config (eapm/paper_results.py: Tables 1-2 on coco_2017_val,
Table 3 on coco_2017_test-dev, chosen by the evaluated dataset) are shown side by side,
their differences taken to the baseline's paper row.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

from eapm.utils.results import (  # noqa: F401  (parse_log, ... are this tool's API too)
    METRICS,
    RunResult,
    _basename,
    identify_config,
    parse_log,
    parse_metrics_json,
    read_config,
    read_results,
)


# ----------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------
def _fmt(v: Optional[float], decimals: int) -> str:
    if v is None:
        return "—"
    if math.isnan(v):
        return "nan"
    return f"{v:.{decimals}f}"


def _cell(v: Optional[float], base: Optional[float], decimals: int, show_delta: bool) -> str:
    s = _fmt(v, decimals)
    if (
        show_delta
        and v is not None
        and base is not None
        and not math.isnan(v)
        and not math.isnan(base)
    ):
        d = round(v - base, decimals)
        s += f" ({d:+.{decimals}f})" if d != 0 else f" (±{0:.{decimals}f})"
    return s


def resolve_baseline(runs: Sequence[RunResult], spec: Optional[str]) -> Optional[int]:
    """Index of the baseline row: None for "none"; an int is a 0-based index; otherwise
    a row name, config name or folder (as given or its basename)."""
    if spec is None:
        return 0 if runs else None
    if spec.lower() == "none":
        return None
    if re.fullmatch(r"-?\d+", spec):
        i = int(spec)
        if not -len(runs) <= i < len(runs):
            raise SystemExit(f"--baseline {spec}: index out of range (0..{len(runs) - 1})")
        return i % len(runs)
    for i, r in enumerate(runs):
        if spec in (r.name, r.config, r.path, _basename(r.path)) or os.path.normpath(
            spec
        ) == os.path.normpath(r.path):
            return i
    names = ", ".join(r.name for r in runs)
    raise SystemExit(f"--baseline {spec!r} matches no run (runs: {names})")


def make_table(
    runs: Sequence[RunResult],
    baseline: Optional[int] = 0,
    paper: bool = False,
    decimals: int = 1,
) -> str:
    """The Markdown table (and, with ``paper``, a list of the paper rows used)."""
    from eapm.paper_results import paper_result

    base = runs[baseline] if baseline is not None else None
    papers = [paper_result(r.config, r.dataset) if paper and r.config else None for r in runs]
    base_paper = papers[baseline] if baseline is not None else None
    head = ["run", "dataset"]
    for m in METRICS:
        head.append(m)
        if paper:
            head.append(f"{m} (paper)")
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    for i, (r, p) in enumerate(zip(runs, papers)):
        label = r.name + (" (baseline)" if i == baseline else "")
        row = [label, r.dataset or "—"]
        # no differences across evaluation sets (e.g. val against test-dev)
        comparable = i != baseline and (
            base is None or not (r.dataset and base.dataset) or r.dataset == base.dataset
        )
        paper_comparable = (
            i != baseline
            and p is not None
            and base_paper is not None
            and p.dataset == base_paper.dataset
        )
        for m in METRICS:
            v = r.metrics.get(m) if r.ok else None
            bv = base.metrics.get(m) if base is not None and base.ok else None
            row.append(_cell(v, bv, decimals, comparable))
            if paper:
                pv = p.as_dict()[m] if p else None
                pb = base_paper.as_dict()[m] if base_paper else None
                row.append(_cell(pv, pb, 1, paper_comparable))
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for r in runs:
        if not r.ok:
            notes.append(f"- {r.name}: no bbox results found in {r.path} (log.txt / metrics.json)")
    if paper:
        for r, p in zip(runs, papers):
            if p:
                notes.append(f'- {r.name}: paper {p.table}, "{p.setting}" ({p.dataset})')
            else:
                notes.append(
                    f"- {r.name}: no paper row for config {r.config!r} "
                    f"on {r.dataset or 'an unknown dataset'}"
                )
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def _unique_names(runs: Sequence[RunResult]) -> None:
    seen: Dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            r.name = os.path.normpath(r.path)


def collect(folders: Sequence[str], dataset: Optional[str] = None) -> List[RunResult]:
    from eapm.paper_results import paper_configs

    runs = [read_results(f, dataset=dataset, known=paper_configs()) for f in folders]
    _unique_names(runs)
    return runs


def main(argv: Optional[Sequence[str]] = None) -> str:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "out_dirs", nargs="+", metavar="OUT_DIR", help="training / evaluation output folders"
    )
    ap.add_argument(
        "--baseline", default=None, help="row name, folder or 0-based index (default 0); 'none'"
    )
    ap.add_argument(
        "--paper", action="store_true", help="show the paper's numbers (COCO configs) side by side"
    )
    ap.add_argument(
        "--dataset", default=None, help="use the evaluation on this dataset (default: the last one)"
    )
    ap.add_argument(
        "--decimals", type=int, default=1, help="decimals of our numbers (default 1, as the paper)"
    )
    ap.add_argument("--output", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    folders = []
    for f in args.out_dirs:
        if os.path.isfile(f):  # e.g. a shell glob over output/*
            print(f"warning: {f} is a file, skipped", file=sys.stderr)
        else:
            if not os.path.isdir(f):
                print(f"warning: {f} does not exist (yet)", file=sys.stderr)
            folders.append(f)
    if not folders:
        raise SystemExit("no output folders given")
    runs = collect(folders, args.dataset)
    table = make_table(runs, resolve_baseline(runs, args.baseline), args.paper, args.decimals)
    print(table, end="")
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(table)
    return table


if __name__ == "__main__":
    main()
