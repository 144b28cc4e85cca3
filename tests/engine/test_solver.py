"""eapm/engine/solver.py: the gradient clipping is one implementation with detectron2's "value"
/ "norm" (per parameter tensor) and "full_model" (one norm over all parameters, mmdetection's
``grad_clip``), chosen the same way by SOLVER.CLIP_GRADIENTS and ``train.clip_gradients``; its
keys are checked at load time naming the key; the configs clip as their recipe."""

from __future__ import annotations

import os

import pytest
import torch

import eapm
from tests.helpers import CONFIGS

QUICKSTART = "configs/quickstart/eapm_retinanet.yaml"


def _with_grads(seed=0, scale=20.0):
    """A small model (conv, BatchNorm, linear) with large random gradients (every clipping
    type changes them)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3),
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return model


def _yacs_cfg(optimizer, clip_type, clip_value=1.0):
    from eapm.utils.testing import repo_cfg

    return repo_cfg(
        "quickstart/eapm_retinanet.yaml",
        "SOLVER.OPTIMIZER", optimizer,
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type,
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", str(clip_value),
    )  # fmt: skip


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _grads(model):
    """The gradients (clipped in place by the step)."""
    return [p.grad.clone() for p in model.parameters()]


def _assert_same(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("optimizer", ["SGD", "ADAMW"])
def test_full_model_clip_is_clip_grad_norm_over_all_parameters_then_the_base_step(optimizer):
    from eapm.engine import build_optimizer

    clipped = _with_grads()
    step = build_optimizer(_yacs_cfg(optimizer, "full_model"), clipped)
    assert type(step).__name__ == ("SGD" if optimizer == "SGD" else "AdamW") + "WithGradientClip"
    reference = _with_grads()  # the same
    plain = _yacs_cfg(optimizer, "full_model")
    plain.SOLVER.CLIP_GRADIENTS.ENABLED = False
    base = build_optimizer(plain, reference)
    assert type(base) is type(step).__mro__[1]  # the base optimizer, its own step
    total = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0, 2.0)
    assert total > 10  # the clipping is active: every gradient is scaled by 1 / total
    base.step()
    step.step()
    _assert_same(_params(clipped), _params(reference))
    _assert_same(_grads(clipped), _grads(reference))
    # closed form: all gradients scaled by one factor to a total norm of 1
    grads = torch.cat([p.grad.flatten() for p in clipped.parameters()])
    assert grads.norm().item() == pytest.approx(1.0, rel=1e-5)
    # and not detectron2's "norm" (each tensor on its own)
    per_tensor = _with_grads()
    build_optimizer(_yacs_cfg(optimizer, "norm"), per_tensor).step()
    assert not all(torch.equal(a, b) for a, b in zip(_grads(per_tensor), _grads(clipped)))


@pytest.mark.parametrize("clip_type", ["value", "norm"])
def test_value_and_norm_are_detectron2s(clip_type):
    """Bitwise detectron2's maybe_add_gradient_clipping (per parameter tensor)."""
    from detectron2.solver.build import maybe_add_gradient_clipping

    from eapm.engine import build_optimizer

    cfg = _yacs_cfg("ADAMW", clip_type, 0.5)
    ours, theirs = _with_grads(), _with_grads()
    build_optimizer(cfg, ours).step()
    plain = cfg.clone()
    plain.SOLVER.CLIP_GRADIENTS.ENABLED = False
    maybe_add_gradient_clipping(cfg, build_optimizer(plain, theirs)).step()
    _assert_same(_params(ours), _params(theirs))
    _assert_same(_grads(ours), _grads(theirs))
    if clip_type == "norm":  # each tensor's gradient norm is at most 0.5, and reaches it
        norms = [p.grad.norm().item() for p in ours.parameters()]
        assert max(norms) == pytest.approx(0.5, rel=1e-5)
    else:
        assert max(p.grad.abs().max().item() for p in ours.parameters()) == 0.5


@pytest.mark.parametrize("clip_type", ["value", "norm", "full_model"])
def test_yacs_and_lazy_clip_the_same(clip_type):
    """SOLVER.CLIP_GRADIENTS of the yacs quickstart and train.clip_gradients of its twin,
    with the same CLIP_TYPE / clip_type, make bitwise the same step (AdamW, same groups)."""
    from eapm import lazy
    from eapm.engine import build_optimizer

    steps = {}
    for kind in ("value", "norm", "full_model"):
        yacs_model, lazy_model = _with_grads(), _with_grads()
        build_optimizer(_yacs_cfg("ADAMW", kind, 10.0), yacs_model).step()
        cfg = lazy.load_lazy_config(
            os.path.join(CONFIGS, "quickstart", "eapm_retinanet.py"),
            [f"train.clip_gradients.clip_type={kind}"],
        )
        build_optimizer(cfg, lazy_model).step()  # the one builder, for either config system
        _assert_same(_params(yacs_model), _params(lazy_model))
        _assert_same(_grads(yacs_model), _grads(lazy_model))
        steps[kind] = _grads(yacs_model)
    # the clip types really clip differently here (so the comparison above can fail)
    others = [k for k in steps if k != clip_type]
    for k in others:
        assert not all(torch.equal(a, b) for a, b in zip(steps[k], steps[clip_type])), k


def test_clip_gradients_rejects_unknown_type_and_nonpositive_value():
    from eapm.engine import CLIP_TYPES, clip_gradients

    assert CLIP_TYPES == ("value", "norm", "full_model")
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="clip_type must be one of"):
        clip_gradients(opt, clip_type="global")
    with pytest.raises(ValueError, match="clip_value must be > 0"):
        clip_gradients(opt, clip_type="norm", clip_value=0.0)
    assert type(clip_gradients(opt, enabled=False)) is torch.optim.SGD


# ---------------------------------------------------------------------------------- the keys


@pytest.mark.parametrize(
    "key, value, expected",
    [
        (
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
            "full",
            "must be one of ('value', 'norm', 'full_model')",
        ),
        ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", -1.0, "must be a finite number > 0"),
        ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", float("nan"), "must be a finite number > 0"),
    ],
)
def test_a_bad_clip_key_is_named(key, value, expected):
    with pytest.raises(ValueError) as e:
        eapm.load_config(QUICKSTART, [key, value])
    assert str(e.value).startswith(f"Invalid config {key} = ") and expected in str(e.value)


def test_clip_type_is_checked_only_when_clipping_is_on_and_full_model_is_accepted():
    off = ["SOLVER.CLIP_GRADIENTS.ENABLED", False, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "x"]
    assert eapm.load_config(QUICKSTART, off).SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "x"
    cfg = eapm.load_config(QUICKSTART, ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model"])
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"


# ------------------------------------------------------------------------------- the configs


MMDET_CLIPPED_YACS = [
    "Base-FCOS.yaml",
    "Base-LibraRetinaNet.yaml",
    "retinanet_R_50_FPN_1x_ghm.yaml",
    "retinanet_R_101_FPN_1x_ghm.yaml",
]


MMDET_CLIPPED_LAZY = [
    "fcos_R_50_FPN_1x.py",
    "fcos_R_50_FPN_1x_eapm_mu1.5.py",
    "libra_retinanet_R_50_FPN_1x.py",
    "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0.py",
]


def test_configs_clip_as_their_recipe():
    """mmdetection's recipes clip the whole model's gradient norm ("full_model") in both
    spellings (the yacs configs loaded and validated as for evaluation); the quickstart keeps
    detectron2's "norm" in both."""
    from detectron2.config import LazyConfig

    from eapm.utils.testing import repo_cfg

    for name in MMDET_CLIPPED_YACS:
        for cfg in (
            repo_cfg(f"COCO-Detection/{name}"),
            eapm.load_config(f"configs/COCO-Detection/{name}", [], training=False),
        ):
            clip = cfg.SOLVER.CLIP_GRADIENTS
            assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 35.0, name
    for name in MMDET_CLIPPED_LAZY:
        clip = LazyConfig.load(os.path.join(CONFIGS, "COCO-Detection", name)).train.clip_gradients
        assert clip == dict(enabled=True, clip_type="full_model", clip_value=35.0, norm_type=2.0)
    yacs = repo_cfg("quickstart/eapm_retinanet.yaml").SOLVER.CLIP_GRADIENTS
    twin = LazyConfig.load(os.path.join(CONFIGS, "quickstart", "eapm_retinanet.py"))
    assert (yacs.CLIP_TYPE, yacs.CLIP_VALUE, yacs.NORM_TYPE) == ("norm", 10.0, 2.0)
    assert twin.train.clip_gradients == dict(
        enabled=True, clip_type="norm", clip_value=10.0, norm_type=2.0
    )
