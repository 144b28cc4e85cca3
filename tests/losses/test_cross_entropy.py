"""EAPM cross entropies (eapm.losses.cross_entropy): values and gradients against the
paper's definition written out in mpmath (50 digits), mu = 0 bitwise the torch functions,
extreme logits, low-precision inputs, empty inputs, ignored rows, the gradient semantics
(the closed form MF (p - y), NOT the derivative of the value) and the errors."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
import torch.nn.functional as F

from eapm.losses import (
    eapm_binary_cross_entropy_with_logits,
    eapm_ce_stats,
    eapm_cross_entropy,
    eapm_sigmoid_focal_loss,
)

mp.mp.dps = 50
MUS = (0.0, 0.5, 1.0, 1.5, 2.0, 10.0)


# ------------------------------------------------------------------ references (mpmath)
def ref_ce_row(x, y, mu):
    """(value, gradient list, Dif, MF) of EAPM cross entropy for one row, per the
    definition: p = softmax(x), Dif = 1 - p_y, MF = 1 + tanh(mu) - tanh(mu Dif),
    p' = Y + MF (p - Y); value -log p'_y, gradient p' - Y. 130 digits: 1 - p_y of a
    certain-wrong row (p_y ~ e^-200) is formed by subtraction."""
    with mp.workdps(130):
        return _ref_ce_row(x, y, mu)


def _ref_ce_row(x, y, mu):
    x = [mp.mpf(float(v)) for v in x]
    m = max(x)
    z = sum(mp.e ** (v - m) for v in x)
    p = [mp.e ** (v - m) / z for v in x]
    dif = 1 - p[y]
    mf = 1 + mp.tanh(mu) - mp.tanh(mu * dif)
    onehot = [mp.mpf(1) if k == y else mp.mpf(0) for k in range(len(x))]
    pm = [o + mf * (pk - o) for o, pk in zip(onehot, p)]
    value = -mp.log(1 - mf * dif)
    return value, [a - o for a, o in zip(pm, onehot)], dif, mf


def ref_ce(x, labels, mu, ignore_index=-100):
    """float64 tensors (values (N,), grads (N, C), dif, mf) from ref_ce_row; ignored rows 0."""
    vals, grads, difs, mfs = [], [], [], []
    for row, y in zip(x.tolist(), labels.tolist()):
        if y == ignore_index:
            vals.append(0.0)
            grads.append([0.0] * len(row))
            continue
        v, g, d, m = ref_ce_row(row, y, mu)
        vals.append(float(v))
        grads.append([float(a) for a in g])
        difs.append(float(d))
        mfs.append(float(m))
    f64 = torch.float64
    return (
        torch.tensor(vals, dtype=f64),
        torch.tensor(grads, dtype=f64),
        torch.tensor(difs, dtype=f64),
        torch.tensor(mfs, dtype=f64),
    )


def ref_bce(x, t, mu):
    """(values, grads) of EAPM BCE elementwise: e = |p - t|, value -log(1 - MF e), grad
    MF (p - t)."""
    vals, grads = [], []
    for xv, tv in zip(x.reshape(-1).tolist(), t.reshape(-1).tolist()):
        with mp.workdps(130):  # 1 - MF e of a certain-wrong logit (e ~ 1 - e^-100)
            xv = mp.mpf(xv)
            p = 1 / (1 + mp.e ** (-xv))
            e = abs(p - tv)
            mf = 1 + mp.tanh(mu) - mp.tanh(mu * e)
            vals.append(float(-mp.log(1 - mf * e)))
            grads.append(float(mf * (p - tv)))
    f64 = torch.float64
    return (
        torch.tensor(vals, dtype=f64).reshape(x.shape),
        torch.tensor(grads, dtype=f64).reshape(x.shape),
    )


def _logits(n=40, c=6, scale=4.0, seed=0, extreme=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (n,), generator=g)
    if extreme:  # +-100 logits: certain right, certain wrong, and a near tie at 100
        x[0] = torch.tensor([100.0, -100.0] + [0.0] * (c - 2))
        x[1] = torch.tensor([-100.0, 100.0] + [0.0] * (c - 2))
        x[2] = torch.tensor([100.0, 100.0] + [-100.0] * (c - 2))
        x[3] = torch.tensor([-100.0] * (c - 1) + [100.0])
        y[:4] = torch.tensor([0, 0, 1, c - 1])
    return x, y


def _grad(fn, x):
    xr = x.detach().clone().requires_grad_()
    out = fn(xr)
    (g,) = torch.autograd.grad(out.sum(), xr)
    return out.detach(), g


def _assert_rel(got, want, rtol, atol=0.0):
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ softmax cross entropy
@pytest.mark.parametrize("mu", MUS)
def test_ce_float64_matches_the_definition(mu):
    x, y = _logits()
    rv, rg, _, _ = ref_ce(x, y, mu)
    for reduction in ("none", "sum", "mean"):
        v, g = _grad(lambda z: eapm_cross_entropy(z, y, mu, reduction), x)
        assert v.dtype == g.dtype == torch.float64
        if reduction == "none":
            want_v, want_g = rv, rg
        elif reduction == "sum":
            want_v, want_g = rv.sum(), rg
        else:
            want_v, want_g = rv.mean(), rg / len(y)
        # relative to each element (tiny values of certain rows included), float64 rounding;
        # mu = 0 is F.cross_entropy, which rounds log(1 + e^-200) of a certain row to 0
        atol = 1e-300 if mu > 0 else 1e-15
        _assert_rel(v, want_v, rtol=1e-12, atol=atol)
        _assert_rel(g, want_g, rtol=1e-12, atol=atol)


@pytest.mark.parametrize("mu", (0.0, 1.5, 10.0))
def test_ce_extreme_logits_finite_and_exact(mu):
    """+-100 logits: finite values and gradients. float32: exact to the rounding of
    log_softmax (relative error ~ eps * |logit| <= 1.2e-5, also for the tiny values of
    certain-right rows, down to float32's underflow); float64: to 1e-12 relative. mu = 0 is
    F.cross_entropy, whose certain-right values are exact only in absolute terms."""
    x, y = _logits(scale=8.0)
    rv, rg, _, _ = ref_ce(x.float().double(), y, mu)
    v, g = _grad(lambda z: eapm_cross_entropy(z, y, mu, "none"), x.float())
    assert v.dtype == g.dtype == torch.float32
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    assert 199 < float(v[1]) < 201  # certain wrong: ~200 (+ the modulation's log term)
    _assert_rel(v, rv, rtol=5e-5, atol=1e-5 if mu == 0 else 1e-44)
    _assert_rel(g, rg, rtol=5e-5, atol=1e-7 if mu == 0 else 1e-44)
    v64, g64 = _grad(lambda z: eapm_cross_entropy(z, y, mu, "none"), x)
    rv64, rg64, _, _ = ref_ce(x, y, mu)
    atol = 1e-300 if mu > 0 else 1e-15
    _assert_rel(v64, rv64, rtol=1e-12, atol=atol)
    _assert_rel(g64, rg64, rtol=1e-12, atol=atol)
    if mu > 0:  # the certain-right row's value e^-100-ish is resolved (F's is 0)
        assert float(v64[0]) > 1e-43 and float(eapm_cross_entropy(x[:1], y[:1], 0.0)) == 0


@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_ce_mu_zero_is_torch_cross_entropy_bitwise(reduction, dtype):
    x, y = _logits(extreme=True)
    y[5] = -100
    x = x.to(dtype)
    v, g = _grad(lambda z: eapm_cross_entropy(z, y, 0.0, reduction), x)
    rv, rg = _grad(lambda z: F.cross_entropy(z, y, reduction=reduction), x)
    assert v.dtype == rv.dtype and g.dtype == rg.dtype
    assert torch.equal(v, rv) and torch.equal(g, rg)


@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_ce_mu_zero_float16_on_cpu_is_the_float32_cross_entropy(reduction):
    """torch's CPU cross entropy has no float16 kernel ("nll_loss_out_frame" not implemented
    for 'Half'); mu 0 then gives the float32 cross entropy of the float16 logits, in float16,
    with a float16 gradient, as mu > 0 does."""
    x, y = _logits(extreme=True)
    y[5] = -100
    xh = x.half()
    v, g = _grad(lambda z: eapm_cross_entropy(z, y, 0.0, reduction), xh)
    rv, rg = _grad(lambda z: F.cross_entropy(z, y, reduction=reduction), xh.float())
    assert v.dtype == g.dtype == torch.float16
    assert torch.equal(v, rv.half()) and torch.equal(g, rg.half())
    assert bool(torch.isfinite(v).all()) and bool(torch.isfinite(g).all())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 under autocast, as mu > 0
        assert eapm_cross_entropy(xh, y, 0.0, reduction).dtype == torch.float32


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_ce_low_precision_computed_in_float32_returned_in_input_dtype(dtype):
    x, y = _logits(extreme=False)
    xl = x.to(dtype)
    rv, rg, _, _ = ref_ce(xl.double(), y, 1.5)  # the reference at the rounded logits
    v, g = _grad(lambda z: eapm_cross_entropy(z, y, 1.5, "none"), xl)
    assert v.dtype == g.dtype == dtype  # as F.cross_entropy outside autocast
    eps = torch.finfo(dtype).eps
    _assert_rel(v, rv, rtol=eps, atol=eps)  # one rounding to the dtype
    _assert_rel(g, rg, rtol=eps, atol=eps * 1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 under autocast, as F's
        v = eapm_cross_entropy(xl, y, 1.5)
        assert v.dtype == torch.float32 == F.cross_entropy(x.bfloat16(), y).dtype
        assert eapm_cross_entropy(x.float(), y, 1.5).dtype == torch.float32
        assert eapm_cross_entropy(x, y, 1.5).dtype == torch.float64
    _assert_rel(v, rv.mean(), rtol=1e-6)


@pytest.mark.parametrize("mu", (0.0, 1.5))
def test_ce_empty_input(mu):
    """detectron2's convention: mean over zero rows is 0 with a gradient path (not NaN)."""
    x = torch.zeros(0, 5, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    v = eapm_cross_entropy(x, y, mu)
    assert v.shape == () and float(v) == 0.0 and v.requires_grad
    (g,) = torch.autograd.grad(v, x)
    assert g.shape == (0, 5)
    assert float(eapm_cross_entropy(x, y, mu, "sum")) == 0.0
    assert eapm_cross_entropy(x, y, mu, "none").shape == (0,)
    assert math.isnan(F.cross_entropy(x, y))  # (what the convention avoids)
    dif, mf = eapm_ce_stats(x, y, mu)
    assert dif.shape == mf.shape == (0,)


@pytest.mark.parametrize("ignore_index", (-100, 255))
def test_ce_ignored_rows(ignore_index):
    """Rows labelled ignore_index: no value, no gradient, not counted in the mean (as
    F.cross_entropy); the other rows are those of the reference."""
    x, y = _logits()
    y[[4, 7, 9]] = ignore_index
    keep = y != ignore_index
    rv, rg, rd, rm = ref_ce(x, y, 1.5, ignore_index)
    v, g = _grad(lambda z: eapm_cross_entropy(z, y, 1.5, "none", ignore_index=ignore_index), x)
    _assert_rel(v, rv, rtol=1e-12, atol=1e-300)
    _assert_rel(g, rg, rtol=1e-12, atol=1e-300)
    assert (v[~keep] == 0).all() and (g[~keep] == 0).all()
    v, g = _grad(lambda z: eapm_cross_entropy(z, y, 1.5, ignore_index=ignore_index), x)
    _assert_rel(v, rv.sum() / keep.sum(), rtol=1e-12)
    _assert_rel(g, rg / keep.sum(), rtol=1e-12, atol=1e-300)
    dif, mf = eapm_ce_stats(x, y, 1.5, ignore_index=ignore_index)
    _assert_rel(dif, rd, rtol=1e-12, atol=1e-300)
    _assert_rel(mf, rm, rtol=1e-14)
    if ignore_index == -100:  # mu = 0: F.cross_entropy's own ignore handling
        a = eapm_cross_entropy(x, y, 0.0)
        assert torch.equal(a, F.cross_entropy(x, y))


def test_ce_gradient_is_the_closed_form_not_the_derivative_of_the_value():
    """Finite differences of the value give d/dx[-log(1 - MF(x) Dif(x))] (MF
    differentiated); the loss's gradient is MF (p - y), the cross entropy's gradient at the
    modulated logits (a finite difference of F.cross_entropy there)."""
    x = torch.tensor([[0.3, -0.4, 1.1, 0.0], [2.0, 0.5, -1.0, 0.2]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    mu, h = 1.5, 1e-6
    _, g = _grad(lambda z: eapm_cross_entropy(z, y, mu, "sum"), x)
    p = torch.softmax(x, 1)
    onehot = F.one_hot(y, 4).double()
    dif = 1 - p[torch.arange(2), y]
    mf = 1 + math.tanh(mu) - torch.tanh(mu * dif)
    torch.testing.assert_close(g, mf[:, None] * (p - onehot), rtol=1e-13, atol=0)

    def fd(fn, z):
        out = torch.zeros_like(z)
        for idx in torch.cartesian_prod(torch.arange(z.shape[0]), torch.arange(z.shape[1])):
            i, k = idx.tolist()
            zp, zm = z.clone(), z.clone()
            zp[i, k] += h
            zm[i, k] -= h
            out[i, k] = (fn(zp) - fn(zm)) / (2 * h)
        return out

    value_fd = fd(lambda z: float(eapm_cross_entropy(z, y, mu, "sum")), x)
    assert (value_fd - g).abs().max() > 1e-2  # not the derivative of the value
    x_mod = torch.log(onehot + mf[:, None] * (p - onehot))  # log p': softmax(x_mod) = p'
    base_fd = fd(lambda z: float(F.cross_entropy(z, y, reduction="sum")), x_mod)
    torch.testing.assert_close(g, base_fd, rtol=0, atol=1e-8)


def test_ce_modulated_distribution_stays_a_distribution():
    x, y = _logits(n=400, scale=6.0)
    for mu in MUS[1:] + (100.0,):
        dif, mf = eapm_ce_stats(x, y, mu)
        assert (mf >= 1).all() and (mf <= 1 + math.tanh(mu) + 1e-15).all()
        assert (mf * dif <= 1).all()  # p'_y = 1 - MF Dif >= 0
        assert dif.dtype == torch.float64 and not dif.requires_grad
    dif, mf = eapm_ce_stats(x.float(), y, 0.0)
    assert dif.dtype == torch.float32 and (mf == 1).all()
    torch.testing.assert_close(dif.double(), 1 - torch.softmax(x, 1)[torch.arange(400), y])


def test_ce_errors():
    x, y = _logits(n=5, extreme=False)
    with pytest.raises(ValueError, match="label 6 of row 2"):
        eapm_cross_entropy(x, torch.tensor([0, 1, 6, 2, 3]), 1.0)
    with pytest.raises(ValueError, match="label -1 of row 0"):
        eapm_cross_entropy(x, torch.tensor([-1, 1, 0, 2, 3]), 0.0)
    with pytest.raises(ValueError, match="integer class indices"):
        eapm_cross_entropy(x, y.double(), 1.0)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        eapm_cross_entropy(x[0], y, 1.0)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        eapm_cross_entropy(x, y[:3], 1.0)
    with pytest.raises(ValueError, match="mu"):
        eapm_cross_entropy(x, y, -1.0)
    with pytest.raises(ValueError, match="mu"):
        eapm_cross_entropy(x, y, float("nan"))
    with pytest.raises(ValueError, match="reduction"):
        eapm_cross_entropy(x, y, 1.0, "avg")


# ------------------------------------------------------------------ binary cross entropy
def _binary(n=300, scale=5.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    t = (torch.rand(n, generator=g) < 0.4).double()
    x[:4] = torch.tensor([100.0, -100.0, 100.0, -100.0], dtype=torch.float64)
    t[:4] = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    return x, t


@pytest.mark.parametrize("mu", MUS)
def test_bce_matches_the_definition(mu):
    x, t = _binary()
    rv, rg = ref_bce(x, t, mu)
    for reduction in ("none", "sum", "mean"):
        v, g = _grad(lambda z: eapm_binary_cross_entropy_with_logits(z, t, mu, reduction), x)
        n = 1 if reduction != "mean" else x.numel()
        want = rv if reduction == "none" else rv.sum() / n
        # mu = 0 is F.binary_cross_entropy_with_logits: exact in absolute terms only
        atol = 1e-300 if mu > 0 else 1e-15
        _assert_rel(v, want, rtol=1e-12, atol=atol)
        _assert_rel(g, rg / n, rtol=1e-12, atol=atol)
    # float32, +-100 logits: finite and exact to rounding (the fused focal kernel)
    v, g = _grad(
        lambda z: eapm_binary_cross_entropy_with_logits(z, t.float(), mu, "none"), x.float()
    )
    assert v.dtype == g.dtype == torch.float32
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    rv32, rg32 = ref_bce(x.float().double(), t, mu)
    # (certain-right values ~ e^-100 are float32 subnormals: a few significant bits)
    _assert_rel(v, rv32, rtol=1e-5, atol=2e-6 if mu == 0 else 1e-43)  # F: eps * |x| absolute
    _assert_rel(g, rg32, rtol=1e-5, atol=1e-7 if mu == 0 else 1e-43)


@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16, torch.bfloat16))
def test_bce_mu_zero_is_torch_bitwise(reduction, dtype):
    x, t = _binary()
    x, t = x.to(dtype), t.to(dtype)
    v, g = _grad(lambda z: eapm_binary_cross_entropy_with_logits(z, t, 0.0, reduction), x)
    rv, rg = _grad(lambda z: F.binary_cross_entropy_with_logits(z, t, reduction=reduction), x)
    assert v.dtype == rv.dtype and g.dtype == rg.dtype
    assert torch.equal(v, rv) and torch.equal(g, rg)


def test_bce_is_focal_with_gamma_zero_no_alpha_and_keeps_the_dtype():
    x, t = _binary()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xl, tl = x.to(dtype), t.to(dtype)
        v, g = _grad(lambda z: eapm_binary_cross_entropy_with_logits(z, tl, 1.5, "sum"), xl)
        fv, fg = _grad(
            lambda z: eapm_sigmoid_focal_loss(z, tl, 1.5, -1.0, 0.0, reduction="sum"), xl
        )
        assert v.dtype == g.dtype == dtype  # as F.binary_cross_entropy_with_logits
        assert torch.equal(v, fv.to(dtype)) and torch.equal(g, fg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert eapm_binary_cross_entropy_with_logits(x.bfloat16(), t.bfloat16(), 1.5).dtype == (
            torch.float32
        )


def test_bce_gradient_is_the_closed_form():
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    mu, h = 1.5, 1e-6
    _, g = _grad(lambda z: eapm_binary_cross_entropy_with_logits(z, t, mu), x)
    p = torch.sigmoid(x)
    mf = 1 + math.tanh(mu) - torch.tanh(mu * (p - t).abs())
    torch.testing.assert_close(g, mf * (p - t), rtol=1e-13, atol=0)
    value_fd = torch.tensor(
        [
            float(
                eapm_binary_cross_entropy_with_logits(x + h * e, t, mu)
                - eapm_binary_cross_entropy_with_logits(x - h * e, t, mu)
            )
            / (2 * h)
            for e in torch.eye(3, dtype=torch.float64)
        ]
    )
    assert (value_fd - g).abs().max() > 1e-2


def test_bce_empty_and_errors():
    x = torch.zeros(0, requires_grad=True)
    for mu in (0.0, 1.5):
        v = eapm_binary_cross_entropy_with_logits(x, x.detach(), mu, "mean")
        assert float(v) == 0.0 and v.requires_grad
        assert float(eapm_binary_cross_entropy_with_logits(x, x.detach(), mu)) == 0.0
    with pytest.raises(ValueError, match="targets in"):
        eapm_binary_cross_entropy_with_logits(torch.zeros(3), torch.tensor([0.0, 0.5, 1.0]), 1.0)
    # mu = 0 is F.binary_cross_entropy_with_logits, soft targets included
    soft = eapm_binary_cross_entropy_with_logits(torch.zeros(3), torch.tensor([0.0, 0.5, 1.0]), 0)
    assert torch.equal(
        soft,
        F.binary_cross_entropy_with_logits(
            torch.zeros(3), torch.tensor([0.0, 0.5, 1.0]), reduction="sum"
        ),
    )
    with pytest.raises(ValueError, match="same shape"):
        eapm_binary_cross_entropy_with_logits(torch.zeros(3), torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="mu"):
        eapm_binary_cross_entropy_with_logits(torch.zeros(3), torch.zeros(3), -0.5)
