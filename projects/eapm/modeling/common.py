"""Loss pieces shared by the EAPM detectors (RetinaNet, FCOS, the ROI box head).

A strength of 0 (mu or theta) is the one way to say "EAPM off": the loss is then the
base loss, computed by the function detectron2 uses (fvcore's focal loss) or by the
plain balanced L1 kernel. Diagnostics never change which kernel computes a loss: the
histograms are computed beside it, from the public attribute functions.
"""

from __future__ import annotations

import torch
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from fvcore.nn import sigmoid_focal_loss_jit

from ..losses import (
    difficulty,
    eapm_balanced_l1_loss,
    eapm_focal_loss_sum_with_stats,
    gap_over_sum,
    modulate_prediction,
    modulating_factor,
)

__all__ = [
    "dense_loss_normalizer",
    "weighted_loss",
    "dense_focal_loss_sum",
    "model_focal_loss_sum",
    "box_reg_balanced_l1",
    "eapm_iou_box_loss",
    "put_reg_stats",
    "IOU_BOX_LOSSES",
    "EAPM_BOX_LOSSES",
    "check_eapm_box_loss",
]

# detectron2's IoU box losses (on boxes decoded from the deltas): EAPM regression modulates
# their deltas before decoding (``eapm_iou_box_loss``)
IOU_BOX_LOSSES = ("giou", "diou", "ciou")
# the box losses EAPM regression modulates: balanced L1 (the paper's) and the IoU losses
EAPM_BOX_LOSSES = ("balanced_l1",) + IOU_BOX_LOSSES


def check_eapm_box_loss(box_reg_loss_type: str, eapm_reg_theta: float) -> None:
    """Raise ``ValueError`` if EAPM regression (``eapm_reg_theta > 0``) is asked of a box
    loss it cannot modulate (not in ``EAPM_BOX_LOSSES``)."""
    if eapm_reg_theta > 0 and box_reg_loss_type not in EAPM_BOX_LOSSES:
        raise ValueError(
            f"box_reg_loss_type must be one of {EAPM_BOX_LOSSES} for EAPM regression "
            f"(MODEL.EAPM.REG.ENABLED, theta {eapm_reg_theta}), got {box_reg_loss_type!r}"
        )


def dense_loss_normalizer(model, num_pos: int, mode: str, initial: float = 100.0) -> float:
    """The number the dense losses are divided by (a float >= 1).

    "ema": detectron2's per-process exponential moving average of the positive count
    (initial ``initial``, momentum 0.9), through ``DenseDetector._ema_update``.
    "all_reduce": this iteration's positive count averaged over all processes
    (mmdetection's convention), at least 1."""
    if mode == "ema":
        return model._ema_update("loss_normalizer", max(num_pos, 1), initial)
    if comm.get_world_size() > 1:
        t = torch.tensor([float(num_pos)], device=model.device)
        torch.distributed.all_reduce(t)
        num_pos = t.item() / comm.get_world_size()
    return max(float(num_pos), 1.0)


def weighted_loss(loss, weight: float):
    """``loss * weight``; ``loss`` itself (the same tensor, no operation) at weight 1.0, so
    the default is the unweighted loss bit for bit, in value and gradient."""
    return loss if weight == 1.0 else loss * weight


def model_focal_loss_sum(model, logits, targets):
    """``dense_focal_loss_sum`` of ``logits`` / one-hot ``targets`` with the dense detector
    ``model``'s own settings (``eapm_cls_mu``, ``focal_loss_alpha`` / ``gamma``,
    ``histogram_period``, ``compile_kernels``)."""
    return dense_focal_loss_sum(
        logits,
        targets,
        model.eapm_cls_mu,
        model.focal_loss_alpha,
        model.focal_loss_gamma,
        histogram_period=model.histogram_period,
        compile_kernels=model.compile_kernels,
    )


def dense_focal_loss_sum(
    logits,
    targets,
    mu: float,
    alpha: float,
    gamma: float,
    *,
    histogram_period: int = 0,
    compile_kernels: bool = False,
    prefix: str = "eapm/cls",
):
    """The summed classification loss (a scalar) of a dense head on ``logits`` and
    one-hot ``targets`` of the same shape.

    ``mu == 0``: detectron2's own focal loss (fvcore's ``sigmoid_focal_loss_jit``, as
    RetinaNet / FCOS call it). ``mu > 0``: EAPM focal loss; the means of Dif and MF over
    the positives and the negatives, and of MF over all elements (``{prefix}_mf``), go to
    the event storage every iteration (fused into the loss pass), their histograms every
    ``histogram_period`` iterations."""
    if mu == 0:
        return sigmoid_focal_loss_jit(
            logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="sum"
        )
    loss, stats = eapm_focal_loss_sum_with_stats(
        logits, targets, mu, alpha, gamma, compile_kernels=compile_kernels
    )
    storage = get_event_storage()
    dif_pos, dif_neg, mf_pos, mf_neg, n_pos = stats.tolist()
    n_neg = logits.numel() - n_pos
    if n_pos > 0:
        storage.put_scalar(f"{prefix}_dif_pos", dif_pos / n_pos)
        storage.put_scalar(f"{prefix}_mf_pos", mf_pos / n_pos)
    if n_neg > 0:
        storage.put_scalar(f"{prefix}_dif_neg", dif_neg / n_neg)
        storage.put_scalar(f"{prefix}_mf_neg", mf_neg / n_neg)
    if n_pos + n_neg > 0:  # over all examples (the weight of a gradient-scale control)
        storage.put_scalar(f"{prefix}_mf", (mf_pos + mf_neg) / (n_pos + n_neg))
    if histogram_period > 0 and storage.iter % histogram_period == 0:
        with torch.no_grad():
            dif = difficulty(logits, targets)
            mf = modulating_factor(dif, mu)
            pos = targets > 0.5
            for name, values in (("dif", dif), ("mf", mf)):
                for part, mask in (("pos", pos), ("neg", ~pos)):
                    if mask.any():
                        storage.put_histogram(f"{prefix}_{name}_{part}", values[mask])
    return loss


@torch.no_grad()
def put_reg_stats(gos_values, mf, histogram_period: int = 0, prefix: str = "eapm/reg") -> None:
    """The mean GoS and MF of the dw, dh components of a dense head's foreground deltas as
    ``{prefix}_gos`` / ``{prefix}_mf`` in the event storage, their histograms every
    ``histogram_period`` iterations (nothing for no foreground)."""
    if gos_values.numel() == 0:
        return
    storage = get_event_storage()
    storage.put_scalar(f"{prefix}_gos", float(gos_values.mean()))
    storage.put_scalar(f"{prefix}_mf", float(mf.mean()))
    if histogram_period > 0 and storage.iter % histogram_period == 0:
        storage.put_histogram(f"{prefix}_gos", gos_values.flatten())
        storage.put_histogram(f"{prefix}_mf", mf.flatten())


def box_reg_balanced_l1(
    pred_deltas,
    gt_deltas,
    theta: float,
    balanced_l1,
    *,
    histogram_period: int = 0,
    compile_kernels: bool = False,
    prefix: str = "eapm/reg",
):
    """Summed (EAPM) balanced L1 (a scalar) on (P, 4) deltas; ``balanced_l1`` is
    (alpha, gamma, beta). ``theta == 0``: the plain balanced L1 loss. ``theta > 0``: the
    mean GoS and MF of the dw/dh components go to the event storage (histograms every
    ``histogram_period`` iterations)."""
    alpha, gamma, beta = balanced_l1
    if theta > 0 and pred_deltas.numel() > 0:
        with torch.no_grad():
            ea = gap_over_sum(pred_deltas[:, 2:], gt_deltas[:, 2:])
            put_reg_stats(ea, modulating_factor(ea, theta), histogram_period, prefix)
    return eapm_balanced_l1_loss(
        pred_deltas,
        gt_deltas,
        theta,
        alpha,
        gamma,
        beta,
        reduction="sum",
        compile_kernels=compile_kernels,
    )


def eapm_iou_box_loss(
    box2box_transform, anchors, gt_boxes, pred_deltas, gt_deltas, theta, loss_type
):
    """EAPM regression through the general recipe with detectron2's IoU losses: the dw, dh
    of the (P, 4) ``pred_deltas`` are modulated by their Gap-over-Sum factor,
    ``t' = t* + MF (t - t*)`` with ``MF = 1 + tanh(theta) - tanh(theta GoS)`` (dx, dy as
    predicted), decoded on the (P, 4) ``anchors`` (proposals for the ROI heads) and given to
    detectron2's ``loss_type`` ("giou", "diou", "ciou") against the (P, 4) ``gt_boxes``. The
    gradient reaching ``pred_deltas`` is the IoU loss's gradient at ``t'`` (MF not
    differentiated). Returns the summed loss and the (P, 2) GoS and MF of dw, dh."""
    pred_mod, ea, mf = modulate_prediction(
        pred_deltas, gt_deltas, "gap_over_sum", theta, modulated_columns=(2, 3)
    )
    loss = _dense_box_regression_loss(
        [anchors],
        box2box_transform,
        [pred_mod.unsqueeze(0)],
        [gt_boxes],
        ...,
        loss_type,
    )
    return loss, ea[:, 2:], mf[:, 2:]
