"""Argument checks shared by the whole package.

Every public entry point validates its arguments before doing any work and raises a
``ValueError`` that names the argument and the accepted range. The helpers here raise it as an
:class:`ArgumentError`, which also carries the argument's name, the accepted range and the
refused value as attributes (``ode-reg`` reads them to name the setting in a configuration).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class ArgumentError(ValueError):
    """A refused argument: a ``ValueError`` whose message names the argument and the range,
    with the three as attributes.

    Not :class:`argparse.ArgumentError` (that one is a parser's; this one is a class's).

    Args:
        argument: the argument's name, as in the signature (``"weight"``).
        accepted: the accepted range or kind, as in the message (``"[0.0, inf)"``).
        value: the refused value (a shape for a tensor argument).
        message: the whole message.

    Example::

        >>> err = ArgumentError("weight", "[0.0, inf)", -1.0, "`weight` must lie in [0.0, inf), got -1.0")
        >>> isinstance(err, ValueError), err.argument, err.accepted, err.value
        (True, 'weight', '[0.0, inf)', -1.0)
        >>> str(err)
        '`weight` must lie in [0.0, inf), got -1.0'
    """

    def __init__(self, argument: str, accepted: str, value: object, message: str) -> None:
        super().__init__(message)
        self.argument = argument
        self.accepted = accepted
        self.value = value

    def __reduce__(self) -> tuple[type, tuple[str, str, object, str]]:
        # BaseException pickles ``args`` (the message alone); keep the three attributes too.
        return type(self), (self.argument, self.accepted, self.value, str(self))


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise :class:`ArgumentError` unless ``low (<|<=) value (<|<=) high`` and ``value`` is finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(
            name, "a real number", value, f"`{name}` must be a real number, got {value!r}"
        )
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    ok = math.isfinite(value)
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ArgumentError(
            name, interval, value, f"`{name}` must lie in {interval}, got {value!r}"
        )


def check_int(name: str, value: int, low: int = 1) -> None:
    """Raise :class:`ArgumentError` unless ``value`` is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        accepted = f"an integer >= {low}"
        raise ArgumentError(name, accepted, value, f"`{name}` must be {accepted}, got {value!r}")


def check_gamma(gamma: float, name: str = "gamma") -> None:
    """Raise :class:`ArgumentError` unless ``gamma`` lies in [-1, 1]."""
    check_range(name, gamma, -1.0, 1.0)


def check_square(name: str, m: Tensor) -> None:
    """Raise :class:`ArgumentError` unless the last two dimensions of ``m`` are equal."""
    if not isinstance(m, Tensor) or m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        accepted = "a (batch of) square matrices (..., n, n)"
        raise ArgumentError(
            name, accepted, shape, f"`{name}` must be {accepted}, got shape {shape}"
        )


def check_skew(name: str, m: Tensor, tol: float | None = None) -> None:
    """Raise :class:`ArgumentError` unless ``m`` is a (batch of) skew-symmetric matrices."""
    check_square(name, m)
    if tol is None:
        tol = 1e-5 if m.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
    err = (m + m.mT).abs().amax().item()
    scale = max(1.0, m.abs().amax().item())
    if err > tol * scale:
        accepted = f"skew-symmetric (A + A^T = 0 within {tol:g} relative)"
        raise ArgumentError(
            name,
            accepted,
            tuple(m.shape),
            f"`{name}` must be {accepted}, got max |A + A^T| = {err:.3g}",
        )


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise :class:`ArgumentError` unless ``value`` is one of ``choices``.

    Example::

        >>> check_choice("order", "pixel", ("pixel", "permuted"))
    """
    if value not in choices:
        raise ArgumentError(
            name, f"one of {choices}", value, f"`{name}` must be one of {choices}, got {value!r}"
        )


def check_bool(name: str, value: object) -> None:
    """Raise :class:`ArgumentError` unless ``value`` is ``True`` or ``False``.

    Example::

        >>> check_bool("gated", True)
    """
    if not isinstance(value, bool):
        raise ArgumentError(name, "True or False", value, f"`{name}` must be a bool, got {value!r}")
