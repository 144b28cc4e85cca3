"""Print docs/config-keys.md: the table of the project's config keys, generated from the
comments in projects/eapm/config.py.

    python tools/config_keys.py > docs/config-keys.md     # regenerate
    python tools/config_keys.py --check docs/config-keys.md   # exit 1 if it is out of date

Reads the source only (``ast`` and the comment lines; imports nothing, needs no
detectron2). A key is an assignment ``<name>.A.B.C = value`` with upper-case attributes
inside a function of config.py whose name contains ``add`` (``add_eapm_config`` and its
helpers); its meaning is the block of comment lines directly above it, its default the
source text of the value. A ``# ---- title`` line starts a section. A group
(``= CN()``) gets a row of its own when a comment stands above it; a key without a comment
of its own shares the comment of the key above it.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from typing import List, Optional, Tuple

# computed here, not imported from eapm.model_zoo: this tool reads the source and imports nothing
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "projects", "eapm", "config.py")
HEADER = re.compile(r"^#\s*-{3,}\s*(.*?)\s*-*\s*$")
GROUP = "(group)"
KEY_PART = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _dotted(node: ast.AST) -> Optional[List[str]]:
    """The upper-case attribute chain of ``x.A.B.C`` (``["A", "B", "C"]``), else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or not parts:
        return None
    parts.reverse()
    return parts if all(KEY_PART.match(p) for p in parts) else None


def _comment_block(lines: List[str], lineno: int) -> Tuple[Optional[str], List[str]]:
    """(section title or None, comment lines) directly above 1-based line ``lineno``."""
    block, i = [], lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        block.append(lines[i].strip())
        i -= 1
    block.reverse()
    section, text = None, []
    for line in block:
        m = HEADER.match(line)
        if m:
            section, text = m.group(1) or None, []  # what follows a header is the key's
        else:
            text.append(line.lstrip("#").strip())
    return section, text


# a config key broken over two comment lines after a dot ("MODEL.RETINANET." + "BBOX_...")
SPLIT_KEY = re.compile(r"[A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)+\.$")


def _join(text: List[str]) -> str:
    """The comment lines as one line: runs of spaces collapsed, a key broken after a dot
    rejoined."""
    out = ""
    for line in text:
        line = " ".join(line.split())
        if not line:
            continue
        glue = "" if not out or SPLIT_KEY.search(out.split(" ")[-1]) else " "
        out = (out + glue + line) if out else line
    return out


def collect(path: str = CONFIG) -> List[Tuple[str, str, str, str]]:
    """[(section, key, default source, meaning)] in file order."""
    src = open(path, encoding="utf-8").read()
    lines = src.splitlines()
    assigns = []
    for fn in ast.walk(ast.parse(src)):
        if isinstance(fn, ast.FunctionDef) and "add" in fn.name:
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    parts = _dotted(node.targets[0])
                    if parts:
                        assigns.append((node.lineno, parts, node.value))
    rows, section, last_meaning = [], "", ""
    for lineno, parts, value in sorted(assigns, key=lambda a: a[0]):
        title, text = _comment_block(lines, lineno)
        if title:
            section = title
        default = " ".join(ast.get_source_segment(src, value).split())
        key = ".".join(parts)
        is_group = default == "CN()"
        meaning = _join(text)
        if is_group:
            if meaning:
                rows.append((section, key + ".*", GROUP, meaning))
            last_meaning = ""
            continue
        if not meaning:
            meaning = "as the row above" if last_meaning else "(no comment in config.py)"
        else:
            last_meaning = meaning
        rows.append((section, key, default, meaning))
    return rows


def _cell(text: str) -> str:
    """Markdown-safe table cell: pipes, asterisks and angle brackets escaped."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def render(rows) -> str:
    out = [
        "# Config keys",
        "",
        "Every key that `add_eapm_config` (`projects/eapm/config.py`) adds to detectron2's",
        "config, with its default and the comment that documents it there.",
        "**This page is generated** from those comments:",
        "`python tools/config_keys.py > docs/config-keys.md` rewrites it, and",
        "`python tools/config_keys.py --check docs/config-keys.md` tells whether it is up to",
        "date; edit the comments, not this page. Values are validated once, when a config is",
        "loaded (a `ValueError` naming the key). How the keys combine per detector:",
        "[detectors.md](detectors.md); detectron2's own keys: its `detectron2/config/defaults.py`.",
    ]
    section = None
    for sec, key, default, meaning in rows:
        if sec != section:
            section = sec
            out += ["", f"## {sec[:1].upper() + sec[1:]}" if sec else "## Keys", ""]
            out += ["| key | default | meaning |", "|---|---|---|"]
        code = default.replace("|", "\\|")  # in a code span only the pipe needs escaping
        code = code if default == GROUP else f"`{code}`"
        out.append(f"| `{key}` | {code} | {_cell(meaning)} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=CONFIG, help="the config module to read")
    ap.add_argument("--check", metavar="FILE", help="compare with FILE instead of printing")
    args = ap.parse_args(argv)
    text = render(collect(args.config))
    if args.check:
        with open(args.check, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{args.check} is out of date: python tools/config_keys.py > {args.check}")
                return 1
        print(f"{args.check} is up to date")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
