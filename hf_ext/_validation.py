"""One convention for checking public arguments: a ValueError that names the argument, the value and what is allowed.

Numbers must be real (not bool), finite and in range — ``x < 0`` is False for NaN, so a bare comparison lets NaN
through; these checks do not. A one-element tensor counts as the number it holds (torch optimizers accept a tensor
``lr``). Each check returns the value unchanged, so it can wrap an assignment.

The HfExt configuration (``models/hfext/configuration_hfext.py``) has its own checks with the same wording: that
file is copied next to saved weights and must load where hf_ext is not installed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional

import torch


def _as_real(value: Any) -> Optional[float]:
    """The float a real number stands for, or None for anything else (bools, strings, tensors of several values)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        real = value.dtype != torch.bool and not value.is_complex()
        return float(value) if real and value.numel() == 1 else None
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_number(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False, why: str = ""):
    """A finite real number within the bounds (``low_open``/``high_open``: the bound itself is excluded)."""
    if value is None and allow_none:
        return value
    number = _as_real(value)
    in_range = number is not None and math.isfinite(number) and not (
        (low is not None and (number <= low if low_open else number < low))
        or (high is not None and (number >= high if high_open else number > high)))
    if not in_range:
        allowed = " ".join(part for part in ("a finite number", _range_text(low, high, low_open, high_open)) if part)
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be {allowed}{none}{f' ({why})' if why else ''}, got {value!r}")
    return value


def check_integer(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None,
                  allow_none: bool = False, why: str = ""):
    """A Python (or numpy) integer, not bool, within [low, high]."""
    if value is None and allow_none:
        return value
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and not (
        (low is not None and value < low) or (high is not None and value > high))
    if not ok:
        allowed = " ".join(part for part in ("an integer", _range_text(low, high, False, False)) if part)
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be {allowed}{none}{f' ({why})' if why else ''}, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Iterable) -> Any:
    allowed = tuple(allowed)
    if not any(value == option and type(value) is type(option) for option in allowed):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value
