"""GHM-C fwd+bwd (eapm.losses.GHMC, bins 30, momentum 0.75) vs fvcore's
sigmoid_focal_loss_jit on --ghm-anchors x 80 logits (default 50000), and a per-bin
loop of mmdetection's algorithm; host synchronisations per call of GHMC, GHMR and
the loop, counted with eapm.utils.testing.HostSyncCounter."""

from __future__ import annotations

import sys

import torch

from eapm.utils.benchmark import interleaved, make_sync

from . import register


def _ghmc_per_bin_loop(pred, target, valid, edges, acc, momentum):
    """GHM-C computed the way mmdetection's ``GHMC.forward`` does it (written from the
    formulation, for comparison): one mask, one ``.item()`` and one masked write per bin."""
    g = (pred.detach().sigmoid() - target).abs()
    tot = max(valid.float().sum().item(), 1.0)
    weights = torch.zeros_like(pred)
    n = 0
    for i in range(len(edges) - 1):
        inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
        count = inds.sum().item()
        if count > 0:
            acc[i] = momentum * acc[i] + (1 - momentum) * count
            weights[inds] = tot / acc[i]
            n += 1
    if n > 0:
        weights = weights / n
    return (
        torch.nn.functional.binary_cross_entropy_with_logits(pred, target, weights, reduction="sum")
        / tot
    )


@register("ghm")
def run(args, reporter) -> None:
    from fvcore.nn import sigmoid_focal_loss_jit

    from eapm.losses import GHMC, GHMR
    from eapm.utils.testing import HostSyncCounter

    sync = make_sync(args.device)
    n = args.ghm_anchors
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, 80, generator=g) * 3).to(args.device).requires_grad_()
    t = (torch.rand(n, 80, generator=g) < 0.01).float().to(args.device)
    valid = (torch.rand(n, 1, generator=g) > 0.05).expand(n, 80).to(args.device)
    ghmc = GHMC(bins=30, momentum=0.75).to(args.device)
    loop_edges = ghmc.edges.clone()
    loop_acc = torch.zeros(30, device=args.device)

    def d2():
        sigmoid_focal_loss_jit(x, t, alpha=0.25, gamma=2.0, reduction="sum").backward()
        x.grad = None

    def ghm():
        ghmc(x, t, valid).backward()
        x.grad = None

    def loop():
        _ghmc_per_bin_loop(x, t, valid, loop_edges, loop_acc, 0.75).backward()
        x.grad = None

    fns = {"d2 fvcore sigmoid_focal_loss_jit": d2, "eapm GHMC": ghm, "GHM-C per-bin loop": loop}
    times = interleaved(fns, args.repeats, args.warmup, sync)
    reporter.timings(
        f"[ghm] GHM-C fwd+bwd, {n} x 80, {args.device}", times, "d2 fvcore sigmoid_focal_loss_jit"
    )
    # host synchronisations per call (forward + backward)
    ghmr = GHMR().to(args.device)
    p = (torch.randn(n // 20, 4, generator=g) * 0.1).to(args.device).requires_grad_()
    q = torch.zeros_like(p)
    counts = {}
    for name, fn in (
        ("eapm GHMC", lambda: ghmc(x, t, valid).backward()),
        ("eapm GHMR", lambda: ghmr(p, q).backward()),
        (
            "GHM-C per-bin loop",
            lambda: _ghmc_per_bin_loop(x, t, valid, loop_edges, loop_acc, 0.75).backward(),
        ),
    ):
        with HostSyncCounter() as c:
            fn()
        counts[name] = c.count
        x.grad = p.grad = None
    print("\n## [ghm] host synchronisations per call (forward + backward)")
    for name, c in counts.items():
        print(f"  syncs {name}: {c}")
    reporter.results["[ghm] host synchronisations per call"] = {"syncs": counts}
    sys.stdout.flush()
