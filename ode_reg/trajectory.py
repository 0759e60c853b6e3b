"""Checkpointed trajectories: the solver is called once per checkpoint interval, chained.

Each call starts from the previous call's end state, so every checkpoint state lies on the
autograd path from ``y0`` to the loss and ``autograd.grad(loss, z_k)`` is the adjoint ``a_k``
(MATH.md, Notation). One ``torchdiffeq.odeint`` call over all times would return interpolated
side outputs instead, whose gradient is not the adjoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torchdiffeq
from torch import Tensor, nn
from torchdiffeq._impl.misc import _all_callback_names
from torchdiffeq._impl.odeint import SOLVERS

from ode_reg._checks import check_increasing, check_int

#: Number of equal checkpoint intervals used when ``checkpoints`` is not given.
DEFAULT_CHECKPOINTS = 8


#: Fixed-grid methods that :func:`integrate` steps itself (see :func:`_fixed_grid_states`).
DIRECT_METHODS = ("euler", "midpoint", "rk4")


@dataclass(frozen=True)
class FieldPoint:
    """How the field is evaluated at one checkpoint: ``f(t_k, z)`` as it was during the solve.

    Attributes:
        func: the field.
        time: ``t_k`` in the field's own time (a chained trajectory shifts its times, this not).
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
class Trajectory:
    """The result of :func:`integrate`.

    Attributes:
        func: the vector field ``f(t, z)``.
        times: checkpoint times ``t_0 < ... < t_K`` (the requested times are among them).
        states: the checkpoint states ``z_k``, each on the autograd path to the loss.
        t: the requested output times.
        t_index: index into ``times`` of each requested time.
        weights: for orthogonal flows, ``W_k`` at the checkpoints (else ``None``).
        method: the solver used.
        adjoint_method: whether ``odeint_adjoint`` solved it (then no double backward).
    """

    func: Callable[..., Tensor]
    times: Tensor
    states: tuple[Tensor, ...]
    t: Tensor
    t_index: tuple[int, ...]
    weights: tuple[Tensor, ...] | None = None
    method: str = "rk4"
    adjoint_method: bool = False
    _field_at: Callable[[int, Tensor], Tensor] | None = field(default=None, repr=False)

    @property
    def num_checkpoints(self) -> int:
        """``K + 1``: the number of checkpoint states."""
        return len(self.states)

    @property
    def checkpoint_states(self) -> Tensor:
        """Checkpoint states stacked, shape ``(K + 1, *y0.shape)``."""
        return torch.stack(self.states)

    @property
    def ys(self) -> Tensor:
        """The solution at the requested times, shape ``(len(t), *y0.shape)``, as odeint returns."""
        return torch.stack([self.states[i] for i in self.t_index])

    @property
    def weight_matrices(self) -> Tensor | None:
        """``W_k`` stacked, shape ``(K + 1, d, d)``, or ``None`` for fields without a weight flow."""
        return None if self.weights is None else torch.stack(self.weights)

    def field_at(self, k: int, z: Tensor) -> Tensor:
        """Evaluate the vector field at checkpoint ``k`` and state ``z``: ``f(t_k, z)``."""
        if self._field_at is not None:
            return self._field_at(k, z)
        return self.func(self.times[k], z)

    funcs: tuple[Callable[..., Tensor], ...] = ()
    #: Per checkpoint, how the field is evaluated there (``None``: only through ``field_at``).
    points: tuple[FieldPoint, ...] | None = field(default=None, repr=False)

    def parameters(self) -> list[Tensor]:
        """Trainable parameters of the field(s) (those the sensitivity density is taken over)."""
        out: list[Tensor] = []
        for f in self.funcs or (self.func,):
            if isinstance(f, nn.Module):
                out.extend(
                    p for p in f.parameters() if p.requires_grad and all(p is not q for q in out)
                )
        return out


def checkpoint_grid(t: Tensor, checkpoints: int | Tensor | Sequence[float] | None) -> Tensor:
    """The sorted union of the requested times ``t`` and the checkpoint times.

    Args:
        t: strictly increasing 1-D tensor of requested times.
        checkpoints: ``None`` (``DEFAULT_CHECKPOINTS`` equal intervals over ``[t[0], t[-1]]``),
            an int ``n >= 1`` (``n`` equal intervals), or a 1-D tensor of times inside
            ``[t[0], t[-1]]``.

    Raises:
        ValueError: on an int below 1 or checkpoint times outside ``[t[0], t[-1]]``.
    """
    check_increasing("t", t)
    t0, t1 = t[0], t[-1]
    if checkpoints is None:
        checkpoints = DEFAULT_CHECKPOINTS
    if isinstance(checkpoints, int) and not isinstance(checkpoints, bool):
        check_int("checkpoints", checkpoints, 1)
        extra = torch.linspace(0.0, 1.0, checkpoints + 1, dtype=t.dtype, device=t.device)
        extra = t0 + (t1 - t0) * extra
    else:
        extra = torch.as_tensor(checkpoints, dtype=t.dtype, device=t.device)
        if extra.dim() != 1 or not torch.isfinite(extra).all():
            raise ValueError(
                "`checkpoints` must be None, an int >= 1 or a finite 1-D tensor of times, "
                f"got {checkpoints!r}"
            )
        if extra.numel() and (extra.min() < t0 or extra.max() > t1):
            raise ValueError(
                f"`checkpoints` times must lie in [t[0], t[-1]] = [{t0.item():g}, {t1.item():g}], "
                f"got {extra.tolist()}"
            )
    grid = torch.cat([t, extra]).sort().values
    # Merge times closer than a relative tolerance so that no interval is degenerate.
    span = (t1 - t0).abs()
    tol = span * (1e-6 if grid.dtype == torch.float32 else 1e-12)
    keep = torch.ones_like(grid, dtype=torch.bool)
    keep[1:] = (grid[1:] - grid[:-1]) > tol
    # Requested times win over checkpoints they coincide with.
    grid = grid[keep]
    idx = torch.searchsorted(grid, t).clamp(max=grid.numel() - 1)
    lower = (idx - 1).clamp(min=0)
    pick = torch.where((grid[lower] - t).abs() < (grid[idx] - t).abs(), lower, idx)
    grid[pick] = t
    return grid


def _requested_index(grid: Tensor, t: Tensor) -> tuple[int, ...]:
    diff = (grid[None, :] - t[:, None]).abs()
    return tuple(int(i) for i in diff.argmin(dim=1))


def _solve_interval(
    func: Callable[..., Tensor],
    y: Tensor,
    ta: Tensor,
    tb: Tensor,
    method: str,
    options: dict[str, Any] | None,
    rtol: float,
    atol: float,
    odeint: Callable[..., Tensor],
) -> Tensor:
    try:
        return odeint(
            func, y, torch.stack([ta, tb]), method=method, options=options, rtol=rtol, atol=atol
        )[-1]
    except AssertionError as exc:  # torchdiffeq reports step-size underflow / max steps this way
        reached = _reached_time(exc, ta)
        raise IntegrationError(
            f"solver '{method}' failed on [{ta.item():g}, {tb.item():g}] for field "
            f"{type(func).__name__}: {exc or 'assertion in solver'}; reached t = {reached:.10g}. "
            "Try a fixed-step method, a larger `atol`/`rtol`, or regularize the field."
        ) from exc


def _reached_time(exc: BaseException, default: Tensor) -> float:
    """The time an adaptive torchdiffeq solver had reached when it raised ``exc``.

    torchdiffeq's messages ("underflow in dt ...", "max_num_steps exceeded ...") omit it; its
    Runge-Kutta solvers hold it as ``rk_state.t1`` (``_RungeKuttaState``) in the failing frames.
    Falls back to ``default`` (the interval start) when no such frame is found.
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
    return float((default if reached is None else reached).detach())


def integrate(
    func: Callable[..., Tensor],
    y0: Tensor,
    t: Tensor,
    *,
    checkpoints: int | Tensor | Sequence[float] | None = None,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    adjoint: bool = False,
) -> Trajectory:
    """Solve ``dz/dt = func(t, z)`` with every checkpoint state on the autograd path.

    torchdiffeq solves each interval between consecutive checkpoint times; each call starts
    from the previous call's end state. The requested times ``t`` are always checkpoints, so
    the solution at ``t`` (``Trajectory.ys``) has the shape ``torchdiffeq.odeint`` returns.

    Args:
        func: vector field ``f(t, z)`` (an ``nn.Module`` for the sensitivity density). A field
            that defines ``ode_reg_integrate(y0, grid, method=, options=)`` (such as
            :class:`~ode_reg.OrthogonalFlow`) integrates itself on the checkpoint grid.
        y0: initial state; its first dimension is the batch (a 1-D ``y0`` is one sample).
        t: strictly increasing 1-D tensor of output times.
        checkpoints: ``None`` (8 equal intervals, so the two-point call ``t = [0, 1]`` still
            gives 9 checkpoints), an int (equal intervals) or a 1-D tensor of times in
            ``[t[0], t[-1]]``.
        method: a torchdiffeq method name (``None``: ``"dopri5"``, as ``torchdiffeq.odeint``,
            or the field's own rule for fields that integrate themselves;
            ``"rk4"``, ``"euler"``, ... with ``options={"step_size": h}``). Fixed-step methods
            step each checkpoint interval on its own, so a ``step_size`` longer than an
            interval is shortened to it. ``"euler"``, ``"midpoint"`` and ``"rk4"`` (options
            ``step_size`` or none, no torchdiffeq callbacks on the field) are stepped here, on
            torchdiffeq's grid and with its formulas, without its per-call overhead: Euler and
            midpoint equal ``odeint`` to the bit, RK4 (stage sums fused) to rounding.
        options: torchdiffeq solver options (e.g. ``{"step_size": 0.05}``).
        rtol: relative tolerance of adaptive solvers.
        atol: absolute tolerance of adaptive solvers.
        adjoint: use ``torchdiffeq.odeint_adjoint`` per interval (memory-light, but its
            backward is not differentiable: adjoint-based regularizers refuse it).

    Returns:
        A :class:`Trajectory`.

    Raises:
        ValueError: if ``t`` is not strictly increasing, ``checkpoints`` is out of range or
            ``y0`` is not a floating-point tensor.
        IntegrationError: if an adaptive solver underflows or exceeds its step budget.

    Example::

        >>> import torch
        >>> from ode_reg import integrate
        >>> traj = integrate(lambda t, z: -z, torch.ones(2, 3), torch.tensor([0.0, 1.0]))
        >>> traj.ys.shape, traj.num_checkpoints
        (torch.Size([2, 2, 3]), 9)
    """
    if not isinstance(y0, Tensor) or not y0.is_floating_point():
        raise ValueError(f"`y0` must be a floating-point tensor, got {type(y0).__name__}")
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=y0.dtype, device=y0.device)
    grid = checkpoint_grid(t, checkpoints)
    t_index = _requested_index(grid, t)
    if method is not None and method not in SOLVERS:
        raise ValueError(f"`method` must be one of {sorted(SOLVERS)}, got {method!r}")
    if adjoint and not isinstance(func, nn.Module):
        raise ValueError(
            "`adjoint=True` needs `func` to be an nn.Module (odeint_adjoint requires it)"
        )

    if not y0.requires_grad and torch.is_grad_enabled():
        # A leaf that requires grad, so that a_0 = dL/dz_0 exists; the caller's y0 is untouched.
        y0 = y0.detach().requires_grad_(True)
    custom = getattr(func, "ode_reg_integrate", None)
    if custom is not None:
        states, weights = custom(y0, grid, method=method, options=options)
        states = tuple(states)
        weights = None if weights is None else tuple(weights)
        field_at = None
        if weights is not None:
            w = weights

            def field_at(k: int, z: Tensor) -> Tensor:
                return func.ode_reg_field_at(grid[k], z, w[k])

        traj = Trajectory(
            func, grid, states, t, t_index, weights, method or "custom", False, field_at
        )
        traj.points = tuple(
            FieldPoint(func, grid[k], None, None if weights is None else weights[k])
            for k in range(len(states))
        )
        return traj

    method = method or "dopri5"
    field_at = _snapshot_field(func, grid)
    snapshot = func.ode_reg_snapshot() if hasattr(func, "ode_reg_snapshot") else None
    points = tuple(FieldPoint(func, grid[k], snapshot) for k in range(grid.numel()))
    if not adjoint and not grid.requires_grad and _steps_directly(func, method, options):
        states = _fixed_grid_states(func, y0, grid, method, (options or {}).get("step_size"))
        traj = Trajectory(func, grid, states, t, t_index, None, method, False, field_at)
        traj.points = points
        return traj
    odeint = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    states = [y0]
    y = y0
    for k in range(1, grid.numel()):
        y = _solve_interval(func, y, grid[k - 1], grid[k], method, options, rtol, atol, odeint)
        states.append(y)
    traj = Trajectory(func, grid, tuple(states), t, t_index, None, method, adjoint, field_at)
    traj.points = points
    return traj


def _steps_directly(
    func: Callable[..., Tensor], method: str, options: dict[str, Any] | None
) -> bool:
    """Whether :func:`_fixed_grid_states` reproduces ``torchdiffeq.odeint`` for this call."""
    if method not in DIRECT_METHODS or set(options or {}) - {"step_size"}:
        return False  # grid_constructor, perturb, interp, ...: torchdiffeq's own solver
    # A field with torchdiffeq step callbacks expects torchdiffeq to call them.
    return not any(hasattr(func, name) for name in _all_callback_names)


def _fixed_grid_states(
    func: Callable[..., Tensor], y0: Tensor, grid: Tensor, method: str, step_size: Any
) -> tuple[Tensor, ...]:
    """The checkpoint states of a fixed-grid solve, stepped here rather than by ``odeint``.

    The same sub-grid as one ``torchdiffeq.odeint`` call per checkpoint interval
    (``ceil(interval / step_size)`` steps, the last one shortened to end on the checkpoint;
    one step per interval without a step size) and the same Runge-Kutta formulas (torchdiffeq's
    ``rk4`` is the 3/8 rule); the results agree with ``odeint`` to rounding. What is saved:
    the per-call input checks, the solution buffer and its in-place writes, the
    ``y.abs()`` torchdiffeq computes on every field call for a dtype, the scalar tensor
    arithmetic on times at every step, and about half the tensor operations of a step (stage
    combinations fused into ``add(..., alpha=h)``), which also shrinks the graphs that the
    backward and the double backward of adjoint-based regularizers walk.
    """
    # Step times per interval on the CPU, in the grid's dtype, as torchdiffeq forms them.
    cpu = grid.detach().cpu()
    if isinstance(step_size, Tensor):
        step_size = step_size.detach().cpu()
    if step_size is None:
        subs = [cpu[k : k + 2] for k in range(cpu.numel() - 1)]
    else:
        subs = []
        counts = torch.ceil((cpu[1:] - cpu[:-1]) / step_size + 1).tolist()
        for k, n in enumerate(counts):
            ts = torch.arange(0, n, dtype=cpu.dtype) * step_size + cpu[k]
            ts[-1] = cpu[k + 1]
            if ts.numel() > 2 and ts[-2] >= cpu[k + 1]:
                # Rounding put the last inner time past the checkpoint (odeint would return an
                # interpolation there): end the interval on the checkpoint instead.
                ts = torch.cat([ts[:-1][ts[:-1] < cpu[k + 1]], ts[-1:]])
            subs.append(ts)
    sizes = [ts.numel() - 1 for ts in subs]
    t0s = torch.cat([ts[:-1] for ts in subs])
    t1s = torch.cat([ts[1:] for ts in subs])
    dts = t1s - t0s
    # The stage times of torchdiffeq's steps, cast to the state's dtype as its field wrapper does.
    real = y0.real.dtype if y0.is_complex() else y0.dtype
    stage = torch.stack(
        [t0s, t0s + dts * (1.0 / 3.0), t0s + dts * (2.0 / 3.0), t1s, t0s + 0.5 * dts]
    ).to(device=y0.device, dtype=real)
    times = [row.unbind() for row in stage]
    hs = dts.tolist()
    step = _STEPPERS[method]
    states = [y0]
    y = y0
    j = 0
    for size in sizes:
        for _ in range(size):
            y = step(
                func, y, hs[j], times[0][j], times[1][j], times[2][j], times[3][j], times[4][j]
            )
            j += 1
        states.append(y)
    return tuple(states)


def _euler_step(func, y, h, t0, t13, t23, t1, th):
    # As torchdiffeq (y + dt * f), to the bit: forward Euler is the AntisymmetricRNN recurrence.
    return y + h * func(t0, y)


def _midpoint_step(func, y, h, t0, t13, t23, t1, th):
    # As torchdiffeq, to the bit.
    half = 0.5 * h
    return y + h * func(th, y + func(t0, y) * half)


def _rk4_step(func, y, h, t0, t13, t23, t1, th):
    # torchdiffeq's rk4_alt_step_func (the 3/8 rule), with the stage combinations fused into
    # add(..., alpha=) (10 tensor operations instead of 18): equal to rounding, not to the bit.
    k1 = func(t0, y)
    k2 = func(t13, torch.add(y, k1, alpha=h / 3.0))
    # add_(x, alpha=-c), not sub_(x, alpha=c): its backward is one multiplication, not two.
    k3 = func(t23, torch.add(y, k2, alpha=h).add_(k1, alpha=-h / 3.0))
    k4 = func(t1, torch.add(y, k1, alpha=h).add_(k2, alpha=-h).add_(k3, alpha=h))
    s = torch.add(k2, k3).mul_(3.0).add_(k1).add_(k4)
    return torch.add(y, s, alpha=h / 8.0)


_STEPPERS = {"euler": _euler_step, "midpoint": _midpoint_step, "rk4": _rk4_step}


def _snapshot_field(
    func: Callable[..., Tensor], grid: Tensor
) -> Callable[[int, Tensor], Tensor] | None:
    """Field evaluation that restores state the field held while it was integrated.

    A field with a held input (an ODE-RNN feeding one sequence step per solve) exposes
    ``ode_reg_snapshot() -> dict`` of attribute values; evaluating ``f(t_k, z)`` later (for the
    sensitivity density or the skew-Jacobian penalty) sets them back for the call.
    """
    snap = getattr(func, "ode_reg_snapshot", None)
    if snap is None:
        return None
    saved = snap()

    def field_at(k: int, z: Tensor) -> Tensor:
        current = {name: getattr(func, name) for name in saved}
        try:
            for name, value in saved.items():
                setattr(func, name, value)
            return func(grid[k], z)
        finally:
            for name, value in current.items():
                setattr(func, name, value)

    return field_at


def chain(trajectories: Sequence[Trajectory]) -> Trajectory:
    """Join trajectories solved one after another (an ODE-RNN's steps) into one.

    Times are shifted so that they keep increasing; a state shared by consecutive trajectories
    (the end of one solve is the start of the next) appears once. Field evaluations are
    delegated to the trajectory each checkpoint came from, so each keeps its own field and
    held input.

    Args:
        trajectories: one or more trajectories whose states have the same shape.

    Returns:
        A :class:`Trajectory` over all checkpoints, in order.

    Raises:
        ValueError: if the sequence is empty or the state shapes differ.

    Example::

        >>> import torch
        >>> from ode_reg import integrate
        >>> from ode_reg.trajectory import chain
        >>> t = torch.tensor([0.0, 1.0])
        >>> a = integrate(lambda t, z: -z, torch.ones(2, 3), t, checkpoints=2)
        >>> b = integrate(lambda t, z: -z, a.ys[-1], t, checkpoints=2)
        >>> chain([a, b]).num_checkpoints
        5
    """
    if len(trajectories) == 0:
        raise ValueError("`trajectories` must hold at least one Trajectory")
    if len(trajectories) == 1:
        return trajectories[0]
    shape = trajectories[0].states[0].shape
    if any(tr.states[0].shape != shape for tr in trajectories):
        raise ValueError(
            "`trajectories` must have states of one shape, got "
            f"{sorted({tuple(tr.states[0].shape) for tr in trajectories})}"
        )
    states: list[Tensor] = []
    times: list[Tensor] = []
    owner: list[tuple[Trajectory, int]] = []
    weights: list[Tensor] = []
    has_weights = all(tr.weights is not None for tr in trajectories)
    offset = trajectories[0].times[0]
    for tr in trajectories:
        shift = offset - tr.times[0]
        for k, z in enumerate(tr.states):
            if states and k == 0 and z is states[-1]:
                continue
            if states and k == 0:
                # A jump between solves (e.g. an RNN cell update): a new checkpoint at the same
                # time would be degenerate for quadrature, so nudge it forward.
                shift = shift + 1e-6 * (tr.times[-1] - tr.times[0])
            states.append(z)
            times.append(tr.times[k] + shift)
            owner.append((tr, k))
            if has_weights:
                weights.append(tr.weights[k])
        offset = tr.times[-1] + shift

    def field_at(j: int, z: Tensor) -> Tensor:
        tr, k = owner[j]
        return tr.field_at(k, z)

    funcs: list[Callable[..., Tensor]] = []
    for tr in trajectories:
        if all(tr.func is not f for f in funcs):
            funcs.append(tr.func)
    first = trajectories[0]
    joined = Trajectory(
        first.func,
        torch.stack(times),
        tuple(states),
        torch.stack([times[0], times[-1]]),
        (0, len(states) - 1),
        tuple(weights) if has_weights else None,
        first.method,
        any(tr.adjoint_method for tr in trajectories),
        field_at,
    )
    joined.funcs = tuple(funcs)
    if all(tr.points is not None for tr in trajectories):
        joined.points = tuple(tr.points[k] for tr, k in owner)
    return joined
