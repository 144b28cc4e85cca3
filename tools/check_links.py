"""Check that every relative link in the Markdown manual resolves.

    python tools/check_links.py                 # README.md, CHANGELOG.md, docs/*.md
    python tools/check_links.py FILE.md ...     # only these

A link is ``[text](target)``, ``![alt](target)`` or a reference definition ``[name]: target``
outside code blocks and inline code. Links with a scheme (``https:``, ``mailto:``) are not
fetched. A relative target must name an existing file or folder (relative to the Markdown
file); a ``#fragment`` must match a heading of the target Markdown file (GitHub's anchors:
lower case, punctuation dropped, spaces as ``-``). Prints each broken link as
``FILE:LINE: target (why)`` and exits with 1 if there is one, else prints the count checked.
Imports nothing of the package.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from typing import Dict, List, Set, Tuple

# computed here, not imported from eapm.model_zoo: this check reads markdown and imports nothing
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def default_files() -> List[str]:
    files = [os.path.join(REPO, "README.md"), os.path.join(REPO, "CHANGELOG.md")]
    files += sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
    return [f for f in files if os.path.isfile(f)]


def prose_lines(path: str, keep_code: bool = False) -> List[Tuple[int, str]]:
    """(line number, text) of the lines outside code blocks (fenced, or indented by 4 spaces
    after a blank line), with inline code removed unless ``keep_code``."""
    out, in_fence, in_indented, prev_blank = [], False, False, True
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if FENCE.match(line):
                in_fence = not in_fence
                continue
            blank = not line.strip()
            in_indented = line.startswith("    ") and (prev_blank or in_indented) and not blank
            prev_blank = blank
            if not in_fence and not in_indented:
                out.append((no, line if keep_code else CODE_SPAN.sub("", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading text."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


_anchors: Dict[str, Set[str]] = {}


def anchors(path: str) -> Set[str]:
    if path not in _anchors:
        seen: Dict[str, int] = {}
        found: Set[str] = set()
        for _, line in prose_lines(path, keep_code=True):
            m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m:
                s = slug(m.group(1))
                n = seen.get(s, 0)
                found.add(s if n == 0 else f"{s}-{n}")
                seen[s] = n + 1
        _anchors[path] = found
    return _anchors[path]


def check_file(path: str) -> Tuple[int, List[str]]:
    """Returns (number of relative links checked, messages of the broken ones)."""
    checked, broken = 0, []
    rel = os.path.relpath(path, REPO)
    for no, line in prose_lines(path):
        targets = INLINE.findall(line)
        m = REFDEF.match(line)
        if m:
            targets.append(m.group(1))
        for target in targets:
            if SCHEME.match(target):
                continue
            checked += 1
            file_part, _, fragment = target.partition("#")
            dest = (
                os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                if file_part
                else path
            )
            if not os.path.exists(dest):
                broken.append(f"{rel}:{no}: {target} (no such file: {os.path.relpath(dest, REPO)})")
                continue
            if fragment and dest.endswith(".md") and fragment not in anchors(dest):
                broken.append(f"{rel}:{no}: {target} (no heading with anchor #{fragment})")
    return checked, broken


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "files", nargs="*", help="Markdown files (default: README, CHANGELOG, docs/*.md)"
    )
    args = ap.parse_args(argv)
    files = [os.path.abspath(f) for f in args.files] or default_files()
    total, broken = 0, []
    for path in files:
        n, bad = check_file(path)
        total += n
        broken += bad
    for msg in broken:
        print(msg)
    if broken:
        print(f"{len(broken)} broken of {total} relative links in {len(files)} files")
        return 1
    print(f"all {total} relative links resolve ({len(files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
