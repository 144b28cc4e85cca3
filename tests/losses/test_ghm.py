"""GHM-C / GHM-R (eapm.losses.GHMC / GHMR) against an independent float64 loop evaluation
of mmdetection's formulas, and GHM RetinaNet (EAPMRetinaNet with MODEL.GHM / "ghm_r")."""

import math
import os

import numpy as np
import pytest
import torch

from eapm.losses import GHMC, GHMR, check_ghm_params, ghm_bin_index
from eapm.utils.testing import HostSyncCounter, make_batch, tiny_cfg
from tests.helpers import REPO


# ----------------------------------------------------------------------------
# the reference: mmdetection's rule written out element by element in float64
# ----------------------------------------------------------------------------
def ref_edges(bins, last):
    """float32 edges i / bins as mmdetection builds them (torch.arange(bins + 1).float() /
    bins), computed here with numpy's float32 division; the last raised by 1e-6 (GHM-C)
    or set to 1e3 (GHM-R)."""
    e = [float(np.float32(i) / np.float32(bins)) for i in range(bins + 1)]
    e[-1] = float(np.float32(e[-1]) + np.float32(1e-6)) if last is None else last
    return e


class RefGHM:
    """One GHM module's state and its loss, in plain Python float64 loops."""

    def __init__(self, bins, momentum, last=None):
        self.bins, self.m, self.edges = bins, momentum, ref_edges(bins, last)
        self.acc = [0.0] * bins

    def weights(self, g, valid):
        tot = max(sum(valid), 1.0)
        w = [0.0] * len(g)
        n = 0
        for i in range(self.bins):
            inds = [
                k for k in range(len(g)) if valid[k] and self.edges[i] <= g[k] < self.edges[i + 1]
            ]
            if inds:
                n += 1
                if self.m > 0:
                    self.acc[i] = self.m * self.acc[i] + (1 - self.m) * len(inds)
                    wi = tot / self.acc[i]
                else:
                    wi = tot / len(inds)
                for k in inds:
                    w[k] = wi
        if n:
            w = [x / n for x in w]
        return w, tot

    def ghmc(self, x, t, valid):
        """(loss, d loss / d x) of GHM-C."""
        p = [1 / (1 + math.exp(-v)) for v in x]
        g = [abs(pi - ti) for pi, ti in zip(p, t)]
        w, tot = self.weights(g, valid)
        bce = [max(v, 0) - v * ti + math.log1p(math.exp(-abs(v))) for v, ti in zip(x, t)]
        loss = sum(wi * b for wi, b in zip(w, bce)) / tot
        grad = [wi * (pi - ti) / tot for wi, pi, ti in zip(w, p, t)]
        return loss, grad

    def ghmr(self, x, t, valid, mu):
        d = [a - b for a, b in zip(x, t)]
        root = [math.sqrt(v * v + mu * mu) for v in d]
        g = [abs(v) / r for v, r in zip(d, root)]
        w, tot = self.weights(g, valid)
        loss = sum(wi * (r - mu) for wi, r in zip(w, root)) / tot
        grad = [wi * v / r / tot for wi, v, r in zip(w, d, root)]
        return loss, grad


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


# ----------------------------------------------------------------------------
# GHM RetinaNet
# ----------------------------------------------------------------------------
GHM_OPTS = ("MODEL.GHM.CLS.ENABLED", True, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r")


def _model(*opts, config="quickstart/retinanet.yaml"):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(tiny_cfg(config, *opts))
    model.train()
    return model


def test_ghm_retinanet_losses_match_per_level_reference():
    """EAPMRetinaNet.losses with GHM on synthetic anchors: loss_cls = sum over the levels of
    GHM-C on that level's anchors x classes (ignored anchors invalid), loss_box_reg = 10 x
    sum over the levels of GHM-R on that level's positive deltas; not divided by the
    positive-anchor normaliser; both modules' states updated level by level."""
    from detectron2.structures import Boxes
    from detectron2.utils.events import EventStorage

    model = _model(*GHM_OPTS)
    K = model.num_classes
    g = torch.Generator().manual_seed(0)
    sizes = [7, 4]
    anchors = []
    for n in sizes:
        xy = torch.rand(n, 2, generator=g) * 40
        anchors.append(Boxes(torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 20], 1)))
    N, R = 2, sum(sizes)
    labels = torch.randint(-1, K + 1, (N, R), generator=g)
    labels[0, 0], labels[1, 8] = 1, 2  # positives on both levels
    xy = torch.rand(N, R, 2, generator=g) * 40
    gt_boxes = torch.cat([xy, xy + 5 + torch.rand(N, R, 2, generator=g) * 30], 2)
    logits = torch.randn(N, R, K, generator=g, dtype=torch.float64).float().requires_grad_()
    deltas = (torch.randn(N, R, 4, generator=g) * 0.3).requires_grad_()
    split = lambda t: list(t.split(sizes, dim=1))  # noqa: E731
    with EventStorage():
        out = model.losses(anchors, split(logits), list(labels), split(deltas), list(gt_boxes))
    assert set(out) == {"loss_cls", "loss_box_reg"}

    ref_c, ref_r = RefGHM(30, 0.75), RefGHM(10, 0.7, last=1e3)
    want_c = want_r = 0.0
    start = 0
    for lvl, n in enumerate(sizes):
        lab = labels[:, start : start + n]
        valid = (lab >= 0)[..., None].expand(-1, -1, K)
        tgt = torch.nn.functional.one_hot(lab.clamp(min=0), K + 1)[..., :K].float()
        tgt[lab < 0] = 0
        want_c += ref_c.ghmc(
            logits[:, start : start + n].detach().double().flatten().tolist(),
            tgt.flatten().tolist(),
            valid.flatten().tolist(),
        )[0]
        pos = (lab >= 0) & (lab != K)
        anc = anchors[lvl].tensor[None].expand(N, -1, -1)[pos]
        gtd = model.box2box_transform.get_deltas(anc, gt_boxes[:, start : start + n][pos])
        pred = deltas[:, start : start + n][pos].detach()
        want_r += ref_r.ghmr(
            pred.double().flatten().tolist(),
            gtd.double().flatten().tolist(),
            [True] * pred.numel(),
            0.02,
        )[0]
        start += n
    assert out["loss_cls"].item() == pytest.approx(want_c, rel=1e-4)
    assert out["loss_box_reg"].item() == pytest.approx(10 * want_r, rel=1e-4)
    np.testing.assert_allclose(model.ghm_cls.acc_sum.numpy(), ref_c.acc, rtol=1e-5)
    np.testing.assert_allclose(model.ghm_reg.acc_sum.numpy(), ref_r.acc, rtol=1e-5)


def test_ghm_retinanet_training_step_on_cpu():
    from detectron2.utils.events import EventStorage

    from eapm.utils.testing import grad_norms

    model = _model(*GHM_OPTS)
    assert type(model.ghm_cls).__name__ == "GHMC" and type(model.ghm_reg).__name__ == "GHMR"
    with EventStorage():
        losses = model(make_batch(2, 64, num_boxes=(3, 0)))
        assert set(losses) == {"loss_cls", "loss_box_reg"}
        assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
        sum(losses.values()).backward()
    norms = grad_norms(model, ["head.cls_score", "head.bbox_pred", "backbone"])
    assert all(math.isfinite(v) and v > 0 for v in norms.values()), norms
    assert model.ghm_cls.acc_sum.sum() > 0 and model.ghm_reg.acc_sum.sum() > 0


def test_ghm_retinanet_batch_without_boxes():
    from detectron2.utils.events import EventStorage

    model = _model(*GHM_OPTS)
    with EventStorage():
        losses = model(make_batch(2, 64, num_boxes=(0,)))
        assert losses["loss_box_reg"].item() == 0.0 and torch.isfinite(losses["loss_cls"])
        sum(losses.values()).backward()


def test_ghm_state_survives_checkpoint(tmp_path):
    """The moving averages are in the model's state_dict: saved by detectron2's
    DetectionCheckpointer, restored by loading; the next step is the same."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    model = _model(*GHM_OPTS)
    batch = make_batch(2, 64, num_boxes=(3, 2))
    with EventStorage():
        for _ in range(2):
            model(batch)
    assert {"ghm_cls.acc_sum", "ghm_reg.acc_sum"} <= set(model.state_dict())
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_x")
    fresh = _model(*GHM_OPTS)
    assert fresh.ghm_cls.acc_sum.sum() == 0
    DetectionCheckpointer(fresh).load(str(tmp_path / "model_x.pth"))
    torch.testing.assert_close(fresh.ghm_cls.acc_sum, model.ghm_cls.acc_sum, rtol=0, atol=0)
    torch.testing.assert_close(fresh.ghm_reg.acc_sum, model.ghm_reg.acc_sum, rtol=0, atol=0)
    with EventStorage():
        a, b = model(batch), fresh(batch)
    for k in a:
        assert a[k].item() == b[k].item(), k
    torch.testing.assert_close(fresh.ghm_cls.acc_sum, model.ghm_cls.acc_sum, rtol=0, atol=0)
    # without the restored state the loss differs (the test can fail)
    other = _model(*GHM_OPTS)
    with EventStorage():
        assert other(batch)["loss_cls"].item() != a["loss_cls"].item()


def test_ghm_off_builds_no_ghm_module_and_each_loss_alone():
    plain = _model()
    assert plain.ghm_cls is None and plain.ghm_reg is None
    assert not any("ghm" in k for k in plain.state_dict())
    only_c = _model("MODEL.GHM.CLS.ENABLED", True)
    assert only_c.ghm_cls is not None and only_c.ghm_reg is None
    only_r = _model("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r")
    assert only_r.ghm_cls is None and only_r.ghm_reg is not None
    assert (only_r.ghm_reg.mu, only_r.ghm_reg.bins, only_r.ghm_reg.momentum) == (0.02, 10, 0.7)
    assert (only_c.ghm_cls.bins, only_c.ghm_cls.momentum) == (30, 0.75)
    assert only_r.ghm_reg_loss_weight == 10.0 and not only_r.ghm_reg.all_reduce


# ----------------------------------------------------------------------------
# config validation
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts,key,config",
    [
        # (a value is checked where it is used: GHM-C's with GHM-C on, GHM-R's with ghm_r)
        (
            ("MODEL.GHM.CLS.ENABLED", True, "MODEL.GHM.CLS.BINS", 0),
            "MODEL.GHM.CLS.BINS",
            "retinanet",
        ),
        (
            ("MODEL.GHM.CLS.ENABLED", True, "MODEL.GHM.CLS.MOMENTUM", 1.0),
            "MODEL.GHM.CLS.MOMENTUM",
            "retinanet",
        ),
        (
            ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r", "MODEL.GHM.REG.MU", 0.0),
            "MODEL.GHM.REG.MU",
            "retinanet",
        ),
        (
            ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r", "MODEL.GHM.REG.BINS", -1),
            "MODEL.GHM.REG.BINS",
            "retinanet",
        ),
        (("MODEL.GHM.REG.LOSS_WEIGHT", -1.0), "MODEL.GHM.REG.LOSS_WEIGHT", "retinanet"),
        (
            ("MODEL.GHM.CLS.ENABLED", True, "MODEL.EAPM.CLS.ENABLED", True),
            "MODEL.GHM.CLS.ENABLED",
            "retinanet",
        ),
        (
            ("MODEL.GHM.CLS.ENABLED", True, "MODEL.META_ARCHITECTURE", "RetinaNet"),
            "MODEL.GHM.CLS.ENABLED",
            "retinanet",
        ),
        (
            ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r", "MODEL.META_ARCHITECTURE", "RetinaNet"),
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
            "retinanet",
        ),
        (
            ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r", "MODEL.EAPM.REG.ENABLED", True),
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
            "retinanet",
        ),
        (("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "ghm_r"), "MODEL.ROI_BOX_HEAD", "faster_rcnn"),
    ],
)
def test_bad_ghm_config_names_the_key(opts, key, config):
    import eapm

    cfg = tiny_cfg(f"quickstart/{config}.yaml", *opts)
    with pytest.raises(ValueError, match="Invalid config " + key.replace(".", r"\.")):
        eapm.validate_config(cfg)


def test_ghm_on_fcos_is_rejected_and_constructor_checks():
    from detectron2.modeling import build_model

    import eapm

    cfg = tiny_cfg("quickstart/fcos.yaml", "MODEL.GHM.CLS.ENABLED", True)
    with pytest.raises(
        ValueError, match=r"Invalid config MODEL\.GHM\.CLS\.ENABLED = True: no class .* reads"
    ):
        eapm.validate_config(cfg)
    # the constructor checks its own arguments (no validate_config)
    cfg = tiny_cfg("quickstart/retinanet.yaml", *GHM_OPTS, "MODEL.EAPM.CLS.ENABLED", True)
    with pytest.raises(ValueError, match="eapm_cls_mu 0"):
        build_model(cfg)
    cfg = tiny_cfg("quickstart/retinanet.yaml", *GHM_OPTS, "MODEL.GHM.CLS.BINS", 0)
    with pytest.raises(ValueError, match="bins"):
        build_model(cfg)


# ----------------------------------------------------------------------------
# Table 3 configs
# ----------------------------------------------------------------------------
TABLE3 = [
    f"COCO-{'InstanceSegmentation' if (name, depth) == ('mask_rcnn', 50) else 'Detection'}/"
    f"{name}_R_{depth}_FPN_1x{suffix}.yaml"
    for depth in (50, 101)
    for name, suffix in (
        ("faster_rcnn", ""),
        ("mask_rcnn", ""),
        ("retinanet", ""),
        ("retinanet", "_ghm"),
        ("libra_retinanet", ""),
        ("libra_retinanet", "_eapm_mu1.5_theta1.0"),
    )
]


@pytest.mark.parametrize("config", TABLE3)
def test_table3_configs_load_validate_and_build(config):
    from detectron2.modeling import build_model

    import eapm
    from eapm.paper_results import TEST_DEV, paper_result

    path = os.path.join(REPO, "configs", config)
    cfg = eapm.load_config(path, ["MODEL.DEVICE", "cpu"])
    depth = 101 if "R_101" in config else 50
    assert cfg.MODEL.RESNETS.DEPTH == depth and f"R-{depth}.pkl" in cfg.MODEL.WEIGHTS
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (90000, (60000, 80000))
    name = os.path.basename(config)[: -len(".yaml")]
    assert paper_result(name, TEST_DEV) is not None  # every config has its Table 3 row
    if "ghm" in config:
        assert cfg.MODEL.GHM.CLS.ENABLED and cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE == "ghm_r"
        assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 35.0
    if "mask_rcnn" in config:
        assert cfg.MODEL.MASK_ON
    model = build_model(tiny_cfg(path))
    assert sum(p.numel() for p in model.parameters()) > 0
