"""eapm/losses/attributes.py: the attributes (Dif, Gap-over-Sum) and the modulating factor MF
(range, monotony, the modulated probability stays in [0, 1], scale invariance of GoS); the
strengths mu and theta (and balanced L1's beta, the inputs' shapes) checked by the losses."""

from __future__ import annotations

import math

import pytest
import torch

from eapm.losses import (
    balanced_l1_loss,
    difficulty,
    eapm_balanced_l1_loss,
    eapm_sigmoid_focal_loss,
    gap_over_sum,
    modulating_factor,
)


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
