"""The recording probe: the user's field as torchdiffeq sees it during one solve.

Everything here that reaches into torchdiffeq's private modules is in this file: the solver
table (``SOLVERS``) and its classes (to tell adaptive from fixed-grid methods), a fixed-grid
solver instantiated to recover the grid it will step on, the tuple-state wrapper
(``_TupleFunc``), and the translation of a solver's ``AssertionError`` into an
:class:`IntegrationError` that names the time reached (read from the failing frames).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchdiffeq
from torch import Tensor, nn
from torchdiffeq._impl.adjoint import odeint_adjoint as td_odeint_adjoint
from torchdiffeq._impl.misc import _check_inputs, _flat_to_shape
from torchdiffeq._impl.misc import _TupleFunc as TupleFunc
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.odeint import odeint as td_odeint
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver, FixedGridODESolver

from ode_reg._once import say_once
from ode_reg._trajectory_data import SolverStats

__all__ = [
    "SOLVERS",
    "CallProbe",
    "IntegrationError",
    "ModuleProbe",
    "TupleFunc",
    "field_attr",
    "make_probe",
    "odeint_error",
    "odeint_rows",
    "fixed_grid",
    "flat_state",
    "run_probe",
    "solver_kind",
    "td_odeint",
    "td_odeint_adjoint",
]

#: The torchdiffeq versions whose ``integrate`` loops :func:`odeint_rows` mirrors (checked
#: bit for bit by tests/test_solution_rows.py); with another version the recorded solve runs
#: torchdiffeq's own loop, said once.
ROWS_MIRROR_VERSIONS = ("0.2.5",)

_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
_ALL_CALLBACKS = (*_CALLBACKS, *(n + "_adjoint" for n in _CALLBACKS))


class IntegrationError(RuntimeError):
    """An adaptive solver failed (step size underflow, too many steps) inside :func:`integrate`."""


def field_attr(func: Any, name: str) -> Any:
    """``getattr(func, name, None)`` for the optional hooks torchdiffeq and ode_reg look up on a
    field (step callbacks, ``ode_reg_snapshot``), without the failed lookup: on an
    ``nn.Module`` a missing attribute raises inside ``Module.__getattr__`` (~8 us, several
    times a solve). They are methods (the class) or attributes of the instance (its
    ``__dict__``, or a submodule); other objects with a ``__getattr__`` use ``getattr``."""
    if name in getattr(func, "__dict__", ()) or hasattr(type(func), name):
        return getattr(func, name)
    if isinstance(func, nn.Module):
        return func._modules.get(name)
    if not hasattr(type(func), "__getattr__"):
        return None
    return getattr(func, name, None)


class _ProbeBase:
    """Counts field evaluations and, through torchdiffeq's step callbacks, records the state at
    the start of every accepted step; the user's own callbacks are still called."""

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
                setattr(self, name, self._accepted(user, keep_states))
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
    def _accepted(self, user: Callable[..., Any] | None, keep_states: bool) -> Callable[..., Any]:
        """The accepted-step callback: the step size, and the step's start (time and live
        state) unless only statistics are kept."""
        times, states, dts, stats = self.times, self.states, self.dts, self.stats
        if not keep_states and user is None:
            # The stats-only solve: the step size only, counted and detached in finish.
            self._counted_in_finish = True

            def count(t0: Tensor, y0: Any, dt: Tensor) -> None:
                dts.append(dt)

            return count

        def callback(t0: Tensor, y0: Any, dt: Tensor) -> None:
            if keep_states:
                times.append(t0)
                states.append(y0)
            dts.append(dt.detach())
            stats.accepted += 1
            if user is not None:
                user(t0, y0, dt)

        return callback

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


class CallProbe(_ProbeBase):
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
            _check_first_output(self.func, out, y)
        return out


class ModuleProbe(_ProbeBase, nn.Module):
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
            _check_first_output(func, out, y)
        return out


def _check_first_output(func: Any, out: Any, y: Any) -> None:
    # ``_inputs`` imports this module (the solver table, the fixed grid): imported here.
    from ode_reg._inputs import check_field_output

    check_field_output(func, out, y)


def make_probe(
    func: Callable[..., Any], adjoint: bool, method: str, keep_states: bool = True
) -> CallProbe | ModuleProbe:
    """The probe for one solve with ``method`` (``odeint_adjoint``: an ``nn.Module`` probe)."""
    adaptive = method in SOLVERS and solver_kind(method) == "adaptive"
    return (ModuleProbe if adjoint else CallProbe)(func, adaptive, keep_states)


def flat_state(y: Any) -> Tensor:
    """The solver's flat state behind a tuple of torchdiffeq's views (or the tensor itself)."""
    if isinstance(y, Tensor):
        return y
    base = y[0]._base
    if base is not None and base.numel() == sum(c.numel() for c in y):
        return base
    return torch.cat([c.reshape(-1) for c in y])


def odeint_rows(func: Callable[..., Any], y0: Any, t: Tensor, **kwargs: Any) -> Any:
    """``torchdiffeq.odeint`` for a recorded solve: the same solver object, steps,
    interpolation and field evaluations, with the solution stacked once from its rows.

    torchdiffeq's ``integrate`` writes each output row into a preallocated tensor
    (``solution[i] = ...``): in autograd a chain of ``CopySlices`` nodes, each of which clones
    the whole ``len(t) x state`` gradient buffer on the way back (and again in every double
    backward through the solve). Here the rows are collected in a list and ``torch.stack``-ed:
    the values are the same rows (a copy either way), the backward an ``unbind``. The loops
    below are torchdiffeq's own ``AdaptiveStepsizeODESolver.integrate`` and
    ``FixedGridODESolver.integrate`` with that one change; a solver that overrides
    ``integrate`` (``scipy_solver``), and an event solve (already stacked by torchdiffeq), run
    torchdiffeq's code unchanged. The keywords are ``torchdiffeq.odeint``'s.
    """
    if kwargs.get("event_fn") is not None:
        return td_odeint(func, y0, t, **kwargs)
    if torchdiffeq.__version__ not in ROWS_MIRROR_VERSIONS:
        say_once(
            f"ode_reg: torchdiffeq {torchdiffeq.__version__} is not a version whose integrate "
            f"loop ode_reg mirrors ({', '.join(ROWS_MIRROR_VERSIONS)}); recorded solves run "
            "torchdiffeq's own loop (same values; a slower backward with many output times). "
            f"Fix: pip install torchdiffeq=={ROWS_MIRROR_VERSIONS[-1]}",
            key="odeint_rows:version",
        )
        return td_odeint(func, y0, t, **kwargs)
    defaults = td_odeint.__kwdefaults__  # torchdiffeq's own keywords and their defaults
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"odeint_rows: unexpected keyword argument(s) {unknown}")
    kw = {**defaults, **kwargs}
    shapes, func, y0, t, rtol, atol, method, options, _, _ = _check_inputs(
        func, y0, t, kw["rtol"], kw["atol"], kw["method"], kw["options"], None, SOLVERS
    )
    solver = SOLVERS[method](func=func, y0=y0, rtol=rtol, atol=atol, **options)
    solution = _integrate_rows(solver, t)
    if shapes is not None:
        solution = _flat_to_shape(solution, (len(t),), shapes)
    return solution


def _integrate_rows(solver: Any, t: Tensor) -> Tensor:
    """``solver.integrate(t)``, the rows stacked instead of copied into a buffer."""
    integrate = type(solver).integrate
    if integrate is AdaptiveStepsizeODESolver.integrate:
        rows = [_row(solver.y0)]
        t = t.to(solver.dtype)
        solver._before_integrate(t)
        for i in range(1, len(t)):
            rows.append(solver._advance(t[i]))
        return _stack_rows(rows, solver.y0)
    if integrate is not FixedGridODESolver.integrate:
        return solver.integrate(t)
    time_grid = solver.grid_constructor(solver.func, solver.y0, t)
    assert time_grid[0] == t[0] and time_grid[-1] == t[-1]
    rows = [_row(solver.y0)]
    j = 1
    y0 = solver.y0
    for t0, t1 in zip(time_grid[:-1], time_grid[1:], strict=True):
        dt = t1 - t0
        solver.func.callback_step(t0, y0, dt)
        dy, f0 = solver._step_func(solver.func, t0, dt, t1, y0)
        y1 = y0 + dy
        while j < len(t) and t1 >= t[j]:
            if solver.interp == "linear":
                rows.append(_row(solver._linear_interp(t0, t1, y0, y1, t[j])))
            elif solver.interp == "cubic":
                f1 = solver.func(t1, y1)
                rows.append(solver._cubic_hermite_interp(t0, y0, f0, t1, y1, f1, t[j]))
            else:
                raise ValueError(f"Unknown interpolation method {solver.interp}")
            j += 1
        y0 = y1
    return _stack_rows(rows, solver.y0)


def _row(value: Tensor) -> Tensor:
    """An alias of a row that is a tensor the solve reads on (``y0``, a grid state ``y1``),
    made where torchdiffeq copies it into its buffer: autograd runs its backward nodes in
    reverse creation order, so the row's gradient joins the state's other gradients in the
    same order as through torchdiffeq's ``CopySlices`` (floating-point sums, bit for bit)."""
    return value.view_as(value) if value.requires_grad else value


def _stack_rows(rows: list[Tensor], y0: Tensor) -> Tensor:
    """The rows as one tensor of ``y0``'s dtype and shape per row (what copying each row into
    torchdiffeq's ``torch.empty(len(t), *y0.shape, dtype=y0.dtype)`` buffer gives)."""
    rows = [
        r if r.dtype == y0.dtype and r.shape == y0.shape else r.to(y0.dtype).expand(y0.shape)
        for r in rows
    ]
    return torch.stack(rows)


def solver_kind(method: str) -> str:
    """``"adaptive"``, ``"fixed"`` or ``"other"`` (scipy) for a torchdiffeq method name."""
    cls = SOLVERS[method]
    if issubclass(cls, RKAdaptiveStepsizeODESolver):
        return "adaptive"
    if issubclass(cls, FixedGridODESolver):
        return "fixed"
    return "other"


def fixed_grid(method: str, options: dict[str, Any], y0: Any, t: Tensor) -> Tensor:
    """The time grid torchdiffeq's fixed-grid solver will step on, in the caller's time (the
    solver is instantiated, without a field, to ask its own ``grid_constructor``)."""
    flat = flat_state(y0)
    reversed_ = len(t) > 1 and bool(t[0] > t[1])
    tt = -t if reversed_ else t
    opts = {k: v for k, v in options.items() if k in ("step_size", "grid_constructor")}
    if reversed_ and "grid_constructor" in opts:
        user = opts["grid_constructor"]
        opts["grid_constructor"] = lambda f, y, s: -user(f, y, -s)
    solver = SOLVERS[method](func=None, y0=flat, rtol=0.0, atol=0.0, **opts)
    grid = solver.grid_constructor(None, flat, tt)
    return -grid if reversed_ else grid


def run_probe(
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
        raise odeint_error(exc, method, func) from exc
    probe.finish()
    return out


def odeint_error(exc: AssertionError, method: str, func: Any) -> IntegrationError:
    """The :class:`IntegrationError` for a solver's ``AssertionError`` (with the time reached)."""
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
