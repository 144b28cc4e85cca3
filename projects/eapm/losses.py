"""EAPM losses: focal loss and balanced L1 loss with example attribute based
prediction modulation (Wu et al., "Deep object detection with example attribute
based prediction modulation", Sec. 2).

Pure torch, no detectron2 import.

Gradient semantics (paper Sec. 2.1): the loss value is the base
loss evaluated at the modulated prediction, and the gradient that reaches the raw
network output is the *base* loss's gradient evaluated at the modulated point:

    dL/dx|_{x0}  ->  dL/dx|_{x0'},   x0' = logit(p* + MF * (p0 - p*))
    dL/dt|_{t0}  ->  dL/dt|_{t0'},   t0' = t* + MF * (t0 - t*)

The modulating factor MF is not differentiated. Both losses are implemented as
custom autograd functions whose forward computes the value *and* the closed-form
gradient in one pass (the backward is one multiply), always in float32 or wider,
whatever the input dtype or autocast state.

Numerics of the focal part.  With the error ``e = |p - p*| = sigmoid(s)``,
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
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "difficulty",
    "gap_over_sum",
    "modulating_factor",
    "sigmoid_focal_loss",
    "eapm_sigmoid_focal_loss",
    "balanced_l1_loss",
    "eapm_balanced_l1_loss",
    "eapm_focal_terms",
    "eapm_focal_loss_sum_with_stats",
    "check_eapm_param",
    "check_balanced_l1_params",
    "check_ghm_params",
    "ghm_bin_index",
    "GHMC",
    "GHMR",
    "clear_compiled_kernels",
    "compiled_kernel_state",
]

_REDUCTIONS = ("none", "sum", "mean")


# ----------------------------------------------------------------------------
# attributes and the modulating factor (public helpers)
# ----------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _to_float(x: Tensor) -> Tensor:
    """float32 for half / bfloat16 / integer inputs, float64 stays float64."""
    if x.dtype == torch.float64:
        return x
    return x.float()


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


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


class _ClosedForm(torch.autograd.Function):
    """Returns a precomputed value; its backward multiplies the precomputed
    gradient. Used by both EAPM losses (the gradient at the modulated point is
    known in closed form)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, input: Tensor, value: Tensor, grad: Tensor
    ) -> Tensor:
        ctx.save_for_backward(grad)
        ctx.input_dtype = input.dtype
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad_out * grad).to(ctx.input_dtype), None, None


def _attach(input: Tensor, value: Tensor, grad: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and input.requires_grad):
        return value
    return _ClosedForm.apply(input, value.detach(), grad.detach())


# ----------------------------------------------------------------------------
# the single-pass kernels: eager, or through torch.compile (per call, no global switch)
# ----------------------------------------------------------------------------
# Registry of the elementwise kernels, by name (filled at import, never changed after).
_EAGER_KERNELS: Dict[str, Callable] = {}
# Cache of compiled kernels keyed by (kernel name, dynamic shapes): torch.compile'd once
# per process. A value of None records that the compiler failed for that kernel: it runs
# eagerly from then on (one warning names the error).
_COMPILED_KERNELS: Dict[Tuple[str, bool], Optional[Callable]] = {}


def _compiler_errors() -> Tuple[type, ...]:
    """The exception types that mean "the compiler could not build the kernel" (no C++
    compiler, an unsupported platform or Python, a dynamo / inductor limitation), as
    opposed to an error of the computation itself."""
    errors = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)  # BackendCompilerFailed, Unsupported, ...
    except ImportError:  # pragma: no cover (torch without dynamo)
        pass
    try:
        from torch._inductor import exc as inductor_exc

        errors += [inductor_exc.CppCompileError, inductor_exc.InvalidCxxCompiler]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def clear_compiled_kernels() -> None:
    """Forget every compiled kernel and every recorded compiler failure of this process
    (the next ``compile_kernels=True`` call compiles again). For tests and benchmarks."""
    _COMPILED_KERNELS.clear()


def compiled_kernel_state(name: str) -> str:
    """ "not compiled", "compiled" or "failed (eager)" for the kernel ``name`` in this
    process (``name``: one of the kernel names, e.g. "_focal_sum", "_bl1_kernel")."""
    key = (name, True)
    if key not in _COMPILED_KERNELS:
        return "not compiled"
    return "compiled" if _COMPILED_KERNELS[key] is not None else "failed (eager)"


def _compiler_failed(name: str, error: BaseException) -> None:
    _COMPILED_KERNELS[(name, True)] = None
    warnings.warn(
        f"torch.compile of the EAPM loss kernel {name} failed ({type(error).__name__}: {error}); "
        "it runs in eager mode for the rest of this process (same results, slower)",
        RuntimeWarning,
        stacklevel=3,
    )


def _compiled(name: str) -> Optional[Callable]:
    """The compiled kernel ``name`` (compiled on first use), or None where the compiler
    failed for it."""
    key = (name, True)
    if key not in _COMPILED_KERNELS:
        try:
            _COMPILED_KERNELS[key] = torch.compile(_EAGER_KERNELS[name], dynamic=True)
        except Exception as e:  # torch.compile refuses up front (platform, Python version)
            _compiler_failed(name, e)
    return _COMPILED_KERNELS[key]


# Elements per chunk of the eager kernels on CPU (1 MiB per float32 temporary): each of a
# kernel's elementwise ops writes a temporary, and chunk by chunk these stay in cache
# instead of being fresh pages of the full (anchors x classes) size.
_EAGER_CHUNK = 1 << 18


def _kernel(fn: Callable) -> Callable:
    """Registers an elementwise kernel: every tensor argument has the same number of
    elements, and every output is either elementwise (the shape of the first tensor
    argument) or a sum over the elements (a scalar or a short vector of sums)."""
    _EAGER_KERNELS[fn.__name__] = fn
    return fn


def _run_chunked(fn: Callable, *args):
    """``fn(*args)`` for an elementwise kernel, computed on flat chunks of
    ``_EAGER_CHUNK`` elements for CPU tensors: elementwise outputs are written into
    full-size tensors, summed outputs are added up over the chunks."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    n = tensors[0].numel()
    # CPU only: on a GPU the caching allocator reuses freed blocks (nothing to gain), and
    # each chunk would cost a kernel launch per op
    if tensors[0].device.type != "cpu" or n <= _EAGER_CHUNK or any(a.numel() != n for a in tensors):
        return fn(*args)
    shape = tensors[0].shape
    flat = [a.reshape(-1) if isinstance(a, Tensor) else a for a in args]
    outs = None
    for start in range(0, n, _EAGER_CHUNK):
        stop = min(start + _EAGER_CHUNK, n)
        part = fn(*(a[start:stop] if isinstance(a, Tensor) else a for a in flat))
        if outs is None:  # the first chunk is a full one: elementwise outputs have its length
            elementwise = [o.shape == (_EAGER_CHUNK,) for o in part]
            outs = [
                o.new_empty(n) if ew else torch.zeros_like(o) for o, ew in zip(part, elementwise)
            ]
        for out, o, ew in zip(outs, part, elementwise):
            if ew:
                out[start:stop] = o
            else:
                out += o
    return tuple(o.view(shape) if ew else o for o, ew in zip(outs, elementwise))


def _run_kernel(name: str, compile_kernels: bool, *args):
    """Runs the registered kernel ``name`` on ``args``, in float32 math whatever the
    autocast state: through its compiled version when ``compile_kernels`` (and the
    compiler works for it), else eagerly. A compiler error falls back to eager mode
    (once per process and kernel, with a warning); any other error propagates."""
    with torch.autocast(device_type=args[0].device.type, enabled=False):
        if compile_kernels:
            fn = _compiled(name)
            if fn is not None:
                try:
                    return fn(*args)
                except _compiler_errors() as e:
                    # an error of the computation itself raises again here, and propagates
                    out = _run_chunked(_EAGER_KERNELS[name], *args)
                    _compiler_failed(name, e)
                    return out
        return _run_chunked(_EAGER_KERNELS[name], *args)


# ----------------------------------------------------------------------------
# focal loss
# ----------------------------------------------------------------------------
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
        # r/u with r = tanh(mu) - tanh(mu e) = MF - 1 = sinh(mu u) / (cosh(mu) cosh(mu e)),
        # written with exponentials of non-positive arguments only (no overflow for any mu):
        # r/u = 4 mu exp(-2 mu e) expm1c(2 mu u) / ((1 + exp(-2 mu)) (1 + exp(-2 mu e)))
        q = e.mul(-2.0 * mu).exp_()
        r_over_u = _expm1c(u.mul(2.0 * mu)).mul_(q).mul_(4.0 * mu / (1.0 + math.exp(-2.0 * mu)))
        r_over_u.div_(q.add_(1.0))
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
    return loss / inputs.numel() if reduction == "mean" and inputs.numel() > 0 else loss


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


# ----------------------------------------------------------------------------
# balanced L1 loss
# ----------------------------------------------------------------------------
def check_balanced_l1_params(alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0) -> None:
    """Raise ``ValueError`` unless alpha, gamma and beta of the balanced L1 loss are
    finite numbers > 0."""
    for name, v in (("alpha", alpha), ("gamma", gamma), ("beta", beta)):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v <= 0:
            raise ValueError(f"balanced L1 {name} must be a finite number > 0, got {v!r}")


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
    if reduction == "mean" and input.numel() > 0:
        loss = loss / input.numel()
    return loss


# ----------------------------------------------------------------------------
# GHM-C and GHM-R (Li, Liu, Wang, "Gradient harmonized single-stage detector", AAAI 2019)
# ----------------------------------------------------------------------------
def check_ghm_params(
    bins: Optional[int] = None,
    momentum: Optional[float] = None,
    mu: Optional[float] = None,
    loss_weight: Optional[float] = None,
) -> None:
    """Raise ``ValueError`` unless each given GHM parameter is valid: ``bins`` an integer
    >= 1, ``momentum`` a finite number in [0, 1), ``mu`` (GHM-R) a finite number > 0,
    ``loss_weight`` a finite number >= 0. Arguments left at None are not checked."""

    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if bins is not None and not (
        isinstance(bins, int) and not isinstance(bins, bool) and bins >= 1
    ):
        raise ValueError(f"GHM bins must be an integer >= 1, got {bins!r}")
    if momentum is not None and not (num(momentum) and 0 <= momentum < 1):
        raise ValueError(f"GHM momentum must be a finite number in [0, 1), got {momentum!r}")
    if mu is not None and not (num(mu) and mu > 0):
        raise ValueError(f"GHM-R mu must be a finite number > 0, got {mu!r}")
    if loss_weight is not None and not (num(loss_weight) and loss_weight >= 0):
        raise ValueError(f"GHM loss weight must be a finite number >= 0, got {loss_weight!r}")


def ghm_bin_index(g: Tensor, edges: Tensor) -> Tensor:
    """The bin of each element of ``g`` by mmdetection's rule: ``i`` where
    ``edges[i] <= g < edges[i + 1]`` (``edges`` increasing, ``bins + 1`` values), ``-1``
    below the first edge, ``bins`` at or above the last. One vectorised pass
    (``torch.bucketize`` with ``right=True``), no host synchronisation. ``edges`` is used
    in ``g``'s dtype (float32 edges are exact in float64, as in mmdetection's comparisons
    of float64 values with a float32 edge tensor)."""
    return torch.bucketize(g, edges.to(g.dtype), right=True) - 1


def _world_size() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


class _GHMBase(torch.nn.Module):
    """The gradient-density weighting shared by GHM-C and GHM-R (mmdetection's rule).

    Elements are binned by their gradient norm ``g`` on the edges ``i / bins``
    (i = 0..bins; the last edge replaced by ``last_edge``): element in bin i iff
    ``edges[i] <= g < edges[i + 1]``, only valid elements counted. With ``tot`` the
    number of valid elements (at least 1), ``c_i`` the count of bin i and ``n`` the number
    of non-empty bins, an element of a non-empty bin i weighs ``tot / acc_i / n`` with
    ``acc_i = m acc_i + (1 - m) c_i`` (the buffer ``acc_sum``, updated for non-empty bins
    only) when momentum m > 0, ``tot / c_i / n`` when m = 0; other elements weigh 0.

    Unlike mmdetection's loop (one ``.item()`` per bin), the bins are counted in one
    vectorised pass (``torch.bucketize`` on the same float32 edge tensor, ``right=True``,
    which is exactly the ``>= / <`` rule) and the weights are formed on the device: no host
    synchronisation. With ``all_reduce`` (and an initialised process group of > 1
    processes) the bin counts and ``tot`` are summed over all processes before the update,
    so every process holds the same ``acc_sum`` and the weights do not depend on the number
    of processes; each process's loss is then its share of the global sum divided by the
    mean ``tot`` per process (DDP's gradient average gives the one-process loss).
    """

    def __init__(self, bins: int, momentum: float, last_edge: float, all_reduce: bool):
        super().__init__()
        check_ghm_params(bins=bins, momentum=momentum)
        self.bins = int(bins)
        self.momentum = float(momentum)
        self.all_reduce = bool(all_reduce)
        edges = torch.arange(self.bins + 1).float() / self.bins
        if last_edge > 1:
            edges[-1] = last_edge
        else:
            edges[-1] += 1e-6
        # derived from bins: not part of the state (not saved)
        self.register_buffer("edges", edges, persistent=False)
        # the moving average of the bin counts: saved in checkpoints, restored on resume
        self.register_buffer("acc_sum", torch.zeros(self.bins))

    def extra_repr(self) -> str:
        return f"bins={self.bins}, momentum={self.momentum}, all_reduce={self.all_reduce}"

    @torch.no_grad()
    def _weights(self, g: Tensor, valid: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(per-element weights of g's shape, normaliser of the summed weighted loss), both
        without gradient, in g's dtype. Updates ``acc_sum`` when momentum > 0."""
        bins = self.bins
        idx = ghm_bin_index(g, self.edges)
        inside = (idx >= 0) & (idx < bins)  # g < 0 or g >= the last edge: in no bin
        if valid is not None:
            inside &= valid
        where = torch.where(inside, idx, bins).reshape(-1)  # bin `bins`: not counted
        counts = torch.zeros(bins + 2, dtype=torch.float64, device=g.device)
        counts.index_add_(0, where, torch.ones_like(where, dtype=torch.float64))
        # tot: the number of valid elements (mmdetection counts valid ones, also those in no bin)
        num_valid = g.numel() if valid is None else valid.sum()
        counts[bins + 1] = num_valid
        world = _world_size() if self.all_reduce else 1
        if world > 1:
            torch.distributed.all_reduce(counts)
        c = counts[:bins].float()
        tot = counts[bins + 1].float().clamp_min(1.0)
        nonempty = c > 0
        n = nonempty.sum().clamp_min(1)
        if self.momentum > 0:
            m = self.momentum
            acc = torch.where(
                nonempty, m * self.acc_sum.float() + (1 - m) * c, self.acc_sum.float()
            )
            self.acc_sum.copy_(acc)
            denom = acc
        else:
            denom = c
        per_bin = torch.where(nonempty, tot / denom.clamp_min(1e-12), torch.zeros_like(c)) / n
        per_bin = torch.cat([per_bin, per_bin.new_zeros(1)]).to(g.dtype)
        weights = per_bin[torch.where(inside, idx, bins)]
        # each process's share: global sum / (global tot / world) = mean tot per process
        return weights, (tot / world).to(g.dtype)

    @staticmethod
    def _inputs(pred: Tensor, target: Tensor, valid: Optional[Tensor]):
        if target.shape != pred.shape:
            raise ValueError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same "
                "shape"
            )
        if valid is not None:
            if valid.dtype != torch.bool or valid.shape != pred.shape:
                raise ValueError(
                    f"valid must be a boolean mask of pred's shape {tuple(pred.shape)}, got "
                    f"{valid.dtype} {tuple(valid.shape)}"
                )
        x = _to_float(pred)
        return x, target.to(x.dtype)


class GHMC(_GHMBase):
    """GHM-C loss (mmdetection's ``GHMC`` with ``use_sigmoid=True``): sigmoid binary cross
    entropy per element, weighted by the inverse gradient density.

    Args:
        bins: number of gradient-norm bins (>= 1) on [0, 1]; the last edge is 1 + 1e-6.
        momentum: m in [0, 1) of the moving average of the bin counts (0 = this call's
            counts only).
        all_reduce: under DDP, sum the bin counts over all processes (see ``_GHMBase``);
            default False: per process, as mmdetection.

    ``forward(pred, target, valid=None)``: ``pred`` logits and ``target`` in [0, 1] of the
    same shape (e.g. (anchors, classes) with one-hot targets), ``valid`` a boolean mask of
    pred's shape (False = ignored; None = every element valid). Returns the scalar
    ``sum(w * BCE(pred, target)) / tot`` (``tot`` = number of valid elements, at least 1),
    float32 (float64 for float64 input) whatever pred's dtype or the autocast state;
    the loss weight is not applied. ``g = |sigmoid(pred) - target|`` and the weights ``w``
    carry no gradient. No valid element: 0 with a gradient path. Updates ``acc_sum``.
    """

    def __init__(self, bins: int = 30, momentum: float = 0.75, all_reduce: bool = False):
        super().__init__(bins, momentum, 1.0, all_reduce)

    def forward(self, pred: Tensor, target: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            x, t = self._inputs(pred, target, valid)
            g = (torch.sigmoid(x.detach()) - t).abs_()
            w, tot = self._weights(g, valid)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                x, t, weight=w, reduction="sum"
            )
            return loss / tot


class GHMR(_GHMBase):
    """GHM-R loss (mmdetection's ``GHMR``): the authentic smooth L1 (ASL1)
    ``sqrt(d^2 + mu^2) - mu`` of ``d = pred - target``, weighted by the inverse density of
    its gradient norm ``g = |d| / sqrt(d^2 + mu^2)`` in [0, 1).

    Args:
        mu: the ASL1 smoothing (> 0), mmdetection's 0.02.
        bins: number of gradient-norm bins (>= 1); the last edge is 1e3.
        momentum: m in [0, 1) of the moving average of the bin counts.
        all_reduce: as ``GHMC``.

    ``forward(pred, target, valid=None)``: regression outputs and targets of the same
    shape (e.g. (positives, 4) box deltas), ``valid`` a boolean mask of pred's shape
    (None = every element valid). Returns the scalar ``sum(w * ASL1) / tot`` (``tot`` =
    number of valid coordinates, at least 1; not the number of positive anchors), float32
    (float64 for float64 input); the loss weight is not applied; weights carry no gradient.
    No valid element: 0 with a gradient path. Updates ``acc_sum``.
    """

    def __init__(
        self, mu: float = 0.02, bins: int = 10, momentum: float = 0.7, all_reduce: bool = False
    ):
        check_ghm_params(mu=mu)
        super().__init__(bins, momentum, 1e3, all_reduce)
        self.mu = float(mu)

    def extra_repr(self) -> str:
        return f"mu={self.mu}, " + super().extra_repr()

    def forward(self, pred: Tensor, target: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            x, t = self._inputs(pred, target, valid)
            mu = self.mu
            d = x - t
            root = torch.sqrt(d * d + mu * mu)
            g = (d.detach() / root.detach()).abs_()
            w, tot = self._weights(g, valid)
            return ((root - mu) * w).sum() / tot
