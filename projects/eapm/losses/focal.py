"""The focal loss and the EAPM focal loss (paper Sec. 2.2), as one fused kernel.

Gradient semantics (paper Sec. 2.1): the value is the focal loss at the modulated
probability ``p' = p* + MF (p - p*)``, MF = 1 + tanh(mu) - tanh(mu Dif), Dif = |p - p*|; the
gradient that reaches the logit is the focal loss's gradient at the modulated logit
``logit(p')`` (MF not differentiated, no chain-rule factor), attached in closed form
(``runtime._attach``). Always computed in float32 or wider.

Numerics.  With the error ``e = |p - p*| = sigmoid(s)``,
``s = x`` for negatives and ``s = -x`` for positives, the modulated error is
``e' = MF * e`` and the focal loss at the modulated point is
``-alpha_t * e'^gamma * log(1 - e')``.  Near a very hard example ``e'`` is close to
one, so ``1 - e'`` is never formed by subtraction: with ``u = 1 - e = sigmoid(-s)``
and ``MF - 1 = tanh(mu) - tanh(mu e) = sinh(mu u) / (cosh(mu) cosh(mu e)) = u * r``,

    1 - e' = u * (1 - e * r),
    r = 4 mu exp(-2 mu e) expm1c(2 mu u) / ((1 + exp(-2 mu)) (1 + exp(-2 mu e))),

with ``expm1c(z) = (1 - exp(-z)) / z``: only exponentials of non-positive arguments, so no
overflow for any mu. The bracket lies in [1 - mu sech^2(mu), 1] (>= 0.55 for every
mu >= 0), so ``log(1 - e') = logsigmoid(-s) + log1p(-e r)`` is exact to rounding even for
logits of +-100 in float32.

Pure torch, no detectron2 import.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from .attributes import _tanh_factor_excess_over_u, check_eapm_param
from .runtime import _attach, _check_reduction, _kernel, _reduce_mean, _run_kernel, _to_float

__all__ = [
    "sigmoid_focal_loss",
    "eapm_sigmoid_focal_loss",
    "eapm_focal_terms",
    "eapm_focal_loss_sum_with_stats",
]


@_kernel
def _focal_terms(
    x: Tensor, t: Tensor, mu: float, alpha: float, gamma: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Value and d/dx of the focal loss at the EAPM-modulated point.

    Returns (loss, grad, dif, mf); all float32/64.

    The temporaries are updated in place where they are not needed any more: run
    eagerly, every out-of-place op allocates a fresh buffer, which costs more than the
    arithmetic (see ``_EAGER_CHUNK``); torch.compile fuses either form."""
    sign = t.mul(-2.0).add_(1.0)  # +1 for negatives, -1 for positives
    s = x.mul(sign)
    # e = sigmoid(s) (= Dif) and u = 1 - e = sigmoid(-s), each to full relative accuracy
    # (1 / (1 + exp(-s)): no cancellation; below ~1e-38 they underflow to 0, where every
    # term they enter is negligible), and log(u) = -softplus(s), exact for any logit
    e = torch.sigmoid(s)
    u = torch.sigmoid(s.neg())
    log_u = torch.nn.functional.softplus(s, threshold=40.0).neg_()  # exact to rounding above 40
    if mu > 0:
        # r/u with r = tanh(mu) - tanh(mu e) = MF - 1 (see _tanh_factor_excess_over_u)
        r_over_u = _tanh_factor_excess_over_u(e, u, mu)
        mf = u.mul(r_over_u).add_(1.0)
        e_mod = e.mul(mf).clamp_(max=1.0)
        er = r_over_u.mul_(e).clamp_(max=1.0)  # e r, in [0, mu sech^2 mu] <= 0.45
        one_m = er.neg().add_(1.0).mul_(u)  # 1 - e' = u (1 - e r), from the same factorisation
        log_1m = er.neg_().log1p_().add_(log_u)
    else:
        mf = torch.ones_like(e)
        e_mod = e
        log_1m = log_u
        one_m = u
    # (e_mod may be e, which is returned: not modified below)
    if gamma == 0:
        e_pow = torch.ones_like(e_mod)
        e_pow_grad = e_mod
    elif gamma == 2:
        e_pow = e_mod * e_mod
        e_pow_grad = e_pow * e_mod
    else:
        e_pow = e_mod.pow(gamma)
        e_pow_grad = e_pow * e_mod
    # FL(s) = -a_t e^g log(1-e);  dFL/ds = a_t e^g (e - g (1-e) log(1-e))
    loss = e_pow.mul(log_1m).neg_()
    grad = e_pow.mul(one_m).mul_(log_1m).mul_(-gamma).add_(e_pow_grad)
    if alpha >= 0:
        a_t = t.mul(2.0 * alpha - 1.0).add_(1.0 - alpha)  # alpha t + (1 - alpha)(1 - t)
        loss.mul_(a_t)
        grad.mul_(a_t)
    return loss, grad.mul_(sign), e, mf


@_kernel
def _focal_sum(
    x: Tensor, t: Tensor, mu: float, alpha: float, gamma: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """Summed loss, per-element gradient and the diagnostic sums
    [sum Dif over positives, over negatives, sum MF over positives, over negatives,
    number of positives], fused in one pass."""
    loss, grad, dif, mf = _focal_terms(x, t, mu, alpha, gamma)
    pos = (t > 0.5).to(x.dtype).reshape(-1)
    dif_pos, mf_pos = dif.reshape(-1) @ pos, mf.reshape(-1) @ pos
    stats = torch.stack([dif_pos, dif.sum() - dif_pos, mf_pos, mf.sum() - mf_pos, pos.sum()])
    return loss.sum(), grad, stats


def _focal_args(
    inputs: Tensor, targets: Tensor, mu, alpha, gamma
) -> Tuple[Tensor, Tensor, float, float, float]:
    """Validated kernel arguments: detached float32+ logits, targets of their dtype, floats."""
    mu = check_eapm_param(mu, "mu")
    _check_focal_args(inputs, targets, alpha, gamma)
    x = _to_float(inputs).detach()
    return x, targets.to(x.dtype), mu, float(alpha), float(gamma)


def _check_focal_args(inputs: Tensor, targets: Tensor, alpha: float, gamma: float) -> None:
    if inputs.shape != targets.shape:
        raise ValueError(
            f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} "
            "must have the same shape"
        )
    if not math.isfinite(alpha) or alpha > 1:
        raise ValueError(f"alpha must be <= 1 (< 0 disables it), got {alpha}")
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")


def eapm_sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    mu: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    compile_kernels: bool = False,
) -> Tensor:
    """Focal loss (Lin et al.) at the EAPM-modulated probability (paper Sec. 2.2).

    Args:
        inputs: logits of any shape, any float dtype (computed in float32 or wider).
        targets: same shape, values in {0, 1}.
        mu: modulation strength >= 0; ``mu == 0`` is exactly the focal loss.
        alpha: positive weight in [0, 1]; ``alpha < 0`` disables the weighting.
        gamma: focusing parameter >= 0.
        reduction: "none" (per element), "sum" or "mean".
        compile_kernels: run the fused kernel through ``torch.compile`` (compiled once
            per process; same results as eager up to float rounding).

    The returned loss is float32 (float64 for float64 inputs). Its gradient w.r.t.
    ``inputs`` is the focal loss's gradient at the modulated logit.
    """
    _check_reduction(reduction)
    if reduction == "none":
        return eapm_focal_terms(inputs, targets, mu, alpha, gamma, compile_kernels=compile_kernels)[
            0
        ]
    loss, _ = eapm_focal_loss_sum_with_stats(
        inputs, targets, mu, alpha, gamma, compile_kernels=compile_kernels
    )
    return _reduce_mean(loss, inputs.numel()) if reduction == "mean" else loss


def eapm_focal_loss_sum_with_stats(
    inputs: Tensor,
    targets: Tensor,
    mu: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
    *,
    compile_kernels: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Summed EAPM focal loss (a scalar, with the gradient semantics above) and the
    detached float32 diagnostic sums ``[sum Dif over positives, over negatives, sum MF
    over positives, over negatives, number of positives]``, computed in one fused pass."""
    args = _focal_args(inputs, targets, mu, alpha, gamma)
    loss, grad, stats = _run_kernel("_focal_sum", compile_kernels, *args)
    return _attach(inputs, loss, grad), stats


def eapm_focal_terms(
    inputs: Tensor,
    targets: Tensor,
    mu: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
    *,
    compile_kernels: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-element EAPM focal loss (with the gradient semantics above) plus the
    detached attributes it was computed from: ``(loss, dif, mf)``, each of the inputs'
    shape (float32, or float64 for float64 inputs)."""
    args = _focal_args(inputs, targets, mu, alpha, gamma)
    loss, grad, dif, mf = _run_kernel("_focal_terms", compile_kernels, *args)
    return _attach(inputs, loss, grad), dif, mf


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    compile_kernels: bool = False,
) -> Tensor:
    """The plain focal loss, ``eapm_sigmoid_focal_loss`` with mu = 0."""
    return eapm_sigmoid_focal_loss(
        inputs, targets, 0.0, alpha, gamma, reduction, compile_kernels=compile_kernels
    )
