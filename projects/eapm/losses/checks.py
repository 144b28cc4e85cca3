"""The project's one rule for a numeric argument, and its rule for a choice.

A number is a real number that is not a bool (``True`` is not the number 1 here) and not a
string (``"2"`` is not 2): an int, a float, a numpy scalar, or a zero-dimensional tensor or array
holding one of those. Every module that checks a
number uses ``check_number`` (or ``is_number``), so that the rule and its message are the same
for a loss argument, a constructor argument and a trainer key. A flag (``check_flag``) is a bool
and nothing else: neither 1 nor ``"False"`` (which ``bool()`` would turn into True). Pure Python.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, Sequence

__all__ = ["is_number", "check_number", "check_flag", "check_choice", "rule", "choice"]


def _scalar(value: Any) -> Any:
    """The Python number a zero-dimensional tensor / array holds (``item()``), else ``value``."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def is_number(value: Any, integer: bool = False) -> bool:
    """Whether ``value`` is a real number (an integer with ``integer``), not a bool."""
    value = _scalar(value)
    kind = numbers.Integral if integer else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool)


def _bounds(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    if hi == math.inf:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo == -math.inf:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def check_number(
    value: Any,
    name: str,
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
):
    """``value`` if it is a finite number (an integer with ``integer``) between ``lo`` and
    ``hi`` (excluded where ``lo_open`` / ``hi_open``), as a float (an int with ``integer``);
    else ``ValueError("<name> must be a finite number >= 0, got ...")`` naming ``name``."""
    value = _scalar(value)
    ok = is_number(value, integer) and math.isfinite(value)
    ok = ok and (lo < value if lo_open else lo <= value)
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        what = "an integer" if integer else "a finite number"
        bounds = _bounds(lo, hi, lo_open, hi_open)
        raise ValueError(f"{name} must be {what} {bounds}, got {value!r}")
    return int(value) if integer else float(value)


def check_flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool (a numpy bool or a zero-dimensional bool tensor / array
    too), as a Python bool; else ``ValueError`` naming ``name``."""
    value = _scalar(value)
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Sequence) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def rule(name: str, lo: float = -math.inf, hi: float = math.inf, **kwargs):
    """A constructor's rule for one argument: ``check(value)`` = ``check_number(value, name,
    lo, hi, **kwargs)`` (``lo_open`` / ``hi_open`` / ``integer``)."""
    return partial(check_number, name=name, lo=lo, hi=hi, **kwargs)


def choice(name: str, choices: Sequence):
    """A constructor's rule for one argument: ``check(value)`` = ``check_choice(value, name,
    choices)``."""
    return partial(check_choice, name=name, choices=choices)
