"""eapm/losses/focal.py: the EAPM focal loss against closed-form values and gradients.

References are computed independently with mpmath at 50 digits from the paper's definitions
(p' = p* + MF (p - p*), x' = logit(p'), the focal loss at the modulated point, and the *base*
loss's derivative at the modulated point by numerical differentiation), not from the
implementation's own algebra; mu = 0 is fvcore's focal loss; extreme logits, very hard
examples, large mu.
"""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
from fvcore.nn import sigmoid_focal_loss as fvcore_focal

from eapm.losses import (
    difficulty,
    eapm_focal_terms,
    eapm_sigmoid_focal_loss,
    modulating_factor,
    sigmoid_focal_loss,
)
from tests.helpers import rel_err

mp.mp.dps = 50


# -------------------------------------------------------------------------------- references


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


# ----------------------------------------------------------------------- the EAPM focal loss


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
            assert rel_err(loss[i], v) < 1e-6, (xi, float(loss[i]), float(v))
        if abs(float(g)) > 1e-290:
            assert rel_err(grad[i], g) < 1e-6, (xi, float(grad[i]), float(g))


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
        assert rel_err(v, ref_eapm_focal(float(xv), 0, 2.0)[0]) < 1e-9
    got = eapm_sigmoid_focal_loss(x64.float(), t.float(), 2.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


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
        assert rel_err(got[i], ref_eapm_focal(float(x64[i]), int(t64[i]), mu)[0]) < 1e-6
