"""Pinned values and gradients of the public losses (``tests/losses/fingerprint.py``):
a handful of the fingerprint's lines, recorded as float.hex() on the code this package was
split from. Any change of a loss value or gradient beyond rounding fails here; the full,
bitwise check is ``python -m tests.losses.fingerprint`` before and after a change, diffed.

Tolerance: 64 units in the last place for float32 / float64 results (a different CPU's
vector width may round a transcendental function or a sum differently), 1 unit for float16
/ bfloat16 results (rounded from float32); exact zeros stay exact. Each pinned line holds
the head (name, dtype, shape) and the first (up to) six values.
"""

from __future__ import annotations

import math

import pytest
import torch

from eapm.losses import GHMC, eapm_focal_terms
from tests.losses.fingerprint import _logits, run_case, tensor_repr

EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
ULPS = {"float64": 64, "float32": 64, "float16": 1, "bfloat16": 1}

PINNED = {
    "eapm_sigmoid_focal_loss mu=1.5 seed=0 float32 sum": [
        ("out0 float32[] " "0x1.50cfce0000000p+7"),
        (
            "grad float32[6, 8] "
            "-0x1.0000000000000p-2 0x1.8000000000000p-1 -0x0.0p+0 "
            "0x0.0p+0 -0x1.078c0c0000000p-2 0x1.c78da40000000p-30"
        ),
    ],
    "eapm_sigmoid_focal_loss mu=10.0 seed=1 float64 mean": [
        ("out0 float64[] " "0x1.e4accd723ddb8p+1"),
        (
            "grad float64[6, 8] "
            "-0x1.5555555555555p-8 0x1.0000000000000p-6 -0x1.82e1625cd33edp-220 "
            "0x1.222909c59e6f2p-218 0x1.37979f2189114p-12 0x1.7cbb988c95412p-14"
        ),
    ],
    "eapm_focal_loss_sum_with_stats mu=2.0 seed=2 bfloat16": [
        ("out0 float32[] " "0x1.4dd1fc0000000p+7"),
        (
            "out1 float32[5] "
            "0x1.c3ae280000000p+2 0x1.28593c0000000p+4 0x1.faa1080000000p+3 "
            "0x1.9b9e1e0000000p+5 0x1.8000000000000p+3"
        ),
        (
            "grad bfloat16[6, 8] "
            "-0x1.0000000000000p-2 0x1.8000000000000p-1 -0x0.0p+0 "
            "0x0.0p+0 -0x1.0000000000000p-2 0x1.b200000000000p-1"
        ),
    ],
    "eapm_focal_terms mu=1.5 seed=1 float64": [
        (
            "out0 float64[6, 8] "
            "0x1.9143c0714ee46p+4 0x1.2cf2d054fb2b4p+6 0x1.fbb74f235bf28p-181 "
            "0x1.7cc97b5a84f5ep-179 0x1.58eefab2e983fp-5 0x1.7973df6631decp-7"
        ),
        (
            "out1 float64[6, 8] "
            "0x1.0000000000000p+0 0x1.0000000000000p+0 0x1.d257d547e0840p-73 "
            "0x1.d257d547e0840p-73 0x1.705321108bd09p-3 0x1.a71e4969372b7p-4"
        ),
        (
            "out2 float64[6, 8] "
            "0x1.0000000000000p+0 0x1.0000000000000p+0 0x1.e7b7cbc36fabcp+0 "
            "0x1.e7b7cbc36fabcp+0 0x1.a448f60d3bac0p+0 0x1.c05d747c14eeap+0"
        ),
        (
            "grad float64[6, 8] "
            "-0x1.a728100000000p-6 0x1.748a348000000p-1 -0x1.2cd810e0963b4p-179 "
            "0x1.d1d9792c995f5p-178 0x1.ac81309c5824bp-6 0x1.72bb954b15028p-6"
        ),
    ],
    "sigmoid_focal_loss seed=0 float32 none": [
        (
            "out0 float32[6, 8] "
            "0x1.9000000000000p+4 0x1.2c00000000000p+6 0x0.0p+0 "
            "0x0.0p+0 0x1.506e100000000p+0 0x1.5ff1580000000p-34"
        ),
        (
            "grad float32[6, 8] "
            "-0x1.a728100000000p-6 0x1.748a340000000p-1 -0x0.0p+0 "
            "0x0.0p+0 -0x1.5b10da0000000p-4 0x1.e580de0000000p-33"
        ),
    ],
    "eapm_balanced_l1_loss theta=1.5 beta=0.11 seed=0 float64 sum": [
        ("out0 float64[] " "0x1.8a525e0e78f98p+5"),
        (
            "grad float64[8, 4] "
            "0x1.8000000000000p+0 0x1.8000000000000p+0 0x1.8000000000000p+0 "
            "-0x1.8000000000000p+0 0x0.0p+0 0x0.0p+0"
        ),
    ],
    "balanced_l1_loss beta=1.0 seed=0 float16 mean": [
        ("out0 float32[] " "0x1.22b8680000000p+0"),
        (
            "grad float16[8, 4] "
            "0x1.5cc0000000000p-5 0x1.3300000000000p-5 0x1.8000000000000p-5 "
            "-0x1.6780000000000p-5 0x0.0p+0 0x0.0p+0"
        ),
    ],
    "GHM mask=True seed=0 float64": [
        "GHMC(bins=30, momentum=0.75, all_reduce=False) call 0",
        ("out0 float64[] " "0x1.d2e94dc15c355p+2"),
        (
            "grad float64[6, 8] "
            "-0x1.3b13b1c71c71cp-6 0x0.0p+0 0x0.0p+0 "
            "0x1.1efaf9e6db133p-77 -0x1.3984b9845ff01p-6 0x0.0p+0"
        ),
        "GHMC(bins=30, momentum=0.75, all_reduce=False) call 1",
        ("out0 float64[] " "0x1.0ace7562e3bb2p+2"),
        (
            "grad float64[6, 8] "
            "-0x1.681681c71c71cp-7 0x0.0p+0 0x0.0p+0 "
            "0x1.47fa41f1303bep-78 -0x1.664e8a9fbbe82p-7 0x0.0p+0"
        ),
        (
            "acc_sum float32[30] "
            "0x1.c000000000000p+1 0x0.0p+0 0x0.0p+0 "
            "0x1.c000000000000p-2 0x1.c000000000000p-2 0x1.c000000000000p-1"
        ),
        "GHMC(bins=10, momentum=0.0, all_reduce=False) call 0",
        ("out0 float64[] " "0x1.01542957938c6p+1"),
        (
            "grad float64[6, 8] "
            "-0x1.ac57038e38e38p-8 0x0.0p+0 0x0.0p+0 "
            "0x1.9e86f678c791cp-79 -0x1.aa389fa3d4e09p-8 0x0.0p+0"
        ),
        "GHMC(bins=10, momentum=0.0, all_reduce=False) call 1",
        ("out0 float64[] " "0x1.01542957938c6p+1"),
        (
            "grad float64[6, 8] "
            "-0x1.ac57038e38e38p-8 0x0.0p+0 0x0.0p+0 "
            "0x1.9e86f678c791cp-79 -0x1.aa389fa3d4e09p-8 0x0.0p+0"
        ),
        ("acc_sum float32[10] " "0x0.0p+0 0x0.0p+0 0x0.0p+0 " "0x0.0p+0 0x0.0p+0 0x0.0p+0"),
        "GHMR(mu=0.02, bins=10, momentum=0.7, all_reduce=False) call 0",
        ("out0 float64[] " "0x1.fb92f08cab9c2p+0"),
        (
            "grad float64[8, 4] "
            "0x1.1c57a2d41d8efp-4 0x1.1c3cc97b4bd1ep-4 0x1.1c675e73bf972p-4 "
            "-0x1.1c5be9236fd5ap-4 0x0.0p+0 0x0.0p+0"
        ),
        "GHMR(mu=0.02, bins=10, momentum=0.7, all_reduce=False) call 1",
        ("out0 float64[] " "0x1.2a92abbcc0722p+0"),
        (
            "grad float64[8, 4] "
            "0x1.4e85382b03a53p-5 0x1.4e65a1e0a03bbp-5 0x1.4e97ba8c78e18p-5 "
            "-0x1.4e8a3f9764f53p-5 0x0.0p+0 0x0.0p+0"
        ),
        (
            "acc_sum float32[10] "
            "0x1.051eb80000000p+1 0x0.0p+0 0x0.0p+0 "
            "0x0.0p+0 0x0.0p+0 0x0.0p+0"
        ),
        "GHMR(mu=0.5, bins=4, momentum=0.0, all_reduce=False) call 0",
        ("out0 float64[] " "0x1.843550409ac70p-2"),
        (
            "grad float64[8, 4] "
            "0x1.c5b2f74b13d97p-7 0x1.ede132cd99524p-6 0x1.f708958860d06p-7 "
            "-0x1.d1a7b5575413ep-7 0x0.0p+0 0x0.0p+0"
        ),
        "GHMR(mu=0.5, bins=4, momentum=0.0, all_reduce=False) call 1",
        ("out0 float64[] " "0x1.843550409ac70p-2"),
        (
            "grad float64[8, 4] "
            "0x1.c5b2f74b13d97p-7 0x1.ede132cd99524p-6 0x1.f708958860d06p-7 "
            "-0x1.d1a7b5575413ep-7 0x0.0p+0 0x0.0p+0"
        ),
        ("acc_sum float32[4] " "0x0.0p+0 0x0.0p+0 0x0.0p+0 " "0x0.0p+0"),
    ],
}


def _split(line: str):
    """(head, dtype, values) of a fingerprint line: head = "name dtype[shape]"."""
    name, rest = line.split(" ", 1)
    dims, values = rest.split("]", 1)
    head = f"{name} {dims}]"
    return head, dims.split("[")[0], [float.fromhex(v) for v in values.split()]


@pytest.mark.parametrize("case", sorted(PINNED))
def test_pinned_values(case):
    got = [line.strip() for line in run_case(case)]
    want = PINNED[case]
    assert len(got) == len(want), got
    for g_line, w_line in zip(got, want):
        if "[" not in w_line:  # a label line (e.g. the GHM module's repr and call number)
            assert g_line == w_line
            continue
        w_head, dtype, w_vals = _split(w_line)
        g_head, _, g_vals = _split(g_line)
        assert g_head == w_head
        tol = ULPS[dtype] * EPS[dtype]
        for i, (g, w) in enumerate(zip(g_vals, w_vals)):
            ok = g == w or abs(g - w) <= tol * max(abs(g), abs(w))
            assert ok, f"{case}: {w_head} element {i}: {g.hex()} != pinned {w.hex()}"


def test_pins_can_fail():
    """The comparison notices a change of about 1e-9 (relative) of a float64 loss: the
    pinned per-element EAPM focal loss at mu 1.5, recomputed at mu = 1.5 + 1e-9."""
    x, t = _logits(torch.Generator().manual_seed(1), 6)
    loss = eapm_focal_terms(x, t, 1.5 + 1e-9, 0.25, 1.5)[0]
    _, _, g_vals = _split("out0 " + tensor_repr(loss))
    _, dtype, w_vals = _split(PINNED["eapm_focal_terms mu=1.5 seed=1 float64"][0])
    tol = ULPS[dtype] * EPS[dtype]
    assert any(abs(g - w) > tol * abs(w) for g, w in zip(g_vals, w_vals))
    assert all(math.isfinite(g) for g in g_vals)


def test_fingerprint_covers_every_public_loss():
    """Every public loss of ``eapm.losses`` has a case in the fingerprint (names in the
    case headers), and large cases report a digest, small ones every element."""
    from tests.losses import fingerprint

    names = {k.split(" ")[0] for k in fingerprint._cases()}
    for public in (
        "sigmoid_focal_loss",
        "eapm_sigmoid_focal_loss",
        "eapm_focal_terms",
        "eapm_focal_loss_sum_with_stats",
        "balanced_l1_loss",
        "eapm_balanced_l1_loss",
        "GHM",
        "attributes",
        "chunked",
    ):
        assert public in names, public
    assert "sha256=" in tensor_repr(torch.zeros(65))
    assert tensor_repr(torch.zeros(2)) == "float32[2] 0x0.0p+0 0x0.0p+0"
    assert GHMC.__module__ == "eapm.losses.ghm"
