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

from .checks import check_number
from .runtime import _to_float

__all__ = ["check_eapm_param", "difficulty", "gap_over_sum", "modulating_factor"]


def check_eapm_param(value: float, name: str) -> float:
    """An EAPM strength (mu or theta): a finite number >= 0 (``check_number``), as a float."""
    return check_number(value, name, 0)


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


# ----------------------------------------------------------------------------
# the tanh factor in a cancellation-free form (shared by the focal and cross-entropy kernels)
# ----------------------------------------------------------------------------
def _expm1c(z: Tensor) -> Tensor:
    """(1 - exp(-z)) / z for z >= 0 (= 1 at z = 0), accurate for tiny z: a Taylor
    polynomial below z = 0.1 (truncation error < z^5/720 < 2e-8) when compiled: not
    torch.expm1 near 0 there, as torch.compile's vectorised CPU expm1 (torch 2.3) loses
    all precision for tiny arguments. Eager torch.expm1 is exact."""
    if not torch.compiler.is_compiling():  # eager: torch.expm1 is exact, and fewer ops
        eps = torch.finfo(z.dtype).eps  # below it, 1 - z/2 + ... rounds to 1
        return z.neg().expm1_().div_(z.clamp_min(eps)).neg_().masked_fill_(z <= eps, 1.0)
    zl = z.clamp_min(0.1)
    poly = 1.0 + z * (-1.0 / 2 + z * (1.0 / 6 + z * (-1.0 / 24 + z * (1.0 / 120))))
    return torch.where(z < 0.1, poly, -torch.expm1(-zl) / zl)


def _tanh_factor_excess_over_u(e: Tensor, u: Tensor, mu: float) -> Tensor:
    """``(MF - 1) / u`` of the tanh factor MF = 1 + tanh(mu) - tanh(mu e), for an error
    ``e`` in [0, 1] and ``u = 1 - e`` (both given to full relative accuracy), mu > 0:

        MF - 1 = tanh(mu) - tanh(mu e) = sinh(mu u) / (cosh(mu) cosh(mu e)) = u * r,
        r = 4 mu exp(-2 mu e) expm1c(2 mu u) / ((1 + exp(-2 mu)) (1 + exp(-2 mu e))),

    only exponentials of non-positive arguments (no overflow for any mu). Then
    ``1 - MF e = u (1 - e r)`` with ``e r`` in [0, mu sech^2(mu)] (<= 0.45): the modulated
    complement ``1 - e'`` is formed without cancellation. Returns r, a fresh tensor."""
    q = e.mul(-2.0 * mu).exp_()
    r_over_u = _expm1c(u.mul(2.0 * mu)).mul_(q).mul_(4.0 * mu / (1.0 + math.exp(-2.0 * mu)))
    r_over_u.div_(q.add_(1.0))
    return r_over_u
