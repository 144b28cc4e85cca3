"""Reading the results of detectron2 training / evaluation output folders.

``read_results(folder)`` returns the last COCO evaluation of a folder (``log.txt``'s
``copypaste:`` blocks, else ``metrics.json``), named after the run's config. Used by
``tools/collect_results.py`` (the result tables) and ``tools/ablation.py`` (which runs are
done). Pure Python (PyYAML where installed), no torch or detectron2 import.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..paper_results import METRICS  # the COCO metrics, in detectron2's order

__all__ = [
    "METRICS",
    "RunResult",
    "parse_log",
    "parse_metrics_json",
    "read_config",
    "identify_config",
    "read_results",
]

_EVAL_FOR = re.compile(r"Evaluation results for (\S+) in csv format")
_COPYPASTE = re.compile(r"copypaste: (.*?)\s*$")


@dataclass
class RunResult:
    """One output folder's result: ``metrics`` maps the names in ``METRICS`` that were
    found to their values (percent, NaN where detectron2 printed nan); empty when the
    folder has no evaluation (yet), which ``ok`` tells."""

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
            task, header = body[len("Task: ") :].strip(), None
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


def read_results(
    folder: str, dataset: Optional[str] = None, task: str = "bbox", known: Sequence[str] = ()
) -> RunResult:
    """The last ``task`` evaluation of an output folder (on ``dataset`` if given): from
    ``log.txt`` if it has one, else from ``metrics.json``. The run is named after its
    config (``identify_config``; ``known`` lists preferred names). A folder without
    results (or that does not exist) gives a ``RunResult`` with ``ok`` False."""
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
