"""The balanced L1 loss (Pang et al., Libra R-CNN; mmdetection's beta convention) and the
EAPM balanced L1 loss (paper Sec. 2.3), as one fused kernel.

EAPM modulates the (dw, dh) deltas: ``t' = t* + MF (t - t*)``, MF = 1 + tanh(theta) -
tanh(theta GoS), GoS = |t - t*| / (|t| + |t*|); dx and dy are not modulated. The value is the
balanced L1 loss at ``t'``, the gradient w.r.t. ``t`` its gradient at ``t'`` (MF not
differentiated), attached in closed form (``runtime._attach``). Float32 or wider.

Pure torch, no detectron2 import.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .attributes import check_eapm_param, gap_over_sum, modulating_factor
from .checks import check_number
from .runtime import _attach, _check_reduction, _kernel, _reduce_mean, _run_kernel, _to_float

__all__ = ["check_balanced_l1_params", "balanced_l1_loss", "eapm_balanced_l1_loss"]


def check_balanced_l1_params(alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0) -> None:
    """Raise ``ValueError`` unless alpha, gamma and beta of the balanced L1 loss are
    finite numbers > 0."""
    for name, v in (("alpha", alpha), ("gamma", gamma), ("beta", beta)):
        check_number(v, f"balanced L1 {name}", 0, lo_open=True)


def _balanced_l1_terms(d: Tensor, alpha: float, gamma: float, beta: float) -> Tuple[Tensor, Tensor]:
    """mmdetection's balanced L1 on d = |error| >= 0: (loss, dloss/dd). ``d`` is only
    read; the temporaries are updated in place (see ``_focal_terms``)."""
    b = math.exp(gamma / alpha) - 1.0
    inlier = d < beta
    di = d.clamp(max=beta)  # the inlier branch stays finite on outliers (not selected)
    bd = di.mul(b)
    log_term = bd.div(beta).log1p_()
    bd_beta = bd.add(beta)
    bd1 = bd.add_(1.0)
    loss_in = bd1.mul(log_term).mul_(alpha / b).sub_(di.mul_(alpha))
    grad_in = bd1.div_(bd_beta).add_(log_term).sub_(1.0).mul_(alpha)
    loss_out = d.mul(gamma).add_(gamma / b - alpha * beta)
    loss = torch.where(inlier, loss_in, loss_out)
    grad = grad_in.masked_fill_(inlier.logical_not_(), gamma)
    return loss, grad


def balanced_l1_loss(
    input: Tensor,
    target: Tensor,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    reduction: str = "none",
    *,
    compile_kernels: bool = False,
) -> Tensor:
    """Balanced L1 loss (Pang et al., Libra R-CNN) with mmdetection's beta convention,
    on d = |input - target| elementwise (float32, or float64 for float64 inputs):

        d <  beta: alpha/b (b d + 1) ln(b d / beta + 1) - alpha d
        d >= beta: gamma d + gamma/b - alpha beta,          b = e^(gamma/alpha) - 1
    """
    return _eapm_bl1(input, target, 0.0, alpha, gamma, beta, reduction, False, compile_kernels)


def eapm_balanced_l1_loss(
    input: Tensor,
    target: Tensor,
    theta: float,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    reduction: str = "none",
    *,
    compile_kernels: bool = False,
) -> Tensor:
    """Balanced L1 loss at the EAPM-modulated deltas (paper Sec. 2.3).

    ``input``/``target`` are (..., 4) box deltas (dx, dy, dw, dh). dw and dh are
    modulated by MF = 1 + tanh(theta) - tanh(theta * GoS), GoS = |t - t*| / (|t| + |t*|);
    dx and dy are not. ``theta == 0`` is exactly the balanced L1 loss.
    """
    if input.shape[-1:] != (4,):
        raise ValueError(
            f"eapm_balanced_l1_loss expects (..., 4) box deltas, got {tuple(input.shape)}"
        )
    return _eapm_bl1(input, target, theta, alpha, gamma, beta, reduction, True, compile_kernels)


@_kernel
def _bl1_kernel(
    t: Tensor,
    g: Tensor,
    wh: Optional[Tensor],
    theta: float,
    alpha: float,
    gamma: float,
    beta: float,
    reduce: bool,
):
    """(loss or its sum, d loss / d t) of (EAPM) balanced L1 in one pass. ``wh`` is 1 on
    the modulated (dw, dh) entries and 0 elsewhere, a full tensor of the inputs' shape so
    that the compiled kernel is one flat, vectorisable loop (GoS is defined for w, h)."""
    err = t - g
    if wh is not None:
        mf = modulating_factor(gap_over_sum(t, g), theta)
        err.mul_(mf.masked_fill_(wh == 0, 1.0))
    loss, grad = _balanced_l1_terms(err.abs(), alpha, gamma, beta)
    grad.mul_(err.sign_())  # 0 at err == 0, as autograd through |err|
    return (loss.sum() if reduce else loss), grad


def _eapm_bl1(input, target, theta, alpha, gamma, beta, reduction, modulate, compile_kernels):
    theta = check_eapm_param(theta, "theta")
    _check_reduction(reduction)
    check_balanced_l1_params(alpha, gamma, beta)
    if input.shape != target.shape:
        raise ValueError(
            f"input {tuple(input.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    t = _to_float(input).detach()
    g = target.to(t.dtype)
    reduce = reduction != "none"
    wh = None
    if modulate and theta > 0:
        wh = torch.zeros_like(t)
        wh[..., 2:] = 1.0
    args = (t, g, wh, theta, float(alpha), float(gamma), float(beta), reduce)
    loss, grad = _run_kernel("_bl1_kernel", compile_kernels, *args)
    loss = _attach(input, loss, grad)
    return _reduce_mean(loss, input.numel()) if reduction == "mean" else loss
