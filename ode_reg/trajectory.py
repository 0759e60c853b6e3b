"""Trajectories recorded while torchdiffeq solves: one solve per call, checkpoints on the path.

:func:`integrate` makes exactly one ``torchdiffeq.odeint`` (or ``odeint_adjoint``) call. The
field is wrapped in a probe whose step callbacks (torchdiffeq's ``callback_accept_step`` for
adaptive methods, ``callback_step`` for fixed grids) see the live state at the start of every
accepted step: the tensor the next step computes from, so on the autograd path from ``y0`` to
the loss, and ``autograd.grad(loss, z_k)`` is the adjoint ``a_k`` (MATH.md, Notation). The
checkpoints are some of those step states plus the result at the last requested time; the
solve itself (result, steps, field evaluations) is torchdiffeq's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq._impl.adjoint import odeint_adjoint as _td_odeint_adjoint
from torchdiffeq._impl.misc import _TupleFunc
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.odeint import odeint as _td_odeint
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from torchdiffeq._impl.solvers import FixedGridODESolver

from ode_reg._checks import check_int
from ode_reg.functional.indices import spread_indices

#: At most ``DEFAULT_CHECKPOINTS + 1`` solver step states are kept per solve by default
#: (spread evenly over the steps taken), plus the result at the last requested time.
DEFAULT_CHECKPOINTS = 8

_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
_ALL_CALLBACKS = (*_CALLBACKS, *(n + "_adjoint" for n in _CALLBACKS))


def field_attr(func: Any, name: str) -> Any:
    """``getattr(func, name, None)`` for the optional hooks ode_reg and torchdiffeq look up on a
    field (step callbacks, ``ode_reg_integrate``, ``ode_reg_snapshot``), without the failed
    lookup: on an ``nn.Module`` a missing attribute raises inside ``Module.__getattr__`` (~8 us,
    several times a solve). They are methods (the class) or attributes of the instance (its
    ``__dict__``, or a submodule); other objects with a ``__getattr__`` use ``getattr``."""
    if name in getattr(func, "__dict__", ()) or hasattr(type(func), name):
        return getattr(func, name)
    if isinstance(func, nn.Module):
        return func._modules.get(name)
    if not hasattr(type(func), "__getattr__"):
        return None
    return getattr(func, name, None)


@dataclass(frozen=True)
class FieldPoint:
    """How the field is evaluated at one checkpoint: ``f(t_k, z)``.

    Attributes:
        func: the field (acting on the solver's state: the flat state for tuple states).
        time: ``t_k``.
        snapshot: attributes the field held during the solve (``ode_reg_snapshot``), restored
            for the call; ``None`` when it holds none.
        weight: the recorded ``W_k`` of a field that integrates its own weights; the value is
            then ``func.ode_reg_field_at(time, z, weight)``.
    """

    func: Callable[..., Tensor]
    time: Tensor
    snapshot: dict[str, object] | None = None
    weight: Tensor | None = None

    def __call__(self, z: Tensor, weight: Tensor | None = None) -> Tensor:
        """``f(t_k, z)``; ``weight`` replaces the recorded ``W_k`` (same value, other graph)."""
        if self.weight is not None:
            return self.func.ode_reg_field_at(
                self.time, z, self.weight if weight is None else weight
            )
        if not self.snapshot:
            return self.func(self.time, z)
        current = {name: getattr(self.func, name) for name in self.snapshot}
        try:
            for name, value in self.snapshot.items():
                setattr(self.func, name, value)
            return self.func(self.time, z)
        finally:
            for name, value in current.items():
                setattr(self.func, name, value)


class IntegrationError(RuntimeError):
    """An adaptive solver failed (step size underflow, too many steps) inside :func:`integrate`."""


@dataclass
class SolverStats:
    """What the solver did in one solve, counted while it ran.

    Attributes:
        nfe: field evaluations of the forward solve (torchdiffeq's, all of them).
        nfe_backward: field evaluations of ``odeint_adjoint``'s backward solve (0 until the
            backward ran; always 0 when the backward goes through the solver's operations).
        accepted: accepted steps (fixed grids: every step).
        rejected: rejected steps (adaptive methods).
        step_sizes: the accepted step sizes ``|dt|``, in order.
    """

    nfe: int = 0
    nfe_backward: int = 0
    accepted: int = 0
    rejected: int = 0
    step_sizes: list[float] = field(default_factory=list)

    @property
    def dt_min(self) -> float | None:
        """Smallest accepted step size (``None`` if no step was recorded)."""
        return min(self.step_sizes) if self.step_sizes else None

    @property
    def dt_max(self) -> float | None:
        """Largest accepted step size (``None`` if no step was recorded)."""
        return max(self.step_sizes) if self.step_sizes else None

    @property
    def dt_median(self) -> float | None:
        """Median accepted step size (``None`` if no step was recorded)."""
        return median_value(self.step_sizes) if self.step_sizes else None


def median_value(values: Sequence[float]) -> float:
    """``statistics.median`` (the mean of the two middle values for an even count), without
    its type dispatch (the solver-statistics monitor takes two medians a training step).

    Raises:
        ValueError: if ``values`` is empty.
    """
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median of no values")
    m = n // 2
    return float(s[m]) if n % 2 else 0.5 * (s[m - 1] + s[m])


@dataclass
class SolveSummary:
    """What the solver did in one solve of a training step (what ``SolverStatsMonitor`` reads).

    Attributes:
        stats: the counts; ``nfe_backward`` fills in during the backward pass.
        method: the solver.
        field: the class name of the user's field.
        t: the requested output times.
        times: the checkpoint times of a recorded :class:`Trajectory`; ``None`` for a
            stats-only solve (:func:`solve_counted`), whose steps are all the solver's own.
    """

    stats: SolverStats
    method: str
    field: str
    t: Tensor
    times: Tensor | None = None

    @classmethod
    def of(cls, traj: Trajectory) -> SolveSummary:
        """The summary of a recorded trajectory."""
        func = (traj.funcs or (traj.func,))[0]
        return cls(traj.stats, str(traj.method), type(func).__name__, traj.t, traj.times)


@dataclass
class Trajectory:
    """One solve, recorded: the result of :func:`integrate` (and of ``ode_reg.odeint``).

    Attributes:
        func: the vector field acting on the solver's state (for tuple states, torchdiffeq's
            flattening wrapper around the user's field, acting on the concatenated state).
        times: checkpoint times ``t_0, ..., t_K`` in the caller's time (decreasing for a solve
            backwards in time).
        states: the checkpoint states ``z_k`` (for tuple states, the concatenated flat state).
            All but the last are live solver states on the autograd path; the last is the
            result at ``t[-1]`` (a row of :attr:`solution`).
        t: the requested output times.
        solution: what ``torchdiffeq.odeint`` returned (a tensor, or a tuple for tuple states;
            ``(event_t, solution)`` is split: :attr:`event_t` holds the event time).
        method: the solver used.
        adjoint_method: whether ``odeint_adjoint`` solved it (no differentiable backward).
        stats: solver statistics (:class:`SolverStats`).
        shapes: the component shapes of a tuple state (else ``None``).
        weights: for orthogonal flows, ``W_k`` at the checkpoints (else ``None``).
        event_t: the event time of a solve with ``event_fn`` (else ``None``).
    """

    func: Callable[..., Tensor]
    times: Tensor
    states: tuple[Tensor, ...]
    t: Tensor
    solution: Any = None
    method: str = "dopri5"
    adjoint_method: bool = False
    stats: SolverStats = field(default_factory=SolverStats)
    shapes: tuple[torch.Size, ...] | None = None
    weights: tuple[Tensor, ...] | None = None
    event_t: Tensor | None = None
    #: index of each requested time among ``states`` (solves that integrate themselves only).
    t_index: tuple[int, ...] = ()
    funcs: tuple[Callable[..., Tensor], ...] = ()
    points: tuple[FieldPoint, ...] | None = field(default=None, repr=False)
    #: for a chained trajectory, the solves it joins (see :func:`chain`).
    parts: tuple[Trajectory, ...] = ()
    _field_at: Callable[[int, Tensor], Tensor] | None = field(default=None, repr=False)
    #: the grad-requiring leaf copies of ``y0`` that :func:`integrate` made (``grad_leaf``).
    grad_leaves: tuple[Tensor, ...] = field(default=(), repr=False)
    #: for a tuple state, the components the terms' per-sample rows are built from (``None``:
    #: every component with the batch dimension; see :meth:`samples`).
    components: tuple[int, ...] | None = None
    #: the autograd edge of the value torchdiffeq copied into the solution's last row (plain
    #: tensor states; else ``None``): a VJP from it equals one from ``solution[-1]`` without
    #: walking the buffer's other rows (see ``ChainContext.flow_adjoints``).
    end_edge: Any = field(default=None, repr=False)

    @property
    def num_checkpoints(self) -> int:
        """``K + 1``: the number of checkpoint states."""
        return len(self.states)

    @property
    def checkpoint_states(self) -> Tensor:
        """Checkpoint states stacked, shape ``(K + 1, *state.shape)``."""
        return torch.stack(self.states)

    @property
    def ys(self) -> Any:
        """What ``odeint`` returns: the solution at the requested times."""
        if self.solution is not None:
            return self.solution
        return torch.stack([self.states[i] for i in self.t_index])

    @property
    def flat_solution(self) -> Tensor | None:
        """The solution as one tensor ``(len(t), *state.shape)`` (the flat one for tuples)."""
        sol = self.solution
        if sol is None:
            return None
        if isinstance(sol, tuple):
            base = sol[0]._base
            return base if base is not None else sol[0]
        return sol

    @property
    def weight_matrices(self) -> Tensor | None:
        """``W_k`` stacked, shape ``(K + 1, d, d)``, or ``None`` for fields without a weight flow."""
        return None if self.weights is None else torch.stack(self.weights)

    @property
    def span(self) -> float:
        """``|t_K - t_0|``: the length of the solve in time."""
        return float((self.times[-1] - self.times[0]).abs())

    @property
    def end_from_solution(self) -> bool:
        """Whether ``z_K`` is a row of :attr:`solution` (then ``a_K`` is the gradient there)."""
        return self.solution is not None

    def autograd_inputs(self) -> list[Tensor]:
        """The tensors the adjoints are gradients in: the live checkpoint states before the
        end, then the solution (whose last row is ``z_K``) or the live end state."""
        if self.end_from_solution:
            return [*self.states[:-1], self.flat_solution]
        return list(self.states)

    def samples(self, x: Tensor) -> Tensor:
        """A state-shaped tensor (or a stack of them) in per-sample form ``(..., B, d)``.

        Plain states keep their shape (dimension 0 of a state is the batch; a 1-D state is one
        sample). Tuple states (MATH.md, Tuple states): the rows are built from the components
        that carry the batch dimension (leading size ``B``, the first non-scalar component's),
        concatenated per sample; components without it (0-dim accumulators such as a CNF's
        regularization integrals) are left out, and :attr:`components` (``odeint(...,
        components=...)``) names the ones to use instead (a CNF: ``(0,)``, its ``z`` without
        ``log p``). With no batched component the whole state is one sample.
        """
        lead = x.shape[: x.dim() - self.states[0].dim()]
        if self.shapes is None:
            if self.states[0].dim() == 1:
                return x.reshape(*lead, 1, -1)
            return x
        shapes = self.shapes
        use = batch_components(shapes, self.components)
        if not use:
            return x.reshape(*lead, 1, -1)
        b = shapes[use[0]][0]
        parts, start = [], 0
        for i, s in enumerate(shapes):
            n = s.numel()
            if i in use:
                parts.append(x[..., start : start + n].reshape(*lead, b, n // b))
            start += n
        return torch.cat(parts, dim=-1)

    def field_at(self, k: int, z: Tensor) -> Tensor:
        """Evaluate the vector field at checkpoint ``k`` and state ``z``: ``f(t_k, z)``."""
        if self._field_at is not None:
            return self._field_at(k, z)
        if self.points is not None:
            return self.points[k](z)
        return self.func(self.times[k], z)

    def parameters(self) -> list[Tensor]:
        """Trainable parameters of the field(s) (those the sensitivity density is taken over)."""
        out: list[Tensor] = []
        for f in self.funcs or (self.func,):
            if isinstance(f, nn.Module):
                out.extend(
                    p for p in f.parameters() if p.requires_grad and all(p is not q for q in out)
                )
        return out


def batch_components(
    shapes: Sequence[torch.Size], components: Sequence[int] | None = None
) -> tuple[int, ...]:
    """The components of a tuple state that the terms' per-sample rows are built from.

    Default: those with the batch dimension (at least one dimension, leading size equal to the
    first such component's). ``components`` names them instead; each must have it.

    Raises:
        ValueError: if a named component is out of range or has no batch dimension.

    Example::

        >>> import torch
        >>> batch_components([torch.Size([4, 2]), torch.Size([4, 1]), torch.Size([])])
        (0, 1)
    """
    batched = [i for i, s in enumerate(shapes) if len(s) >= 1]
    if not batched:
        return ()
    b = shapes[batched[0]][0]
    have = tuple(i for i in batched if shapes[i][0] == b)
    if components is None:
        return have
    bad = [c for c in components if not isinstance(c, int) or c not in have]
    if bad or not components:
        raise ValueError(
            f"`components` must name tuple-state components with the batch dimension "
            f"(indices among {list(have)}), got {list(components)!r}"
        )
    return tuple(sorted(set(components)))


# --------------------------------------------------------------------------- the probe
class _ProbeBase:
    """The user's field as torchdiffeq sees it during one recorded solve.

    Counts field evaluations and, through torchdiffeq's step callbacks, records the state at
    the start of every accepted step; the user's own callbacks are still called.
    """

    stats: SolverStats
    times: list[Tensor]
    states: list[Any]
    dts: list[Tensor]
    in_backward: bool

    def _setup(self, func: Callable[..., Tensor], adaptive: bool, keep_states: bool) -> None:
        self.stats = SolverStats()
        self.times = []
        self.states = []
        self.dts = []
        self.in_backward = False
        record = "callback_accept_step" if adaptive else "callback_step"
        for name in _ALL_CALLBACKS:
            user = field_attr(func, name)
            if name == record:
                make = self._recorder if keep_states else self._counter
                setattr(self, name, make(user))
            elif name == "callback_reject_step" and adaptive:
                setattr(self, name, self._rejecter(user))
            elif user is not None:
                setattr(self, name, user)

    # The step callbacks are instance attributes, so they must not refer to ``self``: a
    # probe -> callback -> probe cycle would keep every solve's probe, its recorded states and
    # their autograd nodes alive until the cyclic garbage collector runs (a gen-0 collection
    # every few training steps, and memory the allocator cannot reuse at once). The step sizes
    # are kept as tensors and read once, after the solve (:meth:`finish`): no host read, hence
    # no device sync, per step.
    def _recorder(self, user: Callable[..., Any] | None) -> Callable[..., Any]:
        times, states, dts, stats = self.times, self.states, self.dts, self.stats

        def callback(t0: Tensor, y0: Any, dt: Tensor) -> None:
            times.append(t0)
            states.append(y0)
            dts.append(dt.detach())
            stats.accepted += 1
            if user is not None:
                user(t0, y0, dt)

        return callback

    def _counter(self, user: Callable[..., Any] | None) -> Callable[..., Any]:
        """The accepted-step callback of a stats-only solve: the step size, no state (the
        accepted steps are counted, and the sizes detached, once in :meth:`finish`)."""
        dts = self.dts
        self._counted_in_finish = True
        if user is None:

            def callback(t0: Tensor, y0: Any, dt: Tensor) -> None:
                dts.append(dt)

            return callback

        def callback_user(t0: Tensor, y0: Any, dt: Tensor) -> None:
            dts.append(dt)
            user(t0, y0, dt)

        return callback_user

    def _rejecter(self, user: Callable[..., Any] | None) -> Callable[..., Any]:
        stats = self.stats

        def callback(t0: Tensor, y0: Any, dt: Tensor) -> None:
            stats.rejected += 1
            if user is not None:
                user(t0, y0, dt)

        return callback

    def finish(self) -> None:
        """After the forward solve: the accepted step sizes ``|dt|`` into :attr:`stats` (one
        host read), and the field evaluations from now on counted as the backward solve's."""
        if self.dts:
            if self.__dict__.get("_counted_in_finish"):
                self.stats.accepted += len(self.dts)
            self.stats.step_sizes = torch.stack(self.dts).detach().abs().tolist()
            self.dts.clear()
        self.in_backward = True


class _CallProbe(_ProbeBase):
    """The probe of an ``odeint`` solve: a plain callable (no ``nn.Module`` dispatch at each of
    the solver's field evaluations; ``odeint`` does not need the parameters)."""

    def __init__(
        self, func: Callable[..., Tensor], adaptive: bool, keep_states: bool = True
    ) -> None:
        self.func = func
        self._setup(func, adaptive, keep_states)

    def __call__(self, t: Tensor, y: Any) -> Any:
        self.stats.nfe += 1
        out = self.func(t, y)
        if self.stats.nfe == 1:
            check_field_output(self.func, out, y)
        return out


class _Probe(_ProbeBase, nn.Module):
    """The probe of an ``odeint_adjoint`` solve: an ``nn.Module`` whose submodule is the user's
    field, so that ``odeint_adjoint`` finds its parameters; the backward solve's evaluations
    are counted apart (``nfe_backward``)."""

    def __init__(
        self, func: Callable[..., Tensor], adaptive: bool, keep_states: bool = True
    ) -> None:
        super().__init__()
        if isinstance(func, nn.Module):
            self.func = func
        else:
            object.__setattr__(self, "_closure", func)
        self._setup(func, adaptive, keep_states)

    def forward(self, t: Tensor, y: Any) -> Any:
        if self.in_backward:
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe += 1
        func = self._modules.get("func") or self._closure
        out = func(t, y)
        if self.stats.nfe == 1 and not self.in_backward:
            check_field_output(func, out, y)
        return out


def _flat(y: Any) -> Tensor:
    """The solver's flat state behind a tuple of torchdiffeq's views (or the tensor itself)."""
    if isinstance(y, Tensor):
        return y
    base = y[0]._base
    if base is not None and base.numel() == sum(c.numel() for c in y):
        return base
    return torch.cat([c.reshape(-1) for c in y])


def _solver_kind(method: str) -> str:
    cls = SOLVERS[method]
    if issubclass(cls, RKAdaptiveStepsizeODESolver):
        return "adaptive"
    if issubclass(cls, FixedGridODESolver):
        return "fixed"
    return "other"


def _checkpoint_times(t: Tensor, checkpoints: int | Tensor | Sequence[float]) -> Tensor:
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


def _fixed_grid(method: str, options: dict[str, Any], y0: Any, t: Tensor) -> Tensor:
    """The time grid torchdiffeq's fixed-grid solver will step on, in the caller's time."""
    flat = _flat(y0) if not isinstance(y0, Tensor) else y0
    reversed_ = len(t) > 1 and bool(t[0] > t[1])
    tt = -t if reversed_ else t
    opts = {k: v for k, v in options.items() if k in ("step_size", "grid_constructor")}
    if reversed_ and "grid_constructor" in opts:
        user = opts["grid_constructor"]
        opts["grid_constructor"] = lambda f, y, s: -user(f, y, -s)
    solver = SOLVERS[method](func=None, y0=flat, rtol=0.0, atol=0.0, **opts)
    grid = solver.grid_constructor(None, flat, tt)
    return -grid if reversed_ else grid


def _match(times: Sequence[float], targets: Sequence[float], tol: float) -> list[int]:
    out = [0]
    for c in targets:
        best = min(range(len(times)), key=lambda i: abs(times[i] - c))
        if abs(times[best] - c) <= tol and best not in out:
            out.append(best)
    return sorted(out)


def _odeint_error(exc: AssertionError, method: str, func: Any) -> IntegrationError:
    reached = _reached_time(exc)
    where = "" if reached is None else f"; reached t = {reached:.10g}"
    name = type(func).__name__
    return IntegrationError(
        f"solver '{method}' failed for field {name}: {str(exc)[:200] or 'assertion in solver'}"
        f"{where}. Try a fixed-step method, a larger `atol`/`rtol`, or regularize the field."
    )


def _reached_time(exc: BaseException) -> float | None:
    """The time an adaptive torchdiffeq solver had reached when it raised ``exc``.

    torchdiffeq's messages ("underflow in dt ...", "max_num_steps exceeded ...") omit it; its
    Runge-Kutta solvers hold it as ``rk_state.t1`` (``_RungeKuttaState``) in the failing frames.
    """
    reached = None
    tb = exc.__traceback__
    while tb is not None:  # innermost frame last
        local = tb.tb_frame.f_locals
        state = local.get("rk_state")
        if state is None and hasattr(local.get("self"), "rk_state"):
            state = local["self"].rk_state
        t1 = getattr(state, "t1", None)
        if isinstance(t1, Tensor) and t1.numel() == 1:
            reached = t1
        tb = tb.tb_next
    return None if reached is None else float(reached.detach())


def _check_state(y0: Any) -> None:
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


def _check_times(t: Any, y0: Any) -> Tensor:
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


def integrate(
    func: Callable[..., Any],
    y0: Any,
    t: Tensor,
    *,
    checkpoints: int | Tensor | Sequence[float] | None = None,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    event_fn: Callable[..., Tensor] | None = None,
    adjoint: bool = False,
    grad_leaf: bool = True,
    components: Sequence[int] | None = None,
    **adjoint_kwargs: Any,
) -> Trajectory:
    """Solve ``dz/dt = func(t, z)`` with one torchdiffeq call, recording checkpoint states.

    The result (``Trajectory.ys``) is exactly what ``torchdiffeq.odeint`` (or
    ``odeint_adjoint`` with ``adjoint=True``) returns for the same arguments, with the same
    steps and field evaluations (``Trajectory.stats``).

    Checkpoints (MATH.md, Notation): by default the states at which the solver's accepted
    steps start (adaptive methods) or the grid points (fixed-grid methods), at most
    ``DEFAULT_CHECKPOINTS + 1`` of them spread evenly over the steps, plus the result at
    ``t[-1]``. Explicit checkpoint times (an int ``n``: ``n`` equal intervals; or a 1-D tensor
    of times between ``t[0]`` and ``t[-1]``) become step ends the adaptive solver must hit
    (torchdiffeq's ``step_t``); for fixed-grid methods they must lie on the solver's grid
    (an int is snapped to the nearest grid points; a time off the grid is an error).

    Args:
        func: vector field ``f(t, z)``; ``z`` a tensor or a tuple of tensors.
        y0: initial state; for the terms, dimension 0 is the batch (a 1-D ``y0`` is one sample).
        t: strictly increasing or strictly decreasing 1-D tensor of output times.
        checkpoints: ``None``, an int ``>= 1`` or a 1-D tensor of times (see above).
        method: a torchdiffeq method (``None``: ``"dopri5"``, as torchdiffeq).
        options: torchdiffeq solver options.
        rtol: relative tolerance of adaptive solvers.
        atol: absolute tolerance of adaptive solvers.
        event_fn: torchdiffeq's event function (``len(t) == 2``); ``Trajectory.event_t``.
        adjoint: solve with ``torchdiffeq.odeint_adjoint`` (its backward is not differentiable).
        grad_leaf: start the solve from an alias of ``y0`` (a grad-requiring leaf copy if ``y0``
            does not require grad), so that ``a_0`` exists and is this solve's own; ``False``
            passes ``y0`` as it is (solver statistics only).
        components: for a tuple ``y0``, the indices of the components the terms' per-sample
            rows are built from (``None``: every component with the batch dimension; 0-dim
            accumulators are left out). A CNF's ``(z, log p)``: ``(0,)``.
        **adjoint_kwargs: ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_method``,
            ``adjoint_options``, ``adjoint_params`` (passed to ``odeint_adjoint``).

    Returns:
        A :class:`Trajectory`.

    Raises:
        ValueError: on a bad ``y0``, ``t``, ``method`` or ``checkpoints`` (before solving).
        IntegrationError: if an adaptive solver underflows or exceeds its step budget.

    Example::

        >>> import torch
        >>> from ode_reg import integrate
        >>> traj = integrate(lambda t, z: -z, torch.ones(2, 3), torch.tensor([0.0, 1.0]))
        >>> traj.ys.shape, traj.stats.nfe == 6 * traj.stats.accepted + 2 + traj.stats.rejected * 6
        (torch.Size([2, 2, 3]), True)
    """
    _check_state(y0)
    t = _check_times(t, y0)
    if components is not None:
        if not isinstance(y0, tuple):
            raise ValueError("`components` names components of a tuple `y0`; `y0` is a tensor")
        components = batch_components([c.shape for c in y0], components)
    if method is not None and method not in SOLVERS:
        raise ValueError(f"`method` must be one of {sorted(SOLVERS)}, got {method!r}")
    unknown = set(adjoint_kwargs) - {
        "adjoint_rtol",
        "adjoint_atol",
        "adjoint_method",
        "adjoint_options",
        "adjoint_params",
    }
    if unknown:
        raise ValueError(f"unknown keyword arguments {sorted(unknown)}")
    if adjoint_kwargs and not adjoint:
        raise ValueError(f"{sorted(adjoint_kwargs)} need `adjoint=True` (odeint_adjoint)")
    if adjoint:
        _check_adjoint_field(func, adjoint_kwargs.get("adjoint_params"))
    custom = field_attr(func, "ode_reg_integrate")
    if custom is not None:
        return _integrate_custom(func, y0, t, checkpoints, method, options)

    method = method or "dopri5"
    options = dict(options or {})
    kind = _solver_kind(method)
    forced: Tensor | None = None
    if checkpoints is not None:
        forced = forced_times(t, checkpoints, method, options, y0)
        if kind == "adaptive" and forced.numel():
            user = options.get("step_t")
            step_t = (
                forced if user is None else torch.cat([torch.as_tensor(user).to(forced), forced])
            )
            options["step_t"] = step_t.unique()
    leaves: tuple[Tensor, ...] = ()
    if torch.is_grad_enabled() and not adjoint and grad_leaf:
        # A leaf that requires grad, so that a_0 = dL/dz_0 exists (values unchanged).
        if isinstance(y0, tuple) and not any(c.requires_grad for c in y0):
            y0 = tuple(c.detach().requires_grad_(True) for c in y0)
            leaves = y0
        elif isinstance(y0, Tensor) and not y0.requires_grad:
            y0 = y0.detach().requires_grad_(True)
            leaves = (y0,)
        if isinstance(y0, Tensor):
            # The solve starts from its own alias of y0 (same values, no copy): the adjoint
            # there is what flows into this solve, not what other readers of y0 add.
            y0 = y0.view_as(y0)
    probe = (_Probe if adjoint else _CallProbe)(func, adaptive=kind == "adaptive")
    kwargs: dict[str, Any] = {"rtol": rtol, "atol": atol, "method": method, "options": options}
    if event_fn is not None:
        kwargs["event_fn"] = event_fn
    if adjoint:
        kwargs.update(adjoint_kwargs)
        solve = _td_odeint_adjoint
    else:
        solve = _td_odeint
    out = _run_probe(solve, probe, y0, t, kwargs, func, quiet=True)
    event_t = None
    if event_fn is not None:
        event_t, out = out
    traj = _trajectory(probe, func, y0, t, out, method, adjoint, forced, event_t)
    traj.grad_leaves = leaves
    traj.components = None if components is None else tuple(components)
    return traj


#: Graph nodes visited at most when asking whether a result depends on anything trainable.
MAX_SOURCE_WALK = 200_000


def grad_only_from_leaves(traj: Trajectory) -> bool:
    """Whether the result of ``traj`` requires grad only through the leaf copies of ``y0`` that
    :func:`integrate` made (``grad_leaves``): then torchdiffeq's own call (a ``y0`` without
    grad, a frozen field) would have returned a result without grad. The walk stops at the
    first other grad-requiring leaf (a parameter), so it is short when there is one.
    """
    if not traj.grad_leaves:
        return False
    sol = traj.flat_solution
    start = (sol if sol is not None else traj.states[-1]).grad_fn
    if start is None:
        return False
    ours = {id(x) for x in traj.grad_leaves}
    seen = {start}
    stack = [start]
    while stack:
        node = stack.pop()
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in ours:
            return False
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
        if len(seen) > MAX_SOURCE_WALK:
            return False
    return True


def solve_counted(
    func: Callable[..., Any], y0: Any, t: Tensor, *, adjoint: bool, **kwargs: Any
) -> tuple[Any, SolveSummary]:
    """torchdiffeq's ``odeint`` (or ``odeint_adjoint``) call, counting what the solver does.

    The stats-only solve of a training step that records nothing else (a
    ``SolverStatsMonitor`` with no active term and no monitor that reads trajectories): the
    field is wrapped in a counter whose step callbacks keep the step sizes and no state, and
    no :class:`Trajectory` is built. The call, its result and its field evaluations are those
    of the unrecorded call (``checkpoints`` are not passed here: they would force step ends).

    Args:
        func: vector field ``f(t, z)``.
        y0: initial state.
        t: output times.
        adjoint: solve with ``torchdiffeq.odeint_adjoint`` (its backward evaluations are
            counted as ``nfe_backward`` when the backward runs).
        **kwargs: torchdiffeq's keyword arguments.

    Returns:
        What torchdiffeq returns, and the solve's :class:`SolveSummary`.

    Raises:
        ValueError: for ``odeint_adjoint`` with a field that is not an ``nn.Module`` and no
            ``adjoint_params``.
        IntegrationError: if an adaptive solver underflows or exceeds its step budget.

    Example::

        >>> import torch
        >>> out, s = solve_counted(lambda t, z: -z, torch.ones(3), torch.tensor([0.0, 1.0]),
        ...                        adjoint=False, method="rk4", options={"step_size": 0.25})
        >>> s.stats.nfe, s.stats.accepted, s.stats.step_sizes
        (16, 4, [0.25, 0.25, 0.25, 0.25])
    """
    if adjoint:
        _check_adjoint_field(func, kwargs.get("adjoint_params"))
    method = kwargs.get("method") or "dopri5"
    kind = _solver_kind(method) if method in SOLVERS else "other"
    probe = (_Probe if adjoint else _CallProbe)(func, kind == "adaptive", keep_states=False)
    solve = _td_odeint_adjoint if adjoint else _td_odeint
    # Only where the probe's step callback is not one the solver calls is torchdiffeq's
    # "does not support callbacks" silenced: elsewhere the user's own warnings stay.
    out = _run_probe(solve, probe, y0, t, kwargs, func, quiet=kind == "other")
    return out, SolveSummary(probe.stats, method, type(func).__name__, t)


def _check_adjoint_field(func: Any, adjoint_params: Any) -> None:
    if not isinstance(func, nn.Module) and adjoint_params is None:
        raise ValueError(
            "odeint_adjoint needs `func` to be an nn.Module, or `adjoint_params` given explicitly"
        )


def _run_probe(
    solve: Callable[..., Any],
    probe: _ProbeBase,
    y0: Any,
    t: Tensor,
    kwargs: dict[str, Any],
    func: Any,
    *,
    quiet: bool,
) -> Any:
    """``solve(probe, y0, t, **kwargs)``, then ``probe.finish()``; a solver's failure becomes
    an :class:`IntegrationError` naming the field; ``quiet`` silences torchdiffeq's warning
    about callbacks a solver does not call."""
    method = kwargs.get("method") or "dopri5"
    try:
        if quiet:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Solver '.*' does not support callbacks")
                out = solve(probe, y0, t, **kwargs)
        else:
            out = solve(probe, y0, t, **kwargs)
    except AssertionError as exc:
        raise _odeint_error(exc, method, func) from exc
    probe.finish()
    return out


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
    forced = _checkpoint_times(t, checkpoints)
    method = method or "dopri5"
    if method in SOLVERS and _solver_kind(method) == "fixed":
        grid = _fixed_grid(method, dict(options or {}), y0, t)
        forced = _on_grid(forced, grid, snap=isinstance(checkpoints, int), method=method)
    return forced


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


def _trajectory(
    probe: _ProbeBase,
    func: Callable[..., Any],
    y0: Any,
    t: Tensor,
    out: Any,
    method: str,
    adjoint: bool,
    forced: Tensor | None,
    event_t: Tensor | None,
) -> Trajectory:
    shapes = tuple(c.shape for c in y0) if isinstance(y0, tuple) else None
    flat_func = func if shapes is None else _TupleFunc(func, shapes)
    step_times = torch.stack(probe.times).detach().tolist() if probe.times else []
    step_states = [_flat(s) for s in probe.states]
    if not step_states:  # a solver without step callbacks (scipy_solver): the start only
        step_times = [float(t[0])]
        step_states = [_flat(y0)]
    if forced is None:
        keep = spread_indices(len(step_states), DEFAULT_CHECKPOINTS + 1)
    else:
        span = abs(float(t[-1] - t[0]))
        tol = span * (1e-5 if t.dtype != torch.float64 else 1e-10)
        keep = _match(step_times, forced.tolist(), tol)
    flat_sol = _flat(out) if shapes is not None else out
    end = flat_sol[-1]
    end_time = event_t if event_t is not None else t[-1]
    times = torch.tensor([step_times[i] for i in keep] + [float(end_time)], dtype=t.dtype)
    traj = Trajectory(
        func=flat_func,
        times=times.to(t.device),
        states=(*[step_states[i] for i in keep], end),
        t=t,
        solution=out,
        method=method,
        adjoint_method=adjoint,
        stats=probe.stats,
        shapes=shapes,
        event_t=event_t,
        funcs=(func,),
    )
    traj.end_edge = _last_row_edge(flat_sol) if shapes is None and event_t is None else None
    if shapes is None:
        # For the functional API's later evaluations (``sensitivities``): a field's held
        # attributes (``ode_reg_snapshot``) as they were during this solve.
        snap = func.ode_reg_snapshot() if field_attr(func, "ode_reg_snapshot") else None
        traj.points = tuple(FieldPoint(func, tk, snap) for tk in traj.times.unbind(0))
    return traj


def _last_row_edge(sol: Any) -> Any:
    """The edge into the value copied into ``sol[-1]``, when ``sol``'s last operation is that
    copy (torchdiffeq fills its solution buffer row by row, the last row last), else ``None``.
    Taken right after the solve, before any later in-place change of ``sol``."""
    node = getattr(sol, "grad_fn", None)
    if node is None or type(node).__name__ != "CopySlices" or sol.shape[0] < 2:
        return None
    nxt = node.next_functions
    if len(nxt) != 2 or nxt[1][0] is None:
        return None
    return torch.autograd.graph.GradientEdge(*nxt[1])


def starts_from_end(traj: Trajectory, z: Tensor) -> bool:
    """Whether ``z`` is (a view of) the last row of ``traj``'s solution: a next solve that
    starts from it continues this one with no operation in between."""
    sol = traj.flat_solution
    if sol is None or not isinstance(z, Tensor) or z.shape != sol.shape[1:]:
        return False
    base = z._base if z._base is not None else z
    return base is sol and z.data_ptr() == sol[-1].data_ptr()


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
    extra = _checkpoint_times(t, checkpoints)
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


def _integrate_custom(
    func: Any, y0: Tensor, t: Tensor, checkpoints: Any, method: str | None, options: Any
) -> Trajectory:
    """A field that integrates itself on the checkpoint grid (``ode_reg_integrate``)."""
    if not isinstance(y0, Tensor):
        raise ValueError(f"{type(func).__name__} integrates tensor states only, got a tuple")
    grid = checkpoint_grid(t, checkpoints)
    diff = (grid[None, :] - t[:, None]).abs()
    t_index = tuple(int(i) for i in diff.argmin(dim=1))
    if not y0.requires_grad and torch.is_grad_enabled():
        y0 = y0.detach().requires_grad_(True)
    states, weights = func.ode_reg_integrate(y0, grid, method=method, options=options)
    states = tuple(states)
    weights = None if weights is None else tuple(weights)
    traj = Trajectory(
        func=func,
        times=grid,
        states=states,
        t=t,
        method=method or "custom",
        weights=weights,
        t_index=t_index,
        funcs=(func,),
    )
    traj.stats.accepted = len(states) - 1
    traj.points = tuple(
        FieldPoint(func, grid[k], None, None if weights is None else weights[k])
        for k in range(len(states))
    )
    return traj


def chain(trajectories: Sequence[Trajectory]) -> Trajectory:
    """Join trajectories solved one after another (an ODE-RNN's steps) into one.

    Times are measured along the chain (``|dt|`` summed, so they increase even for solves
    backwards in time); a state shared by consecutive trajectories (the end of one solve is the
    start of the next) appears once. Field evaluations are delegated to the trajectory each
    checkpoint came from.

    Args:
        trajectories: one or more trajectories.

    Returns:
        A :class:`Trajectory` over all checkpoints, in order.

    Raises:
        ValueError: if the sequence is empty.

    Example::

        >>> import torch
        >>> from ode_reg import integrate
        >>> from ode_reg.trajectory import chain
        >>> t = torch.tensor([0.0, 1.0])
        >>> a = integrate(lambda t, z: -z, torch.ones(2, 3), t, method="euler")
        >>> b = integrate(lambda t, z: -z, a.ys[-1], t, method="euler")
        >>> a.num_checkpoints, b.num_checkpoints, chain([a, b]).num_checkpoints  # a's end once
        (2, 2, 3)
    """
    if len(trajectories) == 0:
        raise ValueError("`trajectories` must hold at least one Trajectory")
    if len(trajectories) == 1:
        return trajectories[0]

    def continues(prev: tuple[Trajectory, int], z: Tensor) -> bool:
        tr, k = prev
        return k == tr.num_checkpoints - 1 and tr.end_from_solution and starts_from_end(tr, z)

    states: list[Tensor] = []
    times: list[float] = []
    owner: list[tuple[Trajectory, int]] = []
    weights: list[Tensor] = []
    has_weights = all(tr.weights is not None for tr in trajectories)
    clock = 0.0
    for tr in trajectories:
        tk = tr.times.tolist()
        for k, z in enumerate(tr.states):
            if states and k == 0 and (z is states[-1] or continues(owner[-1], z)):
                # The next solve starts from this solve's result: one checkpoint (the result,
                # whose adjoint is the total one).
                continue
            if k > 0:
                clock += abs(tk[k] - tk[k - 1])
            elif states:
                # A jump between solves (e.g. an RNN cell update): a new checkpoint at the same
                # time would be degenerate for quadrature, so nudge it forward.
                clock += 1e-6 * max(tr.span, 1e-12)
            states.append(z)
            times.append(clock)
            owner.append((tr, k))
            if has_weights:
                weights.append(tr.weights[k])

    def field_at(j: int, z: Tensor) -> Tensor:
        tr, k = owner[j]
        return tr.field_at(k, z)

    funcs: list[Callable[..., Tensor]] = []
    for tr in trajectories:
        for f in tr.funcs or (tr.func,):
            if all(f is not g for g in funcs):
                funcs.append(f)
    first = trajectories[0]
    joined = Trajectory(
        func=first.func,
        times=torch.tensor(times, dtype=first.times.dtype, device=first.times.device),
        states=tuple(states),
        t=torch.tensor([times[0], times[-1]], dtype=first.times.dtype),
        method=first.method,
        adjoint_method=any(tr.adjoint_method for tr in trajectories),
        shapes=first.shapes,
        components=first.components,
        weights=tuple(weights) if has_weights else None,
        t_index=(0, len(states) - 1),
        funcs=tuple(funcs),
        parts=tuple(trajectories),
        _field_at=field_at,
    )
    joined.owners = tuple(owner)  # type: ignore[attr-defined]
    if all(tr.points is not None for tr in trajectories):
        joined.points = tuple(tr.points[k] for tr, k in owner)
    return joined


__all__ = [
    "DEFAULT_CHECKPOINTS",
    "FieldPoint",
    "IntegrationError",
    "SolveSummary",
    "SolverStats",
    "Trajectory",
    "chain",
    "checkpoint_grid",
    "integrate",
    "solve_counted",
]
