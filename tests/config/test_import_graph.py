"""Imports run one way (docs/design.md, "Import direction"): the config keys, the
capability mixins and the losses import nothing above them, the models import nothing of the
validation or the trainer, and the package has no import cycle.

Two views: what a fresh interpreter really loads (the package's ``__init__``, which imports
everything to register it, is replaced by a bare package object so that only the module
under test and what it imports are loaded), and a static graph of every ``import`` in
projects/eapm, those inside functions included (a deferred import hides a cycle from the
interpreter, not from the design)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Set

import pytest

from tests.helpers import REPO

PKG_DIR = os.path.join(REPO, "projects", "eapm")


# ---------------------------------------------------------------------------
# what a fresh interpreter loads
# ---------------------------------------------------------------------------
_LOADED = """
import json, sys, types
pkg = types.ModuleType("eapm")
pkg.__path__ = [{pkg_dir!r}]
sys.modules["eapm"] = pkg
import importlib
importlib.import_module({module!r})
print(json.dumps(sorted(m for m in sys.modules if m.startswith("eapm."))))
"""


def loaded_by(module: str) -> List[str]:
    """The ``eapm.*`` modules a fresh interpreter holds after importing ``module`` (with
    the package's ``__init__`` not run)."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOADED.format(pkg_dir=PKG_DIR, module=module)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _is(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_config_loads_nothing_of_the_package():
    assert loaded_by("eapm.config") == ["eapm.config"]


def test_losses_load_only_the_losses():
    loaded = loaded_by("eapm.losses")
    assert "eapm.losses" in loaded
    assert [m for m in loaded if not _is(m, "eapm.losses")] == []


def test_models_load_neither_the_config_nor_what_sits_above_them():
    loaded = loaded_by("eapm.modeling")
    allowed = ("eapm.modeling", "eapm.losses", "eapm.upstream")
    assert "eapm.modeling.retinanet" in loaded and "eapm.modeling.fcos" in loaded
    assert [m for m in loaded if not _is(m, *allowed)] == []


# ---------------------------------------------------------------------------
# the static graph
# ---------------------------------------------------------------------------
def package_modules() -> Dict[str, str]:
    """{module name: file} of every .py file under projects/eapm."""
    out = {}
    for root, dirs, files in os.walk(PKG_DIR):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), PKG_DIR)[: -len(".py")].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(["eapm", *rel])] = os.path.join(root, f)
    return out


def _resolve(name: str, modules) -> Optional[str]:
    """The package module ``name`` denotes (a module, or the package whose attribute it
    is), None outside the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: str, modules) -> Set[str]:
    """The package modules ``module`` imports anywhere in its file (function bodies too).
    Parent packages that Python imports implicitly are not counted."""
    is_pkg = os.path.basename(path) == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if _is(a.name, "eapm")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            elif node.module and _is(node.module, "eapm"):
                base = node.module
            else:
                continue
            # `from pkg import sub` imports the submodule sub, `from mod import name` mod
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for n in names:
            target = _resolve(n, modules)
            if target and target != module:
                out.add(target)
    return out


def import_graph() -> Dict[str, Set[str]]:
    modules = package_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(m: str) -> Optional[List[str]]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_the_imports():
    """The parser finds what the files say (else the checks below would pass vacuously)."""
    graph = import_graph()
    assert {"eapm.modeling", "eapm.config", "eapm.validation"} <= graph["eapm"]
    assert {"eapm.losses", "eapm.modeling.keys"} <= graph["eapm.modeling.retinanet"]
    assert {"eapm.modeling", "eapm.config"} <= graph["eapm.validation"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


# what each layer may import of the package (besides itself)
BELOW_THE_MODELS = {
    "eapm.config": (),
    "eapm.upstream": (),
    "eapm.losses": ("eapm.losses",),
}
# what sits above the models
ABOVE_THE_MODELS = (
    "eapm.validation",
    "eapm.engine",
    "eapm.lazy",
    "eapm.export",
    "eapm.model_zoo",
    "eapm.config",  # the models read their keys from the cfg they are given
)


@pytest.mark.parametrize("layer", sorted(BELOW_THE_MODELS))
def test_modules_below_the_models_import_nothing_above(layer):
    allowed = BELOW_THE_MODELS[layer]
    graph = import_graph()
    members = [m for m in graph if _is(m, layer)]
    assert members, layer
    bad = {m: sorted(n for n in graph[m] if not _is(n, *allowed)) for m in members}
    assert {m: v for m, v in bad.items() if v} == {}


def test_models_import_nothing_above_them():
    graph = import_graph()
    bad = {
        m: sorted(n for n in graph[m] if n == "eapm" or _is(n, *ABOVE_THE_MODELS))
        for m in graph
        if _is(m, "eapm.modeling")
    }
    assert {m: v for m, v in bad.items() if v} == {}
