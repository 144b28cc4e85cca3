"""eapm.losses.checks: the one numeric rule (and the choice rule) every module applies, with
the same answer for a loss argument, a constructor argument and a trainer key."""

import math

import numpy as np
import pytest
import torch

from eapm.losses import check_balanced_l1_params, check_eapm_param, check_ghm_params
from eapm.losses.checks import check_choice, check_flag, check_number, is_number

# values that are not numbers: a bool is not the number 1, a string is not its digits
NOT_NUMBERS = [True, False, "2", "1.5", None, [1.0], b"1", complex(1, 0), torch.tensor(True),
               torch.tensor([1.0]), np.array([2.0])]  # fmt: skip


@pytest.mark.parametrize("value", NOT_NUMBERS)
def test_not_numbers_are_refused_everywhere(value):
    assert not is_number(value)
    with pytest.raises(ValueError, match=r"x must be a finite number >= 0, got "):
        check_number(value, "x", 0)
    # the strength of every EAPM loss, the balanced L1 and GHM parameters: the same rule
    with pytest.raises(ValueError, match="mu must be a finite number >= 0"):
        check_eapm_param(value, "mu")
    with pytest.raises(ValueError, match="balanced L1 alpha must be a finite number > 0"):
        check_balanced_l1_params(alpha=value)
    if value is not None:  # check_ghm_params leaves an argument at None unchecked
        with pytest.raises(ValueError, match="GHM momentum must be a finite number in"):
            check_ghm_params(momentum=value)


@pytest.mark.parametrize(
    "value",
    [1, 1.0, np.float32(1.0), np.int64(1), np.float64(1.0), np.array(1.0), torch.tensor(1.0),
     torch.tensor(1, dtype=torch.int64)],
)  # fmt: skip
def test_numbers_of_every_kind_are_accepted(value):
    assert check_number(value, "x", 0) == 1.0 and type(check_number(value, "x", 0)) is float
    assert check_eapm_param(value, "mu") == 1.0


@pytest.mark.parametrize(
    "kwargs, good, bad, text",
    [
        (dict(lo=0), [0, 3.5], [-1e-9, math.inf, math.nan], ">= 0"),
        (dict(lo=0, lo_open=True), [1e-9], [0, -1.0], "> 0"),
        (dict(hi=1), [-5.0, 1], [1.5, -math.inf], "<= 1"),
        (dict(lo=0, hi=1, hi_open=True), [0, 0.999], [1, 1.2], "in [0, 1)"),
        (dict(lo=0, hi=1, lo_open=True), [1, 0.5], [0], "in (0, 1]"),
        (dict(lo=1, integer=True), [1, 7, np.int32(3)], [0, 1.0, 2.5, True], "an integer >= 1"),
    ],
)  # fmt: skip
def test_bounds_and_messages(kwargs, good, bad, text):
    for v in good:
        out = check_number(v, "x", **kwargs)
        assert out == v and type(out) is (int if kwargs.get("integer") else float)
    for v in bad:
        with pytest.raises(ValueError) as e:
            check_number(v, "x", **kwargs)
        assert str(e.value).startswith("x must be ") and text in str(e.value)
        assert str(e.value).endswith(f"got {v!r}")


def test_choice():
    assert check_choice("ema", "loss_normalizer", ("ema", "all_reduce")) == "ema"
    with pytest.raises(ValueError, match=r"loss_normalizer must be one of \('ema', 'all_reduce'\)"):
        check_choice("EMA", "loss_normalizer", ("ema", "all_reduce"))


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), (np.bool_(True), True), (np.array(False), False),
     (torch.tensor(True), True)],
)  # fmt: skip
def test_flags_of_every_kind_are_accepted(value, expected):
    out = check_flag(value, "instance_balanced_pos")
    assert out is expected


# what bool() would turn into a flag silently: "False" is True to bool(), 1 / 1.0 / None too
@pytest.mark.parametrize(
    "value", [1, 0, 1.0, "False", "True", "", None, [True], torch.tensor(1), np.array([True])]
)
def test_not_flags_are_refused(value):
    with pytest.raises(ValueError, match=r"^compile_kernels must be True or False, got "):
        check_flag(value, "compile_kernels")
