"""eapm/losses/ghm.py: GHM-C / GHM-R (eapm.losses.GHMC / GHMR) against an independent float64
loop evaluation of mmdetection's formulas (``RefGHM`` in tests/helpers.py, mmdetection's rule
written out element by element). (GHM RetinaNet, EAPMRetinaNet with MODEL.GHM /
"ghm_r": test_retinanet.py.)"""

import math

import numpy as np
import pytest
import torch

from eapm.losses import GHMC, GHMR, check_ghm_params, ghm_bin_index
from eapm.utils.testing import HostSyncCounter
from tests.helpers import RefGHM, ref_edges


def logits_with_g(g, t):
    """Logits whose gradient norm |sigmoid(x) - t| is g (t in {0, 1})."""
    p = np.where(t > 0.5, 1 - g, g)
    return np.log(p) - np.log1p(-p)


def cls_inputs(seed, n=300, bins=30, used_bins=None):
    """(x, t, valid) with every g at least 10% of a bin width away from a bin edge, so that
    float32 and float64 agree on the bins; valid has ~15% ignored elements."""
    rng = np.random.default_rng(seed)
    t = (rng.random(n) < 0.2).astype(np.float64)
    k = rng.integers(0, bins, n) if used_bins is None else rng.choice(used_bins, n)
    g = (k + 0.1 + 0.8 * rng.random(n)) / bins
    x = logits_with_g(g, t)
    valid = rng.random(n) > 0.15
    return x, t, valid


def torch_of(x, t, valid, dtype=torch.float32):
    return (
        torch.tensor(x, dtype=dtype).reshape(-1, 10).requires_grad_(),
        torch.tensor(t, dtype=dtype).reshape(-1, 10),
        torch.tensor(valid).reshape(-1, 10),
    )


# ----------------------------------------------------------------------------
# GHM-C
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.75, 0.0])
def test_ghmc_value_grad_and_momentum_over_calls(momentum):
    mod, ref = GHMC(bins=30, momentum=momentum), RefGHM(30, momentum)
    for call in range(4):  # the moving average carries over the calls
        x, t, valid = cls_inputs(call, used_bins=[0, 1, 2, 5, 17, 29] if call == 2 else None)
        xt, tt, vt = torch_of(x, t, valid)
        loss = mod(xt, tt, vt)
        loss.backward()
        ref_loss, ref_grad = ref.ghmc(x, t, valid)
        assert loss.dtype == torch.float32 and loss.shape == ()
        assert loss.item() == pytest.approx(ref_loss, rel=2e-5)
        np.testing.assert_allclose(xt.grad.flatten().numpy(), ref_grad, rtol=2e-5, atol=1e-9)
        np.testing.assert_allclose(mod.acc_sum.numpy(), ref.acc, rtol=1e-6)
        # ignored elements get no gradient
        assert (xt.grad.flatten()[~torch.tensor(valid)] == 0).all()
    if momentum > 0:
        assert (mod.acc_sum > 0).sum() > 6  # several bins were filled over the calls


def test_ghmc_weights_carry_no_gradient():
    """If the weights (through g = |sigmoid(x) - t|) were differentiated, the gradient
    would not be the closed form w (sigmoid(x) - t) / tot checked above; here also directly:
    the gradient is linear in the loss' bce part only."""
    x, t, valid = cls_inputs(7)
    xt, tt, vt = torch_of(x, t, valid)
    mod = GHMC(momentum=0.0)
    loss = mod(xt, tt, vt)
    (gx,) = torch.autograd.grad(loss, xt)
    with torch.no_grad():
        w, tot = GHMC(momentum=0.0)._weights((xt.sigmoid() - tt).abs(), vt)
    assert not w.requires_grad and not tot.requires_grad
    torch.testing.assert_close(gx, w * (xt.detach().sigmoid() - tt) / tot)


def test_ghmc_empty_bins_and_single_bin():
    """Only 2 of 30 bins non-empty: n = 2; the other bins' acc stays 0, nothing is NaN."""
    x, t, valid = cls_inputs(3, used_bins=[4, 20])
    xt, tt, vt = torch_of(x, t, valid)
    mod, ref = GHMC(), RefGHM(30, 0.75)
    loss = mod(xt, tt, vt)
    assert loss.item() == pytest.approx(ref.ghmc(x, t, valid)[0], rel=2e-5)
    assert set(torch.nonzero(mod.acc_sum).flatten().tolist()) == {4, 20}
    # one element: weight tot / acc / n = 1 / 0.25
    one = GHMC()
    v = one(torch.tensor([[0.3]]), torch.tensor([[1.0]]))
    bce = math.log1p(math.exp(-0.3))
    assert v.item() == pytest.approx(bce / 0.25, rel=1e-6)


def test_ghmc_no_valid_element_and_empty_input():
    for x, t, valid in (
        (torch.randn(5, 4), torch.zeros(5, 4), torch.zeros(5, 4, dtype=torch.bool)),
        (torch.zeros(0, 80), torch.zeros(0, 80), None),
    ):
        x.requires_grad_()
        mod = GHMC()
        loss = mod(x, t, valid)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.isfinite(x.grad).all() and (x.grad == 0).all()
        assert (mod.acc_sum == 0).all()  # no non-empty bin: nothing updated


def test_ghmc_valid_none_is_all_valid_and_ignored_elements_do_not_count():
    x, t, valid = cls_inputs(11)
    xt, tt, _ = torch_of(x, t, valid)
    a = GHMC()(xt, tt)
    b = GHMC()(xt, tt, torch.ones_like(tt, dtype=torch.bool))
    assert a.item() == b.item()
    # changing an ignored element's logit changes nothing
    _, _, vt = torch_of(x, t, valid)
    x2 = xt.detach().clone()
    x2[~vt] = 50.0
    assert GHMC()(xt, tt, vt).item() == GHMC()(x2, tt, vt).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ghm_low_precision_inputs_compute_in_float32(dtype):
    x, t, valid = cls_inputs(5)
    xt, tt, vt = torch_of(x, t, valid, dtype)
    loss = GHMC()(xt, tt, vt)
    assert loss.dtype == torch.float32
    # the same as float32 computation on the up-cast values
    x32 = xt.detach().float().requires_grad_()
    ref = GHMC()(x32, tt.float(), vt)
    assert loss.item() == ref.item()
    loss.backward()
    ref.backward()
    assert xt.grad.dtype == dtype and torch.isfinite(xt.grad.float()).all()
    torch.testing.assert_close(xt.grad.float(), x32.grad.to(dtype).float())
    # GHM-R too, and under autocast
    p = (torch.randn(40, 4) * 0.05).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = GHMR()(p, torch.zeros(40, 4, dtype=dtype))
    assert r.dtype == torch.float32
    assert r.item() == GHMR()(p.detach().float(), torch.zeros(40, 4)).item()


def test_ghm_float64_stays_float64():
    x, t, valid = cls_inputs(2)
    xt, tt, vt = torch_of(x, t, valid, torch.float64)
    loss = GHMC()(xt, tt, vt)
    assert loss.dtype == torch.float64
    # the moving average is a float32 buffer (as mmdetection's): weights to float32 precision
    assert loss.item() == pytest.approx(RefGHM(30, 0.75).ghmc(x, t, valid)[0], rel=1e-6)


def test_bin_edges_follow_the_ge_lt_rule():
    """An element exactly on a bin edge (and one float32 ulp either side) lands in the
    bin that mmdetection's `g >= edges[i] & g < edges[i + 1]` selects."""
    for mod in (GHMC(bins=30), GHMR(bins=10), GHMC(bins=7)):
        edges = mod.edges
        assert edges.dtype == torch.float32
        below = torch.nextafter(edges, torch.tensor(-1.0))
        above = torch.nextafter(edges, torch.tensor(2e3))
        g = torch.cat([edges, below, above, torch.tensor([0.0, 1.0, 0.5])]).clamp_min(0)
        idx = ghm_bin_index(g, edges)
        bins = len(edges) - 1
        expect = torch.full_like(idx, -1)
        for i in range(bins):  # the mask rule, elementwise comparisons in float32
            expect[(g >= edges[i]) & (g < edges[i + 1])] = i
        expect[g >= edges[-1]] = bins
        assert torch.equal(idx, expect)
        # an element on edge i is in bin i (not i - 1)
        assert torch.equal(idx[: bins + 1], torch.arange(bins + 1))
    # the edges are mmdetection's float32 values
    assert GHMC(bins=30).edges.tolist() == pytest.approx(ref_edges(30, None), abs=0)
    assert GHMR(bins=10).edges.tolist() == pytest.approx(ref_edges(10, 1e3), abs=0)


def test_ghm_state_is_a_buffer_in_the_state_dict():
    mod = GHMC(bins=5)
    assert list(mod.state_dict()) == ["acc_sum"]  # the edges are derived, not saved
    mod(torch.randn(10, 3), torch.zeros(10, 3))
    other = GHMC(bins=5)
    other.load_state_dict(mod.state_dict())
    assert torch.equal(other.acc_sum, mod.acc_sum) and mod.acc_sum.sum() > 0


def test_ghm_no_host_synchronisation():
    x, t, valid = cls_inputs(1)
    xt, tt, vt = torch_of(x, t, valid)
    for mod, args in ((GHMC(), (xt, tt, vt)), (GHMR(), (xt, tt, vt)), (GHMC(), (xt, tt))):
        with HostSyncCounter() as c:
            mod(*args).backward()
        assert c.count == 0, c.ops
    with HostSyncCounter() as c:  # the counter counts
        xt.sum().item()
        xt[vt].sum()
    assert c.ops == ["_local_scalar_dense", "index"]


def test_ghm_argument_checks():
    for kwargs in ({"bins": 0}, {"bins": 2.0}, {"momentum": 1.0}, {"momentum": -0.1}):
        with pytest.raises(ValueError, match="GHM"):
            GHMC(**kwargs)
    with pytest.raises(ValueError, match="mu"):
        GHMR(mu=0.0)
    with pytest.raises(ValueError, match="loss weight"):
        check_ghm_params(loss_weight=float("nan"))
    with pytest.raises(ValueError, match="same shape"):
        GHMC()(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="boolean mask"):
        GHMC()(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3, 2))


# ----------------------------------------------------------------------------
# GHM-R
# ----------------------------------------------------------------------------
def reg_inputs(seed, n=200, bins=10, mu=0.02):
    """Deltas whose g = |d| / sqrt(d^2 + mu^2) stays away from the bin edges."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, bins, n)
    g = (k + 0.1 + 0.8 * rng.random(n)) / bins
    d = mu * g / np.sqrt(1 - g * g) * np.where(rng.random(n) < 0.5, -1, 1)
    t = rng.normal(size=n)
    valid = rng.random(n) > 0.2
    return t + d, t, valid


@pytest.mark.parametrize("momentum", [0.7, 0.0])
def test_ghmr_value_grad_and_momentum_over_calls(momentum):
    mod, ref = GHMR(mu=0.02, bins=10, momentum=momentum), RefGHM(10, momentum, last=1e3)
    for call in range(3):
        x, t, valid = reg_inputs(call)
        xt, tt, vt = torch_of(x, t, valid, torch.float64)
        loss = mod(xt, tt, vt)
        loss.backward()
        ref_loss, ref_grad = ref.ghmr(list(x), list(t), list(valid), 0.02)
        # float64 input; the weights have float32 precision (float32 moving average)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
        np.testing.assert_allclose(xt.grad.flatten().numpy(), ref_grad, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(mod.acc_sum.numpy(), ref.acc, rtol=1e-6)
        # float32 input: same to float32 rounding (bins far from the edges)
        x32 = torch.tensor(x, dtype=torch.float32).reshape(-1, 10)
        assert GHMR(momentum=0.0)(x32, tt.float(), vt).item() == pytest.approx(
            RefGHM(10, 0.0, last=1e3).ghmr(list(x), list(t), list(valid), 0.02)[0], rel=1e-3
        )


def test_ghmr_no_valid_element_and_large_errors():
    p = torch.randn(6, 4, requires_grad=True)
    loss = GHMR()(p, torch.zeros(6, 4), torch.zeros(6, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (p.grad == 0).all()
    # errors of 1e4: g rounds to 1.0 in float32, still below the last edge 1e3: counted
    big = torch.full((1, 4), 1e4, requires_grad=True)
    mod = GHMR()
    v = mod(big, torch.zeros(1, 4))
    assert mod.acc_sum[-1].item() == pytest.approx(0.3 * 4)
    # weight tot / acc / n = 4 / 1.2, ASL1 = sqrt(1e8 + mu^2) - mu
    assert v.item() == pytest.approx((4 / 1.2) * 4 * (1e4 - 0.02) / 4, rel=1e-6)


# ----------------------------------------------------------------------------
# all-reduced bin counts (2 CPU processes over GLOO)
# ----------------------------------------------------------------------------
def _ddp_worker(rank, world, port, results):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    x, t, valid = cls_inputs(0, n=400)
    xt, tt, vt = torch_of(x, t, valid)
    half = xt.shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    out = {}
    for all_reduce in (True, False):
        mod = GHMC(all_reduce=all_reduce)
        xs = xt.detach()[sl].clone().requires_grad_()
        for _ in range(2):
            xs.grad = None
            loss = mod(xs, tt[sl], vt[sl])
            loss.backward()
        # DDP averages the processes' gradients: this half's share is its gradient / world
        out[all_reduce] = (mod.acc_sum.clone(), xs.grad.clone() / world)
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.slow
def test_ghm_all_reduce_makes_weights_independent_of_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    # one process on all the data, two calls
    x, t, valid = cls_inputs(0, n=400)
    xt, tt, vt = torch_of(x, t, valid)
    one = GHMC()
    for _ in range(2):
        xt.grad = None
        one(xt, tt, vt).backward()
    r0, r1 = results[0], results[1]
    acc0, grad0 = r0[True]
    acc1, grad1 = r1[True]
    torch.testing.assert_close(acc0, one.acc_sum)
    torch.testing.assert_close(acc1, one.acc_sum)
    # the averaged gradient of the two halves is the one-process gradient on each half
    torch.testing.assert_close(grad0, xt.grad[:20], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad1, xt.grad[20:], rtol=1e-5, atol=1e-9)
    # per process (the default): each process's state is its own half's
    assert not torch.allclose(r0[False][0], one.acc_sum)
