"""tools/plot_gradients.py's EAPM cross-entropy figure: its curves are the closed form
|dL/dx_y| = MF (1 - p_y) (mu 0: 1 - p_y, the softmax cross entropy), the figure is written,
and the committed copy in docs/figures is there."""

from __future__ import annotations

import math
import os

import torch

from eapm.losses import modulating_factor
from tests.helpers import REPO, load_tool

NAME = "eapm_cross_entropy_gradient.png"


def test_ce_curves_are_the_closed_form():
    tool = load_tool("plot_gradients")
    p_y = 1.0 - tool.dif_grid()
    ce = tool.ce_grad(p_y, 0.0)
    torch.testing.assert_close(ce, 1.0 - p_y, rtol=1e-12, atol=1e-15)
    for mu in tool.CE_MUS[1:]:
        g = tool.ce_grad(p_y, mu)
        want = modulating_factor(1.0 - p_y, mu) * (1.0 - p_y)
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-15)
        ratio = g / ce
        assert (ratio >= 1).all()  # EAPM never lowers the target logit's gradient
        assert abs(float(ratio[-1]) - 1) < 1e-2  # very hard (p_y -> 0): unchanged
        assert abs(float(ratio[0]) - (1 + math.tanh(mu))) < 1e-2  # easy: x (1 + tanh mu)
    assert tool.CE_MUS == (0.0, 1.0, 1.5, 2.0)


def test_ce_figure_written_and_committed(tmp_path):
    tool = load_tool("plot_gradients")
    assert NAME in tool.FIGURES
    out = tmp_path / NAME
    tool.plot_cross_entropy(str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 200_000
    committed = os.path.join(REPO, "docs", "figures", NAME)
    assert os.path.isfile(committed), "run: python tools/plot_gradients.py --out docs/figures"
    assert os.path.getsize(committed) < 200_000
