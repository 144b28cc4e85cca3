"""Pieces shared by the EAPM dense detectors (RetinaNet, FCOS)."""
from __future__ import annotations

import torch
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..losses import eapm_balanced_l1_loss, eapm_focal_terms, gap_over_sum, modulating_factor

__all__ = ["dense_loss_normalizer", "eapm_focal_loss_sum", "box_reg_balanced_l1"]


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


def _put_stats(prefix: str, values: torch.Tensor, mask: torch.Tensor, hist: bool) -> None:
    storage = get_event_storage()
    n = int(mask.sum())
    if n == 0:
        return
    sel = values.masked_select(mask) if hist else None
    mean = sel.mean() if sel is not None else (values * mask).sum() / n
    storage.put_scalar(prefix, float(mean))
    if hist:
        storage.put_histogram(prefix, sel.float())


def eapm_focal_loss_sum(logits, targets, mu, alpha, gamma, hist_period: int = 0, prefix: str = "eapm/cls"):
    """Summed EAPM focal loss, with the means of Dif and MF over positives and negatives
    (and, every ``hist_period`` iterations, their histograms) put in the event storage."""
    loss, dif, mf = eapm_focal_terms(logits, targets, mu, alpha, gamma)
    storage = get_event_storage()
    hist = hist_period > 0 and storage.iter % hist_period == 0
    with torch.no_grad():
        pos = targets > 0.5
        _put_stats(f"{prefix}_dif_pos", dif, pos, hist)
        _put_stats(f"{prefix}_dif_neg", dif, ~pos, hist)
        _put_stats(f"{prefix}_mf_pos", mf, pos, hist)
        _put_stats(f"{prefix}_mf_neg", mf, ~pos, hist)
    return loss.sum()


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
                storage.put_histogram(f"{prefix}_gos", gos)
                storage.put_histogram(f"{prefix}_mf", mf)
    return eapm_balanced_l1_loss(pred_deltas, gt_deltas, theta, alpha, gamma, beta, reduction="sum")
