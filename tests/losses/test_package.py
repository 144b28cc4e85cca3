"""The layout of ``eapm.losses``: one module per concern behind the package, pure torch
(no detectron2 import in any of its modules), every name the rest of the project uses
importable from ``eapm.losses`` itself."""

from __future__ import annotations

import ast
import os

import eapm.losses

PACKAGE = os.path.dirname(eapm.losses.__file__)


def _imported_modules(path: str):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_no_detectron2_import():
    files = sorted(f for f in os.listdir(PACKAGE) if f.endswith(".py"))
    assert {
        "attributes.py",
        "runtime.py",
        "focal.py",
        "balanced_l1.py",
        "cross_entropy.py",
        "general.py",
        "ghm.py",
        "checks.py",
    } <= set(files)
    for f in files:
        mods = set(_imported_modules(os.path.join(PACKAGE, f)))
        bad = sorted(m for m in mods if m.split(".")[0] in ("detectron2", "fvcore", "eapm"))
        assert not bad, f"eapm/losses/{f} imports {bad}"
        stdlib = {"__future__", "functools", "math", "numbers", "warnings", "typing"}
        assert mods <= stdlib | {"torch", "torch.nn"} | {
            m for m in mods if m.startswith("torch.")
        }, f"eapm/losses/{f}: {sorted(mods)}"


def test_public_names():
    for name in eapm.losses.__all__:
        assert callable(getattr(eapm.losses, name)) or name == "LINKS", name
    # private names the tests reach through the package
    assert set(eapm.losses._EAGER_KERNELS) >= {"_focal_terms", "_focal_sum", "_bl1_kernel"}
    assert callable(eapm.losses._run_chunked)
