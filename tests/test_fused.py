"""The fused loss kernels: compiled (torch.compile) and eager paths give the same
results; a failing compiler falls back to eager with a warning."""
from __future__ import annotations

import pytest
import torch

from eapm import losses


@pytest.fixture
def restore_compile():
    yield
    losses.set_compile(False)
    losses._COMPILE["failed"] = False
    losses._COMPILED_KERNELS.clear()


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 80, generator=g) * 6
    x[0, :4] = torch.tensor([-100.0, 100.0, 50.0, -50.0])
    t = (torch.rand(n, 80, generator=g) < 0.05).float()
    p = torch.randn(n, 4, generator=g)
    q = torch.randn(n, 4, generator=g)
    q[:3] = 0.0
    p[:2] = 0.0
    return x, t, p, q


def _run(x, t, p, q):
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    fl, stats = losses.eapm_focal_loss_sum_with_stats(xr, t, 1.5, 0.25, 2.0)
    bl = losses.eapm_balanced_l1_loss(pr, q, 1.0, beta=0.11, reduction="sum")
    (fl + bl).backward()
    return fl.detach(), stats, bl.detach(), xr.grad, pr.grad


@pytest.mark.slow
def test_compiled_equals_eager_and_compiles_once_for_new_shapes(restore_compile):
    eager = []
    for n in (300, 517):
        losses.set_compile(False)
        eager.append(_run(*_inputs(n, seed=n)))
    losses.set_compile(True)
    for i, n in enumerate((300, 517)):  # a second shape reuses the dynamic-shape graph
        got = _run(*_inputs(n, seed=n))
        assert losses.compile_enabled(), "compilation failed and fell back to eager"
        for a, b in zip(got, eager[i]):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    assert set(losses._COMPILED_KERNELS) == {"_focal_sum", "_bl1_kernel"}


def test_compile_failure_falls_back_to_eager(monkeypatch, restore_compile):
    x, t, p, q = _inputs(50)
    losses.set_compile(False)
    want = _run(x, t, p, q)

    def broken(fn, **kwargs):
        def f(*a):
            raise RuntimeError("no C++ compiler")

        return f

    monkeypatch.setattr(torch, "compile", broken)
    losses.set_compile(True)
    with pytest.warns(UserWarning, match="torch.compile of the EAPM loss kernels failed"):
        got = _run(x, t, p, q)
    assert not losses.compile_enabled()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eager_chunks_equal_one_pass(monkeypatch):
    """The eager kernels run on flat chunks of large inputs: elementwise outputs are
    stitched back in place, summed ones (loss sum, diagnostic sums) added up; a
    length that is not a multiple of the chunk exercises the short last chunk."""
    x, t, p, q = _inputs(300, seed=7)  # 24000 logits, 1200 deltas
    losses.set_compile(False)
    want = _run(x, t, p, q)
    want_terms = losses.eapm_focal_terms(x, t, 1.5)
    want_bl1 = losses.eapm_balanced_l1_loss(p, q, 1.0, beta=0.11)
    monkeypatch.setattr(losses, "_EAGER_CHUNK", 1000)  # logits: 24 chunks; deltas: 1000 + 200
    calls = []
    orig = losses._EAGER_KERNELS["_focal_sum"]
    monkeypatch.setitem(losses._EAGER_KERNELS, "_focal_sum", lambda *a: calls.append(a[0].shape) or orig(*a))
    got = _run(x, t, p, q)
    assert calls == [(1000,)] * 24, calls  # it was chunked
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(losses, "_EAGER_CHUNK", 1100)  # 21 full chunks + one of 900
    for a, b in zip(losses.eapm_focal_terms(x, t, 1.5), want_terms):
        assert a.shape == b.shape == x.shape
        # elementwise, but not bit-identical: torch's vectorised and scalar (tail) loops
        # round transcendental functions differently, and the chunking moves the tails
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    got_bl1 = losses.eapm_balanced_l1_loss(p, q, 1.0, beta=0.11)  # 4800 values: 4 + 1 of 400
    torch.testing.assert_close(got_bl1, want_bl1, rtol=1e-6, atol=1e-12)


def test_eager_chunks_only_on_cpu(monkeypatch):
    """On a GPU the kernels run in one piece (the caching allocator makes chunks useless,
    and each chunk would be ~40 kernel launches); 'meta' tensors stand in for a device."""
    monkeypatch.setattr(losses, "_EAGER_CHUNK", 100)
    shapes = []

    def kernel(x, t, k):
        shapes.append(tuple(x.shape))
        return x * k, (x * t).sum()

    x = torch.randn(30, 20)
    t = torch.rand(30, 20)
    out, total = losses._run_chunked(kernel, x, t, 2.0)
    assert shapes == [(100,)] * 6 and out.shape == (30, 20)
    torch.testing.assert_close(out, 2 * x, rtol=0, atol=0)
    torch.testing.assert_close(total, (x * t).sum(), rtol=1e-5, atol=1e-5)
    shapes.clear()
    out, total = losses._run_chunked(kernel, x.to("meta"), t.to("meta"), 2.0)
    assert shapes == [(30, 20)] and out.device.type == "meta"
