"""The EAPM losses against closed-form values and gradients.

References are computed independently with mpmath at 50 digits from the paper's
definitions (p' = p* + MF (p - p*), x' = logit(p'), FL / balanced L1 at the modulated
point, and the *base* loss's derivative at the modulated point by numerical
differentiation), not from the implementation's own algebra.
"""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
from fvcore.nn import sigmoid_focal_loss as fvcore_focal

from eapm.losses import (
    balanced_l1_loss,
    difficulty,
    eapm_balanced_l1_loss,
    eapm_focal_terms,
    eapm_sigmoid_focal_loss,
    gap_over_sum,
    modulating_factor,
    sigmoid_focal_loss,
)

mp.mp.dps = 50


# ------------------------------------------------------------------ references
def ref_focal_of_logit(x, t, alpha, gamma):
    """Focal loss as a function of the logit (mpmath)."""
    p = 1 / (1 + mp.e ** (-x))
    if t == 1:
        fl = -((1 - p) ** gamma) * mp.log(p)
        a = alpha
    else:
        fl = -(p**gamma) * mp.log(1 - p)
        a = 1 - alpha
    return (a if alpha >= 0 else 1) * fl


def ref_eapm_focal(x, t, mu, alpha=0.25, gamma=2.0):
    """(value, gradient) of EAPM focal loss per the paper, in mpmath."""
    x = mp.mpf(x)
    p = 1 / (1 + mp.e ** (-x))
    dif = abs(p - t)
    mf = 1 + mp.tanh(mu) - mp.tanh(mu * dif)
    pm = t + mf * (p - t)
    xm = mp.log(pm) - mp.log(1 - pm)
    f = lambda z: ref_focal_of_logit(z, t, alpha, gamma)  # noqa: E731
    return f(xm), mp.diff(f, xm)


def ref_balanced_l1(d, alpha=0.5, gamma=1.5, beta=1.0):
    """mmdetection's balanced L1 on |d| (mpmath)."""
    b = mp.e ** (mp.mpf(gamma) / alpha) - 1
    d = abs(mp.mpf(d))
    if d < beta:
        return alpha / b * (b * d + 1) * mp.log(b * d / beta + 1) - alpha * d
    return gamma * d + gamma / b - alpha * beta


def ref_eapm_bl1(t, g, theta, modulate, **kw):
    """(value, gradient) of one delta component of EAPM balanced L1 (mpmath)."""
    t, g = mp.mpf(t), mp.mpf(g)
    if modulate and theta > 0:
        s = abs(t) + abs(g)
        gos = abs(t - g) / s if s > 0 else mp.mpf(0)
        mf = 1 + mp.tanh(theta) - mp.tanh(theta * gos)
    else:
        mf = mp.mpf(1)
    tm = g + mf * (t - g)
    f = lambda z: ref_balanced_l1(z - g, **kw)  # noqa: E731
    return f(tm), mp.diff(f, tm)


def _rel(a, b):
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


# ------------------------------------------------------------------ focal
@pytest.mark.parametrize("mu", [0.0, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("t", [0, 1])
def test_eapm_focal_matches_closed_form_float64(mu, t):
    xs = [-60.0, -30.0, -12.0, -5.0, -2.0, -0.7, 0.0, 0.3, 1.0, 2.5, 6.0, 15.0, 35.0, 60.0]
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    tt = torch.full_like(x, float(t))
    loss = eapm_sigmoid_focal_loss(x, tt, mu)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    for i, xi in enumerate(xs):
        v, g = ref_eapm_focal(xi, t, mu)
        if float(v) > 1e-290:
            assert _rel(loss[i], v) < 1e-6, (xi, float(loss[i]), float(v))
        if abs(float(g)) > 1e-290:
            assert _rel(grad[i], g) < 1e-6, (xi, float(grad[i]), float(g))


def test_gradient_semantics_no_chain_rule_factor():
    """The gradient is the base loss's gradient at x' -- not d/dx of FL(x'(x)),
    which would carry MF and sigma'(x)/sigma'(x') factors."""
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    mu = 1.5
    loss = eapm_sigmoid_focal_loss(x, t, mu, alpha=-1)
    (g,) = torch.autograd.grad(loss.sum(), x)
    # the modulated logit, then fvcore's focal gradient there
    p = torch.sigmoid(x.detach())
    mf = 1 + math.tanh(mu) - torch.tanh(mu * (p - t).abs())
    pm = t + mf * (p - t)
    xm = torch.log(pm / (1 - pm)).requires_grad_()
    base = fvcore_focal(xm, t, alpha=-1, gamma=2.0)
    (gb,) = torch.autograd.grad(base.sum(), xm)
    # (fvcore computes in float32)
    torch.testing.assert_close(loss.detach(), base.detach().double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(g, gb.double(), rtol=1e-5, atol=0)
    # differentiating through the modulation gives something else
    xc = x.detach().clone().requires_grad_()
    pc = torch.sigmoid(xc)
    mfc = 1 + math.tanh(mu) - torch.tanh(mu * (pc - t).abs())
    pmc = t + mfc * (pc - t)
    chained = fvcore_focal(torch.log(pmc / (1 - pmc)), t, alpha=-1, gamma=2.0)
    (gc,) = torch.autograd.grad(chained.sum(), xc)
    assert not torch.allclose(gc, g, rtol=1e-3)


def test_mu_zero_equals_fvcore_focal_float32():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(500, 7, generator=g) * 5).requires_grad_()
    t = (torch.rand(500, 7, generator=g) < 0.1).float()
    for alpha in (0.25, -1.0):
        ours = eapm_sigmoid_focal_loss(x, t, 0.0, alpha=alpha, gamma=2.0)
        ref = fvcore_focal(x, t, alpha=alpha, gamma=2.0)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
        (go,) = torch.autograd.grad(ours.sum(), x)
        (gr,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(go, gr, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        sigmoid_focal_loss(x, t), fvcore_focal(x, t, alpha=0.25), rtol=1e-5, atol=1e-7
    )


def test_focal_reductions_and_gamma_zero():
    x = torch.tensor([[-2.0, 1.0], [0.5, 3.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    none = eapm_sigmoid_focal_loss(x, t, 1.0)
    assert none.shape == x.shape
    torch.testing.assert_close(eapm_sigmoid_focal_loss(x, t, 1.0, reduction="sum"), none.sum())
    torch.testing.assert_close(eapm_sigmoid_focal_loss(x, t, 1.0, reduction="mean"), none.mean())
    # gamma = 0, alpha disabled, mu = 0 is BCE with logits
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    torch.testing.assert_close(eapm_sigmoid_focal_loss(x, t, 0.0, alpha=-1, gamma=0.0), bce)
    with pytest.raises(ValueError, match="reduction"):
        eapm_sigmoid_focal_loss(x, t, 1.0, reduction="avg")


@pytest.mark.parametrize("mu", [0.0, 1.5, 2.0, 10.0])
def test_focal_extreme_logits_float32_finite(mu):
    x = torch.linspace(-100, 100, 2001).requires_grad_()
    for tval in (0.0, 1.0):
        t = torch.full_like(x, tval)
        loss = eapm_sigmoid_focal_loss(x, t, mu)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        assert (loss >= 0).all()
        # very hard examples, not clamped: as Dif -> 1, 1 - e' -> (1 - e)(1 - mu sech^2 mu),
        # so the loss is a_t (|x| - log(1 - mu sech^2 mu)) and keeps growing with |x|
        hard = x.detach() * (1 - 2 * tval)
        a_t = 0.25 if tval == 1 else 0.75
        sel = hard > 40
        want = a_t * (hard[sel] - math.log1p(-mu / math.cosh(mu) ** 2))
        torch.testing.assert_close(loss.detach()[sel], want, rtol=1e-5, atol=0)


def test_hard_example_no_cancellation_float32():
    """Near Dif = 1, e' = MF e is ~1; float32 must still match the float64 value."""
    x64 = torch.tensor([8.0, 12.0, 16.0, 20.0, 30.0], dtype=torch.float64)
    t = torch.zeros_like(x64)
    ref = eapm_sigmoid_focal_loss(x64, t, 2.0)
    for v, xv in zip(ref, x64):
        assert _rel(v, ref_eapm_focal(float(xv), 0, 2.0)[0]) < 1e-9
    got = eapm_sigmoid_focal_loss(x64.float(), t.float(), 2.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    """fp16 / bf16 inputs: EAPM focal loss and EAPM balanced L1 compute in float32 (the same
    values as on the float32 copies of the inputs), return float32, with and without CPU bf16
    autocast, and give a finite gradient of the input's dtype."""
    g = torch.Generator().manual_seed(1)
    x32 = torch.randn(64, 5, generator=g) * 4
    t = (torch.rand(64, 5, generator=g) < 0.2).float()
    xh = x32.to(dtype).requires_grad_()
    loss = eapm_sigmoid_focal_loss(xh, t.to(dtype), 1.5)
    assert loss.dtype == torch.float32
    ref = eapm_sigmoid_focal_loss(xh.detach().float(), t, 1.5)
    torch.testing.assert_close(loss, ref)  # same float32 computation, no half rounding inside
    loss.sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad.float()).all()
    # under CPU autocast too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la = eapm_sigmoid_focal_loss(xh, t, 1.5, reduction="sum")
    assert la.dtype == torch.float32 and torch.isfinite(la)

    # both EAPM losses, summed, with and without autocast
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 4, generator=g) * 5).to(dtype).requires_grad_()
    t = (torch.rand(256, 4, generator=g) < 0.3).to(dtype)
    gt = torch.randn(256, 4, generator=g).to(dtype)
    for fn, args in ((eapm_sigmoid_focal_loss, (t, 1.5)), (eapm_balanced_l1_loss, (gt, 1.0))):
        for ctx in (
            torch.autocast("cpu", dtype=torch.bfloat16),
            torch.autocast("cpu", enabled=False),
        ):
            with ctx:
                loss = fn(x, *args, reduction="sum")
            ref = fn(
                x.detach().float().requires_grad_(),
                *(a.float() if torch.is_tensor(a) else a for a in args),
                reduction="sum",
            )
            assert loss.dtype == torch.float32
            torch.testing.assert_close(
                loss, ref.detach(), rtol=1e-6, atol=0
            )  # float32 math on the same values
            (gx,) = torch.autograd.grad(loss, x)
            assert gx.dtype == dtype and torch.isfinite(gx.float()).all() and gx.abs().sum() > 0


def test_empty_inputs_zero_with_grad_path():
    x = torch.zeros(0, 80, requires_grad=True)
    t = torch.zeros(0, 80)
    for red in ("sum", "mean"):
        loss = eapm_sigmoid_focal_loss(x, t, 1.5, reduction=red)
        assert float(loss) == 0.0
        loss.backward()
    d = torch.zeros(0, 4, requires_grad=True)
    for red in ("sum", "mean"):
        loss = eapm_balanced_l1_loss(d, torch.zeros(0, 4), 1.0, reduction=red)
        assert float(loss) == 0.0 and loss.requires_grad
        loss.backward()
    assert d.grad is not None and d.grad.shape == (0, 4)


def test_attributes_and_factor():
    x = torch.tensor([0.0, 2.0, -3.0])
    t = torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(difficulty(x, t), (torch.sigmoid(x) - t).abs())
    # MF at Dif = 0 is 1 + tanh(mu), at Dif = 1 it is exactly 1, and it decreases
    a = torch.linspace(0, 1, 11)
    mf = modulating_factor(a, 1.5)
    assert abs(float(mf[0]) - (1 + math.tanh(1.5))) < 1e-6 and abs(float(mf[-1]) - 1) < 1e-6
    assert (mf[1:] <= mf[:-1]).all()
    assert torch.equal(modulating_factor(a, 0.0), torch.ones_like(a))
    # the modulated probability stays in [0, 1] for every mu >= 0
    for mu in (0.5, 0.77, 1.5, 3.0, 20.0):
        assert ((a * modulating_factor(a, mu)) <= 1 + 1e-6).all()
    # Gap-over-Sum: range, 0/0, and scale invariance
    t1 = torch.tensor([0.5, -0.2, 0.0, 1.0])
    t2 = torch.tensor([0.1, 0.3, 0.0, 1.0])
    gos = gap_over_sum(t1, t2)
    torch.testing.assert_close(gos, torch.tensor([0.4 / 0.6, 0.5 / 0.5, 0.0, 0.0]))
    torch.testing.assert_close(gap_over_sum(5 * t1, 5 * t2), gos)
    with pytest.raises(ValueError, match="strength"):
        modulating_factor(a, -1.0)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_mu_theta_rejected(bad):
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="mu"):
        eapm_sigmoid_focal_loss(x, x, bad)
    with pytest.raises(ValueError, match="theta"):
        eapm_balanced_l1_loss(x, x, bad)
    with pytest.raises(ValueError, match="beta"):
        balanced_l1_loss(x, x, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        eapm_sigmoid_focal_loss(x, x[:2], 1.0)


# ------------------------------------------------------------------ balanced L1
@pytest.mark.parametrize(
    "beta,cases",
    [
        (1.0, {0.1: 0.0314, 0.5: 0.4006, 1.0: 1.0786, 2.0: 2.5786}),
        (0.11, {0.05: 0.0912, 0.11: 0.1886, 1.0: 1.5236}),
    ],
)
def test_balanced_l1_reference_values(beta, cases):
    """peers.md's mmdetection reference values (4 decimals) and the mpmath formula."""
    d = torch.tensor(list(cases), dtype=torch.float64)
    got = balanced_l1_loss(d, torch.zeros_like(d), beta=beta)
    for gv, (dv, want) in zip(got, cases.items()):
        assert abs(float(gv) - want) < 5e-5, (dv, float(gv), want)
        assert _rel(gv, ref_balanced_l1(dv, beta=beta)) < 1e-9
    # symmetric in the sign of the error
    torch.testing.assert_close(balanced_l1_loss(-d, torch.zeros_like(d), beta=beta), got)


def test_balanced_l1_gradient_and_beta_quirk():
    d = torch.tensor([-2.0, -0.5, 0.05, 0.3, 0.9, 1.5], dtype=torch.float64, requires_grad=True)
    for beta in (1.0, 0.11):
        loss = balanced_l1_loss(d, torch.zeros_like(d), beta=beta)
        (g,) = torch.autograd.grad(loss.sum(), d)
        for gi, di in zip(g, d.detach()):
            want = mp.diff(lambda z: ref_balanced_l1(z, beta=beta), mp.mpf(float(di)))
            assert _rel(gi, want) < 1e-7
    # mmdetection's quirk: with beta != 1 the slope at 0+ is alpha (1/beta - 1)
    tiny = torch.tensor([1e-9], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(
        balanced_l1_loss(tiny, torch.zeros(1, dtype=torch.float64), beta=0.11).sum(), tiny
    )
    assert abs(float(g) - 0.5 * (1 / 0.11 - 1)) < 1e-6


@pytest.mark.parametrize("theta", [0.0, 1.0, 1.5, 2.0])
def test_eapm_balanced_l1_closed_form(theta):
    pred = torch.tensor(
        [
            [0.1, -0.3, 0.7, -0.9],
            [1.5, 0.2, 0.05, 0.5],
            [0.0, 0.0, 0.0, 0.0],
            [-0.4, 2.0, -1.2, 0.8],
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    tgt = torch.tensor(
        [[0.0, 0.2, 0.5, -0.4], [1.0, 0.3, -0.1, 0.6], [0.0, 0.1, 0.0, 0.0], [0.3, 1.0, -0.3, 1.1]],
        dtype=torch.float64,
    )
    for beta in (1.0, 0.11):
        loss = eapm_balanced_l1_loss(pred, tgt, theta, beta=beta)
        (g,) = torch.autograd.grad(loss.sum(), pred)
        for i in range(4):
            for j in range(4):
                v, gr = ref_eapm_bl1(float(pred[i, j]), float(tgt[i, j]), theta, j >= 2, beta=beta)
                assert abs(float(loss[i, j]) - float(v)) <= 1e-9 * max(1.0, abs(float(v)))
                if float(pred[i, j]) != float(tgt[i, j]):
                    assert abs(float(g[i, j]) - float(gr)) <= 1e-7 * max(1.0, abs(float(gr)))
    if theta == 0:
        torch.testing.assert_close(
            eapm_balanced_l1_loss(pred, tgt, 0.0), balanced_l1_loss(pred, tgt), rtol=0, atol=0
        )


def test_eapm_balanced_l1_modulates_only_wh_and_raises_large_variation():
    # same error 0.2 on every component; dw/dh with a large |t|+|t*| get a larger gradient
    tgt = torch.tensor([[0.0, 0.0, 1.0, 0.1]])
    pred = (tgt + 0.2).requires_grad_()
    loss = eapm_balanced_l1_loss(pred, tgt, 1.0)
    base = balanced_l1_loss(pred, tgt)
    torch.testing.assert_close(loss[:, :2], base[:, :2])
    assert (loss[:, 2:] > base[:, 2:]).all()
    (g,) = torch.autograd.grad(loss.sum(), pred)
    assert g[0, 2] > g[0, 3] > g[0, 0]  # large variation (GoS small) up-weighted most
    with pytest.raises(ValueError, match="4"):
        eapm_balanced_l1_loss(torch.zeros(3, 5), torch.zeros(3, 5), 1.0)


def _bl1_value_and_slope(d, alpha=0.5, gamma=1.5, beta=1.0):
    """mmdetection's balanced L1 and its derivative at |error| ``d`` (float64 tensors):
    inlier alpha/b (b d + 1) ln(b d / beta + 1) - alpha d, slope alpha (ln(b d / beta + 1) +
    (b d + 1) / (b d + beta) - 1); outlier gamma d + gamma / b - alpha beta, slope gamma."""
    b = math.exp(gamma / alpha) - 1
    log_term = torch.log1p(b * d / beta)
    inlier = d < beta
    value = torch.where(
        inlier, alpha / b * (b * d + 1) * log_term - alpha * d, gamma * d + gamma / b - alpha * beta
    )
    slope = torch.where(inlier, alpha * (log_term + (b * d + 1) / (b * d + beta) - 1), gamma)
    return value, slope


def _eapm_bl1_float64(pred, tgt, theta, columns, beta):
    """(value, gradient) of EAPM balanced L1 in float64 with MF applied to ``columns`` only:
    t' = t* + MF (t - t*), MF = 1 + tanh(theta) - tanh(theta GoS), GoS = |t - t*| / (|t| +
    |t*|); the value is balanced L1 at t', the gradient its derivative at t'."""
    gos_ = (pred - tgt).abs() / (pred.abs() + tgt.abs())
    mf = 1 + math.tanh(theta) - torch.tanh(theta * gos_)
    keep = torch.ones(4, dtype=torch.bool)
    keep[list(columns)] = False
    mf = mf.masked_fill(keep, 1.0)
    err = mf * (pred - tgt)
    value, slope = _bl1_value_and_slope(err.abs(), beta=beta)
    return value, slope * err.sign()


@pytest.mark.parametrize("beta", [1.0, 0.11])
def test_eapm_balanced_l1_leaves_nonzero_dx_dy_unmodulated_float64(beta):
    """dx, dy with nonzero targets and predictions (GoS < 1, so MF > 1 would change them) keep
    the plain balanced L1 value and gradient; dw, dh get the modulated ones (float64 closed
    form). Modulating all four columns would miss both value and gradient."""
    theta = 1.5
    tgt = torch.tensor(
        [[0.4, -0.3, 0.5, -0.2], [-0.6, 0.25, -0.35, 0.3], [0.05, 0.08, 0.2, 0.15]],
        dtype=torch.float64,
    )
    # errors: dx, dy small enough to stay inliers of beta 0.11 even when scaled by MF < 2
    # (the gradient then depends on the error), dw, dh inliers and outliers
    error = torch.tensor(
        [[0.05, -0.04, 0.2, 0.1], [0.04, 0.03, -0.1, 0.12], [0.03, -0.05, 0.05, 0.02]],
        dtype=torch.float64,
    )
    pred = (tgt + error).requires_grad_()
    loss = eapm_balanced_l1_loss(pred, tgt, theta, beta=beta)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    want, want_grad = _eapm_bl1_float64(pred.detach(), tgt, theta, (2, 3), beta)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    # the dx, dy entries are where modulating would show: GoS < 1 there, MF well above 1
    gos_xy = gap_over_sum(pred.detach(), tgt)[:, :2]
    assert bool((gos_xy < 0.5).all())
    all_cols, all_cols_grad = _eapm_bl1_float64(pred.detach(), tgt, theta, (0, 1, 2, 3), beta)
    assert bool(((all_cols - want)[:, :2].abs() > 1e-4).all())
    assert bool(((all_cols_grad - want_grad)[:, :2].abs() > 1e-4).all())
    torch.testing.assert_close(loss[:, :2], balanced_l1_loss(pred, tgt, beta=beta)[:, :2])


def test_eapm_property_finite_loss_stays_finite():
    """EAPM never turns a finite base loss into NaN/Inf: random and extreme inputs."""
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 10.0, 100.0, 1e4):
        x = (torch.randn(4000, generator=g) * scale).requires_grad_()
        t = (torch.rand(4000, generator=g) < 0.5).float()
        for mu in (0.0, 0.1, 1.5, 5.0, 50.0):
            loss = eapm_sigmoid_focal_loss(x, t, mu)
            (gr,) = torch.autograd.grad(loss.sum(), x)
            assert torch.isfinite(loss).all() and torch.isfinite(gr).all(), (scale, mu)
        p = (torch.randn(1000, 4, generator=g) * scale).requires_grad_()
        q = torch.randn(1000, 4, generator=g) * scale
        q[::7] = 0.0
        p.data[::7] = 0.0
        for theta in (0.0, 1.0, 50.0):
            for beta in (1.0, 0.11):
                loss = eapm_balanced_l1_loss(p, q, theta, beta=beta)
                (gr,) = torch.autograd.grad(loss.sum(), p)
                assert torch.isfinite(loss).all() and torch.isfinite(gr).all(), (scale, theta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_eapm_finite_for_extreme_half_inputs(dtype):
    """Extends test_losses' float32 property test to half inputs: logits up to +-1e4
    (and +-max of the dtype's safe range), exact 0/1 targets, deltas where the prediction,
    the target or both are 0 (GoS 1 or 0/0), huge deltas."""
    from eapm.losses import (
        balanced_l1_loss,
        eapm_balanced_l1_loss,
        eapm_sigmoid_focal_loss,
        sigmoid_focal_loss,
    )

    g = torch.Generator().manual_seed(7)
    for scale in (1e-3, 1.0, 30.0, 1e4):
        x = torch.randn(3000, generator=g) * scale
        x[:4] = torch.tensor([scale, -scale, 0.0, -0.0])
        x = x.to(dtype).requires_grad_()
        t = (torch.rand(3000, generator=g) < 0.5).to(dtype)
        base = sigmoid_focal_loss(x, t)
        assert torch.isfinite(base).all()
        for mu in (0.1, 1.5, 20.0):
            loss = eapm_sigmoid_focal_loss(x, t, mu)
            (gr,) = torch.autograd.grad(loss.sum(), x)
            assert torch.isfinite(loss).all() and torch.isfinite(gr.float()).all(), (
                dtype,
                scale,
                mu,
            )
        p = torch.randn(999, 4, generator=g) * scale
        q = torch.randn(999, 4, generator=g) * scale
        p[0::3] = 0.0  # prediction 0
        q[1::3] = 0.0  # target 0
        p[2::9], q[2::9] = 0.0, 0.0  # both 0 (GoS 0/0)
        p = p.to(dtype).requires_grad_()
        q = q.to(dtype)
        assert torch.isfinite(balanced_l1_loss(p, q, beta=0.11)).all()
        for theta in (0.5, 1.0, 20.0):
            loss = eapm_balanced_l1_loss(p, q, theta, beta=0.11)
            (gr,) = torch.autograd.grad(loss.sum(), p)
            assert torch.isfinite(loss).all() and torch.isfinite(gr.float()).all(), (
                dtype,
                scale,
                theta,
            )


def test_eapm_focal_terms_attributes():
    x = torch.tensor([-1.0, 0.0, 3.0])
    t = torch.tensor([1.0, 0.0, 0.0])
    loss, dif, mf = eapm_focal_terms(x, t, 1.5)
    torch.testing.assert_close(dif, difficulty(x, t))
    torch.testing.assert_close(mf, modulating_factor(dif, 1.5))
    torch.testing.assert_close(loss, eapm_sigmoid_focal_loss(x, t, 1.5))


@pytest.mark.parametrize("mu", [60.0, 100.0, 1000.0, 1e6])
def test_large_mu_no_overflow(mu):
    """MF saturates at 2 - tanh(mu Dif); no cosh/sinh of mu is ever formed."""
    x = torch.linspace(-100, 100, 401).requires_grad_()
    t = (torch.arange(401) % 2).float()
    loss = eapm_sigmoid_focal_loss(x, t, mu)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    x64 = torch.tensor([-3.0, -0.5, 0.2, 4.0], dtype=torch.float64)
    t64 = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    got = eapm_sigmoid_focal_loss(x64, t64, mu)
    for i in range(4):
        assert _rel(got[i], ref_eapm_focal(float(x64[i]), int(t64[i]), mu)[0]) < 1e-6
