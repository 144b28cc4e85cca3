"""The paper's general recipe (Sec. 2.1) as a wrapper around any base loss.

EAPM is defined for any loss ``L(pred, target)``:

1. an example attribute ``EA = f(p, p*)`` of the prediction ``p`` and its target ``p*`` in a
   *prediction space* (``attribute``): the name ``"difficulty"`` (Dif = |p - p*|, paper
   Sec. 2.2, of the link's p: the probabilities for sigmoid, where ``eapm.losses.difficulty``
   takes the logits) or ``"gap_over_sum"`` (GoS = |p - p*| / (|p| + |p*|), Sec. 2.3, 0/0 =
   0: ``eapm.losses.gap_over_sum``), or a user's callable ``attribute(p, p_star)``;
2. a modulating factor ``MF = g(EA)`` (``factor``): a number, the strength ``s`` (mu or
   theta) of the paper's factor ``MF = modulating_factor(EA, s) = 1 + tanh(s) - tanh(s EA)``,
   or a user's callable ``factor(ea)``;
3. the modulated prediction ``p' = p* + MF (p - p*)``;
4. the loss evaluated at ``p'``, whose gradient reaches the raw output *as it is at the
   modulated point*: MF is not differentiated and there is no chain-rule factor
   (docs/design.md, "Gradient semantics"). Implemented as the straight-through shift
   ``x_mod = x + (x' - x).detach()`` of the raw prediction ``x`` to the raw value ``x'``
   whose prediction is ``p'``: the base loss sees ``x'`` and its gradient w.r.t. ``x_mod``
   passes to ``x`` unchanged.

The prediction space is named by ``link``:

* ``"identity"``: ``p = x`` (regression deltas), ``x' = p'``. ``target``: same shape as x.
* ``"sigmoid"``: ``p = sigmoid(x)`` elementwise, ``x' = logit(p')``. ``target``: x's shape,
  values in {0, 1} (checked; one host synchronisation). ``attribute(p, target)`` sees the
  probabilities; the modulated error ``MF |p - p*|`` is formed from ``sigmoid(+-x)``
  (accurate for large logits) and must stay <= 1.
* ``"softmax"``: ``p = softmax(x)`` over the last dim of (N, C) logits, ``x' = log p'``
  (log-probabilities: ``softmax(x') = p'``). ``target``: (N,) integer labels; rows whose
  label is outside [0, C) (an ignore index) are not modulated. One MF per row: ``attribute``
  sees the target class's probability ``p_y`` (N,) and ``ones`` (``p*`` at the target
  class), so ``"difficulty"`` gives ``1 - p_y``; ``p' = Y + MF (p - Y)`` stays a
  distribution when ``MF (1 - p_y) <= 1`` (checked). The base loss must depend on the
  logits only through ``softmax`` (as a cross entropy does): ``x'`` is defined up to a
  per-row constant.

Contract of the callables (the named attributes and the strength's factor keep it too):
``attribute(p, p_star) -> Tensor`` broadcastable to ``p``'s shape ((N,) for softmax),
finite; ``factor(ea) -> Tensor`` (MF >= 0), finite. Both are called without gradient, in
float32 (float64 for float64 input), autocast disabled. Where MF is exactly 1 the raw
prediction is passed through untouched (so a factor that is 1 everywhere, e.g. the strength
``factor=0``, gives the base loss bitwise). The base loss itself runs in the caller's
autocast state on the float32 (float64) modulated prediction.

This path composes autograd ops and is meant for new attributes, factors and base losses;
the fused kernels (``eapm_sigmoid_focal_loss``, ``eapm_balanced_l1_loss``,
``eapm_cross_entropy``, ``eapm_binary_cross_entropy_with_logits``) are the fast and, near
``p' -> 1`` (very hard examples with large logits), the more accurate paths of the same
definitions: for the sigmoid and softmax links ``1 - MF Dif`` is formed by subtraction here.

Pure torch, no detectron2 import.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .attributes import check_eapm_param, gap_over_sum, modulating_factor
from .runtime import _to_float

__all__ = [
    "LINKS",
    "modulate_prediction",
    "eapm_loss",
]

LINKS = ("identity", "sigmoid", "softmax")

AttributeFn = Callable[[Tensor, Tensor], Tensor]
FactorFn = Callable[[Tensor], Tensor]
Attribute = Union[str, AttributeFn]  # a name of _ATTRIBUTES or a callable
Factor = Union[float, FactorFn]  # the strength s of modulating_factor or a callable


def _difficulty(pred: Tensor, target: Tensor) -> Tensor:
    """Dif = |p - p*| (paper Sec. 2.2) of predictions in the prediction space (e.g.
    probabilities), elementwise (``attributes.difficulty`` takes sigmoid logits instead)."""
    return (pred - target).abs()


# the attributes ``attribute`` may name: the prediction-space forms of the paper's Dif and GoS
_ATTRIBUTES: Dict[str, AttributeFn] = {"difficulty": _difficulty, "gap_over_sum": gap_over_sum}


def _attribute_fn(attribute: Attribute) -> AttributeFn:
    """The callable of ``attribute``: itself, or the attribute it names."""
    if isinstance(attribute, str):
        try:
            return _ATTRIBUTES[attribute]
        except KeyError:
            raise ValueError(
                f"attribute must be one of {tuple(_ATTRIBUTES)} or a callable, got {attribute!r}"
            ) from None
    if not callable(attribute):
        raise ValueError(
            f"attribute must be one of {tuple(_ATTRIBUTES)} or a callable, got {attribute!r}"
        )
    return attribute


def _factor_fn(factor: Factor) -> FactorFn:
    """The callable of ``factor``: itself, or for a number s (the strength, checked by
    ``check_eapm_param``) ``MF = modulating_factor(EA, s)``."""
    if callable(factor):
        return factor
    if isinstance(factor, (str, bytes)) or factor is None:
        raise ValueError(
            f"factor must be a number >= 0 (the strength s) or a callable, got {factor!r}"
        )
    s = check_eapm_param(factor, "factor")

    def tanh_mf(ea: Tensor) -> Tensor:
        return modulating_factor(ea, s)

    tanh_mf.__name__ = tanh_mf.__qualname__ = f"modulating_factor(ea, {s!r})"
    return tanh_mf


def _column_mask(n: int, columns: Optional[Sequence[int]], device) -> Optional[Tensor]:
    if columns is None:
        return None
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    cols = list(columns)
    if any(not isinstance(c, int) or not -n <= c < n for c in cols):
        raise ValueError(f"modulated_columns must be indices into the last dim ({n}), got {cols}")
    mask[cols] = True
    return mask


def _mf(factor: FactorFn, ea: Tensor, shape, name: str) -> Tensor:
    mf = factor(ea)
    if not isinstance(mf, Tensor):
        raise ValueError(f"the factor must return a tensor, got {type(mf).__name__}")
    try:
        mf = torch.broadcast_to(mf, shape)
    except RuntimeError:
        raise ValueError(
            f"the factor's output {tuple(mf.shape)} does not broadcast to {name} {tuple(shape)}"
        ) from None
    return mf


def modulate_prediction(
    pred: Tensor,
    target: Tensor,
    attribute: Attribute,
    factor: Factor,
    link: str = "identity",
    *,
    modulated_columns: Optional[Sequence[int]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The straight-through modulated prediction of the paper's recipe (module docstring).

    Args:
        pred: raw predictions (logits for the sigmoid / softmax links, deltas for identity).
        target: targets in the link's form (module docstring).
        attribute: ``"difficulty"`` (Dif = |p - p*|), ``"gap_over_sum"`` (GoS) or a callable
            ``EA = attribute(p, p*)``.
        factor: a number, the strength s of ``MF = modulating_factor(EA, s)`` (``0``: MF
            == 1), or a callable ``MF = factor(EA)``.
        link: "identity", "sigmoid" or "softmax".
        modulated_columns: indices along the last dim that are modulated (the others keep
            MF = 1, e.g. ``(2, 3)`` for the dw, dh of (..., 4) box deltas); None: all.
            Not for the softmax link (one MF per row).

    Returns ``(pred_mod, ea, mf)``: ``pred_mod`` of pred's shape, float32 (float64 for
    float64 pred), whose value is the raw ``x'`` and whose gradient passes to ``pred``
    unchanged (identity Jacobian, cast back to pred's dtype); ``ea`` and ``mf`` detached
    (for the softmax link (N,) per row; else of the broadcast shape, MF forced to 1 outside
    ``modulated_columns``).

    Raises:
        ValueError: an unknown link or attribute name, an invalid strength (``factor``),
            shapes that do not fit the link, sigmoid targets
            outside {0, 1}, softmax labels not integers, ``modulated_columns`` with the
            softmax link or out of range, a factor output that does not broadcast, or a
            modulated probability outside [0, 1] (sigmoid / softmax links).
    """
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    attribute, factor = _attribute_fn(attribute), _factor_fn(factor)
    x = _to_float(pred)
    with torch.no_grad(), torch.autocast(device_type=pred.device.type, enabled=False):
        xd = x.detach()
        if link == "softmax":
            x_mod, ea, mf = _softmax_shift(xd, target, attribute, factor, modulated_columns)
        else:
            if target.shape != pred.shape:
                raise ValueError(
                    f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the "
                    f"same shape (link {link!r})"
                )
            t = target.to(xd.dtype)
            cols = None
            if xd.dim() > 0:
                cols = _column_mask(xd.shape[-1], modulated_columns, xd.device)
            elif modulated_columns is not None:
                raise ValueError("modulated_columns needs predictions with a last dim")
            if link == "identity":
                ea = attribute(xd, t)
                mf = _mf(factor, ea, xd.shape, "pred")
                if cols is not None:
                    mf = mf.masked_fill(~cols, 1.0)
                x_mod = t + mf * (xd - t)
            else:
                x_mod, ea, mf = _sigmoid_shift(xd, t, attribute, factor, cols)
            # exactly the raw prediction where MF == 1 (no round trip through the link)
            x_mod = torch.where(mf == 1, xd, x_mod)
    return x + (x_mod - x).detach(), ea, mf


def _sigmoid_shift(x: Tensor, t: Tensor, attribute: AttributeFn, factor: FactorFn, cols):
    if t.numel() and not bool(((t == 0) | (t == 1)).all()):
        raise ValueError("the sigmoid link needs targets in {0, 1}")
    sign = 1.0 - 2.0 * t  # +1 for negatives, -1 for positives
    s = x * sign
    e = torch.sigmoid(s)  # |p - p*|, to full relative accuracy
    ea = attribute(torch.sigmoid(x), t)
    mf = _mf(factor, ea, x.shape, "pred")
    if cols is not None:
        mf = mf.masked_fill(~cols, 1.0)
    e_mod = mf * e
    if e_mod.numel() and not bool(((e_mod >= 0) & (e_mod <= 1)).all()):
        raise ValueError("the modulated probability p* + MF (p - p*) leaves [0, 1]")
    # x' = logit(p') = sign * (log e' - log(1 - e')), log e' = log MF + logsigmoid(s)
    x_mod = sign * (torch.log(mf) + F.logsigmoid(s) - torch.log1p(-e_mod))
    return x_mod, ea, mf


def _softmax_shift(x: Tensor, labels: Tensor, attribute: AttributeFn, factor: FactorFn, columns):
    if columns is not None:
        raise ValueError("modulated_columns is not for the softmax link (one MF per row)")
    if x.dim() != 2 or labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"the softmax link needs (N, C) logits and (N,) labels, got {tuple(x.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"the softmax link needs integer labels, got {labels.dtype}")
    num_classes = x.shape[1]
    modulated = (labels >= 0) & (labels < num_classes)
    idx = labels.masked_fill(~modulated, 0).unsqueeze(1)
    logp = torch.log_softmax(x, dim=1)
    logp_y = logp.gather(1, idx).squeeze(1)
    big = logp_y > -0.6931471805599453  # p_y > 1/2: 1 - p_y as the sum of the others
    e = torch.where(big, logp.exp().scatter(1, idx, 0.0).sum(1), torch.expm1(logp_y).neg())
    p_y = torch.where(big, torch.log1p(e.neg()), logp_y).exp()
    ea = attribute(p_y, torch.ones_like(p_y))
    mf = _mf(factor, ea, p_y.shape, "the rows").masked_fill(~modulated, 1.0)
    e_mod = mf * e
    if e_mod.numel() and not bool(((e_mod >= 0) & (e_mod <= 1)).all()):
        raise ValueError("the modulated distribution Y + MF (p - Y) leaves [0, 1]")
    # x' = log p': log MF + log p_k off the target, log(1 - MF (1 - p_y)) at it
    x_mod = (logp + torch.log(mf).unsqueeze(1)).scatter(1, idx, torch.log1p(-e_mod).unsqueeze(1))
    x_mod = torch.where((mf == 1).unsqueeze(1), x, x_mod)
    return x_mod, ea, mf


def eapm_loss(
    base_loss: Callable[..., Tensor],
    attribute: Attribute,
    factor: Factor,
    link: str = "identity",
    *,
    modulated_columns: Optional[Sequence[int]] = None,
) -> Callable[..., Tensor]:
    """The EAPM version of ``base_loss(pred, target, **kwargs)`` (module docstring):

        eapm_loss(base_loss, attribute, factor, link)(pred, target, **kwargs)
            == base_loss(modulate_prediction(pred, target, attribute, factor, link)[0],
                         target, **kwargs)

    i.e. the value of the base loss at the modulated prediction, and as gradient w.r.t.
    ``pred`` the base loss's gradient there. Examples (the fused kernels compute the same):

        eapm_loss(sigmoid_focal_loss, "difficulty", mu, "sigmoid")  # EAPM focal
        eapm_loss(balanced_l1_loss, "gap_over_sum", theta, modulated_columns=(2, 3))
        eapm_loss(F.cross_entropy, "difficulty", mu, "softmax")  # eapm_cross_entropy

    ``attribute`` and ``factor`` as in ``modulate_prediction``. Raises ``ValueError`` for an
    unknown link or attribute name and an invalid strength (here) and as
    ``modulate_prediction`` (per call).
    """
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    attribute, factor = _attribute_fn(attribute), _factor_fn(factor)
    cols = None if modulated_columns is None else tuple(modulated_columns)

    def loss(pred: Tensor, target: Tensor, **kwargs) -> Tensor:
        pred_mod, _, _ = modulate_prediction(
            pred, target, attribute, factor, link, modulated_columns=cols
        )
        return base_loss(pred_mod, target, **kwargs)

    name = getattr(base_loss, "__name__", type(base_loss).__name__)
    loss.__name__ = loss.__qualname__ = f"eapm_{name}"
    return loss
