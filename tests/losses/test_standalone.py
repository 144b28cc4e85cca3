"""``eapm.losses`` without detectron2: in a process where detectron2 (and fvcore) cannot be
imported, ``import eapm.losses`` works, every public name of it runs and gives the numbers
it gives with detectron2 installed; ``import eapm`` with detectron2 registers the models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "tests", "losses", "every_loss.py")


def _env():
    # the checkout's package first (an editable install may point at another checkout)
    path = [os.path.join(REPO, "projects")] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")


def _python(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env=_env(), cwd="/"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _every_loss_here() -> dict:
    """``evaluate()`` of the script in this process (detectron2 importable)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eapm_every_loss", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.evaluate()


def _losses(results: dict):
    """The (name, result) of every evaluated loss (results with gradients)."""
    for name, r in results.items():
        if isinstance(r, dict) and "finite" in r:
            yield name, r
        elif isinstance(r, dict):  # eapm_loss: one result per link
            for link, sub in r.items():
                yield f"{name}[{link}]", sub


@pytest.mark.parametrize("mode", ["finder", "none"])
def test_losses_run_without_detectron2(mode):
    import eapm.losses

    out = _python(SCRIPT, mode)
    assert out["eapm_file"] == os.path.join(REPO, "projects", "eapm", "__init__.py")
    assert out["has_detectron2"] is False
    assert out["loaded"] == []  # nothing of detectron2 / fvcore, not even indirectly
    assert out["load_config_error"].startswith("ModuleNotFoundError: eapm.load_config needs")
    results = out["results"]
    # every public name was exercised
    assert set(eapm.losses.__all__) <= set(results)
    losses = dict(_losses(results))
    assert sorted(losses) == [
        "GHMC",
        "GHMR",
        "balanced_l1_loss",
        "eapm_balanced_l1_loss",
        "eapm_binary_cross_entropy_with_logits",
        "eapm_cross_entropy",
        "eapm_focal_loss_sum_with_stats",
        "eapm_focal_terms",
        "eapm_loss[identity]",
        "eapm_loss[sigmoid]",
        "eapm_loss[softmax]",
        "eapm_sigmoid_focal_loss",
        "modulate_prediction",
        "sigmoid_focal_loss",
    ]
    for name, r in losses.items():
        assert r["finite"], name
        assert all(v != 0 for v in r["values"]), (name, r["values"])
        assert all(a > 0 for a in r["grad_abs"]), (name, r["grad_abs"])
    assert math.isclose(results["focal_at_0"], results["focal_at_0_expected"], rel_tol=1e-6)
    # EAPM changes the loss: the modulated focal loss differs from the plain one
    plain, eapm_focal = results["sigmoid_focal_loss"], results["eapm_sigmoid_focal_loss"]
    assert not math.isclose(plain["values"][0], eapm_focal["values"][0], rel_tol=1e-3)
    assert results["LINKS"] == ["identity", "sigmoid", "softmax"]
    assert results["ghm_bin_index"] == [0, 0, 5, 10]


def test_losses_without_detectron2_give_the_same_numbers():
    """Standalone and with detectron2 importable, the same inputs give the same values."""
    standalone = _python(SCRIPT, "finder")["results"]
    here = json.loads(json.dumps(_every_loss_here()))
    assert standalone.keys() == here.keys()
    for name, r in _losses(here):
        s = dict(_losses(standalone))[name]
        for a, b in zip(r["values"] + r["grads"], s["values"] + s["grads"]):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (name, a, b)


_REGISTERED = """
import json
import eapm
from detectron2.modeling import (
    BACKBONE_REGISTRY, META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY,
)
regs = (META_ARCH_REGISTRY, BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, PROPOSAL_GENERATOR_REGISTRY)
print(json.dumps({
    "has_detectron2": eapm.HAS_DETECTRON2,
    "names": [callable(getattr(eapm, n)) for n in ("add_eapm_config", "load_config",
                                                   "validate_config")],
    **{r._name: sorted(k for k, v in r._obj_map.items() if v.__module__.startswith("eapm."))
       for r in regs},
}))
"""


def test_import_eapm_registers_with_detectron2():
    """In a fresh process, ``import eapm`` alone fills detectron2's registries."""
    out = _python("-c", _REGISTERED)
    assert out["has_detectron2"] is True
    assert out["names"] == [True, True, True]
    assert out["META_ARCH"] == ["EAPMFCOS", "EAPMRetinaNet"]
    assert out["ROI_HEADS"] == ["EAPMCascadeROIHeads", "EAPMROIHeads", "LibraROIHeads"]
    assert out["PROPOSAL_GENERATOR"] == ["EAPMRPN"]
    assert out["BACKBONE"] == [
        "build_fcos_resnet_fpn_backbone",
        "build_resnet_fpn_bfp_backbone",
        "build_retinanet_resnet_fpn_bfp_backbone",
        "build_retinanet_slim_resnet_fpn_backbone",
        "build_slim_resnet_backbone",
        "build_slim_resnet_fpn_backbone",
    ]
