"""tools/plot_gradients.py: the gradient figures (EAPM focal, balanced L1, cross entropy) are
written and the properties they illustrate hold; the cross-entropy curves are the closed form
|dL/dx_y| = MF (1 - p_y) (mu 0: 1 - p_y, the softmax cross entropy); the committed copies in
docs/figures are there."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from eapm.losses import modulating_factor
from tests.helpers import REPO, load_tool


def test_plot_gradients_writes_figures_and_the_properties_hold(tmp_path):
    tool = load_tool("plot_gradients")
    props = tool.main(["--out", str(tmp_path)])
    assert "eapm_cross_entropy_gradient.png" in tool.FIGURES
    for name in tool.FIGURES:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 200_000
    assert json.loads((tmp_path / "properties.json").read_text())["claims"] == props["claims"]
    assert "Claims:" in (tmp_path / "properties.txt").read_text()
    assert all(props["claims"].values()), props["claims"]

    f = props["focal"]
    assert f["alpha"] < 0 and f["gamma"] == 2.0  # alpha disabled: positives == negatives
    for mu, parts in f["mu"].items():
        assert parts["pos"]["ratio_at"] == parts["neg"]["ratio_at"]
        p = parts["pos"]
        # (a) easy examples: the absolute change is negligible (< 1% of the largest focal
        # gradient), although the *ratio* there is large (the focal gradient is ~0)
        assert p["easy_max_abs_change_rel_to_max_grad"] < 0.01
        assert p["ratio_at"]["0.01"] > 4
        # very hard examples: nearly unchanged (slightly below 1: the focal gradient peaks
        # at Dif ~ 0.95 and the modulation moves past the peak)
        assert abs(p["ratio_at"]["0.99"] - 1) < 0.03 and p["hard_max_rel_change"] < 0.05
        # medium difficulty: raised
        assert p["mid_min_ratio"] > 1.1 and p["ratio_at"]["0.5"] > 1.5
        assert 0.4 < p["max_abs_increase_at_dif"] < 0.7
    # (b) mu shifts the up-weighting towards easier examples
    r = {mu: f["mu"][mu]["pos"]["ratio_at"] for mu in ("1.0", "1.5", "2.0")}
    assert r["1.0"]["0.01"] < r["1.5"]["0.01"] < r["2.0"]["0.01"]
    assert r["1.0"]["0.7"] > r["1.5"]["0.7"] > r["2.0"]["0.7"]
    assert f["semantics_max_rel_diff"] < 1e-6

    g = props["regression"]
    assert g["shape_sum"] == 1.5 and g["bl1_over_smooth_l1_min_ratio_inliers"] > 1.4
    for theta, t in g["theta"].items():
        assert t["inlier_min_ratio"] > 1.0 and t["ratio_at_error"]["0.3"] > 1.15
        assert t["outlier_max_rel_change"] < 1e-9 and t["ratio_at_error"]["1.2"] == 1.0
        by_sum = t["ratio_at_fixed_error_by_shape_sum"]
        assert by_sum["0.3"] == pytest.approx(1.0) and by_sum["0.4"] < 1.06 < 1.15 < by_sum["1.5"]
    assert g["semantics_max_rel_diff"] < 1e-9


def test_committed_figures_are_small_pngs():
    for name in (
        "eapm_focal_gradient.png",
        "eapm_balanced_l1_gradient.png",
        "eapm_cross_entropy_gradient.png",
    ):
        path = os.path.join(REPO, "docs", "figures", name)
        assert os.path.isfile(
            path
        ), f"run: python tools/plot_gradients.py --out docs/figures ({name} missing)"
        assert os.path.getsize(path) < 200_000


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
