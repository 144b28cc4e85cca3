"""The sections of ``tools/benchmark.py``, one module each, and their registry.

A section is a module here whose function ``run(args, reporter)`` (``args``: the parsed command
line of ``tools/benchmark.py``; ``reporter``: the run's ``eapm.utils.benchmark.Reporter``) is
registered with ``@register(name, cpu_default)``; its module docstring is its entry in the
tool's ``--help`` (first line after the name, the others indented as they are written).
The sections run, and are listed, in the order they are imported at the end of this file.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, NamedTuple


class Section(NamedTuple):
    name: str  # what --only takes
    run: Callable  # run(args, reporter)
    doc: str  # its --help entry (the module docstring)
    cpu_default: bool  # in the default set on cpu (on cuda every section is)


SECTIONS: Dict[str, Section] = {}


def register(name: str, cpu_default: bool = True) -> Callable[[Callable], Callable]:
    """Decorator: registers ``run`` as section ``name``, its module's docstring as its help.
    Raises ``ValueError`` on a name registered twice or a module without a docstring."""

    def deco(run: Callable) -> Callable:
        doc = sys.modules[run.__module__].__doc__
        if name in SECTIONS:
            raise ValueError(f"benchmark section {name!r} registered twice")
        if not doc:
            raise ValueError(f"benchmark section {name!r}: {run.__module__} has no docstring")
        SECTIONS[name] = Section(name, run, doc.strip("\n"), cpu_default)
        return run

    return deco


def help_text() -> str:
    """The sections' part of ``--help``: one entry per section, its name in a column of
    width 8 before the first line of its docstring."""
    lines = []
    for s in SECTIONS.values():
        first, *rest = s.doc.splitlines()
        lines.append(f"  {s.name:<8} {first}")
        lines += [f"{'':11}{line}" if line else "" for line in rest]
    return "\n".join(lines)


# isort: off
# the sections, in the run order (and --help's)
from . import focal, box, step, sampler, bfp, ghm, guards, resume, recipe, train  # noqa: E402,F401
