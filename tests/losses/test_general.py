"""The general EAPM recipe (eapm.losses.general): the wrapper around a base loss agrees with
the fused kernels (focal, balanced L1, cross entropies) in float64, values and gradients;
a factor of 1 gives the base loss bitwise; user attributes and factors follow the contract
(gradient = the base gradient at the modulated point); the named attributes and the strength
as factor are the explicit callables bitwise; errors are clear."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eapm.losses import (
    LINKS,
    balanced_l1_loss,
    eapm_balanced_l1_loss,
    eapm_binary_cross_entropy_with_logits,
    eapm_cross_entropy,
    eapm_loss,
    eapm_sigmoid_focal_loss,
    gap_over_sum,
    modulate_prediction,
    modulating_factor,
    sigmoid_focal_loss,
)

RTOL, ATOL = 1e-10, 1e-14  # float64; the general path forms 1 - MF Dif by subtraction


def _grad(fn, x):
    xr = x.detach().clone().requires_grad_()
    out = fn(xr)
    (g,) = torch.autograd.grad(out.sum(), xr)
    return out.detach(), g


def _close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _binary(n=400, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) * scale
    t = (torch.rand(n, 5, generator=g) < 0.3).double()
    return x, t


def _deltas(n=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, 4, generator=g, dtype=torch.float64)
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    p[:2] = 0.0  # GoS 1 (target only) and 0/0
    q[1:3] = 0.0
    p[3, 2:] = 5.0  # balanced L1 outlier
    return p, q


@pytest.mark.parametrize("mu", (0.0, 0.5, 1.0, 1.5, 2.0, 5.0))
@pytest.mark.parametrize("alpha,gamma", ((0.25, 2.0), (-1.0, 2.0), (0.25, 1.5), (-1.0, 0.0)))
def test_general_equals_fused_focal(mu, alpha, gamma):
    x, t = _binary()
    general = eapm_loss(sigmoid_focal_loss, "difficulty", mu, "sigmoid")
    for reduction in ("none", "sum"):
        v, g = _grad(lambda z: general(z, t, alpha=alpha, gamma=gamma, reduction=reduction), x)
        fv, fg = _grad(
            lambda z: eapm_sigmoid_focal_loss(z, t, mu, alpha, gamma, reduction=reduction), x
        )
        _close(v, fv)
        _close(g, fg)
        if mu == 0:  # MF == 1: the base loss bitwise
            assert torch.equal(v, fv) and torch.equal(g, fg)


@pytest.mark.parametrize("theta", (0.0, 0.5, 1.0, 1.5, 2.0))
@pytest.mark.parametrize("beta", (1.0, 0.11))
def test_general_equals_fused_balanced_l1(theta, beta):
    p, q = _deltas()
    general = eapm_loss(balanced_l1_loss, "gap_over_sum", theta, modulated_columns=(2, 3))
    for reduction in ("none", "sum", "mean"):
        v, g = _grad(lambda z: general(z, q, beta=beta, reduction=reduction), p)
        fv, fg = _grad(
            lambda z: eapm_balanced_l1_loss(z, q, theta, beta=beta, reduction=reduction), p
        )
        _close(v, fv)
        _close(g, fg)
    # all four columns modulated: differs from the fused (w, h only) loss when theta > 0
    v_all = eapm_loss(balanced_l1_loss, "gap_over_sum", theta)(p, q, beta=beta)
    v_wh = general(p, q, beta=beta)
    assert torch.equal(v_all[:, 2:], v_wh[:, 2:])
    assert bool((v_all[:, :2] != v_wh[:, :2]).any()) == (theta > 0)


@pytest.mark.parametrize("mu", (0.0, 0.5, 1.5, 2.0, 10.0))
def test_general_equals_eapm_cross_entropy(mu):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 7, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (300,), generator=g)
    y[:5] = -100  # ignored rows: not modulated, F.cross_entropy ignores them
    general = eapm_loss(F.cross_entropy, "difficulty", mu, "softmax")
    for reduction in ("none", "sum", "mean"):
        v, gr = _grad(lambda z: general(z, y, reduction=reduction), x)
        fv, fg = _grad(lambda z: eapm_cross_entropy(z, y, mu, reduction), x)
        _close(v, fv)
        _close(gr, fg)
        if mu == 0:
            assert torch.equal(v, fv) and torch.equal(gr, fg)
    # the modulated prediction is log p' and p' is a distribution
    x_mod, ea, mf = modulate_prediction(x, y, "difficulty", mu, "softmax")
    if mu > 0:  # (mu = 0: MF == 1, the logits pass through untouched)
        _close(torch.logsumexp(x_mod[5:], 1), torch.zeros(295, dtype=torch.float64), 0, 1e-14)
    p_y = torch.softmax(x, 1)[torch.arange(300), y.clamp_min(0)]
    _close(ea, 1 - p_y, 1e-12, 1e-15)
    assert (mf[:5] == 1).all() and not ea.requires_grad and not mf.requires_grad


@pytest.mark.parametrize("mu", (0.0, 1.0, 1.5, 2.0))
def test_general_equals_eapm_bce(mu):
    x, t = _binary(seed=3)
    general = eapm_loss(F.binary_cross_entropy_with_logits, "difficulty", mu, "sigmoid")
    for reduction in ("none", "sum", "mean"):
        v, g = _grad(lambda z: general(z, t, reduction=reduction), x)
        fv, fg = _grad(lambda z: eapm_binary_cross_entropy_with_logits(z, t, mu, reduction), x)
        _close(v, fv)
        _close(g, fg)


def test_user_attribute_and_factor_follow_the_contract():
    """A user's factor on the identity link with a squared error: the gradient is the
    base gradient at t' (2 MF (t - t*)), not d/dt of (MF(t) (t - t*))^2; on the sigmoid
    link with BCE: MF (p - t)."""
    g = torch.Generator().manual_seed(4)
    t = torch.randn(50, 3, generator=g, dtype=torch.float64)
    ts = torch.randn(50, 3, generator=g, dtype=torch.float64)

    def attr(p, p_star):
        return (p - p_star).abs().clamp(max=1.0)

    def factor(ea):
        return 1.0 + 0.5 * (1.0 - ea)  # up-weights small errors; MF in [1, 1.5]

    mse = eapm_loss(F.mse_loss, attr, factor)
    v, gr = _grad(lambda z: mse(z, ts, reduction="sum"), t)
    mf = factor(attr(t, ts))
    _close(v, ((mf * (t - ts)) ** 2).sum())
    _close(gr, 2 * mf * (t - ts))
    # differentiating through the modulation would give something else
    tc = t.clone().requires_grad_()
    (gc,) = torch.autograd.grad(((factor(attr(tc, ts)) * (tc - ts)) ** 2).sum(), tc)
    assert (gc - gr).abs().max() > 1e-2

    x, y = _binary(n=60, scale=2.0, seed=5)
    bce = eapm_loss(F.binary_cross_entropy_with_logits, attr, factor, "sigmoid")
    v, gr = _grad(lambda z: bce(z, y, reduction="sum"), x)
    p = torch.sigmoid(x)
    mf = factor((p - y).abs())
    _close(gr, mf * (p - y))
    _close(v, -torch.log1p(-mf * (p - y).abs()).sum())


@pytest.mark.parametrize("link", LINKS)
def test_factor_one_is_the_base_loss_bitwise(link):
    x, t = _binary()
    if link == "softmax":
        t = t.argmax(1)
        base = F.cross_entropy
    elif link == "sigmoid":
        base = F.binary_cross_entropy_with_logits
    else:
        base = F.smooth_l1_loss
    general = eapm_loss(base, "difficulty", lambda ea: torch.ones_like(ea), link)
    v, g = _grad(lambda z: general(z, t), x)
    rv, rg = _grad(lambda z: base(z, t), x)
    assert torch.equal(v, rv) and torch.equal(g, rg)


def test_low_precision_input_modulated_in_float32():
    x, t = _binary(n=30)
    xh = x.to(torch.bfloat16)
    x_mod, ea, mf = modulate_prediction(xh, t, "difficulty", 1.5, "sigmoid")
    assert x_mod.dtype == ea.dtype == mf.dtype == torch.float32
    general = eapm_loss(sigmoid_focal_loss, "difficulty", 1.5, "sigmoid")
    v, g = _grad(lambda z: general(z, t, reduction="sum"), xh)
    fv, fg = _grad(lambda z: eapm_sigmoid_focal_loss(z, t, 1.5, reduction="sum"), xh)
    assert g.dtype == torch.bfloat16
    # float32: 1 - MF Dif by subtraction loses ~eps / (1 - MF Dif) on very hard examples
    torch.testing.assert_close(v, fv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g, fg, rtol=1e-2, atol=1e-3)


def _explicit(name, s):
    """The attribute and factor callables a name and a strength stand for, written out."""
    if name == "difficulty":

        def attribute(p, p_star):
            return (p - p_star).abs()  # Dif = |p - p*| in the prediction space

    else:
        attribute = gap_over_sum

    def factor(ea):
        return modulating_factor(ea, s)

    return attribute, factor


def _link_inputs(link, dtype):
    if link == "identity":
        p, q = _deltas()
        return p.to(dtype), q.to(dtype), F.smooth_l1_loss
    x, t = _binary(n=60, seed=6)
    if link == "softmax":
        t = t.argmax(1)
        t[:3] = -100  # ignored rows
        return x.to(dtype), t, F.cross_entropy
    return x.to(dtype), t.to(dtype), F.binary_cross_entropy_with_logits


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("s", (0.0, 0.5, 1.5, 10.0))
@pytest.mark.parametrize(
    "link,name",
    (("identity", "gap_over_sum"), ("identity", "difficulty"), ("sigmoid", "difficulty"),
     ("softmax", "difficulty")),
)  # fmt: skip
def test_names_and_strength_are_the_explicit_callables_bitwise(link, name, s, dtype):
    """``attribute="difficulty"`` / ``"gap_over_sum"`` and ``factor=s`` compute exactly what
    the callables |p - p*| / ``gap_over_sum`` and ``modulating_factor(EA, s)`` compute:
    modulated prediction, EA, MF, loss values and gradients bitwise; s == 0 is the base
    loss bitwise."""
    x, t, base = _link_inputs(link, dtype)
    attribute, factor = _explicit(name, s)
    cols = (2, 3) if link == "identity" else None
    named = modulate_prediction(x, t, name, s, link, modulated_columns=cols)
    explicit = modulate_prediction(x, t, attribute, factor, link, modulated_columns=cols)
    for a, b in zip(named, explicit):
        assert a.dtype == b.dtype and torch.equal(a, b)
    kw = {"reduction": "none"}
    v, g = _grad(lambda z: eapm_loss(base, name, s, link, modulated_columns=cols)(z, t, **kw), x)
    ev, eg = _grad(
        lambda z: eapm_loss(base, attribute, factor, link, modulated_columns=cols)(z, t, **kw), x
    )
    assert torch.equal(v, ev) and torch.equal(g, eg)
    if s == 0:
        rv, rg = _grad(lambda z: base(z, t, **kw), x)
        assert torch.equal(v, rv) and torch.equal(g, rg)
        assert (named[2] == 1).all()


def test_named_attributes_and_strength():
    a = torch.tensor([0.2, 0.9, 0.0])
    b = torch.tensor([1.0, 0.0, 0.0])
    _, ea, mf = modulate_prediction(a, b, "difficulty", 1.5)
    assert torch.equal(ea, torch.tensor([0.8, 0.9, 0.0]))
    assert torch.equal(mf, modulating_factor(ea, 1.5))
    _, ea, _ = modulate_prediction(
        torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]), "gap_over_sum", 1.0
    )
    assert torch.equal(ea, torch.tensor([0.5, 0.0]))
    _, _, mf = modulate_prediction(
        torch.zeros(1, dtype=torch.float64), torch.zeros(1), "difficulty", 1.5
    )
    _close(mf, torch.tensor([1 + math.tanh(1.5)], dtype=torch.float64))
    # a strength may be any real number type (as check_eapm_param reads it)
    for s in (1, 1.5, torch.tensor(1.5)):
        _, _, mf_s = modulate_prediction(a, b, "difficulty", s)
        assert torch.equal(mf_s, modulating_factor((a - b).abs(), float(s)))
    assert eapm_loss(F.cross_entropy, "difficulty", 1.5, "softmax").__name__ == "eapm_cross_entropy"


def test_errors():
    x, t = _binary(n=4)
    f = 1.0
    with pytest.raises(ValueError, match="link"):
        eapm_loss(F.mse_loss, "difficulty", f, "tanh")
    for bad in ("dif", "gos", "Difficulty", ""):  # an unknown name lists the accepted ones
        with pytest.raises(
            ValueError, match=r"attribute must be one of \('difficulty', 'gap_over_sum'\)"
        ):
            eapm_loss(F.mse_loss, bad, f)
        with pytest.raises(ValueError, match="'difficulty', 'gap_over_sum'"):
            modulate_prediction(x, t, bad, f)
    with pytest.raises(ValueError, match="attribute must be"):
        eapm_loss(F.mse_loss, 1.5, f)
    for bad in (-1.0, float("nan"), float("inf"), "1.5", "tanh", None, [1.0]):
        with pytest.raises(ValueError, match="^factor must be"):
            eapm_loss(F.mse_loss, "difficulty", bad)
        with pytest.raises(ValueError, match="^factor must be"):
            modulate_prediction(x, t, "difficulty", bad)
    with pytest.raises(ValueError, match="targets in"):
        eapm_loss(F.binary_cross_entropy_with_logits, "difficulty", f, "sigmoid")(x, t * 0.5 + 0.25)
    with pytest.raises(ValueError, match="same shape"):
        eapm_loss(F.mse_loss, "difficulty", f)(x, t[:2])
    with pytest.raises(ValueError, match="integer labels"):
        eapm_loss(F.cross_entropy, "difficulty", f, "softmax")(x, t[:, 0])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        eapm_loss(F.cross_entropy, "difficulty", f, "softmax")(x[0], t[:, 0].long())
    with pytest.raises(ValueError, match="one MF per row"):
        modulate_prediction(x, t[:, 0].long(), "difficulty", f, "softmax", modulated_columns=(0,))
    with pytest.raises(ValueError, match="modulated_columns"):
        modulate_prediction(x, t, "difficulty", f, modulated_columns=(7,))
    with pytest.raises(ValueError, match="broadcast"):
        modulate_prediction(x, t, "difficulty", lambda ea: torch.ones(3))
    with pytest.raises(ValueError, match="leaves"):  # MF = 3: p' outside [0, 1]
        modulate_prediction(x, t, "difficulty", lambda ea: torch.full_like(ea, 3.0), "sigmoid")
    with pytest.raises(ValueError, match="leaves"):
        modulate_prediction(
            x, t.argmax(1), "difficulty", lambda ea: torch.full_like(ea, 3.0), "softmax"
        )
