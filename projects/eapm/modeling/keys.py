"""The config keys several EAPM modules read (how ``from_config`` reads them) and the rules
about their values that several constructors share.

Each EAPM class reads its own keys in its ``from_config`` (as detectron2's classes do): a
class honours a key if and only if it reads it. A rule about a value lives once: here when
several classes share it, else in the module of the one class that uses it, and the
constructor applies it to its argument. A rule is a callable ``check(value)`` that returns
the value or raises ``ValueError`` naming the argument (``eapm.validation`` maps the
argument back to the key it was read from).

A disabled EAPM switch gives strength 0.0: 0 is the one way to say "off".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from ..losses import check_eapm_param

__all__ = [
    "OneOf",
    "IntAtLeast",
    "NumberIn",
    "NonEmptyList",
    "LOSS_NORMALIZERS",
    "BOX_REG_LOSSES",
    "check_loss_normalizer",
    "check_histogram_period",
    "check_cls_loss_weight",
    "check_eapm_cls_mu",
    "check_eapm_reg_theta",
    "check_eapm_rpn_mu",
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
class NonEmptyList:
    """``name`` must be a non-empty list (or tuple) of strings."""

    name: str

    def __call__(self, value):
        if not (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and len(value) > 0
            and all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"{self.name} must be a non-empty list of names, got {value!r}")
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
    """theta of EAPM regression (balanced L1 or an IoU loss): a finite number >= 0 (returned
    as a float)."""
    return check_eapm_param(value, "eapm_reg_theta")


def check_eapm_rpn_mu(value) -> float:
    """mu of the RPN's EAPM binary cross entropy: a finite number >= 0 (returned as a float)."""
    return check_eapm_param(value, "eapm_rpn_mu")


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
