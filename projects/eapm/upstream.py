"""Method bodies adapted from detectron2, pinned to the source they were adapted from.

Where detectron2 offers no hook, an EAPM method has to repeat the body of the
detectron2 method it overrides (to swap one loss call). Each such method is marked
``@adapted_from(<detectron2 function>, <upstream file>, <sha1 of its source>)``; the
test suite compares the recorded hashes with the installed detectron2
(``changed_upstream()``), so a new detectron2 pin fails a test until someone has looked
at what changed upstream and updated the adaptation and its hash.
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable, Dict, List

__all__ = ["Adapted", "ADAPTED", "adapted_from", "source_sha1", "changed_upstream"]


@dataclass(frozen=True)
class Adapted:
    """One adapted method: ours, the upstream function and file, the pinned source hash."""

    ours: str
    upstream: Callable
    upstream_file: str
    sha1: str


# Registry of the adapted methods, by our method's qualified name (filled at import).
ADAPTED: Dict[str, Adapted] = {}


def source_sha1(fn: Callable) -> str:
    """sha1 (hex) of ``fn``'s source text, dedented."""
    return hashlib.sha1(textwrap.dedent(inspect.getsource(fn)).encode()).hexdigest()


def adapted_from(
    upstream: Callable, upstream_file: str, sha1: str
) -> Callable[[Callable], Callable]:
    """Decorator: records that the decorated method repeats ``upstream``'s body (from
    ``upstream_file`` of detectron2) as it was when its source hashed to ``sha1``."""

    def mark(fn: Callable) -> Callable:
        name = f"{fn.__module__}.{fn.__qualname__}"
        ADAPTED[name] = Adapted(name, upstream, upstream_file, sha1)
        return fn

    return mark


def changed_upstream() -> List[str]:
    """One line for each adapted method whose upstream source no longer has the pinned
    hash (empty when the installed detectron2 matches every pin)."""
    out = []
    for a in ADAPTED.values():
        now = source_sha1(a.upstream)
        if now != a.sha1:
            out.append(
                f"{a.ours} adapts {a.upstream.__qualname__} ({a.upstream_file}), whose source "
                f"changed: pinned sha1 {a.sha1}, installed {now}"
            )
    return out
