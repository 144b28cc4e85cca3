"""The repository explains itself: no tracked file but CHANGELOG.md cites a design file that is
not in it (the upper-case design file, notes of the design), a folder beside the repository (the
"shared" folder one level up) or an issue number of the project's own tracker; the design is in
docs/design.md, history in CHANGELOG.md. An upstream project's issue ("pytorch issue" and its
number) is a public reference and allowed. The bad examples below are spelled in pieces so that
this file does not match its own check."""

from __future__ import annotations

import os
import re
import subprocess
from typing import List

from tests.helpers import REPO

EXEMPT = {"CHANGELOG.md"}
# issues of these projects are public references, not this project's history
UPSTREAM = {"pytorch", "torch", "detectron2", "onnx", "onnxruntime", "numpy", "fvcore", "uv"}
OUTSIDE = re.compile(r"DESIGN\.md|design\s+notes|\.\./shared", re.IGNORECASE)
ISSUE = re.compile(r"(?:\b([\w.-]+)\s+)?\bissues?\s+(?:no\.\s*)?#?\d+", re.IGNORECASE)


def outside_references(text: str) -> List[str]:
    """Each mention in ``text`` of a file outside the repository or of an issue number of
    the project's own tracker."""
    found = []
    for m in OUTSIDE.finditer(text):
        if m.group(0) != "design.md":  # docs/design.md is in the repository
            found.append(m.group(0))
    for m in ISSUE.finditer(text):
        if (m.group(1) or "").lower() not in UPSTREAM:
            found.append(m.group(0))
    return found


def _tracked_files() -> List[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(REPO, p))]


def test_no_tracked_file_cites_what_is_outside_the_repository():
    files = _tracked_files()
    assert len(files) > 100 and "docs/design.md" in files
    problems = []
    for path in files:
        if path in EXEMPT:
            continue
        with open(os.path.join(REPO, path), "rb") as f:
            text = f.read().decode("utf-8", errors="ignore")
        for ref in outside_references(text):
            problems.append(f"{path}: {ref!r}")
    assert problems == []


def test_the_check_finds_each_kind_of_reference():
    bad = [
        "(MF not differentiated: DESIGN" + ".md section 2)",
        "from the project's design" + " notes (its house rules)",
        "see .." + "/shared/notes.md",
        "EAPM in the two-stage detectors (issue" + " 20): EAPM cross entropy",
        "the paper's recipe on a two-stage detector, issue" + " 20). Its",
        "EAPMFCOS with EAPM focal loss (issue" + " #4).",
        "Issues" + " 12 and 13",
    ]
    for line in bad:
        assert len(outside_references(line)) == 1, line
    good = [
        "the design: [docs/design.md](docs/design.md)",
        "scaled_dot_product_attention; pytorch issue" + " 125158, fixed in torch 2.5",
        "an issue of the dataset: 20 images",
        "every issue is named",
    ]
    for line in good:
        assert outside_references(line) == [], line
