"""GHM-C and GHM-R (Li, Liu, Wang, "Gradient harmonized single-stage detector", AAAI 2019;
mmdetection's ``GHMC`` / ``GHMR``): the losses the paper compares EAPM with (its Table 3).

``GHMC`` / ``GHMR`` are ``torch.nn.Module``s (the moving average of the bin counts is a
buffer saved in checkpoints); ``check_ghm_params`` validates their parameters and
``ghm_bin_index`` is the binning rule. Under DDP the bin counts can be summed over the
processes (``all_reduce=True``; ``torch.distributed`` directly).

Pure torch, no detectron2 import.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .checks import check_number
from .runtime import _to_float

__all__ = ["check_ghm_params", "ghm_bin_index", "GHMC", "GHMR"]


def check_ghm_params(
    bins: Optional[int] = None,
    momentum: Optional[float] = None,
    mu: Optional[float] = None,
    loss_weight: Optional[float] = None,
) -> None:
    """Raise ``ValueError`` unless each given GHM parameter is valid: ``bins`` an integer
    >= 1, ``momentum`` a finite number in [0, 1), ``mu`` (GHM-R) a finite number > 0,
    ``loss_weight`` a finite number >= 0. Arguments left at None are not checked."""

    if bins is not None:
        check_number(bins, "GHM bins", 1, integer=True)
    if momentum is not None:
        check_number(momentum, "GHM momentum", 0, 1, hi_open=True)
    if mu is not None:
        check_number(mu, "GHM-R mu", 0, lo_open=True)
    if loss_weight is not None:
        check_number(loss_weight, "GHM loss weight", 0)


def ghm_bin_index(g: Tensor, edges: Tensor) -> Tensor:
    """The bin of each element of ``g`` by mmdetection's rule: ``i`` where
    ``edges[i] <= g < edges[i + 1]`` (``edges`` increasing, ``bins + 1`` values), ``-1``
    below the first edge, ``bins`` at or above the last. One vectorised pass
    (``torch.bucketize`` with ``right=True``), no host synchronisation. ``edges`` is used
    in ``g``'s dtype (float32 edges are exact in float64, as in mmdetection's comparisons
    of float64 values with a float32 edge tensor)."""
    return torch.bucketize(g, edges.to(g.dtype), right=True) - 1


def _world_size() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


class _GHMBase(torch.nn.Module):
    """The gradient-density weighting shared by GHM-C and GHM-R (mmdetection's rule).

    Elements are binned by their gradient norm ``g`` on the edges ``i / bins``
    (i = 0..bins; the last edge replaced by ``last_edge``): element in bin i iff
    ``edges[i] <= g < edges[i + 1]``, only valid elements counted. With ``tot`` the
    number of valid elements (at least 1), ``c_i`` the count of bin i and ``n`` the number
    of non-empty bins, an element of a non-empty bin i weighs ``tot / acc_i / n`` with
    ``acc_i = m acc_i + (1 - m) c_i`` (the buffer ``acc_sum``, updated for non-empty bins
    only) when momentum m > 0, ``tot / c_i / n`` when m = 0; other elements weigh 0.

    Unlike mmdetection's loop (one ``.item()`` per bin), the bins are counted in one
    vectorised pass (``torch.bucketize`` on the same float32 edge tensor, ``right=True``,
    which is exactly the ``>= / <`` rule) and the weights are formed on the device: no host
    synchronisation. With ``all_reduce`` (and an initialised process group of > 1
    processes) the bin counts and ``tot`` are summed over all processes before the update,
    so every process holds the same ``acc_sum`` and the weights do not depend on the number
    of processes; each process's loss is then its share of the global sum divided by the
    mean ``tot`` per process (DDP's gradient average gives the one-process loss).
    """

    def __init__(self, bins: int, momentum: float, last_edge: float, all_reduce: bool):
        super().__init__()
        check_ghm_params(bins=bins, momentum=momentum)
        self.bins = int(bins)
        self.momentum = float(momentum)
        self.all_reduce = bool(all_reduce)
        edges = torch.arange(self.bins + 1).float() / self.bins
        if last_edge > 1:
            edges[-1] = last_edge
        else:
            edges[-1] += 1e-6
        # derived from bins: not part of the state (not saved)
        self.register_buffer("edges", edges, persistent=False)
        # the moving average of the bin counts: saved in checkpoints, restored on resume
        self.register_buffer("acc_sum", torch.zeros(self.bins))

    def extra_repr(self) -> str:
        return f"bins={self.bins}, momentum={self.momentum}, all_reduce={self.all_reduce}"

    @torch.no_grad()
    def _weights(self, g: Tensor, valid: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(per-element weights of g's shape, normaliser of the summed weighted loss), both
        without gradient, in g's dtype. Updates ``acc_sum`` when momentum > 0."""
        bins = self.bins
        idx = ghm_bin_index(g, self.edges)
        inside = (idx >= 0) & (idx < bins)  # g < 0 or g >= the last edge: in no bin
        if valid is not None:
            inside &= valid
        where = torch.where(inside, idx, bins).reshape(-1)  # bin `bins`: not counted
        counts = torch.zeros(bins + 2, dtype=torch.float64, device=g.device)
        counts.index_add_(0, where, torch.ones_like(where, dtype=torch.float64))
        # tot: the number of valid elements (mmdetection counts valid ones, also those in no bin)
        num_valid = g.numel() if valid is None else valid.sum()
        counts[bins + 1] = num_valid
        world = _world_size() if self.all_reduce else 1
        if world > 1:
            torch.distributed.all_reduce(counts)
        c = counts[:bins].float()
        tot = counts[bins + 1].float().clamp_min(1.0)
        nonempty = c > 0
        n = nonempty.sum().clamp_min(1)
        if self.momentum > 0:
            m = self.momentum
            acc = torch.where(
                nonempty, m * self.acc_sum.float() + (1 - m) * c, self.acc_sum.float()
            )
            self.acc_sum.copy_(acc)
            denom = acc
        else:
            denom = c
        per_bin = torch.where(nonempty, tot / denom.clamp_min(1e-12), torch.zeros_like(c)) / n
        per_bin = torch.cat([per_bin, per_bin.new_zeros(1)]).to(g.dtype)
        weights = per_bin[torch.where(inside, idx, bins)]
        # each process's share: global sum / (global tot / world) = mean tot per process
        return weights, (tot / world).to(g.dtype)

    @staticmethod
    def _inputs(pred: Tensor, target: Tensor, valid: Optional[Tensor]):
        if target.shape != pred.shape:
            raise ValueError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same "
                "shape"
            )
        if valid is not None:
            if valid.dtype != torch.bool or valid.shape != pred.shape:
                raise ValueError(
                    f"valid must be a boolean mask of pred's shape {tuple(pred.shape)}, got "
                    f"{valid.dtype} {tuple(valid.shape)}"
                )
        x = _to_float(pred)
        return x, target.to(x.dtype)


class GHMC(_GHMBase):
    """GHM-C loss (mmdetection's ``GHMC`` with ``use_sigmoid=True``): sigmoid binary cross
    entropy per element, weighted by the inverse gradient density.

    Args:
        bins: number of gradient-norm bins (>= 1) on [0, 1]; the last edge is 1 + 1e-6.
        momentum: m in [0, 1) of the moving average of the bin counts (0 = this call's
            counts only).
        all_reduce: under DDP, sum the bin counts over all processes (see ``_GHMBase``);
            default False: per process, as mmdetection.

    ``forward(pred, target, valid=None)``: ``pred`` logits and ``target`` in [0, 1] of the
    same shape (e.g. (anchors, classes) with one-hot targets), ``valid`` a boolean mask of
    pred's shape (False = ignored; None = every element valid). Returns the scalar
    ``sum(w * BCE(pred, target)) / tot`` (``tot`` = number of valid elements, at least 1),
    float32 (float64 for float64 input) whatever pred's dtype or the autocast state;
    the loss weight is not applied. ``g = |sigmoid(pred) - target|`` and the weights ``w``
    carry no gradient. No valid element: 0 with a gradient path. Updates ``acc_sum``.
    """

    def __init__(self, bins: int = 30, momentum: float = 0.75, all_reduce: bool = False):
        super().__init__(bins, momentum, 1.0, all_reduce)

    def forward(self, pred: Tensor, target: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            x, t = self._inputs(pred, target, valid)
            g = (torch.sigmoid(x.detach()) - t).abs_()
            w, tot = self._weights(g, valid)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                x, t, weight=w, reduction="sum"
            )
            return loss / tot


class GHMR(_GHMBase):
    """GHM-R loss (mmdetection's ``GHMR``): the authentic smooth L1 (ASL1)
    ``sqrt(d^2 + mu^2) - mu`` of ``d = pred - target``, weighted by the inverse density of
    its gradient norm ``g = |d| / sqrt(d^2 + mu^2)`` in [0, 1).

    Args:
        mu: the ASL1 smoothing (> 0), mmdetection's 0.02.
        bins: number of gradient-norm bins (>= 1); the last edge is 1e3.
        momentum: m in [0, 1) of the moving average of the bin counts.
        all_reduce: as ``GHMC``.

    ``forward(pred, target, valid=None)``: regression outputs and targets of the same
    shape (e.g. (positives, 4) box deltas), ``valid`` a boolean mask of pred's shape
    (None = every element valid). Returns the scalar ``sum(w * ASL1) / tot`` (``tot`` =
    number of valid coordinates, at least 1; not the number of positive anchors), float32
    (float64 for float64 input); the loss weight is not applied; weights carry no gradient.
    No valid element: 0 with a gradient path. Updates ``acc_sum``.
    """

    def __init__(
        self, mu: float = 0.02, bins: int = 10, momentum: float = 0.7, all_reduce: bool = False
    ):
        check_ghm_params(mu=mu)
        super().__init__(bins, momentum, 1e3, all_reduce)
        self.mu = float(mu)

    def extra_repr(self) -> str:
        return f"mu={self.mu}, " + super().extra_repr()

    def forward(self, pred: Tensor, target: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            x, t = self._inputs(pred, target, valid)
            mu = self.mu
            d = x - t
            root = torch.sqrt(d * d + mu * mu)
            g = (d.detach() / root.detach()).abs_()
            w, tot = self._weights(g, valid)
            return ((root - mu) * w).sum() / tot
