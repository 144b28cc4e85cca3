"""The fused loss kernels: compiled (torch.compile) and eager paths give the same
results; only a compiler error falls back to eager (once, one warning); the eager
kernels' chunking on CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from eapm import losses
from eapm.losses import runtime


@pytest.fixture
def fresh_kernels():
    """No compiled kernel and no recorded compiler failure before or after the test."""
    losses.clear_compiled_kernels()
    yield
    losses.clear_compiled_kernels()


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


def _run(x, t, p, q, compile_kernels=False):
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    fl, stats = losses.eapm_focal_loss_sum_with_stats(
        xr, t, 1.5, 0.25, 2.0, compile_kernels=compile_kernels
    )
    bl = losses.eapm_balanced_l1_loss(
        pr, q, 1.0, beta=0.11, reduction="sum", compile_kernels=compile_kernels
    )
    (fl + bl).backward()
    return fl.detach(), stats, bl.detach(), xr.grad, pr.grad


def _fake_compile(behaviour, calls):
    """A stand-in for torch.compile whose "compiled" kernels record their calls and then
    run the eager kernel, or raise what ``behaviour`` returns."""

    def compile(fn, **kwargs):
        def compiled(*args):
            calls.append(fn.__name__)
            error = behaviour()
            if error is not None:
                raise error
            return fn(*args)

        return compiled

    return compile


@pytest.mark.slow
def test_compiled_equals_eager_and_compiles_once_for_new_shapes(fresh_kernels):
    eager = [_run(*_inputs(n, seed=n)) for n in (300, 517)]
    for i, n in enumerate((300, 517)):  # a second shape reuses the dynamic-shape graph
        got = _run(*_inputs(n, seed=n), compile_kernels=True)
        for name in ("_focal_sum", "_bl1_kernel"):
            assert losses.compiled_kernel_state(name) == "compiled"
        for a, b in zip(got, eager[i]):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    assert losses.compiled_kernel_state("_focal_terms") == "not compiled"


def test_compiler_error_falls_back_to_eager_once_with_one_warning(monkeypatch, fresh_kernels):
    from torch._dynamo.exc import BackendCompilerFailed

    x, t, p, q = _inputs(50)
    want = _run(x, t, p, q)
    calls = []
    error = lambda: BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"))  # noqa: E731
    monkeypatch.setattr(torch, "compile", _fake_compile(error, calls))
    with pytest.warns(RuntimeWarning) as record:
        got = _run(x, t, p, q, compile_kernels=True)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2, messages  # one per kernel: focal, balanced L1
    assert (
        "torch.compile of the EAPM loss kernel _focal_sum failed (BackendCompilerFailed"
        in messages[0]
    )
    assert "no C++ compiler" in messages[0]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert losses.compiled_kernel_state("_focal_sum") == "failed (eager)"
    # later calls: eager at once, no new warning, the compiler is not tried again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(x, t, p, q, compile_kernels=True)
    assert calls == ["_focal_sum", "_bl1_kernel"]


def test_compile_refused_up_front_falls_back(monkeypatch, fresh_kernels):
    """torch.compile itself raising (an unsupported Python or platform) is a compiler
    error too."""

    def refuse(fn, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    x, t, p, q = _inputs(20)
    want = _run(x, t, p, q)
    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(RuntimeWarning, match="_focal_sum failed .*not supported on this Python"):
        got = _run(x, t, p, q, compile_kernels=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_other_errors_in_the_compiled_kernel_propagate(monkeypatch, fresh_kernels):
    """A real bug (any exception but a compiler error) is not hidden by the fallback."""
    calls = []
    monkeypatch.setattr(torch, "compile", _fake_compile(lambda: ValueError("a real bug"), calls))
    x, t, p, q = _inputs(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no fallback warning
        with pytest.raises(ValueError, match="a real bug"):
            _run(x, t, p, q, compile_kernels=True)
        with pytest.raises(ValueError, match="a real bug"):  # still the compiled path
            _run(x, t, p, q, compile_kernels=True)
    assert calls == ["_focal_sum", "_focal_sum"]
    assert losses.compiled_kernel_state("_focal_sum") == "compiled"


def test_compile_kernels_false_never_compiles(monkeypatch, fresh_kernels):
    calls = []
    monkeypatch.setattr(torch, "compile", _fake_compile(lambda: None, calls))
    _run(*_inputs(20))
    assert calls == [] and losses.compiled_kernel_state("_focal_sum") == "not compiled"
    _run(*_inputs(20), compile_kernels=True)
    assert calls == ["_focal_sum", "_bl1_kernel"]


def test_eager_chunks_equal_one_pass(monkeypatch):
    """The eager kernels run on flat chunks of large inputs: elementwise outputs are
    stitched back in place, summed ones (loss sum, diagnostic sums) added up; a
    length that is not a multiple of the chunk exercises the short last chunk."""
    x, t, p, q = _inputs(300, seed=7)  # 24000 logits, 1200 deltas
    want = _run(x, t, p, q)
    want_terms = losses.eapm_focal_terms(x, t, 1.5)
    want_bl1 = losses.eapm_balanced_l1_loss(p, q, 1.0, beta=0.11)
    monkeypatch.setattr(runtime, "_EAGER_CHUNK", 1000)  # logits: 24 chunks; deltas: 1000 + 200
    calls = []
    orig = losses._EAGER_KERNELS["_focal_sum"]
    monkeypatch.setitem(
        losses._EAGER_KERNELS, "_focal_sum", lambda *a: calls.append(a[0].shape) or orig(*a)
    )
    got = _run(x, t, p, q)
    assert calls == [(1000,)] * 24, calls  # it was chunked
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(runtime, "_EAGER_CHUNK", 1100)  # 21 full chunks + one of 900
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
    monkeypatch.setattr(runtime, "_EAGER_CHUNK", 100)
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
