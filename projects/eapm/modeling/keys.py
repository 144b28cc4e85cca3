"""The config keys several EAPM modules read: how ``from_config`` reads them, and the rules
about their values.

Each EAPM class reads its own keys in its ``from_config`` (as detectron2's classes do) and
declares, in ``config_checks()`` (``eapm.capabilities.DeclaresConfigChecks``), the rule of
each key it reads. The rules about values that several classes share live here, once; a
rule about a value only one class reads lives in that class's module. A rule is a callable
``check(value)`` that raises ``ValueError`` naming the constructor argument (the config
validation re-raises it naming the key) and returns the value; the checkers below are
frozen dataclasses, so equal rules compare equal and the validation runs each
``(key, rule)`` pair once however many classes declare it.

A disabled EAPM switch gives strength 0.0: 0 is the one way to say "off".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

from ..losses import check_balanced_l1_params, check_eapm_param

__all__ = [
    "OneOf",
    "IntAtLeast",
    "NumberIn",
    "IsBool",
    "NonEmptyList",
    "ArgOf",
    "LOSS_NORMALIZERS",
    "BOX_REG_LOSSES",
    "check_loss_normalizer",
    "check_histogram_period",
    "check_cls_loss_weight",
    "check_eapm_cls_mu",
    "check_eapm_reg_theta",
    "check_eapm_rpn_mu",
    "EAPM_CLS_CHECKS",
    "EAPM_RPN_CHECKS",
    "EAPM_REG_CHECKS",
    "KERNEL_CHECKS",
    "BALANCED_L1_CHECKS",
    "LOSS_NORMALIZER_CHECKS",
    "CLS_LOSS_WEIGHT_CHECKS",
    "eapm_cls_mu_from_config",
    "eapm_reg_theta_from_config",
    "eapm_rpn_mu_from_config",
    "balanced_l1_from_config",
    "kernel_args_from_config",
    "cls_loss_weight_from_config",
]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------
# checkers: check(value) -> value, or ValueError naming the argument
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OneOf:
    """``name`` must be one of ``choices``."""

    name: str
    choices: Tuple

    def __call__(self, value):
        if value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        return value


@dataclass(frozen=True)
class IntAtLeast:
    """``name`` must be an integer (not a bool) >= ``lo``."""

    name: str
    lo: int

    def __call__(self, value):
        if not (_is_int(value) and value >= self.lo):
            raise ValueError(f"{self.name} must be an integer >= {self.lo}, got {value!r}")
        return value


@dataclass(frozen=True)
class NumberIn:
    """``name`` must be a finite number in the interval from ``lo`` to ``hi`` (open at an end
    where ``lo_open`` / ``hi_open``)."""

    name: str
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __call__(self, value):
        ok = (
            _is_num(value)
            and (self.lo < value if self.lo_open else self.lo <= value)
            and (value < self.hi if self.hi_open else value <= self.hi)
        )
        if not ok:
            rng = (
                f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
            )
            raise ValueError(f"{self.name} must be a finite number in {rng}, got {value!r}")
        return value


@dataclass(frozen=True)
class IsBool:
    """``name`` must be True or False."""

    name: str

    def __call__(self, value):
        if not isinstance(value, bool):
            raise ValueError(f"{self.name} must be True or False, got {value!r}")
        return value


@dataclass(frozen=True)
class NonEmptyList:
    """``name`` must be a non-empty list (or tuple) of strings."""

    name: str

    def __call__(self, value):
        if not (
            isinstance(value, (list, tuple))
            and len(value) > 0
            and all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"{self.name} must be a non-empty list of names, got {value!r}")
        return value


@dataclass(frozen=True)
class ArgOf:
    """One argument of a check function of several keyword arguments (``check(arg=value)``,
    e.g. ``eapm.losses.check_balanced_l1_params``)."""

    check: Callable[..., Any]
    arg: str

    def __call__(self, value):
        self.check(**{self.arg: value})
        return value


# ---------------------------------------------------------------------------
# shared rules
# ---------------------------------------------------------------------------
# how the dense heads normalise their losses (MODEL.LOSS_NORMALIZER.TYPE)
LOSS_NORMALIZERS = ("ema", "all_reduce")
# box regression losses of RetinaNet and the ROI box head: detectron2's four and ours
BOX_REG_LOSSES = ("smooth_l1", "giou", "diou", "ciou", "balanced_l1")

check_loss_normalizer = OneOf("loss_normalizer", LOSS_NORMALIZERS)
check_histogram_period = IntAtLeast("histogram_period", 0)
# the dense detectors' classification loss weight (MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT)
check_cls_loss_weight = NumberIn("cls_loss_weight", 0, math.inf, lo_open=True, hi_open=True)


def check_eapm_cls_mu(value) -> float:
    """mu of EAPM focal loss: a finite number >= 0 (returned as a float)."""
    return check_eapm_param(value, "eapm_cls_mu")


def check_eapm_reg_theta(value) -> float:
    """theta of EAPM balanced L1: a finite number >= 0 (returned as a float)."""
    return check_eapm_param(value, "eapm_reg_theta")


def check_eapm_rpn_mu(value) -> float:
    """mu of the RPN's EAPM binary cross entropy: a finite number >= 0 (returned as a float)."""
    return check_eapm_param(value, "eapm_rpn_mu")


# the keys' declarations (merged into the classes' config_checks)
EAPM_CLS_CHECKS: Dict[str, Callable] = {"MODEL.EAPM.CLS.MU": check_eapm_cls_mu}
EAPM_REG_CHECKS: Dict[str, Callable] = {"MODEL.EAPM.REG.THETA": check_eapm_reg_theta}
EAPM_RPN_CHECKS: Dict[str, Callable] = {"MODEL.EAPM.RPN.MU": check_eapm_rpn_mu}
KERNEL_CHECKS: Dict[str, Callable] = {
    "MODEL.EAPM.HISTOGRAM_PERIOD": check_histogram_period,
    "MODEL.EAPM.COMPILE": IsBool("compile_kernels"),
}
BALANCED_L1_CHECKS: Dict[str, Callable] = {
    f"MODEL.BALANCED_L1.{k}": ArgOf(check_balanced_l1_params, k.lower())
    for k in ("ALPHA", "GAMMA", "BETA")
}
LOSS_NORMALIZER_CHECKS: Dict[str, Callable] = {"MODEL.LOSS_NORMALIZER.TYPE": check_loss_normalizer}
CLS_LOSS_WEIGHT_CHECKS: Dict[str, Callable] = {
    "MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT": check_cls_loss_weight
}


# ---------------------------------------------------------------------------
# readers (for the classes' from_config)
# ---------------------------------------------------------------------------
def eapm_cls_mu_from_config(cfg) -> float:
    """``MODEL.EAPM.CLS.MU`` when ``MODEL.EAPM.CLS.ENABLED``, else 0.0 (off)."""
    e = cfg.MODEL.EAPM.CLS
    return float(e.MU) if e.ENABLED else 0.0


def eapm_reg_theta_from_config(cfg) -> float:
    """``MODEL.EAPM.REG.THETA`` when ``MODEL.EAPM.REG.ENABLED``, else 0.0 (off)."""
    e = cfg.MODEL.EAPM.REG
    return float(e.THETA) if e.ENABLED else 0.0


def eapm_rpn_mu_from_config(cfg) -> float:
    """``MODEL.EAPM.RPN.MU`` when ``MODEL.EAPM.RPN.ENABLED``, else 0.0 (off)."""
    e = cfg.MODEL.EAPM.RPN
    return float(e.MU) if e.ENABLED else 0.0


def balanced_l1_from_config(cfg) -> Tuple[float, float, float]:
    """(alpha, gamma, beta) of ``MODEL.BALANCED_L1``."""
    b = cfg.MODEL.BALANCED_L1
    return (float(b.ALPHA), float(b.GAMMA), float(b.BETA))


def kernel_args_from_config(cfg) -> Dict[str, Any]:
    """``histogram_period`` and ``compile_kernels`` from ``MODEL.EAPM.HISTOGRAM_PERIOD`` /
    ``COMPILE`` (the arguments every EAPM loss module takes)."""
    e = cfg.MODEL.EAPM
    return {"histogram_period": int(e.HISTOGRAM_PERIOD), "compile_kernels": bool(e.COMPILE)}


def cls_loss_weight_from_config(cfg) -> float:
    """``MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT`` (the dense detectors' ``cls_loss_weight``)."""
    return float(cfg.MODEL.DENSE_HEAD.CLS_LOSS_WEIGHT)
