"""Every config of the repository writes its own output folder, named by one convention:
``configs/FOLDER/NAME.yaml`` (and its LazyConfig twin ``configs/FOLDER/NAME.py``, the same run
spelled in the other config system) writes to ``./output/FOLDER/NAME``. Two configs of
different names never share a folder, so two runs cannot overwrite each other. The
``Base-*.yaml`` files are not run on their own: they keep detectron2's default ``./output``
(a derived config that forgot its own OUTPUT_DIR would not follow the convention)."""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from typing import Dict, List

from detectron2.config import LazyConfig, get_cfg

from eapm.config import add_eapm_config, merge_config_file
from tests.helpers import CONFIGS

DEFAULT = "./output"  # detectron2's default OUTPUT_DIR


def _is_base(path: str) -> bool:
    return os.path.basename(path).startswith("Base-")


def expected_output_dir(path: str) -> str:
    """``configs/FOLDER/NAME.EXT`` -> ``./output/FOLDER/NAME``."""
    folder = os.path.basename(os.path.dirname(path))
    name = os.path.splitext(os.path.basename(path))[0]
    return f"./output/{folder}/{name}"


def output_dir_problems(dirs: Dict[str, str]) -> List[str]:
    """One line per config (path -> its merged OUTPUT_DIR / train.output_dir) that breaks
    the convention, and per folder that configs of different names share."""
    problems = []
    for path, out in sorted(dirs.items()):
        want = DEFAULT if _is_base(path) else expected_output_dir(path)
        if out != want:
            problems.append(f"{path}: output folder {out!r}, expected {want!r}")
    runs = defaultdict(set)  # folder -> the config names (path without extension) writing it
    for path, out in dirs.items():
        if not _is_base(path):
            runs[os.path.normpath(out)].add(os.path.splitext(path)[0])
    for out, names in sorted(runs.items()):
        if len(names) > 1:
            problems.append(f"{out} is written by {len(names)} configs: {sorted(names)}")
    return problems


def _yacs_output_dirs() -> Dict[str, str]:
    dirs = {}
    for path in sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)):
        cfg = get_cfg()
        add_eapm_config(cfg)
        merge_config_file(cfg, path)
        dirs[os.path.relpath(path, CONFIGS)] = cfg.OUTPUT_DIR
    return dirs


def _lazy_output_dirs() -> Dict[str, str]:
    return {
        os.path.relpath(path, CONFIGS): LazyConfig.load(path).train.output_dir
        for path in sorted(glob.glob(os.path.join(CONFIGS, "**", "*.py"), recursive=True))
    }


def test_every_config_writes_its_own_folder_by_the_convention():
    yacs, lazy = _yacs_output_dirs(), _lazy_output_dirs()
    assert len([p for p in yacs if not _is_base(p)]) >= 40 and len(lazy) >= 15
    # every LazyConfig file is the twin of a yacs config of the same folder and name
    assert {os.path.splitext(p)[0] for p in lazy} <= {os.path.splitext(p)[0] for p in yacs}
    assert output_dir_problems({**yacs, **lazy}) == []


def test_the_check_catches_a_shared_folder_and_a_folder_off_the_convention():
    retinanet = "./output/COCO-Detection/retinanet_R_50_FPN_1x"
    good = {
        "COCO-Detection/Base-RetinaNet.yaml": "./output",
        "COCO-Detection/retinanet_R_50_FPN_1x.yaml": retinanet,
        "COCO-Detection/retinanet_R_50_FPN_1x.py": retinanet,  # its LazyConfig twin
        "quickstart/fcos.yaml": "./output/quickstart/fcos",
    }
    assert output_dir_problems(good) == []
    # two configs of different names, one folder (and so one of them off the convention)
    shared = {**good, "quickstart/eapm_fcos.yaml": "./output/quickstart/fcos"}
    problems = output_dir_problems(shared)
    assert any("written by 2 configs" in p for p in problems), problems
    assert any(p.startswith("quickstart/eapm_fcos.yaml: ") for p in problems), problems
    # the old "coco" folder, a missing OUTPUT_DIR (the default) and a base that sets one
    for path, out in [
        ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", "./output/coco/retinanet_R_50_FPN_1x"),
        ("quickstart/fcos.yaml", "./output"),
        ("COCO-Detection/Base-RetinaNet.yaml", "./output/COCO-Detection/Base-RetinaNet"),
        ("quickstart/fcos.yaml", "./output/quickstart/fcos/"),
    ]:
        want = DEFAULT if "Base-" in path else good[path]
        assert output_dir_problems({**good, path: out}) == [
            f"{path}: output folder {out!r}, expected {want!r}"
        ]
    # the same folder reached through two spellings is still one folder
    both = {**good, "quickstart/retinanet.yaml": "./output/quickstart/./fcos"}
    assert any("written by 2 configs" in p for p in output_dir_problems(both))
