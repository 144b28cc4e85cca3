"""The rules about config values that several EAPM constructors share, and the readers of
the keys several ``from_config`` read (docs/design.md, "Who owns what"). A rule is a callable
``check(value)`` that returns the value or raises ``ValueError`` naming the argument. A
disabled EAPM switch gives strength 0.0: 0 is the one way to say "off".
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Tuple

from ..losses import check_eapm_param
from ..losses.checks import choice, rule

__all__ = [
    "LOSS_NORMALIZERS", "BOX_REG_LOSSES", "check_loss_normalizer", "check_histogram_period",
    "check_cls_loss_weight", "check_eapm_cls_mu", "check_eapm_reg_theta", "check_eapm_rpn_mu",
    "eapm_strength_from_config", "balanced_l1_from_config", "kernel_args_from_config",
]  # fmt: skip


# how the dense heads normalise their losses (MODEL.LOSS_NORMALIZER.TYPE)
LOSS_NORMALIZERS = ("ema", "all_reduce")
# box regression losses of RetinaNet and the ROI box head: detectron2's four and ours
BOX_REG_LOSSES = ("smooth_l1", "giou", "diou", "ciou", "balanced_l1")

check_loss_normalizer = choice("loss_normalizer", LOSS_NORMALIZERS)
check_histogram_period = rule("histogram_period", 0, integer=True)
# the dense detectors' classification loss weight (MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT)
check_cls_loss_weight = rule("cls_loss_weight", 0, lo_open=True)
# the EAPM strengths (a finite number >= 0, returned as a float): mu of the classification
# losses (focal, cross entropy), theta of the regression (balanced L1 or an IoU loss)
check_eapm_cls_mu = partial(check_eapm_param, name="eapm_cls_mu")
check_eapm_reg_theta = partial(check_eapm_param, name="eapm_reg_theta")
check_eapm_rpn_mu = partial(check_eapm_param, name="eapm_rpn_mu")


# ---------------------------------------------------------------------------
# readers (for the classes' from_config)
# ---------------------------------------------------------------------------
def eapm_strength_from_config(cfg, part: str) -> float:
    """``MODEL.EAPM.<part>.MU`` (``REG``: ``THETA``) when ``MODEL.EAPM.<part>.ENABLED``, else 0.0
    (off); ``part``: "CLS", "REG" or "RPN"."""
    e = cfg.MODEL.EAPM[part]
    return (e.THETA if part == "REG" else e.MU) if e.ENABLED else 0.0


def balanced_l1_from_config(cfg) -> Tuple[float, float, float]:
    """(alpha, gamma, beta) of ``MODEL.BALANCED_L1``."""
    b = cfg.MODEL.BALANCED_L1
    return (b.ALPHA, b.GAMMA, b.BETA)


def kernel_args_from_config(cfg) -> Dict[str, Any]:
    """``histogram_period`` and ``compile_kernels`` (``MODEL.EAPM.HISTOGRAM_PERIOD``,
    ``COMPILE``): the arguments every EAPM loss module takes."""
    e = cfg.MODEL.EAPM
    return {"histogram_period": e.HISTOGRAM_PERIOD, "compile_kernels": e.COMPILE}
