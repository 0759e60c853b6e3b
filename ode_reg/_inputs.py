"""Input canonicalisation and checks of a solve, in the style of torchdiffeq's ``_check_inputs``.

Every check runs before any work and raises a ``ValueError`` naming the argument and what it
accepts: the state, the times, the method, the keyword arguments, ``components``, the
checkpoint times (and, for fixed-grid methods, whether they lie on the solver's grid), and the
field's first output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ode_reg._checks import check_int
from ode_reg._probe import SOLVERS, fixed_grid, solver_kind
from ode_reg._trajectory_data import DEFAULT_CHECKPOINTS, batch_components

#: The keyword arguments of ``odeint_adjoint`` beyond ``odeint``'s.
ADJOINT_KEYWORDS = (
    "adjoint_rtol",
    "adjoint_atol",
    "adjoint_method",
    "adjoint_options",
    "adjoint_params",
)


def check_state(y0: Any) -> None:
    """Refuse a ``y0`` that is not a floating-point tensor or a tuple of them."""
    comps = y0 if isinstance(y0, tuple) else (y0,)
    if not comps or not all(isinstance(c, Tensor) and c.is_floating_point() for c in comps):
        got = (
            type(y0).__name__
            if not isinstance(y0, tuple)
            else "a tuple of "
            + ", ".join(
                type(c).__name__ if not isinstance(c, Tensor) else str(c.dtype) for c in comps
            )
        )
        raise ValueError(
            f"`y0` must be a floating-point tensor or a tuple of them, got {got}"[:300]
        )


def check_times(t: Any, y0: Any) -> Tensor:
    """``t`` as a tensor (of ``y0``'s dtype and device when given as a sequence), refused
    unless 1-D, finite, of at least 2 times and strictly monotonic."""
    ref = y0[0] if isinstance(y0, tuple) else y0
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=ref.dtype, device=ref.device)
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(
            f"`t` must be a 1-D tensor of at least 2 times, got shape {tuple(t.shape)}"
        )
    # On the host, from one read of ``t`` (a few tensor ops and a device sync each otherwise).
    vals = t.tolist()
    if not all(math.isfinite(v) for v in vals):
        raise ValueError("`t` must be finite")
    d = [b - a for a, b in zip(vals, vals[1:])]
    if not (all(x > 0 for x in d) or all(x < 0 for x in d)):
        raise ValueError("`t` must be strictly increasing or strictly decreasing")
    return t


def check_method(method: str | None) -> None:
    """Refuse a ``method`` that is not one of torchdiffeq's (``None`` is its default)."""
    if method is not None and method not in SOLVERS:
        raise ValueError(f"`method` must be one of {sorted(SOLVERS)}, got {method!r}")


def check_components(y0: Any, components: Sequence[int] | None) -> tuple[int, ...] | None:
    """``components`` checked against a tuple ``y0`` (see :func:`batch_components`).

    Raises:
        ValueError: if ``y0`` is a tensor, or a named component has no batch dimension.
    """
    if components is None:
        return None
    if not isinstance(y0, tuple):
        raise ValueError("`components` names components of a tuple `y0`; `y0` is a tensor")
    return batch_components([c.shape for c in y0], components)


def check_adjoint_kwargs(adjoint_kwargs: dict[str, Any], adjoint: bool) -> None:
    """Refuse keywords other than ``odeint_adjoint``'s, or those without ``adjoint=True``."""
    unknown = set(adjoint_kwargs) - set(ADJOINT_KEYWORDS)
    if unknown:
        raise ValueError(f"unknown keyword arguments {sorted(unknown)}")
    if adjoint_kwargs and not adjoint:
        raise ValueError(f"{sorted(adjoint_kwargs)} need `adjoint=True` (odeint_adjoint)")


def check_adjoint_field(func: Any, adjoint_params: Any) -> None:
    if not isinstance(func, nn.Module) and adjoint_params is None:
        raise ValueError(
            "odeint_adjoint needs `func` to be an nn.Module, or `adjoint_params` given explicitly"
        )


def check_field_output(func: Any, out: Any, y: Any) -> None:
    """Refuse a field whose output does not have the state's shape (its first evaluation).

    A broadcastable wrong shape (``(B, 1)`` for a ``(B, 4)`` state) would otherwise be
    stepped silently by the fixed-grid solvers.

    Args:
        func: the field (named in the message).
        out: what it returned.
        y: the state it was evaluated at (a tensor, or a tuple of tensors).

    Raises:
        ValueError: naming the field and both shapes.

    Example::

        >>> check_field_output(None, torch.zeros(3, 4), torch.zeros(3, 4))  # accepted
    """
    if isinstance(y, Tensor):
        ok = isinstance(out, Tensor) and out.shape == y.shape
        want, got = tuple(y.shape), tuple(out.shape) if isinstance(out, Tensor) else type(out)
    else:
        ok = (
            isinstance(out, (tuple, list))
            and len(out) == len(y)
            and all(isinstance(o, Tensor) and o.shape == c.shape for o, c in zip(out, y))
        )
        want = [tuple(c.shape) for c in y]
        got = (
            [tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__ for o in out]
            if isinstance(out, (tuple, list))
            else type(out).__name__
        )
    if not ok:
        name = getattr(func, "__qualname__", None) or type(func).__name__
        raise ValueError(
            f"the field {name} returned shape {got} for a state of shape {want}: f(t, z) must "
            "return dz/dt with the state's shape"
        )


def checkpoint_times(t: Tensor, checkpoints: int | Tensor | Sequence[float]) -> Tensor:
    """Interior checkpoint times asked for explicitly, in the caller's time."""
    t0, t1 = t[0], t[-1]
    if isinstance(checkpoints, int) and not isinstance(checkpoints, bool):
        check_int("checkpoints", checkpoints, 1)
        frac = torch.arange(1, checkpoints, dtype=t.dtype, device=t.device) / checkpoints
        return t0 + (t1 - t0) * frac
    try:
        extra = torch.as_tensor(checkpoints, dtype=t.dtype, device=t.device)
    except (TypeError, ValueError, RuntimeError):
        extra = None
    if extra is None or extra.dim() != 1 or not bool(torch.isfinite(extra).all()):
        raise ValueError(
            "`checkpoints` must be None, an int >= 1 or a finite 1-D tensor of times, got "
            f"{type(checkpoints).__name__}"
        )
    lo, hi = torch.minimum(t0, t1), torch.maximum(t0, t1)
    if extra.numel() and bool((extra < lo).any() or (extra > hi).any()):
        raise ValueError(
            f"`checkpoints` times must lie between t[0] = {t0.item():g} and t[-1] = "
            f"{t1.item():g}, got values in [{extra.min().item():g}, {extra.max().item():g}]"
        )
    span = (t1 - t0).abs()
    tol = span * (1e-6 if t.dtype != torch.float64 else 1e-12)
    inner = (extra - t0).abs() > tol
    inner &= (extra - t1).abs() > tol
    return extra[inner].unique()


def checkpoint_grid(t: Tensor, checkpoints: int | Tensor | Sequence[float] | None) -> Tensor:
    """The sorted union of the requested times ``t`` and the checkpoint times (for fields that
    integrate themselves on a grid, such as :class:`~ode_reg.OrthogonalFlow`).

    Args:
        t: strictly increasing 1-D tensor of requested times.
        checkpoints: ``None`` (``DEFAULT_CHECKPOINTS`` equal intervals over ``[t[0], t[-1]]``),
            an int ``n >= 1`` (``n`` equal intervals), or a 1-D tensor of times inside
            ``[t[0], t[-1]]``.

    Raises:
        ValueError: on an int below 1 or checkpoint times outside ``[t[0], t[-1]]``.
    """
    if not bool((t[1:] > t[:-1]).all()):
        raise ValueError("`t` must be strictly increasing for a field that integrates itself")
    if checkpoints is None:
        checkpoints = DEFAULT_CHECKPOINTS
    extra = checkpoint_times(t, checkpoints)
    grid = torch.cat([t, extra]).sort().values
    span = (t[-1] - t[0]).abs()
    tol = span * (1e-6 if grid.dtype == torch.float32 else 1e-12)
    keep = torch.ones_like(grid, dtype=torch.bool)
    keep[1:] = (grid[1:] - grid[:-1]) > tol
    grid = grid[keep]
    idx = torch.searchsorted(grid, t).clamp(max=grid.numel() - 1)
    lower = (idx - 1).clamp(min=0)
    pick = torch.where((grid[lower] - t).abs() < (grid[idx] - t).abs(), lower, idx)
    grid[pick] = t
    return grid


def forced_times(
    t: Tensor, checkpoints: Any, method: str | None, options: dict[str, Any] | None, y0: Any
) -> Tensor:
    """The checkpoint times a solve must reach, checked as every call checks them.

    Fixed-grid methods: times on the solver's grid (``checkpoints`` as a count is snapped to
    it; given times off the grid are refused). Other methods: the times themselves.

    Args:
        t: the output times (a 1-D tensor).
        checkpoints: as for :func:`integrate`.
        method: the torchdiffeq method (``None``: ``"dopri5"``).
        options: the solver options.
        y0: the initial state.

    Returns:
        The checkpoint times, a 1-D tensor.

    Raises:
        ValueError: on a bad ``checkpoints`` or a given time off a fixed grid.

    Example::

        >>> forced_times(torch.tensor([0.0, 1.0]), 2, "rk4", {"step_size": 0.25}, torch.ones(1))
        tensor([0.5000])
    """
    forced = checkpoint_times(t, checkpoints)
    method = method or "dopri5"
    if method in SOLVERS and solver_kind(method) == "fixed":
        grid = fixed_grid(method, dict(options or {}), y0, t)
        forced = _on_grid(forced, grid, snap=isinstance(checkpoints, int), method=method)
    return forced


def _on_grid(forced: Tensor, grid: Tensor, *, snap: bool, method: str) -> Tensor:
    span = (grid[-1] - grid[0]).abs()
    tol = float(span) * (1e-5 if grid.dtype != torch.float64 else 1e-10)
    out = []
    for c in forced.tolist():
        i = int((grid - c).abs().argmin())
        if abs(float(grid[i]) - c) > tol and not snap:
            raise ValueError(
                f"`checkpoints` time {c:g} is not on the '{method}' grid (nearest grid time "
                f"{float(grid[i]):g}); fixed-grid checkpoints must be grid times"
            )
        out.append(float(grid[i]))
    return torch.tensor(sorted(set(out)), dtype=grid.dtype)


def match_times(times: Sequence[float], targets: Sequence[float], tol: float) -> list[int]:
    out = [0]
    for c in targets:
        best = min(range(len(times)), key=lambda i: abs(times[i] - c))
        if abs(times[best] - c) <= tol and best not in out:
            out.append(best)
    return sorted(out)
