"""Chains: solves run one after another (an ODE-RNN's steps) joined into one trajectory."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ode_reg._trajectory_data import Trajectory


def starts_from_end(traj: Trajectory, z: Tensor) -> bool:
    """Whether ``z`` is (a view of) the last row of ``traj``'s solution: a next solve that
    starts from it continues this one with no operation in between."""
    sol = traj.flat_solution
    if sol is None or not isinstance(z, Tensor) or z.shape != sol.shape[1:]:
        return False
    base = z._base if z._base is not None else z
    return base is sol and z.data_ptr() == sol[-1].data_ptr()


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
        owners=tuple(owner),
        _field_at=field_at,
    )
    if all(tr.points is not None for tr in trajectories):
        joined.points = tuple(tr.points[k] for tr, k in owner)
    return joined
