"""EAPM cross entropies: softmax cross entropy for R-CNN box classification and binary
cross entropy with logits for the RPN objectness (the paper's recipe, Sec. 2.1, with Dif
and the tanh factor of Sec. 2.2 on the base losses of a two-stage detector).

Softmax (``eapm_cross_entropy``), per example (row) with logits ``x`` (C classes), label
``y`` (one-hot ``Y``), ``p = softmax(x)``:

    Dif = 1 - p_y,   MF = 1 + tanh(mu) - tanh(mu Dif),   p' = Y + MF (p - Y)

``p'`` is again a distribution (``MF Dif <= 1`` for every mu >= 0). The value is the cross
entropy at ``p'``, ``-log p'_y = -log(1 - MF Dif)``; the gradient w.r.t. the logits is the
cross entropy's gradient at the modulated point, ``softmax(x') - Y = p' - Y = MF (p - Y)``
(MF not differentiated, no chain-rule factor: docs/design.md), attached in closed form.

Numerics: with ``u = p_y`` and ``MF - 1 = u r`` (the tanh factor's factorisation,
``attributes._tanh_factor_excess_over_u``), ``1 - MF Dif = u (1 - Dif r)`` and

    -log p'_y = -log p_y - log1p(-Dif r),   Dif r in [0, 0.45],

with ``log p_y`` from ``log_softmax`` and ``Dif`` as the sum of the other classes'
probabilities where ``p_y > 1/2`` (no cancellation in ``1 - p_y``), ``-expm1(log p_y)``
elsewhere: logits of +-100 give finite values and gradients, exact to the rounding of
log_softmax.

Binary (``eapm_binary_cross_entropy_with_logits``): the sigmoid case, ``Dif = |p - p*|``,
``p' = p* + MF (p - p*)``, value ``-log(1 - MF Dif)``, gradient ``p' - p* = MF (p - p*)``:
the EAPM focal loss with gamma 0 and no alpha weighting (its fused kernel).

dtype: computed in float32 (float64 for float64 input) with autocast disabled; the result
has the dtype F.cross_entropy / F.binary_cross_entropy_with_logits would return: the input's
dtype (float16 / bfloat16 in, the same out), float32 for float16 / bfloat16 input inside an
autocast region of the input's device (those functions are float32 ops under autocast). The
gradient has the input's dtype. ``mu == 0`` calls the torch function itself (bitwise); float16
logits on the CPU, for which torch has no cross entropy kernel, go through float32 there too.

Pure torch, no detectron2 import.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .attributes import _tanh_factor_excess_over_u, check_eapm_param
from .focal import eapm_sigmoid_focal_loss
from .runtime import _attach, _check_reduction, _to_float

__all__ = [
    "eapm_cross_entropy",
    "eapm_ce_stats",
    "eapm_binary_cross_entropy_with_logits",
]


def _output_dtype(x: Tensor) -> torch.dtype:
    """The dtype F.cross_entropy returns for ``x``: float32 for float16 / bfloat16 inside
    an autocast region of x's device, x's dtype otherwise."""
    if x.dtype in (torch.float16, torch.bfloat16):
        dev = x.device.type
        on = torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()
        if on and dev in ("cpu", "cuda"):
            return torch.float32
    return x.dtype


def _empty_mean(logits: Tensor) -> Tensor:
    """detectron2's convention for the mean over zero elements: 0 with a gradient path."""
    return (logits.sum() * 0.0).to(_output_dtype(logits))


def _check_ce_inputs(logits: Tensor, labels: Tensor, ignore_index: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C) class scores, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (N,) = ({logits.shape[0]},) class indices, got shape "
            f"{tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    num_classes = logits.shape[1]
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):  # one host synchronisation: a clear error instead of a gather fault
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"label {int(labels[i])} of row {i} is outside [0, {num_classes}) and not the "
            f"ignore_index {ignore_index} (background is the last index, {num_classes - 1})"
        )


def _ce_terms(x: Tensor, labels: Tensor, mu: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Value and d/dx of the cross entropy at the EAPM-modulated distribution, per row.

    ``x``: (N, C) float32/64 logits, detached; ``labels``: (N,) in [0, C). Returns
    ``(loss (N,), grad (N, C), dif (N,), mf (N,))``, all of x's dtype."""
    logp = torch.log_softmax(x, dim=1)
    p = logp.exp()
    idx = labels.unsqueeze(1)
    logp_y = logp.gather(1, idx).squeeze(1)
    # Dif = 1 - p_y: the sum of the other probabilities where p_y > 1/2 (no cancellation),
    # -expm1(log p_y) elsewhere (Dif >= 1/2: accurate); log p_y then from the accurate Dif
    # where p_y > 1/2 (log_softmax rounds log(1 - tiny) to 0)
    big = logp_y > -0.6931471805599453  # p_y > 1/2
    others = p.scatter(1, idx, 0.0).sum(1)
    dif = torch.where(big, others, torch.expm1(logp_y).neg())
    log_u = torch.where(big, torch.log1p(dif.neg()), logp_y)
    u = log_u.exp()  # p_y
    if mu > 0:
        r = _tanh_factor_excess_over_u(dif, u, mu)  # MF - 1 = u r
        mf = u * r + 1.0
        dif_r = (dif * r).clamp(max=1.0)  # in [0, mu sech^2 mu] <= 0.45
        loss = torch.log1p(dif_r.neg()).add_(log_u).neg_()  # -log(u (1 - Dif r))
    else:
        mf = torch.ones_like(dif)
        loss = log_u.neg()
    # MF (p - Y): MF p_k for k != y, -MF Dif at y
    grad = (p * mf.unsqueeze(1)).scatter_(1, idx, (mf * dif).neg().unsqueeze(1))
    return loss, grad, dif, mf


def eapm_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    mu: float,
    reduction: str = "mean",
    *,
    ignore_index: int = -100,
) -> Tensor:
    """Softmax cross entropy at the EAPM-modulated distribution (R-CNN box classification).

    Args:
        logits: (N, C) class scores, any float dtype (background = the last index, as
            detectron2's box predictor).
        labels: (N,) integer class indices in [0, C), or ``ignore_index``.
        mu: modulation strength >= 0; ``mu == 0`` is ``F.cross_entropy`` itself (bitwise).
        reduction: "none" ((N,) per-row losses, 0 for ignored rows), "sum", or "mean" (the
            sum over the rows whose label is not ignored, divided by their number, as
            F.cross_entropy; every row ignored gives 0 / 0 = NaN there, as F.cross_entropy).
        ignore_index: label of rows that contribute neither loss nor gradient.

    Returns the loss (see the module docstring for its value, gradient and dtype). Empty
    input (N == 0): "mean" gives 0 with a gradient path (detectron2's ``cross_entropy``
    convention, not F.cross_entropy's NaN), "sum" 0, "none" an empty (0,) tensor.

    Raises:
        ValueError: mu not a finite number >= 0, an unknown reduction, logits not (N, C)
            floating point, labels not (N,) integers, or a label outside [0, C) that is
            not ``ignore_index`` (one host synchronisation checks the labels).
    """
    mu = check_eapm_param(mu, "mu")
    _check_reduction(reduction)
    _check_ce_inputs(logits, labels, ignore_index)
    if logits.shape[0] == 0 and reduction == "mean":
        return _empty_mean(logits)
    if mu == 0:
        if logits.dtype == torch.float16 and logits.device.type == "cpu":
            # torch's CPU cross entropy has no float16 kernel: the float32 value, cast back
            loss = F.cross_entropy(
                logits.float(), labels, reduction=reduction, ignore_index=ignore_index
            )
            return loss.to(_output_dtype(logits))
        return F.cross_entropy(logits, labels, reduction=reduction, ignore_index=ignore_index)
    out_dtype = _output_dtype(logits)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = _to_float(logits).detach()
        keep = labels != ignore_index
        loss, grad, _, _ = _ce_terms(x, labels.masked_fill(~keep, 0), mu)
        loss = loss.masked_fill_(~keep, 0.0)
        grad = grad.masked_fill_(~keep.unsqueeze(1), 0.0)
        if reduction == "none":
            out = _attach(logits, loss, grad)
        else:
            out = _attach(logits, loss.sum(), grad)
            if reduction == "mean":
                out = out / keep.sum().to(out.dtype)
    return out.to(out_dtype)


@torch.no_grad()
def eapm_ce_stats(
    logits: Tensor, labels: Tensor, mu: float, *, ignore_index: int = -100
) -> Tuple[Tensor, Tensor]:
    """The attributes ``eapm_cross_entropy`` computes from: ``(dif, mf)``, each (M,) for the
    M rows whose label is not ``ignore_index`` (in row order: they align with
    ``labels[labels != ignore_index]``), detached, float32 (float64 for float64 logits).
    ``dif = 1 - p_y``, ``mf = 1 + tanh(mu) - tanh(mu dif)`` (ones for mu == 0). For
    histograms of the diagnostics; raises as ``eapm_cross_entropy``."""
    mu = check_eapm_param(mu, "mu")
    _check_ce_inputs(logits, labels, ignore_index)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        keep = labels != ignore_index
        x = _to_float(logits).detach()[keep]
        _, _, dif, mf = _ce_terms(x, labels[keep], mu)
    return dif, mf


def eapm_binary_cross_entropy_with_logits(
    logits: Tensor, targets: Tensor, mu: float, reduction: str = "sum"
) -> Tensor:
    """Binary cross entropy with logits at the EAPM-modulated probability (RPN objectness).

    Args:
        logits: objectness logits of any shape, any float dtype.
        targets: same shape, values in {0, 1} (checked for mu > 0, one host
            synchronisation; ``mu == 0`` accepts what F.binary_cross_entropy_with_logits
            accepts).
        mu: modulation strength >= 0; ``mu == 0`` is F.binary_cross_entropy_with_logits
            itself (bitwise).
        reduction: "none", "sum" (default, as detectron2's RPN) or "mean".

    Per element: ``-log(1 - MF Dif)``, Dif = |sigmoid(x) - t|, MF = 1 + tanh(mu) -
    tanh(mu Dif); gradient ``MF (sigmoid(x) - t)`` (the BCE gradient at the modulated
    point). Equals ``eapm_sigmoid_focal_loss(logits, targets, mu, alpha=-1, gamma=0)``,
    cast to the dtype the torch function returns (module docstring). Empty input: "mean"
    gives 0 with a gradient path (not NaN), "sum" 0.

    Raises:
        ValueError: mu not a finite number >= 0, an unknown reduction, shapes that differ,
            or (mu > 0) a target other than 0 or 1.
    """
    mu = check_eapm_param(mu, "mu")
    _check_reduction(reduction)
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the "
            "same shape"
        )
    if logits.numel() == 0 and reduction == "mean":
        return _empty_mean(logits)
    if mu == 0:
        return F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)
    if targets.numel() and not bool(((targets == 0) | (targets == 1)).all()):
        raise ValueError("EAPM binary cross entropy needs targets in {0, 1} (mu > 0)")
    out_dtype = _output_dtype(logits)
    loss = eapm_sigmoid_focal_loss(logits, targets, mu, alpha=-1.0, gamma=0.0, reduction=reduction)
    return loss.to(out_dtype)
