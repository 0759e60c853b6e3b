"""Argument checks shared by the whole package.

Every public entry point validates its arguments before doing any work and raises a
``ValueError`` that names the argument and the accepted range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``low (<|<=) value (<|<=) high`` and ``value`` is finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a real number, got {value!r}")
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    ok = math.isfinite(value)
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"`{name}` must lie in {interval}, got {value!r}")


def check_int(name: str, value: int, low: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")


def check_gamma(gamma: float, name: str = "gamma") -> None:
    """Raise ``ValueError`` unless ``gamma`` lies in [-1, 1]."""
    check_range(name, gamma, -1.0, 1.0)


def check_square(name: str, m: Tensor) -> None:
    """Raise ``ValueError`` unless the last two dimensions of ``m`` are equal."""
    if not isinstance(m, Tensor) or m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(
            f"`{name}` must be a (batch of) square matrices (..., n, n), got shape {shape}"
        )


def check_skew(name: str, m: Tensor, tol: float | None = None) -> None:
    """Raise ``ValueError`` unless ``m`` is a (batch of) skew-symmetric matrices."""
    check_square(name, m)
    if tol is None:
        tol = 1e-5 if m.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
    err = (m + m.mT).abs().amax().item()
    scale = max(1.0, m.abs().amax().item())
    if err > tol * scale:
        raise ValueError(
            f"`{name}` must be skew-symmetric (A + A^T = 0 within {tol:g} relative), "
            f"got max |A + A^T| = {err:.3g}"
        )
