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
