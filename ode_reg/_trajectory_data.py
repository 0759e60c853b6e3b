"""What one recorded solve is: the :class:`Trajectory` record and its parts.

A :class:`Trajectory` holds the checkpoint states of one solve (or of a chain of solves, see
:func:`ode_reg.trajectory.chain`), the solver's counts (:class:`SolverStats`) and how the
field is evaluated again at each checkpoint (:class:`FieldPoint`). Nothing here solves: the
records are built by :func:`ode_reg.integrate` and read by the terms and the monitors.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: At most ``DEFAULT_CHECKPOINTS + 1`` solver step states are kept per solve by default
#: (spread evenly over the steps taken), plus the result at the last requested time.
DEFAULT_CHECKPOINTS = 8


def call_holding(
    func: Callable[..., Tensor], t: Tensor, z: Tensor, held: Mapping[str, object]
) -> Tensor:
    """``func(t, z)`` with the attributes ``held`` set on ``func`` for the call (the inputs a
    field held during the solve, ``ode_reg_snapshot``), restored afterwards."""
    if not held:
        return func(t, z)
    current = {name: getattr(func, name) for name in held}
    try:
        for name, value in held.items():
            setattr(func, name, value)
        return func(t, z)
    finally:
        for name, value in current.items():
            setattr(func, name, value)


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
        return call_holding(self.func, self.time, z, self.snapshot or {})


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
    """``statistics.median`` as a float (the mean of the two middle values for an even count).

    Raises:
        ValueError: if ``values`` is empty (``statistics.StatisticsError``).

    Example::

        >>> median_value([3, 1, 4, 1])
        2.0
    """
    return float(statistics.median(values))


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
        t_index: index of each requested time among ``states`` (solves of a field that
            integrates itself only).
        funcs: the user's fields (one per solve; a chain joins several).
        points: how the field is evaluated at each checkpoint (:class:`FieldPoint`).
        parts: for a chained trajectory, the solves it joins (see
            :func:`~ode_reg.trajectory.chain`).
        owners: for a chained trajectory, ``(part, k)`` for each checkpoint: the solve it
            comes from and its index there (``()`` for a single solve; see
            :meth:`checkpoint_owners`).
        _field_at: for a chained trajectory, the field evaluation at a checkpoint, delegated
            to the solve it comes from (``None`` otherwise).
        grad_leaves: the grad-requiring leaf copies of ``y0`` that :func:`integrate` made
            (``grad_leaf``).
        components: for a tuple state, the components the terms' per-sample rows are built
            from (``None``: every component with the batch dimension; see :meth:`samples`).
        end_edge: the autograd edge of the solution's last row (the last value stacked by the
            recorded solve, or copied into torchdiffeq's buffer; plain tensor states; else
            ``None``): a VJP from it equals one from ``solution[-1]`` without walking the other
            rows.
        solve_kwargs: the keywords ``ode_reg.odeint`` solved with (``rtol``, ``atol``,
            ``options`` as the caller gave them, before the forced checkpoint step ends), so
            that a term can re-solve part of the batch the same way
            (:class:`~ode_reg.AdjointMagnitude` with ``subsample``); ``None`` for a
            trajectory not made by ``ode_reg.odeint``.
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
    t_index: tuple[int, ...] = ()
    funcs: tuple[Callable[..., Tensor], ...] = ()
    points: tuple[FieldPoint, ...] | None = field(default=None, repr=False)
    parts: tuple[Trajectory, ...] = ()
    owners: tuple[tuple[Trajectory, int], ...] = field(default=(), repr=False)
    _field_at: Callable[[int, Tensor], Tensor] | None = field(default=None, repr=False)
    grad_leaves: tuple[Tensor, ...] = field(default=(), repr=False)
    components: tuple[int, ...] | None = None
    end_edge: Any = field(default=None, repr=False)
    solve_kwargs: dict[str, Any] | None = field(default=None, repr=False)

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

    def checkpoint_owners(self) -> Sequence[tuple[Trajectory, int]]:
        """``(solve, k)`` for each checkpoint: :attr:`owners` for a chain, else ``(self, k)``."""
        return self.owners or [(self, k) for k in range(self.num_checkpoints)]

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
