"""The optimizer of both config systems and its gradient clipping, implemented once.

``clip_gradients(optimizer, enabled, clip_type, clip_value, norm_type)`` makes an
optimizer clip the gradients before every step:

* ``"value"``: every gradient element clamped to ``[-clip_value, clip_value]``
  (detectron2's "value");
* ``"norm"``: the gradient of every parameter tensor on its own rescaled to a norm of at
  most ``clip_value`` (detectron2's "norm": ``torch.nn.utils.clip_grad_norm_`` per tensor);
* ``"full_model"``: the gradients of all parameters together rescaled to a total norm of
  at most ``clip_value`` (``torch.nn.utils.clip_grad_norm_`` over all of them; mmdetection's
  ``grad_clip`` and Mask2Former's CLIP_TYPE "full_model").

``build_optimizer(cfg, model)`` builds the optimizer of either config system with it
(``clip_kwargs(cfg)``): yacs' ``SOLVER.CLIP_GRADIENTS`` for SOLVER.OPTIMIZER "SGD"
(detectron2's) or "ADAMW"; a LazyConfig's ``optimizer`` (instantiated) with the dict
``train.clip_gradients`` of the same four arguments (missing ones: yacs' defaults).
"""

from __future__ import annotations

import math

import torch
from detectron2.config import CfgNode
from detectron2.solver import build_optimizer as _d2_build_optimizer
from detectron2.solver import get_default_optimizer_params

from ..losses.checks import is_number

__all__ = ["CLIP_TYPES", "build_optimizer", "clip_gradients", "clip_kwargs"]

CLIP_TYPES = ("value", "norm", "full_model")


def clip_gradients(
    optimizer: torch.optim.Optimizer,
    enabled: bool = True,
    clip_type: str = "norm",
    clip_value: float = 1.0,
    norm_type: float = 2.0,
) -> torch.optim.Optimizer:
    """``optimizer`` (the same object), whose ``step`` first clips the gradients of its
    parameters as ``clip_type`` says (module docstring; ``norm_type``: the p of the norm,
    "norm" and "full_model" only). ``enabled=False`` returns it unchanged. Its class becomes
    a subclass of the original one made for it, so its ``state_dict`` is the original's.

    Raises ``ValueError`` for a ``clip_type`` not in ``CLIP_TYPES`` or a ``clip_value`` <= 0
    (when enabled)."""
    if not enabled:
        return optimizer
    if clip_type not in CLIP_TYPES:
        raise ValueError(f"clip_type must be one of {CLIP_TYPES}, got {clip_type!r}")
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0, got {clip_value!r}")
    base = type(optimizer)

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if clip_type == "value":
            torch.nn.utils.clip_grad_value_(params, clip_value)
        elif clip_type == "norm":
            for p in params:
                torch.nn.utils.clip_grad_norm_(p, clip_value, norm_type)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_value, norm_type)
        return base.step(self, closure)

    # a subclass per instance (as detectron2's maybe_add_gradient_clipping does)
    optimizer.__class__ = type(f"{base.__name__}WithGradientClip", (base,), {"step": step})
    return optimizer


def clip_kwargs(cfg) -> dict:
    """``clip_gradients``'s keyword arguments: a yacs config's SOLVER.CLIP_GRADIENTS, or a
    LazyConfig's ``train.clip_gradients`` over yacs' defaults."""
    if not isinstance(cfg, CfgNode):
        from ..config import default_config

        return {**clip_kwargs(default_config()), **(cfg.train.get("clip_gradients", None) or {})}
    c = cfg.SOLVER.CLIP_GRADIENTS
    return dict(
        enabled=c.ENABLED, clip_type=c.CLIP_TYPE, clip_value=c.CLIP_VALUE, norm_type=c.NORM_TYPE
    )


# the optimizers of SOLVER.OPTIMIZER (build_optimizer)
OPTIMIZERS = ("SGD", "ADAMW")


def check_solver_config(cfg) -> None:
    """The rules of the solver keys this module uses (SOLVER.OPTIMIZER, SOLVER.CLIP_GRADIENTS),
    applied when the config is loaded: ``ValueError`` naming the key."""
    from ..config import invalid

    if cfg.SOLVER.OPTIMIZER not in OPTIMIZERS:
        raise invalid("SOLVER.OPTIMIZER", cfg.SOLVER.OPTIMIZER, f"must be one of {OPTIMIZERS}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return
    if clip.CLIP_TYPE not in CLIP_TYPES:
        raise invalid(
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
            clip.CLIP_TYPE,
            f'must be one of {CLIP_TYPES} ("full_model": one norm over all parameters, as '
            'mmdetection; "norm": detectron2\'s norm of each parameter tensor)',
        )
    v = clip.CLIP_VALUE
    if not (is_number(v) and 0 < v < math.inf):
        raise invalid("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", v, "must be a finite number > 0")


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of a config, with its gradient clipping (``clip_kwargs``): for a yacs
    config detectron2's SGD (SOLVER.OPTIMIZER "SGD"; its parameter groups, momentum, Nesterov
    and weight decay) or AdamW ("ADAMW"; the same parameter groups, SOLVER.BASE_LR and
    SOLVER.WEIGHT_DECAY); for a LazyConfig ``cfg.optimizer`` instantiated for ``model``."""
    if not isinstance(cfg, CfgNode):
        return clip_gradients(_instantiate_optimizer(cfg, model), **clip_kwargs(cfg))
    if cfg.SOLVER.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(
            f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {cfg.SOLVER.OPTIMIZER!r}"
        )
    if cfg.SOLVER.OPTIMIZER == "SGD":
        plain = cfg.clone()  # detectron2's SGD without detectron2's clipping: ours below
        plain.defrost()
        plain.SOLVER.CLIP_GRADIENTS.ENABLED = False
        optimizer = _d2_build_optimizer(plain, model)
    else:
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        optimizer = torch.optim.AdamW(
            params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY
        )
    return clip_gradients(optimizer, **clip_kwargs(cfg))


def _instantiate_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    from detectron2.config import instantiate
    from omegaconf import ListConfig

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    # instantiate passes list arguments (AdamW's betas) as omegaconf ListConfigs: plain
    # tuples as on the yacs path, so that checkpoints hold data only
    for group in [optimizer.defaults, *optimizer.param_groups]:
        for key, value in group.items():
            if isinstance(value, ListConfig):
                group[key] = tuple(value)
    return optimizer
