"""The fused loss kernels: compiled (torch.compile) and eager paths give the same
results; only a compiler error falls back to eager (once, one warning); the eager
kernels' chunking on CPU."""

from __future__ import annotations

import math
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


# ------------------------------------------------------------------ hard examples
# Where Dif = sigmoid(s) is close to 1 (s: the logit on the wrong side of its target), the
# kernel forms 1 - MF Dif through expm1c(z), z = 2 mu (1 - Dif): compiled, as a Taylor
# polynomial for z < 0.1 (torch.compile's vectorised expm1 is inexact there); eager, with
# torch.expm1 and the limit 1 for z below the float's eps. The references below are written
# in float64 from the definitions, without the kernel's factorisation of MF - 1.
HARD_MUS = (0.5, 1.5)
FLOAT32_EPS = 2.0**-23


def focal_float64(x, t, mu, alpha, gamma):
    """(per-element value, gradient w.r.t. x) of the EAPM focal loss in float64: Dif = e =
    |p - t|, MF = 1 + tanh(mu) - tanh(mu e), e' = MF e; value -alpha_t e'^gamma log(1 - e'),
    gradient the focal loss's derivative at logit(p'), sign * alpha_t e'^gamma (e' - gamma (1 -
    e') log(1 - e')) (sign -1 for positives). 1 - e' = u - (MF - 1) e with u = 1 - e =
    sigmoid(-s) and MF - 1 = tanh(mu) - tanh(mu e) = sinh(mu u) / (cosh(mu) cosh(mu e)) (the
    difference of two tanh), so no cancellation for e -> 1 (MF - 1 <= u mu sech^2 mu)."""
    x, t = x.double(), t.double()
    sign = 1 - 2 * t
    s = sign * x
    e, u = torch.sigmoid(s), torch.sigmoid(-s)
    mf_minus_1 = torch.sinh(mu * u) / (math.cosh(mu) * torch.cosh(mu * e))
    e_mod = e * (1 + mf_minus_1)
    one_minus = u - mf_minus_1 * e
    a_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(x)
    log_1m = torch.log(one_minus)
    value = -a_t * e_mod**gamma * log_1m
    grad = sign * a_t * e_mod**gamma * (e_mod - gamma * one_minus * log_1m)
    return value, grad


def hard_examples(rows: int = 4):
    """(logits, targets) float64 (rows, 35): wrong-side logits |s| from 3 to 100 (log-spaced:
    2 mu (1 - Dif) from ~0.3 down to ~1e-43), a few ordinary ones (s from -6 to 2), both
    targets; each row shuffled differently."""
    s = torch.cat(
        [
            torch.linspace(-6.0, 2.0, 5, dtype=torch.float64),
            torch.logspace(math.log10(3.0), 2.0, 30, dtype=torch.float64),
        ]
    )
    g = torch.Generator().manual_seed(11)
    x, t = [], []
    for _ in range(rows):
        perm = torch.randperm(len(s), generator=g)
        tr = (torch.rand(len(s), generator=g) < 0.5).double()
        x.append(s[perm] * (1 - 2 * tr))
        t.append(tr)
    return torch.stack(x), torch.stack(t)


def _series_counts(x, t, mu):
    """(number of elements with z = 2 mu (1 - Dif) < 0.1: the compiled Taylor branch, number
    with z <= float32 eps: the eager limit branch)."""
    z = 2 * mu * torch.sigmoid(-(1 - 2 * t) * x)
    return int((z < 0.1).sum()), int((z <= FLOAT32_EPS).sum())


def _check_hard(x, t, mu, dtype, compile_kernels, rtol):
    """The per-element and the summed kernel and the EAPM BCE on ``hard_examples`` against
    ``focal_float64``: values and gradients."""
    for kind, alpha, gamma in (("terms", 0.25, 2.0), ("sum", 0.3, 1.5)):
        xr = x.to(dtype).requires_grad_()
        if kind == "terms":
            loss = losses.eapm_focal_terms(
                xr, t.to(dtype), mu, alpha, gamma, compile_kernels=compile_kernels
            )[0]
            (grad,) = torch.autograd.grad(loss.sum(), xr)
        else:
            loss, _ = losses.eapm_focal_loss_sum_with_stats(
                xr, t.to(dtype), mu, alpha, gamma, compile_kernels=compile_kernels
            )
            (grad,) = torch.autograd.grad(loss, xr)
        want, want_grad = focal_float64(x.to(dtype), t, mu, alpha, gamma)
        if kind == "sum":
            want = want.sum()
        torch.testing.assert_close(
            loss.double(), want, rtol=rtol, atol=0, msg=lambda m, k=kind: f"{k}: {m}"
        )
        torch.testing.assert_close(
            grad.double(), want_grad, rtol=rtol, atol=0, msg=lambda m, k=kind: f"{k}: {m}"
        )


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("mu", HARD_MUS)
def test_eager_kernels_on_hard_examples_equal_float64_closed_form(mu, dtype, rtol):
    """The default (eager) kernels where Dif -> 1: float32 within a few units in the last
    place of the float64 closed form, float64 to 1e-12; the EAPM BCE (the kernel at gamma 0,
    no alpha) too."""
    x, t = hard_examples()
    taylor, limit = _series_counts(x, t, mu)
    assert taylor >= 40 and limit >= 20  # both series regions are exercised
    _check_hard(x, t, mu, dtype, False, rtol)
    xr = x.to(dtype).requires_grad_()
    bce = losses.eapm_binary_cross_entropy_with_logits(xr, t.to(dtype), mu, reduction="none")
    (grad,) = torch.autograd.grad(bce.sum(), xr)
    want, want_grad = focal_float64(x.to(dtype), t, mu, -1.0, 0.0)
    torch.testing.assert_close(bce.double(), want, rtol=rtol, atol=0)
    torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=0)


@pytest.mark.parametrize("mu", HARD_MUS)
def test_taylor_branch_of_the_compiled_kernels_equals_float64_closed_form(mu, monkeypatch):
    """The branch the compiled kernels take (``torch.compiler.is_compiling()`` true while
    torch.compile traces them: the Taylor polynomial of expm1c below z = 0.1), run eagerly
    here in milliseconds: float32 as accurate as the eager branch; float64 within the
    polynomial's truncation (z^5 / 720 < 2e-8 relative in expm1c)."""
    x, t = hard_examples()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _check_hard(x, t, mu, torch.float32, False, 2e-6)
    _check_hard(x, t, mu, torch.float64, False, 2e-8)


def _recording_backend(graphs):
    """A torch.compile backend that runs dynamo's captured graph as it is (no code
    generation: fast) and records it."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def test_compile_kernels_path_traced_by_dynamo_on_hard_examples(monkeypatch, fresh_kernels):
    """``compile_kernels=True`` through the runtime's torch.compile cache, with dynamo tracing
    the kernels (their compiled branch) and the captured graph run without code generation:
    the values and gradients on hard examples are the float64 closed form's. (The same with
    inductor's code generation: ``test_inductor_kernels_on_hard_examples``, slow.)"""
    graphs = []
    real_compile = torch.compile
    monkeypatch.setattr(
        torch,
        "compile",
        lambda fn, **kw: real_compile(fn, **{**kw, "backend": _recording_backend(graphs)}),
    )
    x, t = hard_examples()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
            for mu in HARD_MUS:
                for dtype, rtol in ((torch.float32, 2e-6), (torch.float64, 2e-8)):
                    before = len(graphs)
                    _check_hard(x, t, mu, dtype, True, rtol)
                    assert len(graphs) > before, (mu, dtype)  # traced, not run eagerly
        for name in ("_focal_terms", "_focal_sum"):
            assert losses.compiled_kernel_state(name) == "compiled"
    finally:
        torch._dynamo.reset()  # no frame traced for this backend is reused by a later compile


@pytest.mark.slow
def test_inductor_kernels_on_hard_examples(fresh_kernels):
    """The compiled kernels (inductor's generated C++; about a minute to compile on a CPU)
    on hard examples equal the eager kernels and the float64 closed form (float32); with a
    second input shape (dynamic shapes: no recompilation needed for the result)."""
    for rows in (4, 9):
        x, t = hard_examples(rows)
        for mu in HARD_MUS:
            _check_hard(x, t, mu, torch.float32, True, 2e-6)
            for name in ("_focal_terms", "_focal_sum"):
                assert losses.compiled_kernel_state(name) == "compiled"
            xr = x.float().requires_grad_()
            got = losses.eapm_focal_terms(xr, t.float(), mu, compile_kernels=True)
            (got_grad,) = torch.autograd.grad(got[0].sum(), xr)
            xe = x.float().requires_grad_()
            eager = losses.eapm_focal_terms(xe, t.float(), mu)
            (eager_grad,) = torch.autograd.grad(eager[0].sum(), xe)
            for a, b in zip(got + (got_grad,), eager + (eager_grad,)):
                torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
