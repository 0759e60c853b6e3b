"""Trajectories recorded while torchdiffeq solves: one solve per call, checkpoints on the path.

:func:`integrate` makes exactly one ``torchdiffeq.odeint`` (or ``odeint_adjoint``) call. The
field is wrapped in a probe whose step callbacks (torchdiffeq's ``callback_accept_step`` for
adaptive methods, ``callback_step`` for fixed grids) see the live state at the start of every
accepted step: the tensor the next step computes from, so on the autograd path from ``y0`` to
the loss, and ``autograd.grad(loss, z_k)`` is the adjoint ``a_k`` (MATH.md, Notation). The
checkpoints are some of those step states plus the result at the last requested time; the
solve itself (result, steps, field evaluations) is torchdiffeq's.

The pieces live by responsibility: the input checks in ``ode_reg._inputs``, the probe (and
every use of torchdiffeq's private modules) in ``ode_reg._probe``, the records in
``ode_reg._trajectory_data``, chains in ``ode_reg._chain`` and the protocol of a field that
integrates itself in :mod:`ode_reg.protocol`. Their public names are importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ode_reg._chain import chain, starts_from_end
from ode_reg._inputs import (
    check_adjoint_field,
    check_adjoint_kwargs,
    check_components,
    check_field_output,
    check_method,
    check_state,
    check_times,
    checkpoint_grid,
    forced_times,
    match_times,
)
from ode_reg._probe import (
    SOLVERS,
    CallProbe,
    IntegrationError,
    ModuleProbe,
    TupleFunc,
    field_attr,
    flat_state,
    make_probe,
    run_probe,
    solver_kind,
    td_odeint,
    td_odeint_adjoint,
)
from ode_reg._trajectory_data import (
    DEFAULT_CHECKPOINTS,
    FieldPoint,
    SolverStats,
    SolveSummary,
    Trajectory,
    batch_components,
    median_value,
)
from ode_reg.functional.indices import spread_indices
from ode_reg.protocol import IntegratorCall, held_inputs, integrate_self, self_integrating


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
        ValueError: on a bad ``y0``, ``t``, ``method`` or ``checkpoints`` (before solving);
            for a field that integrates itself (:class:`~ode_reg.protocol.SelfIntegratingField`,
            solved by its own integrator), on a keyword it cannot honour (named).
        IntegrationError: if an adaptive solver underflows or exceeds its step budget.

    Example::

        >>> import torch
        >>> from ode_reg import integrate
        >>> traj = integrate(lambda t, z: -z, torch.ones(2, 3), torch.tensor([0.0, 1.0]))
        >>> traj.ys.shape, traj.stats.nfe == 6 * traj.stats.accepted + 2 + traj.stats.rejected * 6
        (torch.Size([2, 2, 3]), True)
    """
    check_state(y0)
    t = check_times(t, y0)
    components = check_components(y0, components)
    check_method(method)
    check_adjoint_kwargs(adjoint_kwargs, adjoint)
    if adjoint:
        check_adjoint_field(func, adjoint_kwargs.get("adjoint_params"))
    if self_integrating(func):
        call = IntegratorCall(method, options, rtol, atol, record=torch.is_grad_enabled())
        return integrate_self(
            func,
            y0,
            t,
            call,
            checkpoints=checkpoints,
            event_fn=event_fn,
            adjoint=adjoint,
            adjoint_kwargs=adjoint_kwargs,
        )
    method = method or "dopri5"
    options, forced = _forced_step_ends(t, y0, checkpoints, method, options)
    y0, leaves = _solve_start(y0, grad_leaf and not adjoint)
    probe = make_probe(func, adjoint, method)
    kwargs: dict[str, Any] = {"rtol": rtol, "atol": atol, "method": method, "options": options}
    if event_fn is not None:
        kwargs["event_fn"] = event_fn
    if adjoint:
        kwargs.update(adjoint_kwargs)
    out = run_probe(
        td_odeint_adjoint if adjoint else td_odeint, probe, y0, t, kwargs, func, quiet=True
    )
    event_t = None
    if event_fn is not None:
        event_t, out = out
    traj = _trajectory(probe, func, y0, t, out, method, adjoint, forced, event_t)
    traj.grad_leaves = leaves
    traj.components = components
    return traj


def _forced_step_ends(
    t: Tensor, y0: Any, checkpoints: Any, method: str, options: dict[str, Any] | None
) -> tuple[dict[str, Any], Tensor | None]:
    """The solver options with the explicit checkpoint times as step ends an adaptive solver
    must hit (joined to the user's ``step_t``), and those times (``None``: the default
    checkpoints, no forced step end)."""
    options = dict(options or {})
    if checkpoints is None:
        return options, None
    forced = forced_times(t, checkpoints, method, options, y0)
    if solver_kind(method) == "adaptive" and forced.numel():
        user = options.get("step_t")
        step_t = forced if user is None else torch.cat([torch.as_tensor(user).to(forced), forced])
        options["step_t"] = step_t.unique()
    return options, forced


def _solve_start(y0: Any, grad_leaf: bool) -> tuple[Any, tuple[Tensor, ...]]:
    """The state the solve starts from, and the grad-requiring leaf copies of ``y0`` made.

    With grad on and ``grad_leaf``: a ``y0`` without grad becomes a leaf that requires it (so
    that ``a_0 = dL/dz_0`` exists; values unchanged), and a tensor ``y0`` is aliased (same
    values, no copy), so that the adjoint there is what flows into this solve, not what other
    readers of ``y0`` add.
    """
    if not (torch.is_grad_enabled() and grad_leaf):
        return y0, ()
    leaves: tuple[Tensor, ...] = ()
    if isinstance(y0, tuple) and not any(c.requires_grad for c in y0):
        y0 = tuple(c.detach().requires_grad_(True) for c in y0)
        leaves = y0
    elif isinstance(y0, Tensor) and not y0.requires_grad:
        y0 = y0.detach().requires_grad_(True)
        leaves = (y0,)
    if isinstance(y0, Tensor):
        y0 = y0.view_as(y0)
    return y0, leaves


def _trajectory(
    probe: CallProbe | ModuleProbe,
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
    flat_func = func if shapes is None else TupleFunc(func, shapes)
    step_times = torch.stack(probe.times).detach().tolist() if probe.times else []
    step_states = [flat_state(s) for s in probe.states]
    if not step_states:  # a solver without step callbacks (scipy_solver): the start only
        step_times = [float(t[0])]
        step_states = [flat_state(y0)]
    if forced is None:
        keep = spread_indices(len(step_states), DEFAULT_CHECKPOINTS + 1)
    else:
        span = abs(float(t[-1] - t[0]))
        tol = span * (1e-5 if t.dtype != torch.float64 else 1e-10)
        keep = match_times(step_times, forced.tolist(), tol)
    flat_sol = flat_state(out) if shapes is not None else out
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
        snap = held_inputs(func)
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
        check_adjoint_field(func, kwargs.get("adjoint_params"))
    method = kwargs.get("method") or "dopri5"
    probe = make_probe(func, adjoint, method, keep_states=False)
    solve = td_odeint_adjoint if adjoint else td_odeint
    # Only where the probe's step callback is not one the solver calls is torchdiffeq's
    # "does not support callbacks" silenced: elsewhere the user's own warnings stay.
    quiet = method not in SOLVERS or solver_kind(method) == "other"
    out = run_probe(solve, probe, y0, t, kwargs, func, quiet=quiet)
    return out, SolveSummary(probe.stats, method, type(func).__name__, t)


__all__ = [
    "DEFAULT_CHECKPOINTS",
    "FieldPoint",
    "IntegrationError",
    "SolveSummary",
    "SolverStats",
    "Trajectory",
    "batch_components",
    "chain",
    "check_field_output",
    "checkpoint_grid",
    "field_attr",
    "forced_times",
    "grad_only_from_leaves",
    "integrate",
    "median_value",
    "solve_counted",
    "starts_from_end",
]
