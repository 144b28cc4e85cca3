"""eapm/losses/runtime.py, the runtime of the fused loss kernels (EAPM focal and balanced L1):
compiled (torch.compile) and eager paths give the same results; only a compiler error falls back
to eager (once, one warning); the eager kernels' chunking on CPU; the hard examples' series
branches against float64 closed forms; the dtype policy (half inputs computed in float32,
under autocast too), empty inputs, and finite losses and gradients for any finite input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from eapm import losses
from eapm.losses import eapm_balanced_l1_loss, eapm_sigmoid_focal_loss, runtime


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


# ---------------------------------------------------- dtype policy, empty inputs, finiteness


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    """fp16 / bf16 inputs: EAPM focal loss and EAPM balanced L1 compute in float32 (the same
    values as on the float32 copies of the inputs), return float32, with and without CPU bf16
    autocast, and give a finite gradient of the input's dtype."""
    g = torch.Generator().manual_seed(1)
    x32 = torch.randn(64, 5, generator=g) * 4
    t = (torch.rand(64, 5, generator=g) < 0.2).float()
    xh = x32.to(dtype).requires_grad_()
    loss = eapm_sigmoid_focal_loss(xh, t.to(dtype), 1.5)
    assert loss.dtype == torch.float32
    ref = eapm_sigmoid_focal_loss(xh.detach().float(), t, 1.5)
    torch.testing.assert_close(loss, ref)  # same float32 computation, no half rounding inside
    loss.sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad.float()).all()
    # under CPU autocast too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la = eapm_sigmoid_focal_loss(xh, t, 1.5, reduction="sum")
    assert la.dtype == torch.float32 and torch.isfinite(la)

    # both EAPM losses, summed, with and without autocast
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 4, generator=g) * 5).to(dtype).requires_grad_()
    t = (torch.rand(256, 4, generator=g) < 0.3).to(dtype)
    gt = torch.randn(256, 4, generator=g).to(dtype)
    for fn, args in ((eapm_sigmoid_focal_loss, (t, 1.5)), (eapm_balanced_l1_loss, (gt, 1.0))):
        for ctx in (
            torch.autocast("cpu", dtype=torch.bfloat16),
            torch.autocast("cpu", enabled=False),
        ):
            with ctx:
                loss = fn(x, *args, reduction="sum")
            ref = fn(
                x.detach().float().requires_grad_(),
                *(a.float() if torch.is_tensor(a) else a for a in args),
                reduction="sum",
            )
            assert loss.dtype == torch.float32
            torch.testing.assert_close(
                loss, ref.detach(), rtol=1e-6, atol=0
            )  # float32 math on the same values
            (gx,) = torch.autograd.grad(loss, x)
            assert gx.dtype == dtype and torch.isfinite(gx.float()).all() and gx.abs().sum() > 0


def test_empty_inputs_zero_with_grad_path():
    x = torch.zeros(0, 80, requires_grad=True)
    t = torch.zeros(0, 80)
    for red in ("sum", "mean"):
        loss = eapm_sigmoid_focal_loss(x, t, 1.5, reduction=red)
        assert float(loss) == 0.0
        loss.backward()
    d = torch.zeros(0, 4, requires_grad=True)
    for red in ("sum", "mean"):
        loss = eapm_balanced_l1_loss(d, torch.zeros(0, 4), 1.0, reduction=red)
        assert float(loss) == 0.0 and loss.requires_grad
        loss.backward()
    assert d.grad is not None and d.grad.shape == (0, 4)


def test_eapm_property_finite_loss_stays_finite():
    """EAPM never turns a finite base loss into NaN/Inf: random and extreme inputs."""
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 10.0, 100.0, 1e4):
        x = (torch.randn(4000, generator=g) * scale).requires_grad_()
        t = (torch.rand(4000, generator=g) < 0.5).float()
        for mu in (0.0, 0.1, 1.5, 5.0, 50.0):
            loss = eapm_sigmoid_focal_loss(x, t, mu)
            (gr,) = torch.autograd.grad(loss.sum(), x)
            assert torch.isfinite(loss).all() and torch.isfinite(gr).all(), (scale, mu)
        p = (torch.randn(1000, 4, generator=g) * scale).requires_grad_()
        q = torch.randn(1000, 4, generator=g) * scale
        q[::7] = 0.0
        p.data[::7] = 0.0
        for theta in (0.0, 1.0, 50.0):
            for beta in (1.0, 0.11):
                loss = eapm_balanced_l1_loss(p, q, theta, beta=beta)
                (gr,) = torch.autograd.grad(loss.sum(), p)
                assert torch.isfinite(loss).all() and torch.isfinite(gr).all(), (scale, theta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_eapm_finite_for_extreme_half_inputs(dtype):
    """Extends test_losses' float32 property test to half inputs: logits up to +-1e4
    (and +-max of the dtype's safe range), exact 0/1 targets, deltas where the prediction,
    the target or both are 0 (GoS 1 or 0/0), huge deltas."""
    from eapm.losses import (
        balanced_l1_loss,
        eapm_balanced_l1_loss,
        eapm_sigmoid_focal_loss,
        sigmoid_focal_loss,
    )

    g = torch.Generator().manual_seed(7)
    for scale in (1e-3, 1.0, 30.0, 1e4):
        x = torch.randn(3000, generator=g) * scale
        x[:4] = torch.tensor([scale, -scale, 0.0, -0.0])
        x = x.to(dtype).requires_grad_()
        t = (torch.rand(3000, generator=g) < 0.5).to(dtype)
        base = sigmoid_focal_loss(x, t)
        assert torch.isfinite(base).all()
        for mu in (0.1, 1.5, 20.0):
            loss = eapm_sigmoid_focal_loss(x, t, mu)
            (gr,) = torch.autograd.grad(loss.sum(), x)
            assert torch.isfinite(loss).all() and torch.isfinite(gr.float()).all(), (
                dtype,
                scale,
                mu,
            )
        p = torch.randn(999, 4, generator=g) * scale
        q = torch.randn(999, 4, generator=g) * scale
        p[0::3] = 0.0  # prediction 0
        q[1::3] = 0.0  # target 0
        p[2::9], q[2::9] = 0.0, 0.0  # both 0 (GoS 0/0)
        p = p.to(dtype).requires_grad_()
        q = q.to(dtype)
        assert torch.isfinite(balanced_l1_loss(p, q, beta=0.11)).all()
        for theta in (0.5, 1.0, 20.0):
            loss = eapm_balanced_l1_loss(p, q, theta, beta=0.11)
            (gr,) = torch.autograd.grad(loss.sum(), p)
            assert torch.isfinite(loss).all() and torch.isfinite(gr.float()).all(), (
                dtype,
                scale,
                theta,
            )
