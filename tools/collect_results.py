#!/usr/bin/env python
"""Collect the COCO box AP of training / evaluation output folders into a Markdown table.

    python tools/collect_results.py output/coco/retinanet_R_50_FPN_1x \\
        output/coco/retinanet_R_50_FPN_1x_eapm_mu1.5 --paper
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
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(REPO, "projects") not in sys.path:
    try:
        import eapm  # noqa: F401
    except ImportError:  # not pip-installed: use the source tree
        sys.path.insert(0, os.path.join(REPO, "projects"))

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

_EVAL_FOR = re.compile(r"Evaluation results for (\S+) in csv format")
_COPYPASTE = re.compile(r"copypaste: (.*?)\s*$")


@dataclass
class RunResult:
    path: str  # the folder as given
    name: str  # row label
    config: Optional[str] = None  # config name (OUTPUT_DIR basename or folder name)
    dataset: Optional[str] = None  # evaluated dataset, where known
    metrics: Dict[str, float] = field(default_factory=dict)
    source: Optional[str] = None  # "log.txt" / "metrics.json"

    @property
    def ok(self) -> bool:
        return bool(self.metrics)


# ----------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------
def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.nan


def parse_log(text: str) -> List[Tuple[Optional[str], str, Dict[str, float]]]:
    """All ``copypaste:`` result blocks of a detectron2 log, in order:
    [(dataset or None, task, {metric: value})]."""
    blocks = []
    dataset, task, header = None, None, None
    for line in text.splitlines():
        m = _EVAL_FOR.search(line)
        if m:
            dataset, task, header = m.group(1), None, None
            continue
        m = _COPYPASTE.search(line)
        if not m:
            continue
        body = m.group(1)
        if body.startswith("Task: "):
            task, header = body[len("Task: "):].strip(), None
        elif task is not None and header is None:
            header = [h.strip() for h in body.split(",")]
        elif task is not None and header is not None:
            values = [_float(v.strip()) for v in body.split(",")]
            if len(values) == len(header):
                blocks.append((dataset, task, dict(zip(header, values))))
            task, header = None, None
    return blocks


def parse_metrics_json(path: str) -> List[Tuple[Optional[str], str, Dict[str, float]]]:
    """The evaluation entries of a detectron2 ``metrics.json`` (one JSON object per
    line; evaluation results are flattened as ``bbox/AP`` or ``<dataset>/bbox/AP``)."""
    blocks = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            found: Dict[Tuple[Optional[str], str], Dict[str, float]] = {}
            for key, value in entry.items():
                parts = key.split("/")
                if len(parts) >= 2 and parts[-1] in METRICS and parts[-2] == "bbox":
                    ds = "/".join(parts[:-2]) or None
                    found.setdefault((ds, "bbox"), {})[parts[-1]] = float(value)
            blocks += [(ds, task, vals) for (ds, task), vals in found.items()]
    return blocks


def read_config(folder: str) -> dict:
    """OUTPUT_DIR and DATASETS.TEST of the folder's config.yaml ({} if absent)."""
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return {}
    try:
        import yaml

        with open(path) as fh:
            cfg = yaml.safe_load(fh) or {}
        return {
            "OUTPUT_DIR": cfg.get("OUTPUT_DIR"),
            "TEST": list((cfg.get("DATASETS") or {}).get("TEST") or []),
        }
    except Exception:  # unreadable yaml: fall back to the one key we need
        with open(path) as fh:
            m = re.search(r"^OUTPUT_DIR:\s*(.+?)\s*$", fh.read(), re.M)
        return {"OUTPUT_DIR": m.group(1).strip("'\"") if m else None, "TEST": []}


def _basename(p: str) -> str:
    return os.path.basename(os.path.normpath(p))


def identify_config(folder: str, cfg: Optional[dict] = None, known: Sequence[str] = ()) -> str:
    """The config name of a run: OUTPUT_DIR's basename (config.yaml) or the folder's
    name; a name in ``known`` (the paper's configs) wins over one that is not."""
    cfg = read_config(folder) if cfg is None else cfg
    candidates = [_basename(cfg["OUTPUT_DIR"])] if cfg.get("OUTPUT_DIR") else []
    candidates.append(_basename(folder))
    for c in candidates:
        if c in known:
            return c
    return candidates[0]


def read_results(folder: str, dataset: Optional[str] = None, task: str = "bbox", known: Sequence[str] = ()) -> RunResult:
    """The last ``task`` evaluation of an output folder (on ``dataset`` if given)."""
    cfg = read_config(folder)
    config = identify_config(folder, cfg, known)
    run = RunResult(path=folder, name=config, config=config)
    test_sets = cfg.get("TEST") or []
    for source in ("log.txt", "metrics.json"):
        path = os.path.join(folder, source)
        if not os.path.isfile(path):
            continue
        if source == "log.txt":
            with open(path, errors="replace") as fh:
                blocks = parse_log(fh.read())
        else:
            blocks = parse_metrics_json(path)
        # a block without a dataset name is the (single) test set of the config
        default_ds = test_sets[0] if len(test_sets) == 1 else None
        blocks = [(ds or default_ds, t, v) for ds, t, v in blocks if t == task]
        if dataset is not None:
            blocks = [b for b in blocks if b[0] == dataset]
        if blocks:
            run.dataset, _, values = blocks[-1]
            run.metrics = {k: values[k] for k in METRICS if k in values}
            run.source = source
            break
    if run.dataset is None and len(test_sets) == 1:
        run.dataset = test_sets[0]
    return run


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
    if show_delta and v is not None and base is not None and not math.isnan(v) and not math.isnan(base):
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
        if spec in (r.name, r.config, r.path, _basename(r.path)) or os.path.normpath(spec) == os.path.normpath(r.path):
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
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for i, (r, p) in enumerate(zip(runs, papers)):
        label = r.name + (" (baseline)" if i == baseline else "")
        row = [label, r.dataset or "—"]
        # no differences across evaluation sets (e.g. val against test-dev)
        comparable = i != baseline and (base is None or not (r.dataset and base.dataset) or r.dataset == base.dataset)
        paper_comparable = i != baseline and p is not None and base_paper is not None and p.dataset == base_paper.dataset
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
                notes.append(f"- {r.name}: paper {p.table}, \"{p.setting}\" ({p.dataset})")
            else:
                notes.append(f"- {r.name}: no paper row for config {r.config!r} on {r.dataset or 'an unknown dataset'}")
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="training / evaluation output folders")
    ap.add_argument("--baseline", default=None, help="row name, folder or 0-based index (default 0); 'none'")
    ap.add_argument("--paper", action="store_true", help="show the paper's numbers (COCO configs) side by side")
    ap.add_argument("--dataset", default=None, help="use the evaluation on this dataset (default: the last one)")
    ap.add_argument("--decimals", type=int, default=1, help="decimals of our numbers (default 1, as the paper)")
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
