"""``ode_reg.odeint`` and ``ode_reg.odeint_adjoint``: torchdiffeq's calls, recorded when it matters.

Converting a project is ``from torchdiffeq import odeint`` -> ``from ode_reg import odeint``
(and the base class). Inside a :class:`~ode_reg.RegularizedODEModule`'s training step with an
active term or a monitor due, the call is recorded into the step (one torchdiffeq solve, the
checkpoints taken from the solver's own steps). When the step wants only solver statistics
(a ``SolverStatsMonitor``, no active term) the call is torchdiffeq's on a counting field
(:func:`~ode_reg.trajectory.solve_counted`). Everywhere else it is torchdiffeq's call and
nothing more, except for a field that integrates itself
(:class:`~ode_reg.protocol.SelfIntegratingField`), which is solved by its own integrator on
every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ode_reg._inputs import (
    check_components,
    check_field_output,
    check_state,
    check_times,
    forced_times,
)
from ode_reg._probe import td_odeint as _td_odeint
from ode_reg._probe import td_odeint_adjoint as _td_odeint_adjoint
from ode_reg.protocol import IntegratorCall, integrate_self, self_integrating
from ode_reg.recording import StepRecorder, current_recorder
from ode_reg.trajectory import SolveSummary, grad_only_from_leaves, integrate, solve_counted


def odeint(
    func: Callable[..., Any],
    y0: Any,
    t: Tensor,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    event_fn: Callable[..., Tensor] | None = None,
    checkpoints: int | Tensor | Sequence[float] | None = None,
    components: Sequence[int] | None = None,
) -> Any:
    """``torchdiffeq.odeint`` with the same signature and result, plus ``checkpoints`` and
    ``components``.

    Args:
        func: vector field ``f(t, y)``; ``y`` a tensor or a tuple of tensors.
        y0: initial state (dimension 0 is the batch for the terms).
        t: increasing or decreasing 1-D tensor of output times.
        rtol: relative tolerance (adaptive methods).
        atol: absolute tolerance (adaptive methods).
        method: torchdiffeq method (``None``: ``"dopri5"``).
        options: torchdiffeq solver options.
        event_fn: torchdiffeq's event function (returns ``(event_t, solution)``).
        checkpoints: where the terms look at the solve (see :func:`ode_reg.integrate`); only
            used when the call is recorded.
        components: for a tuple state, the components the per-sample terms see (see
            :func:`ode_reg.integrate`; default every component with the batch dimension, 0-dim
            accumulators left out); only used when the call is recorded.

    Returns:
        What ``torchdiffeq.odeint`` returns.

    Raises:
        ValueError: on bad arguments (before solving), when the call is recorded.
        IntegrationError: when a recorded adaptive solve fails (with the time reached).

    Example::

        >>> import torch
        >>> from ode_reg import odeint
        >>> odeint(lambda t, z: -z, torch.ones(2), torch.tensor([0.0, 1.0])).shape
        torch.Size([2, 2])
    """
    kw = {"rtol": rtol, "atol": atol, "method": method, "options": options, "event_fn": event_fn}
    return _solve(func, y0, t, checkpoints, components, False, kw)


def odeint_adjoint(
    func: Callable[..., Any],
    y0: Any,
    t: Tensor,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    event_fn: Callable[..., Tensor] | None = None,
    adjoint_rtol: Any = None,
    adjoint_atol: Any = None,
    adjoint_method: str | None = None,
    adjoint_options: dict[str, Any] | None = None,
    adjoint_params: Sequence[Tensor] | None = None,
    checkpoints: int | Tensor | Sequence[float] | None = None,
    components: Sequence[int] | None = None,
) -> Any:
    """``torchdiffeq.odeint_adjoint`` with the same signature and result, plus ``checkpoints``
    and ``components``.

    Its backward solves the adjoint ODE and is not differentiable, and the solver's states are
    not on the autograd path: terms that need the adjoints ``a_k`` are refused on such a solve
    (:class:`~ode_reg.SkewJacobianPenalty` and the monitors work).

    Args:
        func: vector field (an ``nn.Module``, or give ``adjoint_params``).
        y0: initial state.
        t: output times.
        rtol: relative tolerance.
        atol: absolute tolerance.
        method: torchdiffeq method.
        options: solver options.
        event_fn: event function.
        adjoint_rtol: tolerance of the backward solve.
        adjoint_atol: tolerance of the backward solve.
        adjoint_method: method of the backward solve.
        adjoint_options: options of the backward solve.
        adjoint_params: parameters to differentiate in (default: ``func``'s).
        checkpoints: as for :func:`odeint`.
        components: as for :func:`odeint`.

    Returns:
        What ``torchdiffeq.odeint_adjoint`` returns.

    Raises:
        ValueError: on bad arguments, or when an active term needs adjoints.

    Example::

        >>> import torch
        >>> from ode_reg import odeint_adjoint
        >>> lin = torch.nn.Linear(2, 2)
        >>> odeint_adjoint(lambda t, z: lin(z), torch.ones(2), torch.tensor([0.0, 1.0]),
        ...                adjoint_params=tuple(lin.parameters())).shape
        torch.Size([2, 2])
    """
    kw: dict[str, Any] = {
        "rtol": rtol,
        "atol": atol,
        "method": method,
        "options": options,
        "event_fn": event_fn,
    }
    extra = {
        "adjoint_rtol": adjoint_rtol,
        "adjoint_atol": adjoint_atol,
        "adjoint_method": adjoint_method,
        "adjoint_options": adjoint_options,
        "adjoint_params": adjoint_params,
    }
    kw.update({k: v for k, v in extra.items() if v is not None})
    return _solve(func, y0, t, checkpoints, components, True, kw)


def _solve(
    func: Callable[..., Any],
    y0: Any,
    t: Any,
    checkpoints: Any,
    components: Sequence[int] | None,
    adjoint: bool,
    kw: dict[str, Any],
) -> Any:
    """The call of :func:`odeint` (``adjoint``: :func:`odeint_adjoint`): torchdiffeq's outside
    a recorded step, the field's own integrator for a field that integrates itself (on every
    call, so training and evaluation solve alike), recorded inside a training step."""
    check_components(y0, components)  # refused on every call, recorded or not (no solve)
    rec = current_recorder()
    t = _as_times(t, y0)
    if self_integrating(func):
        if rec is None:
            return _self_integrated(func, y0, t, checkpoints, adjoint, kw)
    elif rec is None:
        return _plain(_td_odeint_adjoint if adjoint else _td_odeint, func, y0, t, checkpoints, kw)
    return _recorded(rec, func, y0, t, checkpoints, adjoint, kw, components=components)


def _self_integrated(
    func: Any, y0: Any, t: Any, checkpoints: Any, adjoint: bool, kw: dict[str, Any]
) -> Any:
    """An unrecorded solve of a field that integrates itself: its integrator on the
    checkpoint grid (the grid a recorded solve steps on), no checkpoint kept on the path."""
    check_state(y0)
    adjoint_kwargs = dict(kw)
    own = [adjoint_kwargs.pop(k) for k in ("method", "options", "rtol", "atol")]
    event_fn = adjoint_kwargs.pop("event_fn")
    traj = integrate_self(
        func,
        y0,
        check_times(t, y0),
        IntegratorCall(*own, record=False),
        checkpoints=checkpoints,
        event_fn=event_fn,
        adjoint=adjoint,
        adjoint_kwargs=adjoint_kwargs,
    )
    return traj.ys


def _as_times(t: Any, y0: Any) -> Any:
    """``t`` as a tensor of the state's dtype and device when given as a list (every call, as
    ``integrate`` does; torchdiffeq alone refuses a list)."""
    if isinstance(t, (list, tuple)):
        ref = y0[0] if isinstance(y0, tuple) else y0
        if isinstance(ref, Tensor):
            return torch.as_tensor(t, dtype=ref.dtype, device=ref.device)
    return t


def _check_checkpoints(checkpoints: Any, t: Any, y0: Any, kw: dict[str, Any]) -> None:
    """``checkpoints`` are checked on every call, recorded or not, as ``integrate`` checks them
    (times off a fixed grid refused; cheap: no solve)."""
    if checkpoints is not None and isinstance(t, Tensor) and t.dim() == 1 and t.numel() >= 2:
        forced_times(t, checkpoints, kw.get("method"), kw.get("options"), y0)


class _FirstOutputChecked:
    """A plain field whose first output's shape is checked; torchdiffeq finds the field's own
    step callbacks through it."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.checked = False

    def __call__(self, t: Tensor, y: Any) -> Any:
        out = self.func(t, y)
        if not self.checked:
            self.checked = True
            check_field_output(self.func, out, y)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["func"], name)


@contextmanager
def _output_checked(func: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """The field to hand to torchdiffeq, its first output's shape checked (a forward hook
    removed at the first call for an ``nn.Module``, so ``odeint_adjoint`` still finds its
    parameters; a thin wrapper otherwise)."""
    if not isinstance(func, nn.Module):
        yield _FirstOutputChecked(func)
        return

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        handle.remove()
        if len(args) >= 2:
            check_field_output(module, out, args[1])

    handle = func.register_forward_hook(hook)
    try:
        yield func
    finally:
        handle.remove()


def _plain(
    solve: Callable[..., Any],
    func: Callable[..., Any],
    y0: Any,
    t: Any,
    checkpoints: Any,
    kw: dict[str, Any],
) -> Any:
    """torchdiffeq's call, with the checks every call makes (checkpoints, the field's shape)."""
    _check_checkpoints(checkpoints, t, y0, kw)
    with _output_checked(func) as checked:
        return solve(checked, y0, t, **kw)


def _recorded(
    rec: StepRecorder,
    func: Callable[..., Any],
    y0: Any,
    t: Tensor,
    checkpoints: Any,
    adjoint: bool,
    kw: dict[str, Any],
    components: Sequence[int] | None = None,
) -> Any:
    solve = _td_odeint_adjoint if adjoint else _td_odeint
    own = self_integrating(func)
    if not torch.is_grad_enabled() and not own:
        rec.unrecorded += 1
        rec.warn(
            "no_grad",
            "ode_reg: a solve ran without grad inside a training step; the loss cannot reach "
            "it, so it is left out of the terms (said once)",
        )
        return _plain(solve, func, y0, t, checkpoints, kw)
    if rec.stats_only and not own:
        # Only solver statistics are wanted: torchdiffeq's call with a counting field, no
        # trajectory (checkpoints are checked, and not used, as on the unrecorded call).
        _check_checkpoints(checkpoints, t, y0, kw)
        out, summary = solve_counted(func, y0, t, adjoint=adjoint, **_drop_none(kw))
        rec.summaries.append(summary)
        return out
    if adjoint and rec.refuse_adjoint:
        raise ValueError(
            f"odeint_adjoint cannot be used with {list(rec.refuse_adjoint)}: their terms need the "
            "adjoints a_k, which an odeint_adjoint solve does not expose to autograd. Use "
            "ode_reg.odeint, or SkewJacobianPenalty"
        )
    if checkpoints is None:
        checkpoints = rec.common_checkpoints
    traj = integrate(
        func,
        y0,
        t,
        checkpoints=checkpoints,
        adjoint=adjoint,
        grad_leaf=rec.adjoint_inputs or rec.chains,
        components=components,
        **{k: v for k, v in kw.items() if k != "event_fn" or v is not None},
    )
    traj.solve_kwargs = {k: kw.get(k) for k in ("rtol", "atol", "options")}
    if torch.is_grad_enabled():
        if grad_only_from_leaves(traj):
            # Nothing trainable reaches the result (a frozen teacher's rollout from an input
            # without grad): torchdiffeq's call gives a result without grad, so does this one,
            # and the solve is no chain (its solver counts are kept).
            rec.summaries.append(SolveSummary.of(traj))
            if traj.event_t is not None:
                return traj.event_t.detach(), _detach(traj.solution)
            return _detach(traj.ys)
        rec.record(traj)
    if traj.event_t is not None:
        return traj.event_t, traj.solution
    return traj.ys


def _detach(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(c.detach() for c in x)
    return x.detach()


def _drop_none(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}
