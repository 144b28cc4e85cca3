"""eapm/losses/balanced_l1.py: balanced L1 against mmdetection's reference values, and EAPM
balanced L1 against closed-form values and gradients computed independently with mpmath at 50
digits (dw, dh modulated at t' = t* + MF (t - t*), dx, dy not)."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

from eapm.losses import balanced_l1_loss, eapm_balanced_l1_loss, gap_over_sum
from tests.helpers import rel_err

mp.mp.dps = 50


# -------------------------------------------------------------------------------- references


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


# ---------------------------------------------------------- balanced L1 and EAPM balanced L1


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
        assert rel_err(gv, ref_balanced_l1(dv, beta=beta)) < 1e-9
    # symmetric in the sign of the error
    torch.testing.assert_close(balanced_l1_loss(-d, torch.zeros_like(d), beta=beta), got)


def test_balanced_l1_gradient_and_beta_quirk():
    d = torch.tensor([-2.0, -0.5, 0.05, 0.3, 0.9, 1.5], dtype=torch.float64, requires_grad=True)
    for beta in (1.0, 0.11):
        loss = balanced_l1_loss(d, torch.zeros_like(d), beta=beta)
        (g,) = torch.autograd.grad(loss.sum(), d)
        for gi, di in zip(g, d.detach()):
            want = mp.diff(lambda z: ref_balanced_l1(z, beta=beta), mp.mpf(float(di)))
            assert rel_err(gi, want) < 1e-7
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
