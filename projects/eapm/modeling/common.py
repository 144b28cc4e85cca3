"""Pieces shared by the EAPM dense detectors (RetinaNet, FCOS)."""
from __future__ import annotations

import torch
from detectron2.utils import comm
from fvcore.nn import sigmoid_focal_loss_jit
from detectron2.utils.events import get_event_storage

from ..losses import (
    eapm_balanced_l1_loss,
    eapm_focal_loss_sum_with_stats,
    eapm_focal_terms,
    gap_over_sum,
    modulating_factor,
)

__all__ = ["dense_loss_normalizer", "dense_focal_loss_sum", "eapm_focal_loss_sum", "box_reg_balanced_l1"]


def dense_loss_normalizer(model, num_pos: int, mode: str, name: str = "loss_normalizer", initial: float = 100.0) -> float:
    """The number the dense losses are divided by.

    "ema": detectron2's per-process exponential moving average of the positive count
    (initial ``initial``, momentum 0.9), exactly as ``DenseDetector._ema_update``.
    "all_reduce": this iteration's positive count averaged over all processes
    (mmdetection's convention), at least 1."""
    if mode == "ema":
        return model._ema_update(name, max(num_pos, 1), initial)
    if mode == "all_reduce":
        if comm.get_world_size() > 1:
            t = torch.tensor([float(num_pos)], device=model.device)
            torch.distributed.all_reduce(t)
            num_pos = t.item() / comm.get_world_size()
        return max(float(num_pos), 1.0)
    raise ValueError(f"Unknown MODEL.LOSS_NORMALIZER.TYPE {mode!r}")


def dense_focal_loss_sum(logits, targets, mu, alpha, gamma, hist_period: int = 0):
    """The summed classification loss of a dense head: detectron2's own (fvcore's
    ``sigmoid_focal_loss_jit``, exactly as RetinaNet / FCOS call it) when ``mu`` is None,
    else EAPM focal loss with diagnostics (``eapm_focal_loss_sum``)."""
    if mu is None:
        return sigmoid_focal_loss_jit(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="sum")
    return eapm_focal_loss_sum(logits, targets, mu, alpha, gamma, hist_period)


def eapm_focal_loss_sum(logits, targets, mu, alpha, gamma, hist_period: int = 0, prefix: str = "eapm/cls"):
    """Summed EAPM focal loss; the means of Dif and MF over positives and negatives go
    to the event storage (fused into the loss pass), and every ``hist_period``
    iterations their histograms."""
    storage = get_event_storage()
    if hist_period > 0 and storage.iter % hist_period == 0:
        loss, dif, mf = eapm_focal_terms(logits, targets, mu, alpha, gamma)
        pos = targets > 0.5
        for name, values in (("dif", dif), ("mf", mf)):
            for part, mask in (("pos", pos), ("neg", ~pos)):
                if mask.any():
                    sel = values[mask]
                    storage.put_scalar(f"{prefix}_{name}_{part}", float(sel.mean()))
                    storage.put_histogram(f"{prefix}_{name}_{part}", sel)
        return loss.sum()
    loss, stats = eapm_focal_loss_sum_with_stats(logits, targets, mu, alpha, gamma)
    dif_pos, dif_neg, mf_pos, mf_neg, n_pos = stats.tolist()
    n_neg = logits.numel() - n_pos
    if n_pos > 0:
        storage.put_scalar(f"{prefix}_dif_pos", dif_pos / n_pos)
        storage.put_scalar(f"{prefix}_mf_pos", mf_pos / n_pos)
    if n_neg > 0:
        storage.put_scalar(f"{prefix}_dif_neg", dif_neg / n_neg)
        storage.put_scalar(f"{prefix}_mf_neg", mf_neg / n_neg)
    return loss


def box_reg_balanced_l1(pred_deltas, gt_deltas, theta, balanced_l1, histogram_period=0, prefix="eapm/reg"):
    """Summed (EAPM) balanced L1 on (P, 4) deltas; with EAPM on, the mean GoS and MF of
    the dw/dh components go to the event storage (histograms every ``histogram_period``)."""
    alpha, gamma, beta = balanced_l1
    if theta is None:
        return eapm_balanced_l1_loss(pred_deltas, gt_deltas, 0.0, alpha, gamma, beta, reduction="sum")
    if pred_deltas.numel() > 0:
        with torch.no_grad():
            gos = gap_over_sum(pred_deltas[:, 2:], gt_deltas[:, 2:])
            mf = modulating_factor(gos, theta)
            storage = get_event_storage()
            storage.put_scalar(f"{prefix}_gos", float(gos.mean()))
            storage.put_scalar(f"{prefix}_mf", float(mf.mean()))
            if histogram_period > 0 and storage.iter % histogram_period == 0:
                storage.put_histogram(f"{prefix}_gos", gos.flatten())
                storage.put_histogram(f"{prefix}_mf", mf.flatten())
    return eapm_balanced_l1_loss(pred_deltas, gt_deltas, theta, alpha, gamma, beta, reduction="sum")
