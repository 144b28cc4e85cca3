#!/usr/bin/env python
"""Gradient curves of EAPM (the paper's Figs. 3 and 4), computed from this package's
own loss functions through autograd, plus numerical checks of the paper's claims.

    python tools/plot_gradients.py --out docs/figures

Writes to --out:
  eapm_focal_gradient.png        |dL/dx| against Dif = |p - p*| for focal loss and EAPM
                                 focal loss (mu 1.0 / 1.5 / 2.0), positives and negatives,
                                 and the ratio EAPM / focal (Fig. 3 analogue)
  eapm_balanced_l1_gradient.png  |dL/dd| against the error |d| for smooth L1, balanced L1
                                 and EAPM balanced L1 (theta 1.0 / 1.5 / 2.0) at
                                 |t_j| + |t*_j| = 1.5, and the EAPM / balanced L1 gradient
                                 ratio against the shape variation |t_j| + |t*_j| at a
                                 fixed error (Fig. 4 analogue)
  eapm_cross_entropy_gradient.png    |dL/dx_y| (the target class's logit) against p_y for
                                 softmax cross entropy and EAPM cross entropy (mu 1.0 / 1.5 /
                                 2.0), and the ratio EAPM / cross entropy (the Fig. 3 analogue
                                 for R-CNN box classification: it is MF(1 - p_y) / (1 - p_y))
  properties.json / properties.txt   the numbers behind the paper's qualitative claims

No formula is re-typed here: every curve is ``torch.autograd.grad`` of
``eapm.losses.{sigmoid_focal_loss, eapm_sigmoid_focal_loss, balanced_l1_loss,
eapm_balanced_l1_loss, eapm_cross_entropy}`` or ``torch.nn.functional.smooth_l1_loss``, in
float64.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from eapm.losses import (
    balanced_l1_loss,
    difficulty,
    eapm_balanced_l1_loss,
    eapm_cross_entropy,
    eapm_sigmoid_focal_loss,
    gap_over_sum,
    modulating_factor,
    sigmoid_focal_loss,
)

# computed here, not imported from eapm.model_zoo: this tool needs eapm.losses only (pure torch)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUS = (1.0, 1.5, 2.0)
THETAS = (1.0, 1.5, 2.0)
GAMMA = 2.0
BL1 = dict(alpha=0.5, gamma=1.5, beta=1.0)  # the paper's Fig. 4 values (beta: mmdetection's 1.0)
SMOOTH_L1_BETA = 1.0
SHAPE_SUM = 1.5  # |t_j| + |t*_j| of the paper's Fig. 4
FIXED_ERROR = 0.3  # |d| of the shape-variation panel
DTYPE = torch.float64
CE_MUS = (0.0,) + MUS  # the cross-entropy figure: mu 0 is the softmax cross entropy
CE_CLASSES = 81  # COCO's 80 classes + background, as detectron2's box predictor

# thresholds of the claims (see properties.txt)
EASY_DIF, HARD_DIF = 0.05, 0.95
MID_RANGE = (0.2, 0.7)


# ----------------------------------------------------------------------------
# curves (autograd through the package's losses)
# ----------------------------------------------------------------------------
def dif_grid(n: int = 999) -> torch.Tensor:
    """Dif in (0, 1), endpoints excluded (the logit is infinite there)."""
    return torch.linspace(0.001, 0.999, n, dtype=DTYPE)


def focal_input(dif: torch.Tensor, positive: bool):
    """Logits x and targets t of examples whose difficulty |sigmoid(x) - t| is ``dif``."""
    p = 1.0 - dif if positive else dif
    t = torch.full_like(dif, 1.0 if positive else 0.0)
    return torch.logit(p), t


def focal_grad(
    dif: torch.Tensor, positive: bool, mu: Optional[float], alpha: float, gamma: float = GAMMA
) -> torch.Tensor:
    """|dL/dx| of focal loss (mu None) or EAPM focal loss (mu) at the given difficulties."""
    x, t = focal_input(dif, positive)
    x.requires_grad_(True)
    if mu is None:
        loss = sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="sum")
    else:
        loss = eapm_sigmoid_focal_loss(x, t, mu, alpha=alpha, gamma=gamma, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return g.abs()


def _grad_of(loss_fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x), x)
    return g


def box_deltas(error: torch.Tensor, shape_sum: float):
    """(N, 4) predicted / target deltas whose dw column has |t - t*| = error and
    |t| + |t*| = shape_sum (both >= 0, so GoS = error / shape_sum); dx, dy, dh are 0."""
    if float(error.max()) > shape_sum + 1e-12:
        raise ValueError(
            f"|t - t*| <= |t| + |t*| = {shape_sum}, got an error of {float(error.max())}"
        )
    t = torch.zeros(error.numel(), 4, dtype=DTYPE)
    g = torch.zeros_like(t)
    t[:, 2] = (shape_sum + error) / 2
    g[:, 2] = (shape_sum - error) / 2
    return t, g


def reg_grad(error: torch.Tensor, shape_sum: float, kind: str, theta: float = 0.0) -> torch.Tensor:
    """|dL/dt_w| for kind in {"smooth_l1", "balanced_l1", "eapm"}."""
    t, g = box_deltas(error, shape_sum)
    if kind == "smooth_l1":
        fn = lambda x: F.smooth_l1_loss(x, g, beta=SMOOTH_L1_BETA, reduction="sum")  # noqa: E731
    elif kind == "balanced_l1":
        fn = lambda x: balanced_l1_loss(x, g, reduction="sum", **BL1)  # noqa: E731
    elif kind == "eapm":
        fn = lambda x: eapm_balanced_l1_loss(x, g, theta, reduction="sum", **BL1)  # noqa: E731
    else:
        raise ValueError(kind)
    return _grad_of(fn, t)[:, 2].abs()


def ce_input(p_y: torch.Tensor, num_classes: int = CE_CLASSES):
    """(N, C) logits whose softmax gives the target class 0 the probability ``p_y`` (the
    rest spread evenly over the other classes) and the labels (all 0). The gradient w.r.t.
    the target logit depends on p_y only."""
    rest = ((1.0 - p_y) / (num_classes - 1)).unsqueeze(1).expand(-1, num_classes - 1)
    x = torch.cat([p_y.unsqueeze(1), rest], 1).log()
    return x, torch.zeros(p_y.numel(), dtype=torch.long)


def ce_grad(p_y: torch.Tensor, mu: float) -> torch.Tensor:
    """|dL/dx_y| of EAPM cross entropy (mu = 0: softmax cross entropy, F.cross_entropy) at
    target-class probabilities ``p_y``, w.r.t. the target class's logit."""
    x, y = ce_input(p_y)
    return _grad_of(lambda z: eapm_cross_entropy(z, y, mu, reduction="sum"), x)[:, 0].abs()


# ----------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------
def _at(grid: torch.Tensor, values: torch.Tensor, where: float) -> float:
    return float(values[(grid - where).abs().argmin()])


def _r(v: float, n: int = 4) -> float:
    return round(float(v), n)


def focal_properties(alpha: float) -> Dict:
    dif = dif_grid()
    fl_pos = focal_grad(dif, True, None, alpha)
    fl_neg = focal_grad(dif, False, None, alpha)
    out: Dict = {
        "alpha": alpha,
        "gamma": GAMMA,
        "focal_max_grad": {"pos": _r(fl_pos.max()), "neg": _r(fl_neg.max())},
    }

    # the package's focal loss against fvcore's (an independent implementation)
    from fvcore.nn import sigmoid_focal_loss as fv_focal

    x, t = focal_input(dif, True)
    mine = _grad_of(lambda z: sigmoid_focal_loss(z, t, alpha, GAMMA, "sum"), x)
    ref = _grad_of(lambda z: fv_focal(z, t, alpha=alpha, gamma=GAMMA, reduction="sum"), x)
    out["fvcore_max_abs_diff"] = float((mine - ref).abs().max())

    mus = {}
    sem_err = 0.0
    for mu in MUS:
        parts = {}
        for part, positive, fl in (("pos", True, fl_pos), ("neg", False, fl_neg)):
            g = focal_grad(dif, positive, mu, alpha)
            ratio = g / fl
            change = g - fl
            easy = dif <= EASY_DIF
            hard = dif >= HARD_DIF
            mid = (dif >= MID_RANGE[0]) & (dif <= MID_RANGE[1])
            below = torch.nonzero(ratio < 1.0)
            parts[part] = {
                "ratio_at": {
                    str(d): _r(_at(dif, ratio, d)) for d in (0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99)
                },
                "easy_max_abs_change": float(change[easy].abs().max()),
                "easy_max_abs_change_rel_to_max_grad": float(change[easy].abs().max() / fl.max()),
                "hard_max_rel_change": float((ratio[hard] - 1).abs().max()),
                "mid_min_ratio": float(ratio[mid].min()),
                "max_abs_increase": float(change.max()),
                "max_abs_increase_rel_to_max_grad": float(change.max() / fl.max()),
                "max_abs_increase_at_dif": _r(dif[change.argmax()], 3),
                "ratio_falls_below_1_at_dif": _r(dif[below[0, 0]], 3) if len(below) else None,
            }
            # gradient semantics (paper Sec. 2.1): EAPM's gradient at x is the focal
            # loss's gradient at x' = logit(p* + MF (p - p*)), MF from the package helpers
            x, t = focal_input(dif, positive)
            mf = modulating_factor(difficulty(x, t), mu)
            x_mod = torch.logit(t + mf * (torch.sigmoid(x) - t))
            ok = dif <= 0.99  # logit(p') loses digits as p' -> 0 or 1
            at_mod = _grad_of(lambda z: sigmoid_focal_loss(z, t, alpha, GAMMA, "sum"), x_mod).abs()
            sem_err = max(sem_err, float(((at_mod - g) / g).abs()[ok].max()))
        mus[str(mu)] = parts
    out["mu"] = mus
    out["semantics_max_rel_diff"] = sem_err
    return out


def regression_properties() -> Dict:
    err = torch.linspace(0.0, SHAPE_SUM, 301, dtype=DTYPE)[1:]
    sl1 = reg_grad(err, SHAPE_SUM, "smooth_l1")
    bl1 = reg_grad(err, SHAPE_SUM, "balanced_l1")
    inlier = err < BL1["beta"]
    out: Dict = {
        "shape_sum": SHAPE_SUM,
        "balanced_l1": BL1,
        "smooth_l1_beta": SMOOTH_L1_BETA,
        "bl1_over_smooth_l1_min_ratio_inliers": float((bl1 / sl1)[inlier].min()),
        "bl1_outlier_grad": _r(bl1[~inlier].max()),
    }
    thetas = {}
    sem_err = 0.0
    sums = torch.linspace(FIXED_ERROR, 3.0, 28, dtype=DTYPE)
    for theta in THETAS:
        g = reg_grad(err, SHAPE_SUM, "eapm", theta)
        ratio = g / bl1
        # ratio at a fixed error |d| as the shape variation |t| + |t*| grows
        fixed = torch.full((1,), FIXED_ERROR, dtype=DTYPE)
        by_sum = torch.stack(
            [
                reg_grad(fixed, float(s), "eapm", theta)[0]
                / reg_grad(fixed, float(s), "balanced_l1")[0]
                for s in sums
            ]
        )
        thetas[str(theta)] = {
            "ratio_at_error": {
                str(d): _r(_at(err, ratio, d)) for d in (0.05, 0.15, 0.3, 0.5, 0.75, 0.95, 1.2, 1.5)
            },
            "inlier_min_ratio": float(ratio[inlier].min()),
            "inlier_max_ratio": float(ratio[inlier].max()),
            "outlier_max_rel_change": float((ratio[~inlier] - 1).abs().max()),
            "never_below_balanced_l1": bool((g >= bl1 * (1 - 1e-12)).all()),
            "ratio_at_fixed_error_by_shape_sum": {
                str(_r(s, 3)): _r(v) for s, v in zip(sums.tolist(), by_sum.tolist())
            },
            "ratio_fixed_error_monotone_in_shape_sum": bool(
                (by_sum[1:] >= by_sum[:-1] - 1e-12).all()
            ),
        }
        # gradient semantics: EAPM's gradient = balanced L1's gradient at t' = t* + MF (t - t*)
        t, tg = box_deltas(err, SHAPE_SUM)
        mf = modulating_factor(gap_over_sum(t, tg), theta)
        mf[:, :2] = 1.0  # dx, dy are not modulated
        t_mod = tg + mf * (t - tg)
        at_mod = _grad_of(lambda z: balanced_l1_loss(z, tg, reduction="sum", **BL1), t_mod)[
            :, 2
        ].abs()
        sem_err = max(sem_err, float(((at_mod - g) / g).abs().max()))
    out["theta"] = thetas
    out["semantics_max_rel_diff"] = sem_err
    out["fixed_error"] = FIXED_ERROR
    return out


def claims(focal: Dict, reg: Dict) -> Dict[str, bool]:
    """The paper's qualitative statements, as checked predicates (thresholds in the text)."""
    parts = [p for m in focal["mu"].values() for p in m.values()]
    th = list(reg["theta"].values())
    small_error = [reg["theta"][str(t)]["ratio_at_error"]["0.05"] for t in THETAS]
    return {
        # Fig. 3 (a): easy and very hard examples nearly unaffected, the others up-weighted
        "focal_easy_nearly_unchanged": all(
            p["easy_max_abs_change_rel_to_max_grad"] < 0.01 for p in parts
        ),
        "focal_very_hard_nearly_unchanged": all(p["hard_max_rel_change"] < 0.05 for p in parts),
        "focal_medium_raised": all(p["mid_min_ratio"] > 1.1 for p in parts),
        "focal_pos_neg_symmetric_without_alpha": focal["alpha"] >= 0
        or all(m["pos"]["ratio_at"] == m["neg"]["ratio_at"] for m in focal["mu"].values()),
        # fvcore computes in float32: agreement to float32 rounding
        "focal_matches_fvcore": focal["fvcore_max_abs_diff"]
        < 1e-5 * max(focal["focal_max_grad"].values()),
        "focal_gradient_is_base_gradient_at_modulated_point": focal["semantics_max_rel_diff"]
        < 1e-6,
        # Fig. 4: balanced L1 raises inliers over smooth L1; EAPM raises inliers further
        "bl1_raises_inliers_over_smooth_l1": reg["bl1_over_smooth_l1_min_ratio_inliers"] > 1.0,
        "eapm_reg_raises_inliers": all(
            t["inlier_min_ratio"] > 1.0 and t["never_below_balanced_l1"] for t in th
        ),
        "eapm_reg_outliers_unchanged": all(t["outlier_max_rel_change"] < 1e-9 for t in th),
        "eapm_reg_up_weighting_grows_with_shape_variation": all(
            t["ratio_fixed_error_monotone_in_shape_sum"] for t in th
        ),
        "eapm_reg_small_errors_up_weighted_more_for_larger_theta": small_error
        == sorted(small_error),
        "reg_gradient_is_base_gradient_at_modulated_point": reg["semantics_max_rel_diff"] < 1e-6,
    }


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------
COLORS = {None: "tab:blue", 1.0: "tab:orange", 1.5: "tab:green", 2.0: "tab:red"}


def plot_focal(path: str, alpha: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    dif = dif_grid()
    alpha_txt = "alpha disabled" if alpha < 0 else f"alpha = {alpha:g}"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    for ax, (part, positive) in zip(
        axes[:2], (("positives (p* = 1)", True), ("negatives (p* = 0)", False))
    ):
        fl = focal_grad(dif, positive, None, alpha)
        ax.plot(dif, fl, color=COLORS[None], lw=2, label="focal loss")
        for mu in MUS:
            ax.plot(
                dif,
                focal_grad(dif, positive, mu, alpha),
                color=COLORS[mu],
                label=f"EAPM, mu = {mu:g}",
            )
        ax.set_title(f"{part}")
        ax.set_xlabel("Dif = |p - p*|")
        ax.set_ylabel("|dL/dx|")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    ax = axes[2]
    fl = focal_grad(dif, True, None, alpha)
    for mu in MUS:
        ax.plot(dif, focal_grad(dif, True, mu, alpha) / fl, color=COLORS[mu], label=f"mu = {mu:g}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_yticks([1, 1.5, 2, 3, 4, 6, 8])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title("ratio EAPM / focal (pos = neg)")
    ax.set_xlabel("Dif = |p - p*|")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"EAPM with focal loss: gradient w.r.t. the logit (gamma = {GAMMA:g}, {alpha_txt})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_regression(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    err = torch.linspace(0.0, SHAPE_SUM, 301, dtype=DTYPE)[1:]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
    ax = axes[0]
    ax.plot(
        err,
        reg_grad(err, SHAPE_SUM, "smooth_l1"),
        color="tab:gray",
        lw=2,
        label=f"smooth L1 (beta {SMOOTH_L1_BETA:g})",
    )
    ax.plot(
        err, reg_grad(err, SHAPE_SUM, "balanced_l1"), color=COLORS[None], lw=2, label="balanced L1"
    )
    for theta in THETAS:
        ax.plot(
            err,
            reg_grad(err, SHAPE_SUM, "eapm", theta),
            color=COLORS[theta],
            label=f"EAPM, theta = {theta:g}",
        )
    ax.set_title(f"|t_j| + |t*_j| = {SHAPE_SUM:g} (GoS = |d| / {SHAPE_SUM:g})")
    ax.set_xlabel("|d| = |t_j - t*_j|")
    ax.set_ylabel("|dL/dt_j|")
    ax.set_xlim(0, SHAPE_SUM)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    sums = torch.linspace(FIXED_ERROR, 3.0, 55, dtype=DTYPE)
    fixed = torch.full((1,), FIXED_ERROR, dtype=DTYPE)
    bl1 = torch.stack([reg_grad(fixed, float(s), "balanced_l1")[0] for s in sums])
    for theta in THETAS:
        g = torch.stack([reg_grad(fixed, float(s), "eapm", theta)[0] for s in sums])
        ax.plot(sums, g / bl1, color=COLORS[theta], label=f"theta = {theta:g}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title(f"ratio EAPM / balanced L1 at |d| = {FIXED_ERROR:g}")
    ax.set_xlabel("shape variation |t_j| + |t*_j|")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    b = BL1
    fig.suptitle(
        f"EAPM with balanced L1 (alpha {b['alpha']:g}, gamma {b['gamma']:g}, beta {b['beta']:g}): "
        "gradient w.r.t. t_w",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_cross_entropy(path: str) -> None:
    """The Fig. 3 analogue for EAPM cross entropy (R-CNN box classification)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p_y = 1.0 - dif_grid()  # p_y in (0, 1), endpoints excluded
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
    ce = ce_grad(p_y, 0.0)
    for mu in CE_MUS:
        g = ce if mu == 0 else ce_grad(p_y, mu)
        label = "cross entropy (mu = 0)" if mu == 0 else f"EAPM, mu = {mu:g}"
        color = COLORS[None if mu == 0 else mu]
        axes[0].plot(p_y, g, color=color, lw=2 if mu == 0 else 1.5, label=label)
        if mu > 0:
            axes[1].plot(p_y, g / ce, color=color, label=f"mu = {mu:g}")
    ax = axes[0]
    ax.set_title("|dL/dx_y| = MF (1 - p_y)")
    ax.set_xlabel("p_y (probability of the labelled class)")
    ax.set_ylabel("|dL/dx_y|")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax = axes[1]
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title("ratio EAPM / cross entropy (= MF)")
    ax.set_xlabel("p_y")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"EAPM with softmax cross entropy ({CE_CLASSES} classes; Dif = 1 - p_y): gradient w.r.t. "
        "the labelled class's logit",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------
def format_report(props: Dict) -> str:
    f, r, c = props["focal"], props["regression"], props["claims"]
    alpha_txt = "disabled" if f["alpha"] < 0 else f"{f['alpha']:g}"
    lines = [
        "EAPM gradient properties (tools/plot_gradients.py; float64 autograd through eapm.losses)",
        "",
        f"Focal loss, gamma {f['gamma']:g}, alpha {alpha_txt}; "
        f"max |dL/dx| of focal loss: {f['focal_max_grad']}",
        f"  package focal loss vs fvcore's: max |grad diff| {f['fvcore_max_abs_diff']:.2e}",
        f"  EAPM grad vs focal grad at the modulated logit: "
        f"max rel diff {f['semantics_max_rel_diff']:.2e}",
    ]
    for mu, parts in f["mu"].items():
        p = parts["pos"]
        lines += [
            f"  mu {mu}: ratio EAPM/focal at Dif "
            + ", ".join(f"{k}: {v:.3f}" for k, v in p["ratio_at"].items()),
            f"    easy (Dif <= {EASY_DIF}): max |change| {p['easy_max_abs_change']:.4f}"
            f" = {100 * p['easy_max_abs_change_rel_to_max_grad']:.2f}% of the max focal gradient",
            f"    very hard (Dif >= {HARD_DIF}): max |ratio - 1| {p['hard_max_rel_change']:.4f}",
            f"    medium (Dif in {list(MID_RANGE)}): min ratio {p['mid_min_ratio']:.3f};"
            f" largest increase {p['max_abs_increase']:.3f}"
            f" ({100 * p['max_abs_increase_rel_to_max_grad']:.1f}% of the"
            f" max focal gradient) at Dif {p['max_abs_increase_at_dif']};"
            f" ratio < 1 from Dif {p['ratio_falls_below_1_at_dif']}",
        ]
    lines += [
        "",
        f"Balanced L1 (alpha {r['balanced_l1']['alpha']:g}, gamma {r['balanced_l1']['gamma']:g},"
        f" beta {r['balanced_l1']['beta']:g}) at |t_j| + |t*_j| = {r['shape_sum']:g}:",
        f"  balanced L1 / smooth L1 (beta {r['smooth_l1_beta']:g}) on inliers: min ratio"
        f" {r['bl1_over_smooth_l1_min_ratio_inliers']:.3f};"
        f" outlier gradient {r['bl1_outlier_grad']}",
        f"  EAPM grad vs balanced L1 grad at the modulated delta: "
        f"max rel diff {r['semantics_max_rel_diff']:.2e}",
    ]
    for theta, t in r["theta"].items():
        lines += [
            f"  theta {theta}: ratio EAPM/BL1 at |d| "
            + ", ".join(f"{k}: {v:.3f}" for k, v in t["ratio_at_error"].items()),
            f"    inliers: ratio in [{t['inlier_min_ratio']:.4f}, {t['inlier_max_ratio']:.3f}];"
            f" outliers: max |ratio - 1| {t['outlier_max_rel_change']:.1e}",
            f"    at |d| = {r['fixed_error']:g}, ratio by |t|+|t*|: "
            + ", ".join(
                f"{k}: {v:.3f}"
                for k, v in t["ratio_at_fixed_error_by_shape_sum"].items()
                if k in ("0.3", "0.4", "0.6", "1.0", "1.5", "2.0", "3.0")
            ),
        ]
    lines += ["", "Claims:"] + [f"  [{'x' if v else ' '}] {k}" for k, v in c.items()]
    return "\n".join(lines) + "\n"


def compute_properties(alpha: float = -1.0) -> Dict:
    focal = focal_properties(alpha)
    reg = regression_properties()
    return {"focal": focal, "regression": reg, "claims": claims(focal, reg)}


FIGURES = (
    "eapm_focal_gradient.png",
    "eapm_balanced_l1_gradient.png",
    "eapm_cross_entropy_gradient.png",
)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "figures"), help="output folder")
    ap.add_argument(
        "--alpha",
        type=float,
        default=-1.0,
        help="focal loss alpha; < 0 disables it (default, as the paper's Fig. 3)",
    )
    ap.add_argument("--no-plots", action="store_true", help="only compute and write the properties")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    props = compute_properties(args.alpha)
    if not args.no_plots:
        plot_focal(os.path.join(args.out, FIGURES[0]), args.alpha)
        plot_regression(os.path.join(args.out, FIGURES[1]))
        plot_cross_entropy(os.path.join(args.out, FIGURES[2]))
    with open(os.path.join(args.out, "properties.json"), "w") as fh:
        json.dump(props, fh, indent=1)
    report = format_report(props)
    with open(os.path.join(args.out, "properties.txt"), "w") as fh:
        fh.write(report)
    print(report, end="")
    return props


if __name__ == "__main__":
    props = main()
    sys.exit(0 if all(props["claims"].values()) else 1)
