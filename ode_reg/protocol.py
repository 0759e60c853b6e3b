"""The protocols a field may implement beyond ``f(t, z)``: integrating itself, holding inputs.

Two optional protocols, looked up by :func:`ode_reg.integrate`, :func:`ode_reg.odeint` and
:func:`ode_reg.odeint_adjoint`:

- :class:`SelfIntegratingField`, a base class: the field advances its own state over a grid
  of times (:class:`~ode_reg.OrthogonalFlow`'s Lie-group steps keep ``W_t`` orthogonal;
  :class:`~ode_reg.SkewLinearODEFunc` with ``g`` solves ``(z, A)`` jointly). Such a field is
  integrated by its own integrator on every call (training and evaluation, ``odeint`` and
  ``odeint_adjoint``): the same solver everywhere. Of torchdiffeq's keywords it honours those
  its integrator can (checked by the field) and refuses the others by name (:func:`integrate_self`).
- :class:`HoldsInputs`: the field holds attributes set between solves (an ODE-RNN's input at
  each step); ``ode_reg_snapshot`` names them, and each checkpoint is evaluated again with
  the values of its own solve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ode_reg._inputs import checkpoint_grid
from ode_reg._once import say_once
from ode_reg._probe import field_attr
from ode_reg._trajectory_data import FieldPoint, Trajectory

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "HoldsInputs",
    "IntegratorCall",
    "SelfIntegratingField",
    "held_inputs",
    "integrate_self",
    "self_integrating",
]

#: torchdiffeq's (and ``ode_reg.odeint``'s) default tolerances.
DEFAULT_RTOL = 1e-7
DEFAULT_ATOL = 1e-9


@dataclass(frozen=True)
class IntegratorCall:
    """The keywords of one call, as a field that integrates itself receives them.

    Attributes:
        method: the torchdiffeq ``method`` asked for (``None``: the field's default).
        options: the ``options`` of the call.
        rtol: the ``rtol`` of the call (:data:`DEFAULT_RTOL` unless given).
        atol: the ``atol`` of the call (:data:`DEFAULT_ATOL` unless given).
        record: whether the states are checkpoints the terms take adjoints at: then each
            state must be on the autograd path from ``y0`` to the later states.
    """

    method: str | None = None
    options: dict[str, Any] | None = None
    rtol: Any = DEFAULT_RTOL
    atol: Any = DEFAULT_ATOL
    record: bool = True


class SelfIntegratingField:
    """Base class of a field that integrates itself on a grid of checkpoint times.

    A subclass (also an ``nn.Module``) implements :meth:`ode_reg_integrate` and
    :meth:`ode_reg_field_at`. :attr:`integrates_itself` may turn the protocol off for an
    instance (then the field is an ordinary torchdiffeq field). The recorded weights ``W_k``
    are taken as orthogonal (their defect monitored) only where :attr:`weights_orthogonal`
    is ``True``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from ode_reg import integrate
        >>> class Decay(SelfIntegratingField, nn.Module):  # dz/dt = -z, exactly
        ...     def forward(self, t, z):
        ...         return -z
        ...     def ode_reg_integrate(self, y0, grid, call):
        ...         return [y0 * torch.exp(-(s - grid[0])) for s in grid], None
        ...     def ode_reg_field_at(self, t, z, weight):
        ...         return -z
        >>> traj = integrate(Decay(), torch.ones(2, 1), torch.tensor([0.0, 1.0]), checkpoints=2)
        >>> traj.times.tolist(), round(float(traj.ys[-1, 0, 0]), 4)
        ([0.0, 0.5, 1.0], 0.3679)
    """

    #: Whether the recorded ``W_k`` are orthogonal.
    weights_orthogonal: bool = False

    @property
    def integrates_itself(self) -> bool:
        """Whether :meth:`ode_reg_integrate` is used for this instance (default ``True``)."""
        return True

    def ode_reg_integrate(
        self, y0: Tensor, grid: Tensor, call: IntegratorCall
    ) -> tuple[Sequence[Tensor], Sequence[Tensor] | None]:
        """Advance ``y0`` over ``grid``.

        Args:
            y0: initial state; ``states[0]`` is this very tensor.
            grid: increasing 1-D times; ``grid[0]`` is the start, the requested times are
                among them.
            call: the call's keywords (:class:`IntegratorCall`); the field honours each or
                refuses it by name.

        Returns:
            ``(states, weights)``: the state at every grid time, and the field's weight at
            every grid time (``None`` for a field without one).

        Raises:
            ValueError: naming each keyword the integrator cannot honour.
        """
        raise NotImplementedError

    def ode_reg_field_at(self, t: Tensor, z: Tensor, weight: Tensor | None) -> Tensor:
        """``f(t, z)`` given the recorded weight at ``t`` (used for the sensitivity density)."""
        raise NotImplementedError


@runtime_checkable
class HoldsInputs(Protocol):
    """A field holding attributes that change between solves (an ODE-RNN's input).

    Example::

        >>> import torch
        >>> class Driven(torch.nn.Module):
        ...     u = None
        ...     def forward(self, t, z):
        ...         return self.u - z
        ...     def ode_reg_snapshot(self):
        ...         return {"u": self.u}
        >>> isinstance(Driven(), HoldsInputs)
        True
    """

    def ode_reg_snapshot(self) -> dict[str, object]:
        """The held attributes, by name, as they are now (restored for later evaluations)."""
        ...


def held_inputs(func: Any) -> dict[str, object] | None:
    """``func.ode_reg_snapshot()`` for a field that holds inputs (:class:`HoldsInputs`), else
    ``None`` (looked up without ``nn.Module``'s failing ``__getattr__``)."""
    snapshot = field_attr(func, "ode_reg_snapshot")
    return None if snapshot is None else snapshot()


def self_integrating(func: Any) -> bool:
    """Whether ``func`` integrates itself (a :class:`SelfIntegratingField` that says so)."""
    return isinstance(func, SelfIntegratingField) and func.integrates_itself


def integrate_self(
    func: SelfIntegratingField,
    y0: Any,
    t: Tensor,
    call: IntegratorCall,
    *,
    checkpoints: int | Tensor | Sequence[float] | None = None,
    event_fn: Callable[..., Tensor] | None = None,
    adjoint: bool = False,
    adjoint_kwargs: dict[str, Any] | None = None,
) -> Trajectory:
    """Solve with the field's own integrator on the checkpoint grid (all of ``t`` among it).

    ``call`` (``method``, ``options``, ``rtol``, ``atol``) goes to the field, which honours
    each keyword or refuses it by name. ``event_fn`` and ``odeint_adjoint``'s own keywords
    (``adjoint_*``) are refused by name; ``adjoint=True`` runs the same integrator as
    ``odeint``, its gradient taken through its steps (said once per field class).

    Args:
        func: the field.
        y0: initial state (a tensor).
        t: strictly increasing output times.
        call: the call's keywords (:class:`IntegratorCall`).
        checkpoints: as for :func:`ode_reg.integrate`.
        event_fn: refused when given.
        adjoint: whether the call was ``odeint_adjoint``.
        adjoint_kwargs: ``odeint_adjoint``'s keywords that were given (refused).

    Returns:
        A :class:`Trajectory` with a checkpoint at every grid time.

    Raises:
        ValueError: on a tuple ``y0``, decreasing ``t``, ``event_fn``, ``adjoint_*`` keywords,
            or what the field refuses.
    """
    name = type(func).__name__
    if not isinstance(y0, Tensor):
        raise ValueError(f"{name} integrates tensor states only, got a tuple `y0`")
    if event_fn is not None:
        raise ValueError(
            f"`event_fn` is not supported by {name}, which integrates itself on a grid (no "
            "event location): solve to a fixed time, or use a field without its own integrator"
        )
    if adjoint_kwargs:
        raise ValueError(
            f"{sorted(adjoint_kwargs)} are not supported by {name}: it integrates itself and "
            "odeint_adjoint runs that same integrator, differentiated through its steps (no "
            "backward adjoint solve to configure)"
        )
    if adjoint:
        say_once(
            f"ode_reg: odeint_adjoint on {name} runs its own integrator, as odeint does, and "
            "differentiates through its steps (no adjoint solve, so memory grows with the "
            "steps); use ode_reg.odeint to say so (said once)",
            key=f"self-integrating adjoint:{name}",
        )
    grid = checkpoint_grid(t, checkpoints)
    t_index = tuple(int(i) for i in (grid[None, :] - t[:, None]).abs().argmin(dim=1))
    if call.record and not y0.requires_grad and torch.is_grad_enabled():
        y0 = y0.detach().requires_grad_(True)
    states, weights = func.ode_reg_integrate(y0, grid, call)
    states = tuple(states)
    weights = None if weights is None else tuple(weights)
    traj = Trajectory(
        func=func,
        times=grid,
        states=states,
        t=t,
        method=call.method or "custom",
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
