"""Bitwise fingerprint of every public loss of ``eapm.losses``: values and gradients
printed as ``float.hex()`` (small tensors element by element, large ones as a SHA-256 of
their float64 bytes plus the hex of their float64 sum).

    python -m tests.losses.fingerprint > /tmp/fp.txt

Run it before and after a refactoring that must not change any number: ``diff`` of the two
outputs must be empty. Covered: the focal loss and the EAPM focal loss at several mu
(reductions none / sum / mean, the per-element terms, the fused sum with its statistics),
the balanced L1 and EAPM balanced L1 losses at several theta and two betas, GHM-C and GHM-R
(two calls, so the moving average enters; with and without a valid mask), the attributes
and the modulating factor, the EAPM cross entropies (softmax: with an ignored row, its
statistics; binary) at several mu, the general recipe (``eapm_loss`` and
``modulate_prediction`` with the sigmoid, softmax and identity links, the named attributes
``"difficulty"`` and ``"gap_over_sum"`` and the strength as factor), GHM's bin index;
float32 / float64 / float16 / bfloat16 inputs, extreme logits, an autocast region, three
seeds; eager kernels (``compile_kernels=False``), both in one piece and through the CPU
chunking (inputs above its chunk size).

``fingerprint()`` returns the lines, ``run_case(name)`` those of one case;
``tests/losses/test_fingerprint.py`` pins some of them.
Single-threaded (``torch.set_num_threads(1)`` inside ``fingerprint``) so that large sums do
not depend on the number of threads.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from eapm.losses import (
    GHMC,
    GHMR,
    balanced_l1_loss,
    difficulty,
    eapm_balanced_l1_loss,
    eapm_binary_cross_entropy_with_logits,
    eapm_ce_stats,
    eapm_cross_entropy,
    eapm_focal_loss_sum_with_stats,
    eapm_focal_terms,
    eapm_loss,
    eapm_sigmoid_focal_loss,
    gap_over_sum,
    ghm_bin_index,
    modulate_prediction,
    modulating_factor,
    sigmoid_focal_loss,
)

MUS = (0.0, 0.5, 1.0, 1.5, 2.0, 10.0)
THETAS = (0.0, 0.5, 1.0, 1.5, 2.0)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEEDS = (0, 1, 2)
# above the eager kernels' CPU chunk (2**18 elements): exercises the chunked path
LARGE_ROWS = 4000  # x 80 classes = 320000 logits; x 4 deltas uses LARGE_ROWS * 20 rows


def tensor_repr(t: torch.Tensor) -> str:
    """Exact text of a tensor: dtype, shape and every element as float.hex() (<= 64
    elements) or the SHA-256 of the float64 bytes and the hex of the float64 sum."""
    t = t.detach()
    d = t.to(torch.float64).contiguous().reshape(-1)
    head = f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
    if d.numel() <= 64:
        return head + " " + " ".join(float(v).hex() for v in d.tolist())
    digest = hashlib.sha256(d.numpy().tobytes()).hexdigest()[:32]
    return head + f" sha256={digest} sum={float(d.sum()).hex()}"


def _logits(g: torch.Generator, rows: int, classes: int = 8):
    x = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 6
    t = (torch.rand(rows, classes, generator=g, dtype=torch.float64) < 0.3).double()
    x[0, :4] = torch.tensor([-100.0, 100.0, 50.0, -50.0], dtype=torch.float64)
    t[0, :4] = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    return x, t


def _labels(g: torch.Generator, rows: int, classes: int = 8):
    """(rows,) class indices in [0, classes) (the last one: background), row 1 ignored
    (-100)."""
    y = torch.randint(0, classes, (rows,), generator=g)
    y[1] = -100
    return y


def _deltas(g: torch.Generator, rows: int):
    p = torch.randn(rows, 4, generator=g, dtype=torch.float64)
    q = torch.randn(rows, 4, generator=g, dtype=torch.float64)
    p[:2] = 0.0  # GoS 1 (one zero) and 0/0 (both zero)
    q[1:3] = 0.0
    p[3, 2:] = 5.0  # an outlier of the balanced L1
    return p, q


def _with_grad(fn: Callable, x: torch.Tensor, *args, upstream_seed: int = 99) -> List[str]:
    """Value(s) of ``fn(x_leaf, *args)`` and the gradient w.r.t. x of the first output
    (summed with a fixed random weight when it is not a scalar)."""
    xr = x.clone().requires_grad_()
    out = fn(xr, *args)
    outs = out if isinstance(out, tuple) else (out,)
    first = outs[0]
    if first.dim() == 0:
        first.backward()
    else:
        w = torch.rand(first.shape, generator=torch.Generator().manual_seed(upstream_seed))
        first.backward(w.to(first.dtype))
    lines = [f"  out{i} " + tensor_repr(o) for i, o in enumerate(outs)]
    lines.append("  grad " + tensor_repr(xr.grad))
    return lines


def _cases() -> Dict[str, Callable[[], List[str]]]:  # noqa: C901  (one flat table)
    cases: Dict[str, Callable[[], List[str]]] = {}

    for seed in SEEDS:
        for dtype in DTYPES:
            dn = str(dtype).replace("torch.", "")

            def logits(seed=seed, dtype=dtype):
                x, t = _logits(torch.Generator().manual_seed(seed), 6)
                return x.to(dtype), t.to(dtype)

            def deltas(seed=seed, dtype=dtype):
                p, q = _deltas(torch.Generator().manual_seed(100 + seed), 8)
                return p.to(dtype), q.to(dtype)

            for red in ("none", "sum", "mean"):
                cases[f"sigmoid_focal_loss seed={seed} {dn} {red}"] = (
                    lambda logits=logits, red=red: _with_grad(
                        lambda x, t: sigmoid_focal_loss(x, t, reduction=red), *logits()
                    )
                )
                cases[f"sigmoid_focal_loss a=-1 g=0 seed={seed} {dn} {red}"] = (
                    lambda logits=logits, red=red: _with_grad(
                        lambda x, t: sigmoid_focal_loss(x, t, -1.0, 0.0, red), *logits()
                    )
                )
                for mu in MUS:
                    cases[f"eapm_sigmoid_focal_loss mu={mu} seed={seed} {dn} {red}"] = (
                        lambda logits=logits, red=red, mu=mu: _with_grad(
                            lambda x, t: eapm_sigmoid_focal_loss(x, t, mu, reduction=red),
                            *logits(),
                        )
                    )
            for mu in MUS:
                cases[f"eapm_focal_terms mu={mu} seed={seed} {dn}"] = (
                    lambda logits=logits, mu=mu: _with_grad(
                        lambda x, t: eapm_focal_terms(x, t, mu, 0.25, 1.5), *logits()
                    )
                )
                cases[f"eapm_focal_loss_sum_with_stats mu={mu} seed={seed} {dn}"] = (
                    lambda logits=logits, mu=mu: _with_grad(
                        lambda x, t: eapm_focal_loss_sum_with_stats(x, t, mu), *logits()
                    )
                )
            for beta in (1.0, 0.11):
                for red in ("none", "sum", "mean"):
                    cases[f"balanced_l1_loss beta={beta} seed={seed} {dn} {red}"] = (
                        lambda deltas=deltas, beta=beta, red=red: _with_grad(
                            lambda p, q: balanced_l1_loss(p, q, beta=beta, reduction=red),
                            *deltas(),
                        )
                    )
                    for theta in THETAS:
                        key = f"eapm_balanced_l1_loss theta={theta} beta={beta} "
                        key += f"seed={seed} {dn} {red}"
                        cases[key] = lambda deltas=deltas, beta=beta, red=red, theta=theta: (
                            _with_grad(
                                lambda p, q: eapm_balanced_l1_loss(
                                    p, q, theta, beta=beta, reduction=red
                                ),
                                *deltas(),
                            )
                        )
            for mask in (False, True):

                def ghm(seed=seed, dtype=dtype, mask=mask, logits=logits, deltas=deltas):
                    x, t = logits()
                    p, q = deltas()
                    vc = vr = None
                    if mask:
                        vc = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) > 0.2
                        vr = torch.rand(p.shape, generator=torch.Generator().manual_seed(6)) > 0.2
                    out = []
                    for module, a, b, v in (
                        (GHMC(), x, t, vc),
                        (GHMC(bins=10, momentum=0.0), x, t, vc),
                        (GHMR(), p, q, vr),
                        (GHMR(mu=0.5, bins=4, momentum=0.0), p, q, vr),
                    ):
                        for call in range(2):
                            out.append(f"  {module!r} call {call}")
                            out += _with_grad(lambda a_, b_: module(a_, b_, v), a, b)
                        out.append("  acc_sum " + tensor_repr(module.acc_sum))
                    return out

                cases[f"GHM mask={mask} seed={seed} {dn}"] = ghm

            def attributes(logits=logits, deltas=deltas):
                x, t = logits()
                p, q = deltas()
                out = ["  difficulty " + tensor_repr(difficulty(x, t))]
                out.append("  gap_over_sum " + tensor_repr(gap_over_sum(p, q)))
                for s in MUS:
                    out.append(
                        f"  modulating_factor {s} "
                        + tensor_repr(modulating_factor(difficulty(x, t), s))
                    )
                return out

            cases[f"attributes seed={seed} {dn}"] = attributes

            def ce_inputs(seed=seed, logits=logits):
                """Softmax logits and labels: the rows of ``logits`` with its extreme row moved
                from the top to the middle, so that the first pinned values of a gradient are
                those of an ordinary row."""
                return logits()[0].roll(-2, 0), _labels(
                    torch.Generator().manual_seed(400 + seed), 6
                )

            for mu in MUS:
                for red in ("none", "sum", "mean"):
                    # (mu 0 is F.cross_entropy itself, which has no float16 CPU kernel)
                    if mu > 0 or dtype != torch.float16:
                        cases[f"eapm_cross_entropy mu={mu} seed={seed} {dn} {red}"] = (
                            lambda ce_inputs=ce_inputs, mu=mu, red=red: _with_grad(
                                lambda x, y: eapm_cross_entropy(x, y, mu, red), *ce_inputs()
                            )
                        )
                    key = f"eapm_binary_cross_entropy_with_logits mu={mu} seed={seed} {dn} {red}"
                    cases[key] = lambda logits=logits, mu=mu, red=red: _with_grad(
                        lambda x, t: eapm_binary_cross_entropy_with_logits(x, t, mu, red),
                        *logits(),
                    )

                def ce_stats(ce_inputs=ce_inputs, mu=mu):
                    d, m = eapm_ce_stats(*ce_inputs(), mu)
                    return ["  dif " + tensor_repr(d), "  mf " + tensor_repr(m)]

                cases[f"eapm_ce_stats mu={mu} seed={seed} {dn}"] = ce_stats

            # the general recipe: the paper's three EAPM losses rebuilt from their base losses
            for s_ in (0.0, 1.5):
                general = {
                    "sigmoid": (
                        eapm_loss(sigmoid_focal_loss, "difficulty", s_, "sigmoid"),
                        logits,
                        {"reduction": "none"},
                    ),
                    "softmax": (
                        eapm_loss(F.cross_entropy, "difficulty", s_, "softmax"),
                        ce_inputs,
                        {"reduction": "none"},
                    ),
                    "identity": (
                        eapm_loss(balanced_l1_loss, "gap_over_sum", s_, modulated_columns=(2, 3)),
                        deltas,
                        {"beta": 0.11},
                    ),
                }
                for link, (fn, inputs, kw) in general.items():
                    cases[f"eapm_loss {link} s={s_} seed={seed} {dn}"] = (
                        lambda fn=fn, inputs=inputs, kw=kw: _with_grad(
                            lambda a, b: fn(a, b, **kw), *inputs()
                        )
                    )
                    cols = (2, 3) if link == "identity" else None
                    attribute = "gap_over_sum" if link == "identity" else "difficulty"
                    cases[f"modulate_prediction {link} s={s_} seed={seed} {dn}"] = (
                        lambda inputs=inputs, link=link, cols=cols, attribute=attribute, s_=s_: (
                            _with_grad(
                                lambda a, b: modulate_prediction(
                                    a, b, attribute, s_, link, modulated_columns=cols
                                ),
                                *inputs(),
                            )
                        )
                    )

            def bins(logits=logits):
                g = torch.sigmoid(logits()[0].float()).reshape(-1)
                out = []
                for edges in (torch.linspace(0, 1, 11), torch.tensor([0.0, 0.25, 0.5, 1.0 + 1e-6])):
                    out.append("  ghm_bin_index " + tensor_repr(ghm_bin_index(g, edges)))
                return out

            cases[f"ghm_bin_index seed={seed} {dn}"] = bins

    # autocast region (bfloat16 on the CPU): the kernels compute in float32 regardless
    def autocast_case():
        x, t = _logits(torch.Generator().manual_seed(3), 6)
        p, q = _deltas(torch.Generator().manual_seed(4), 8)
        out = []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out += _with_grad(lambda a, b: eapm_sigmoid_focal_loss(a, b, 1.5), x.float(), t.float())
            out += _with_grad(lambda a, b: eapm_balanced_l1_loss(a, b, 1.5), p.float(), q.float())
            out += _with_grad(lambda a, b: GHMC()(a, b), x.float(), t.float())
        return out

    cases["autocast bfloat16"] = autocast_case

    # the chunked eager path (inputs larger than the CPU chunk)
    for seed in SEEDS[:2]:
        for dtype in (torch.float32, torch.float64):
            dn = str(dtype).replace("torch.", "")

            def large(seed=seed, dtype=dtype):
                x, t = _logits(torch.Generator().manual_seed(200 + seed), LARGE_ROWS, 80)
                p, q = _deltas(torch.Generator().manual_seed(300 + seed), LARGE_ROWS * 20)
                x, t, p, q = (a.to(dtype) for a in (x, t, p, q))
                out = []
                for mu in (0.0, 1.5):
                    out += _with_grad(lambda a, b: eapm_focal_loss_sum_with_stats(a, b, mu), x, t)
                    out += _with_grad(lambda a, b: eapm_focal_terms(a, b, mu), x, t)
                for theta in (0.0, 1.5):
                    out += _with_grad(
                        lambda a, b: eapm_balanced_l1_loss(a, b, theta, beta=0.11), p, q
                    )
                    out += _with_grad(
                        lambda a, b: eapm_balanced_l1_loss(a, b, theta, reduction="sum"), p, q
                    )
                return out

            cases[f"chunked seed={seed} {dn}"] = large
    return cases


def fingerprint() -> List[str]:
    """The fingerprint lines: one header per case, then its values and gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lines = []
        for name, fn in _cases().items():
            lines.append(name)
            lines += fn()
        return lines
    finally:
        torch.set_num_threads(threads)


def run_case(name: str) -> List[str]:
    """The lines of one case (without its header), single-threaded like ``fingerprint``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _cases()[name]()
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    for line in fingerprint():
        print(line)


if __name__ == "__main__":
    main()
