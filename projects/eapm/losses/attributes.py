"""The example attributes and the modulating factor of EAPM (paper Sec. 2.2, 2.3).

* ``difficulty`` (Dif, classification): ``|p - p*|`` of a sigmoid probability, from logits;
* ``gap_over_sum`` (GoS, regression): ``|t - t*| / (|t| + |t*|)`` of box deltas;
* ``modulating_factor``: ``MF = 1 + tanh(s) - tanh(s * attribute)``;
* ``check_eapm_param``: the validation of a strength mu / theta (a finite number >= 0).

Pure torch. Attributes are computed in float32 or wider (float64 stays float64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .runtime import _to_float

__all__ = ["check_eapm_param", "difficulty", "gap_over_sum", "modulating_factor"]


def check_eapm_param(value: float, name: str) -> float:
    """Validate an EAPM strength (mu or theta): a finite number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def difficulty(logits: Tensor, targets: Tensor) -> Tensor:
    """Dif = |p - p*| with p = sigmoid(logits) (paper Sec. 2.2), computed without
    cancellation: it equals sigmoid(x) for negatives and sigmoid(-x) for positives."""
    x = _to_float(logits)
    t = targets.to(x.dtype)
    return torch.sigmoid((1.0 - 2.0 * t) * x)


def gap_over_sum(input: Tensor, target: Tensor) -> Tensor:
    """GoS = |t - t*| / (|t| + |t*|) (paper Sec. 2.3), elementwise, in [0, 1].

    0/0 (t == t* == 0) is defined as 0 (no error, no shape variation)."""
    t = _to_float(input)
    g = target.to(t.dtype)
    num = (t - g).abs()
    den = t.abs() + g.abs()
    return torch.where(
        den > 0, num / den.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(num)
    )


def modulating_factor(attribute: Tensor, strength: float) -> Tensor:
    """MF = 1 + tanh(s) - tanh(s * attribute), s = mu (classification) or theta
    (regression). MF == 1 for s == 0; MF in [1, 1 + tanh(s)] for attributes in [0, 1]."""
    strength = check_eapm_param(strength, "strength")
    return 1.0 + math.tanh(strength) - torch.tanh(strength * attribute)
