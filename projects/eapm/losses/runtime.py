"""The runtime of the fused EAPM loss kernels (shared by ``focal`` and ``balanced_l1``).

* dtype and reduction policy: ``_to_float`` (float32 for half / bfloat16 / integer inputs,
  float64 stays float64), ``_check_reduction`` / ``_reduce_mean``;
* the closed-form autograd attach: ``_attach(input, value, grad)`` returns ``value`` with a
  backward that multiplies the precomputed ``grad`` (the gradient at the modulated point,
  paper Sec. 2.1), cast to the input's dtype;
* the kernel registry and the compile cache: ``@_kernel`` registers an elementwise kernel by
  its function name; ``_run_kernel(name, compile_kernels, *args)`` runs it in float32 math
  whatever the autocast state, through ``torch.compile`` (compiled once per process, a
  compiler error falls back to eager with one warning) or eagerly;
* the CPU chunking of the eager kernels (``_run_chunked``, ``_EAGER_CHUNK`` elements per
  chunk; patch ``eapm.losses.runtime._EAGER_CHUNK`` to change it in tests);
* ``clear_compiled_kernels`` / ``compiled_kernel_state``: the cache's public controls.

Pure torch, no detectron2 import.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["clear_compiled_kernels", "compiled_kernel_state"]

_REDUCTIONS = ("none", "sum", "mean")


# ----------------------------------------------------------------------------
# dtype and reductions
# ----------------------------------------------------------------------------
def _to_float(x: Tensor) -> Tensor:
    """float32 for half / bfloat16 / integer inputs, float64 stays float64."""
    if x.dtype == torch.float64:
        return x
    return x.float()


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce_mean(summed: Tensor, numel: int) -> Tensor:
    """``summed / numel`` for the "mean" reduction; an empty input (``numel == 0``) keeps
    the zero sum (with its gradient path) instead of 0 / 0."""
    return summed / numel if numel > 0 else summed


# ----------------------------------------------------------------------------
# the closed-form gradient
# ----------------------------------------------------------------------------
class _ClosedForm(torch.autograd.Function):
    """Returns a precomputed value; its backward multiplies the precomputed
    gradient. Used by the EAPM losses (the gradient at the modulated point is
    known in closed form)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, input: Tensor, value: Tensor, grad: Tensor
    ) -> Tensor:
        ctx.save_for_backward(grad)
        ctx.input_dtype = input.dtype
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if 0 < grad_out.dim() < grad.dim():  # one value per row of grad (cross entropy)
            grad_out = grad_out.reshape(grad_out.shape + (1,) * (grad.dim() - grad_out.dim()))
        return (grad_out * grad).to(ctx.input_dtype), None, None


def _attach(input: Tensor, value: Tensor, grad: Tensor) -> Tensor:
    """``value`` (detached) with the backward ``d value / d input := grad``: ``grad`` has
    ``input``'s shape; ``value`` is a scalar (the sum: grad is its gradient), of
    ``input``'s shape (elementwise), or of the leading shape of ``input`` (one value per
    row: grad row i is the gradient of value i). The gradient is cast to input's dtype."""
    if not (torch.is_grad_enabled() and input.requires_grad):
        return value
    return _ClosedForm.apply(input, value.detach(), grad.detach())


# ----------------------------------------------------------------------------
# the single-pass kernels: eager, or through torch.compile (per call, no global switch)
# ----------------------------------------------------------------------------
# Registry of the elementwise kernels, by name (filled at import, never changed after).
_EAGER_KERNELS: Dict[str, Callable] = {}
# Cache of compiled kernels keyed by (kernel name, dynamic shapes): torch.compile'd once
# per process. A value of None records that the compiler failed for that kernel: it runs
# eagerly from then on (one warning names the error).
_COMPILED_KERNELS: Dict[Tuple[str, bool], Optional[Callable]] = {}


def _compiler_errors() -> Tuple[type, ...]:
    """The exception types that mean "the compiler could not build the kernel" (no C++
    compiler, an unsupported platform or Python, a dynamo / inductor limitation), as
    opposed to an error of the computation itself."""
    errors = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)  # BackendCompilerFailed, Unsupported, ...
    except ImportError:  # pragma: no cover (torch without dynamo)
        pass
    try:
        from torch._inductor import exc as inductor_exc

        errors += [inductor_exc.CppCompileError, inductor_exc.InvalidCxxCompiler]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def clear_compiled_kernels() -> None:
    """Forget every compiled kernel and every recorded compiler failure of this process
    (the next ``compile_kernels=True`` call compiles again). For tests and benchmarks."""
    _COMPILED_KERNELS.clear()


def compiled_kernel_state(name: str) -> str:
    """ "not compiled", "compiled" or "failed (eager)" for the kernel ``name`` in this
    process (``name``: one of the kernel names, e.g. "_focal_sum", "_bl1_kernel")."""
    key = (name, True)
    if key not in _COMPILED_KERNELS:
        return "not compiled"
    return "compiled" if _COMPILED_KERNELS[key] is not None else "failed (eager)"


def _compiler_failed(name: str, error: BaseException) -> None:
    _COMPILED_KERNELS[(name, True)] = None
    warnings.warn(
        f"torch.compile of the EAPM loss kernel {name} failed ({type(error).__name__}: {error}); "
        "it runs in eager mode for the rest of this process (same results, slower)",
        RuntimeWarning,
        stacklevel=3,
    )


def _compiled(name: str) -> Optional[Callable]:
    """The compiled kernel ``name`` (compiled on first use), or None where the compiler
    failed for it."""
    key = (name, True)
    if key not in _COMPILED_KERNELS:
        try:
            _COMPILED_KERNELS[key] = torch.compile(_EAGER_KERNELS[name], dynamic=True)
        except Exception as e:  # torch.compile refuses up front (platform, Python version)
            _compiler_failed(name, e)
    return _COMPILED_KERNELS[key]


# Elements per chunk of the eager kernels on CPU (1 MiB per float32 temporary): each of a
# kernel's elementwise ops writes a temporary, and chunk by chunk these stay in cache
# instead of being fresh pages of the full (anchors x classes) size.
_EAGER_CHUNK = 1 << 18


def _kernel(fn: Callable) -> Callable:
    """Registers an elementwise kernel: every tensor argument has the same number of
    elements, and every output is either elementwise (the shape of the first tensor
    argument) or a sum over the elements (a scalar or a short vector of sums)."""
    _EAGER_KERNELS[fn.__name__] = fn
    return fn


def _run_chunked(fn: Callable, *args):
    """``fn(*args)`` for an elementwise kernel, computed on flat chunks of
    ``_EAGER_CHUNK`` elements for CPU tensors: elementwise outputs are written into
    full-size tensors, summed outputs are added up over the chunks."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    n = tensors[0].numel()
    # CPU only: on a GPU the caching allocator reuses freed blocks (nothing to gain), and
    # each chunk would cost a kernel launch per op
    if tensors[0].device.type != "cpu" or n <= _EAGER_CHUNK or any(a.numel() != n for a in tensors):
        return fn(*args)
    shape = tensors[0].shape
    flat = [a.reshape(-1) if isinstance(a, Tensor) else a for a in args]
    outs = None
    for start in range(0, n, _EAGER_CHUNK):
        stop = min(start + _EAGER_CHUNK, n)
        part = fn(*(a[start:stop] if isinstance(a, Tensor) else a for a in flat))
        if outs is None:  # the first chunk is a full one: elementwise outputs have its length
            elementwise = [o.shape == (_EAGER_CHUNK,) for o in part]
            outs = [
                o.new_empty(n) if ew else torch.zeros_like(o) for o, ew in zip(part, elementwise)
            ]
        for out, o, ew in zip(outs, part, elementwise):
            if ew:
                out[start:stop] = o
            else:
                out += o
    return tuple(o.view(shape) if ew else o for o, ew in zip(outs, elementwise))


def _run_kernel(name: str, compile_kernels: bool, *args):
    """Runs the registered kernel ``name`` on ``args``, in float32 math whatever the
    autocast state: through its compiled version when ``compile_kernels`` (and the
    compiler works for it), else eagerly. A compiler error falls back to eager mode
    (once per process and kernel, with a warning); any other error propagates."""
    with torch.autocast(device_type=args[0].device.type, enabled=False):
        if compile_kernels:
            fn = _compiled(name)
            if fn is not None:
                try:
                    return fn(*args)
                except _compiler_errors() as e:
                    # an error of the computation itself raises again here, and propagates
                    out = _run_chunked(_EAGER_KERNELS[name], *args)
                    _compiler_failed(name, e)
                    return out
        return _run_chunked(_EAGER_KERNELS[name], *args)
