"""Pinned values and gradients of the public losses (``tests/losses/fingerprint.py``):
a handful of the fingerprint's lines, recorded as float.hex() on the code this package was
split from (the focal, balanced L1 and GHM losses) or, for the cases added later (the EAPM
cross entropies, the general recipe, GHM's bin index), on the code of the day they were
added. Any change of a loss value or gradient beyond rounding fails here; the full, bitwise
check is ``python -m tests.losses.fingerprint`` before and after a change, diffed.

Tolerance: 64 units in the last place for float32 / float64 results (a different CPU's
vector width may round a transcendental function or a sum differently), 1 unit for float16
/ bfloat16 results (rounded from float32), none for integers; exact zeros stay exact. Each
pinned line holds the head (name, dtype, shape) and the first (up to) six values.
"""

from __future__ import annotations

import math

import pytest
import torch

from eapm.losses import GHMC, eapm_focal_terms
from tests.losses.fingerprint import _logits, run_case, tensor_repr

EPS = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
    "int64": 0.0,  # indices (GHM's bins): exact
}
ULPS = {"float64": 64, "float32": 64, "float16": 1, "bfloat16": 1, "int64": 0}

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
    "eapm_cross_entropy mu=1.5 seed=0 float32 mean": [
        ("out0 float32[] 0x1.7e7fc40000000p+4"),
        (
            "grad float32[6, 8] "
            "0x1.ac8ac00000000p-5 0x1.e8a7da0000000p-12 0x1.69f21e0000000p-17 "
            "0x1.168cf40000000p-12 -0x1.7f0e5e0000000p-3 0x1.2d3f060000000p-4"
        ),
    ],
    "eapm_cross_entropy mu=2.0 seed=1 bfloat16 none": [
        (
            "out0 bfloat16[6] "
            "0x1.1800000000000p+2 0x0.0p+0 0x1.9a00000000000p+2 "
            "0x1.0c00000000000p-1 0x1.7400000000000p+6 0x1.8800000000000p+1"
        ),
        (
            "grad bfloat16[6, 8] "
            "0x1.0400000000000p-10 0x1.4000000000000p-14 0x1.0600000000000p-12 "
            "0x1.9e00000000000p-4 -0x1.a200000000000p-4 0x1.f800000000000p-50"
        ),
    ],
    "eapm_binary_cross_entropy_with_logits mu=1.5 seed=2 float64 sum": [
        ("out0 float64[] 0x1.4974370484363p+8"),
        (
            "grad float64[6, 8] "
            "-0x1.0000000000000p+0 0x1.0000000000000p+0 -0x1.bc39f35a6e788p-72 "
            "0x1.bc39f35a6e788p-72 -0x1.fffa1235f2653p-1 0x1.e6afc1f8ad468p-1"
        ),
    ],
    "eapm_ce_stats mu=10.0 seed=0 float64": [
        (
            "dif float64[5] "
            "0x1.d1fa0b589ab03p-1 0x1.ab51be15e79b5p-3 0x1.fffbcc8b1fa41p-1 "
            "0x1.0000000000000p+0 0x1.b797ab011d425p-5"
        ),
        (
            "mf float64[5] "
            "0x1.000000592af31p+0 0x1.07c49360ec473p+0 0x1.0000000002e81p+0 "
            "0x1.0000000000000p+0 0x1.8273e658949e2p+0"
        ),
    ],
    "eapm_loss sigmoid s=1.5 seed=0 float32": [
        (
            "out0 float32[6, 8] "
            "0x1.9000000000000p+4 0x1.2c00000000000p+6 0x0.0p+0 "
            "0x0.0p+0 0x1.65786c0000000p+0 0x1.2fee540000000p-31"
        ),
        (
            "grad float32[6, 8] "
            "-0x1.a728100000000p-6 0x1.748a340000000p-1 -0x0.0p+0 "
            "0x0.0p+0 -0x1.5878640000000p-4 0x1.a31f1a0000000p-30"
        ),
    ],
    "eapm_loss softmax s=1.5 seed=1 float64": [
        (
            "out0 float64[6] "
            "0x1.218a89fe04499p+2 0x0.0p+0 0x1.a5213999917cap+2 "
            "0x1.1b4fa7d4b61ffp-1 0x1.74203b2e95ce5p+6 0x1.9b335182c955bp+1"
        ),
        (
            "grad float64[6, 8] "
            "0x1.0a7484aa92640p-10 0x1.43f55ed2b549fp-14 0x1.0cc2088ab87d3p-12 "
            "0x1.9d09b60412fd4p-4 -0x1.a291478a6d7dcp-4 0x1.06232fb52aa9ep-49"
        ),
    ],
    "eapm_loss identity s=1.5 seed=2 float64": [
        (
            "out0 float64[8, 4] "
            "0x1.e7a76c7402efcp+0 0x1.5324f829515f2p+0 0x1.efe66c2360baap+0 "
            "0x1.5232044aee59cp+1 0x0.0p+0 0x0.0p+0"
        ),
        (
            "grad float64[8, 4] "
            "0x1.3d5e0c0000000p-3 0x1.748a348000000p+0 0x1.6c0f158000000p+0 "
            "-0x1.77d2fc0000000p+0 0x0.0p+0 0x0.0p+0"
        ),
    ],
    "modulate_prediction softmax s=1.5 seed=0 float64": [
        (
            "out0 float64[6, 8] "
            "-0x1.575175ac773c6p+0 -0x1.83f54ec2536e2p+2 -0x1.3a7ce8af9599bp+3 "
            "-0x1.a7ee13e4a94a6p+2 -0x1.5e41c4f8e5529p+1 -0x1.001a3d8c6dffdp+0"
        ),
        (
            "out1 float64[6] "
            "0x1.d1fa0b589ab03p-1 0x1.e44d5a6fb3deep-1 0x1.ab51be15e79b4p-3 "
            "0x1.fffbcc8b1fa41p-1 0x1.0000000000000p+0 0x1.b797ab011d420p-5"
        ),
        (
            "out2 float64[6] "
            "0x1.070e53d4a5932p+0 0x1.0000000000000p+0 0x1.9a1cf5871c758p+0 "
            "0x1.000091c350782p+0 0x1.0000000000000p+0 0x1.d3280ca694ceep+0"
        ),
        (
            "grad float64[6, 8] "
            "0x1.a728100000000p-4 0x1.f0b8460000000p-1 0x1.e569720000000p-1 "
            "0x1.f519500000000p-1 0x1.4e9b240000000p-2 0x1.d70dd00000000p-1"
        ),
    ],
    "ghm_bin_index seed=1 float32": [
        (
            "ghm_bin_index int64[48] "
            "0x0.0p+0 0x1.4000000000000p+3 0x1.4000000000000p+3 "
            "0x0.0p+0 0x1.0000000000000p+0 0x1.0000000000000p+0"
        ),
        (
            "ghm_bin_index int64[48] "
            "0x0.0p+0 0x1.0000000000000p+1 0x1.0000000000000p+1 "
            "0x0.0p+0 0x0.0p+0 0x0.0p+0"
        ),
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


# names of ``eapm.losses.__all__`` with no number to fingerprint: the checks of arguments, the
# controls of the compiled-kernel cache, the tuple of link names
NOT_LOSSES = {
    "check_eapm_param",
    "check_balanced_l1_params",
    "check_ghm_params",
    "clear_compiled_kernels",
    "compiled_kernel_state",
    "LINKS",
}


def test_fingerprint_covers_every_public_loss(monkeypatch):
    """Every name of ``eapm.losses.__all__`` but ``NOT_LOSSES`` is called by the fingerprint:
    each is replaced, in the fingerprint module, by a wrapper that records its calls (a name
    the module does not import is added there, and never called), then the cases are built
    and one case of each kind (a header up to its seed: every function, link, mu and
    reduction) is run. A public loss added to ``eapm.losses`` without a case in the
    fingerprint fails here. Large cases report a digest, small ones every element."""
    import eapm.losses
    from tests.losses import fingerprint

    public = set(eapm.losses.__all__)
    assert NOT_LOSSES <= public
    called = set()
    for name in public - NOT_LOSSES:

        def wrapper(*args, _name=name, _original=getattr(eapm.losses, name), **kwargs):
            called.add(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(fingerprint, name, wrapper, raising=False)
    first_of_kind = {}
    for case in fingerprint._cases():
        first_of_kind.setdefault(case.split(" seed=")[0], case)
    for case in first_of_kind.values():
        assert fingerprint.run_case(case), case
    missing = sorted(public - NOT_LOSSES - called)
    assert not missing, f"public names of eapm.losses no fingerprint case calls: {missing}"
    assert "sha256=" in tensor_repr(torch.zeros(65))
    assert tensor_repr(torch.zeros(2)) == "float32[2] 0x0.0p+0 0x0.0p+0"
    assert GHMC.__module__ == "eapm.losses.ghm"
