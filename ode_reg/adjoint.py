"""Adjoints ``a_k = dL/dz_k`` and sensitivity densities ``y_k = a_k df/dtheta`` (MATH.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ode_reg._batched import group_points
from ode_reg.functional.penalties import UNTRACEABLE, known_unstackable, mark_unstackable
from ode_reg.functional.sensitivity import sensitivity_at_leaf, sensitivity_density
from ode_reg.trajectory import Trajectory


def adjoints(loss: Tensor, traj: Trajectory, create_graph: bool = False) -> Tensor:
    """All checkpoint adjoints ``a_k = dL/dz_k`` in one backward pass.

    ``a_k`` is the total derivative: where the loss also reads intermediate states, the
    adjoint includes those direct contributions (it jumps there).

    Args:
        loss: scalar loss computed from the trajectory.
        traj: the :class:`~ode_reg.Trajectory` the loss was computed from.
        create_graph: keep the graph so that the adjoints are differentiable in the
            parameters (needed when a penalty of the adjoints is trained on).

    Returns:
        Tensor of shape ``(K + 1, *y0.shape)``; states the loss does not reach get zeros.

    Raises:
        ValueError: if ``loss`` is not a scalar, does not depend on the trajectory, or
            ``create_graph`` is asked of a trajectory solved with ``odeint_adjoint``.

    Example::

        >>> import torch
        >>> from ode_reg import integrate, adjoints
        >>> z0 = torch.ones(4, 2, requires_grad=True)
        >>> traj = integrate(lambda t, z: -z, z0, torch.tensor([0.0, 1.0]), checkpoints=2)
        >>> a = adjoints(traj.ys[-1].pow(2).sum(), traj)
        >>> a.shape
        torch.Size([3, 4, 2])
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss` must be a scalar tensor, got {shape}")
    if create_graph and traj.adjoint_method:
        raise ValueError(
            "`create_graph=True` needs a differentiable backward, but the trajectory was solved "
            "with odeint_adjoint (`adjoint=True`), whose backward is not differentiable"
        )
    (a,), _ = adjoints_and_grads(loss, [traj], (), create_graph=create_graph)
    return a


def adjoints_and_grads(
    loss: Tensor,
    trajs: Sequence[Trajectory],
    inputs: Sequence[Tensor],
    create_graph: bool = False,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """The adjoints of several trajectories and ``dL/dx`` of other tensors, in one backward.

    What :class:`~ode_reg.RegularizedODEModule` uses to take the task gradient of the
    parameters from the same backward pass that gives the adjoints (one pass instead of two).

    Args:
        loss: scalar loss.
        trajs: trajectories the loss was computed from.
        inputs: further tensors (e.g. parameters) to differentiate the loss in.
        create_graph: as for :func:`adjoints` (applies to every returned tensor).

    Returns:
        The adjoints ``(K + 1, *y0.shape)`` of each trajectory, as :func:`adjoints` gives them,
        and ``dL/dx`` for each of ``inputs`` (``None`` where the loss does not depend on it).

    Raises:
        ValueError: as :func:`adjoints`, for each trajectory.
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss` must be a scalar tensor, got {shape}")
    slots: list[list[tuple[Tensor, bool, Tensor]]] = []
    for traj in trajs:
        if create_graph and traj.adjoint_method:
            raise ValueError(
                "`create_graph=True` needs a differentiable backward, but the trajectory was "
                "solved with odeint_adjoint (`adjoint=True`), whose backward is not "
                "differentiable"
            )
        if not loss.requires_grad or not any(s.requires_grad for s in traj.states):
            raise ValueError("`loss` does not depend on the trajectory: no state requires grad")
        owners = getattr(traj, "owners", None) or [(traj, k) for k in range(traj.num_checkpoints)]
        row = []
        for tr, k in owners:
            end = tr.end_from_solution and k == tr.num_checkpoints - 1
            row.append((tr.flat_solution if end else tr.states[k], end, tr.states[k]))
        slots.append(row)
    wanted: list[Tensor] = []
    position: dict[int, int] = {}
    for row in slots:
        for x, _, _ in row:
            if x.requires_grad and id(x) not in position:
                position[id(x)] = len(wanted)
                wanted.append(x)
    n = len(wanted)
    grads = torch.autograd.grad(
        loss,
        [*wanted, *inputs],
        create_graph=create_graph,
        retain_graph=True,
        allow_unused=True,
    )
    out = []
    for row in slots:
        stack = []
        for x, end, _ in row:
            g = grads[position[id(x)]] if id(x) in position else None
            if g is not None and end:
                g = g[-1]
            stack.append(g)
        if all(g is None for g in stack):
            raise ValueError("`loss` does not depend on the trajectory's states")
        out.append(
            torch.stack(
                [torch.zeros_like(st) if g is None else g for g, (_, _, st) in zip(stack, row)]
            )
        )
    return out, list(grads[n:])


def sensitivities(
    traj: Trajectory,
    adjoints: Tensor,
    create_graph: bool = False,
    *,
    params: Sequence[Tensor] | None = None,
    detach_states: bool = False,
) -> Tensor:
    """Sensitivity densities ``y_k = sum_i a_{k,i} df(t_k, z_{k,i})/dtheta``, shape ``(K + 1, P)``.

    For a loss read at ``t_K``, ``dL/dtheta = integral of y(t) dt`` (the note's eq. 23).
    ``df/dtheta`` is the partial derivative at fixed ``z_k`` (``z_k`` depends on ``theta`` too,
    through the trajectory; that path is not part of ``y_k``); with ``create_graph`` the
    gradient of ``y_k`` itself is the full one, through ``a_k``, ``z_k`` and ``theta``.

    Args:
        traj: the trajectory.
        adjoints: ``(K + 1, *y0.shape)`` adjoints from :func:`adjoints`.
        create_graph: make ``y_k`` differentiable (through ``a_k``, ``z_k`` and ``theta``).
        params: parameters to differentiate with respect to (default: the field's trainable
            parameters). ``P`` is their total number of elements.
        detach_states: treat ``z_k`` as constants inside ``y_k`` (a stop-gradient: an
            approximation of the full derivative; off by default).

    Fields that are ``nn.Module``s reading their parameters as attributes are evaluated at
    all checkpoints of a group in one ``torch.func.vmap`` call, with the parameters
    substituted (``functional_call``) so that the gradient in them is the partial derivative
    while ``z_k`` stays attached; other fields (closures, fields caching tensors computed from
    their parameters) take one VJP per checkpoint, with the full derivative carried by a
    zero-valued term (:func:`~ode_reg.functional.sensitivity.through_state`). Both give the same values and gradients
    (``tests/test_fast_paths.py``).

    Returns:
        Tensor of shape ``(K + 1, P)``.

    Raises:
        ValueError: if the field has no parameters or ``adjoints`` has the wrong shape.

    Example::

        >>> import torch
        >>> from ode_reg import integrate, adjoints, sensitivities
        >>> lin = torch.nn.Linear(2, 2)
        >>> traj = integrate(lambda t, z: lin(z), torch.ones(4, 2), torch.tensor([0.0, 1.0]),
        ...                  checkpoints=2)
        >>> y = sensitivities(traj, adjoints(traj.ys[-1].sum(), traj), params=list(lin.parameters()))
        >>> y.shape
        torch.Size([3, 6])
    """
    params = list(traj.parameters() if params is None else params)
    if not params:
        raise ValueError("`params` is empty: the field has no trainable parameters")
    expected = (traj.num_checkpoints, *traj.states[0].shape)
    if tuple(adjoints.shape) != expected:
        raise ValueError(f"`adjoints` must have shape {expected}, got {tuple(adjoints.shape)}")
    y = _sensitivities_batched(traj, adjoints, params, create_graph, detach_states)
    if y is not None:
        return y
    return _sensitivities_direct(traj, adjoints, params, create_graph, detach_states)


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
    )


class _Call(nn.Module):
    """Holds the fields as submodules, so that ``functional_call`` can substitute their
    parameters, and calls ``fn(*args)`` with the substitutes in place."""

    def __init__(self, funcs: Sequence[nn.Module]) -> None:
        super().__init__()
        self.funcs = nn.ModuleList(funcs)

    def forward(self, fn: Callable[..., Tensor], *args: object) -> Tensor:
        return fn(*args)


class _Substitution:
    """Calls the fields of a trajectory with their parameters replaced (``functional_call``)."""

    def __init__(self, funcs: Sequence[nn.Module], names: list[list[str]]) -> None:
        self.module = _Call(funcs)
        self.names = names

    def __call__(self, replacements: Sequence[Tensor], fn: Callable[..., Tensor], *args) -> Tensor:
        mapping = {n: r for r, ns in zip(replacements, self.names) for n in ns}
        return torch.func.functional_call(self.module, mapping, (fn, *args))

    @classmethod
    def of(cls, traj: Trajectory, params: Sequence[Tensor]) -> _Substitution | None:
        """``None`` when a parameter is not an attribute of a field (a closure's, say)."""
        if traj.points is None:
            return None
        funcs: list[nn.Module] = []
        for pt in traj.points:
            if not isinstance(pt.func, nn.Module):
                return None
            if all(pt.func is not f for f in funcs):
                funcs.append(pt.func)
        names: dict[int, list[str]] = {}
        for i, f in enumerate(funcs):
            for name, p in f.named_parameters(remove_duplicate=False):
                names.setdefault(id(p), []).append(f"funcs.{i}.{name}")
        if len({id(p) for p in params}) != len(params) or any(id(p) not in names for p in params):
            return None
        return cls(funcs, [names[id(p)] for p in params])

    def reaches_only_through(self, traj: Trajectory, params: Sequence[Tensor]) -> bool:
        """Whether each field reaches ``params`` only as its own attributes (and ``W_k``).

        Evaluates each distinct field once with every parameter, ``W_k`` and ``z_k`` replaced
        by constants: a result that still depends on ``params`` (through a tensor computed from
        them and cached on the field, say) would make the substituted derivative miss a path.
        """
        seen: list[Callable[..., Tensor]] = []
        consts = [p.detach() for p in params]
        for k, pt in enumerate(traj.points):
            if any(pt.func is f for f in seen):
                continue
            seen.append(pt.func)
            w = None if pt.weight is None else pt.weight.detach()
            with torch.enable_grad():
                out = self(consts, pt, traj.states[k].detach(), w)
            if out.requires_grad:
                grads = torch.autograd.grad(out.sum(), list(params), allow_unused=True)
                if any(g is not None for g in grads):
                    return False
        return True


def _sensitivities_batched(
    traj: Trajectory,
    adjoints: Tensor,
    params: Sequence[Tensor],
    create_graph: bool,
    detach_states: bool,
) -> Tensor | None:
    """``y_k`` by substituted parameters; ``None`` where that does not apply.

    The partial derivative at fixed ``z_k`` is a VJP in substitutes of the parameters (same
    values, own autograd identity): ``z_k`` stays attached, so with ``create_graph`` the result
    is itself a function of ``a_k``, ``z_k`` and ``theta``, and its gradient is the full one
    without the extra term of :func:`~ode_reg.functional.sensitivity.through_state`. The field
    at all checkpoints of a group (:func:`~ode_reg._batched.group_points`) is one
    ``torch.func.vmap`` call (:func:`stacked_evaluations`); a field that ``vmap`` cannot trace
    is done one checkpoint at a time with ``p.view_as(p)`` aliases (announced once). A recorded
    ``W_k`` is substituted the same way, and the gradient in it is pulled back to ``theta``
    through the weight flow.
    """
    sub = _Substitution.of(traj, params)
    if sub is None or not sub.reaches_only_through(traj, params):
        return None
    full = create_graph and not detach_states
    field = _field(traj)
    groups = None
    if not known_unstackable(field):
        try:
            groups = stacked_evaluations(traj, params, sub, full)
        except UNTRACEABLE as err:
            mark_unstackable(field, type(field).__name__, err)
    if groups is None:
        if not full:
            return None
        return _sensitivities_aliased(traj, adjoints, params, sub)
    return _sensitivities_vmap(traj, adjoints, params, groups, create_graph)


def _field(traj: Trajectory) -> object:
    """The (first) field of the trajectory: what a failed stacked evaluation is remembered by."""
    return (traj.funcs or (traj.func,))[0]


def _pull_back(
    weight: Tensor, cotangent: Tensor, params: Sequence[Tensor], create_graph: bool
) -> Tensor | None:
    """``(dW/dtheta)^T G``: the gradient in a recorded ``W_k`` pulled back to ``theta``."""
    if not weight.requires_grad:
        return None
    grads = torch.autograd.grad(
        weight, params, cotangent, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return _flat(grads, params)


@dataclass
class StackedEvaluation:
    """The field at the checkpoints ``index`` of one group, in one ``vmap`` call, each
    checkpoint with its own alias of every parameter (``p`` expanded along a new leading
    dimension) and of its recorded ``W_k``: the gradient in the aliases is the partial
    derivative ``df(t_k, z_k)/dtheta`` per checkpoint, while ``z_k`` stays attached.

    Attributes:
        index: the checkpoint indices.
        out: ``(n, *state.shape)`` the field there.
        aliases: per parameter, ``(n, *p.shape)``.
        weights: ``(n, ...)`` the substituted ``W_k`` (or ``None``).
        weight_list: the recorded ``W_k`` (for pulling gradients back through them).
    """

    index: list[int]
    out: Tensor
    aliases: list[Tensor]
    weights: Tensor | None = None
    weight_list: list[Tensor] = field(default_factory=list)


def stacked_evaluations(
    traj: Trajectory, params: Sequence[Tensor], sub: _Substitution, attached: bool = True
) -> list[StackedEvaluation]:
    """The field at every checkpoint with per-checkpoint parameter aliases, one ``vmap`` call per
    group (what :func:`sensitivities` and the step recorder evaluate ``y_k`` from).

    Args:
        traj: the trajectory (with field points).
        params: the parameters to alias (substituted through ``sub``).
        sub: the substitution of the trajectory's fields.
        attached: keep ``z_k`` attached (``False``: detached states).

    Raises:
        RuntimeError, NotImplementedError: what ``vmap`` raises on a field it cannot trace.
    """
    out = []
    with torch.enable_grad():
        for g in group_points(traj.points):
            n = len(g.index)
            zs = torch.stack([traj.states[k] for k in g.index])
            if not attached:
                zs = zs.detach()
            aliases = [p.unsqueeze(0).expand(n, *p.shape) for p in params]
            ws = g.weights
            np_ = len(aliases)

            def one(t, z, w, *rest, g=g, np_=np_):
                return sub(rest[:np_], g.evaluate, t, z, rest[np_:], w)

            in_dims = (0, 0, None if ws is None else 0, *([0] * (np_ + len(g.values))))
            value = torch.func.vmap(one, in_dims=in_dims)(g.times, zs, ws, *aliases, *g.values)
            out.append(StackedEvaluation(list(g.index), value, aliases, ws, list(g.weight_list)))
    return out


def _sensitivities_vmap(
    traj: Trajectory,
    adjoints: Tensor,
    params: Sequence[Tensor],
    groups: Sequence[StackedEvaluation],
    create_graph: bool,
) -> Tensor:
    rows: list[Tensor | None] = [None] * traj.num_checkpoints
    size = sum(p.numel() for p in params)
    for ev in groups:
        adj = adjoints[ev.index]
        if not create_graph:
            adj = adj.detach()
        wrt = ev.aliases if ev.weights is None else [*ev.aliases, ev.weights]
        flat = sensitivity_density(ev.out, wrt, adj, per_checkpoint=True, create_graph=create_graph)
        for j, k in enumerate(ev.index):
            row = flat[j, :size]
            if ev.weights is not None:
                gw = flat[j, size:].reshape(ev.weights.shape[1:])
                pulled = _pull_back(ev.weight_list[j], gw, params, create_graph)
                if pulled is not None:
                    row = row + pulled
            rows[k] = row
    return torch.stack(rows)


def _sensitivities_aliased(
    traj: Trajectory, adjoints: Tensor, params: Sequence[Tensor], sub: _Substitution
) -> Tensor:
    """The full ``y_k`` one checkpoint at a time: ``f(t_k, z_k)`` at the attached ``z_k`` with
    each parameter replaced by an alias ``p.view_as(p)``; the gradient in the aliases is the
    partial derivative, and with ``create_graph`` it is differentiable in ``a_k``, ``z_k`` and
    ``theta``."""
    aliases = [p.view_as(p) for p in params]
    size = sum(p.numel() for p in params)
    rows = []
    for k, pt in enumerate(traj.points):
        w = None if pt.weight is None else pt.weight.view_as(pt.weight)
        fk = sub(aliases, pt, traj.states[k], w)
        wrt = aliases if w is None else [*aliases, w]
        flat = sensitivity_density(fk, wrt, adjoints[k], per_checkpoint=False)
        row = flat[:size]
        if w is not None:
            pulled = _pull_back(pt.weight, flat[size:].reshape(w.shape), params, True)
            if pulled is not None:
                row = row + pulled
        rows.append(row)
    return torch.stack(rows)


def _sensitivities_direct(
    traj: Trajectory,
    adjoints: Tensor,
    params: Sequence[Tensor],
    create_graph: bool,
    detach_states: bool,
) -> Tensor:
    """The reference implementation: one VJP per checkpoint at a detached copy of ``z_k``
    (:func:`~ode_reg.functional.sensitivity.sensitivity_at_leaf`, with the zero-valued term
    that carries ``dy_k/dz_k`` for the full derivative). Works for any field
    ``traj.field_at`` can evaluate; the fallback of :func:`sensitivities`.
    """
    rows = []
    for k, z in enumerate(traj.states):
        # y_k is the PARTIAL derivative in theta at fixed z_k. z_k itself depends on theta
        # through the trajectory, so f is evaluated at a detached leaf copy: differentiating
        # f(t_k, z_k) directly would add the path through the whole trajectory (a wrong value,
        # and a freed graph on the next checkpoint when create_graph is False).
        z_leaf = z.detach().requires_grad_(create_graph and not detach_states and z.requires_grad)
        fk = traj.field_at(k, z_leaf)
        rows.append(
            sensitivity_at_leaf(
                fk,
                z_leaf,
                z,
                adjoints[k],
                params,
                create_graph=create_graph,
                detach_states=detach_states,
            )
        )
    return torch.stack(rows)
