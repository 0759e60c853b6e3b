"""Adjoints ``a_k = dL/dz_k`` and sensitivity densities ``y_k = a_k df/dtheta`` (MATH.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ode_reg._batched import group_points
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
    zero-valued term (``_through_state``). Both give the same values and gradients
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
    without the extra term of :func:`_through_state`. The VJPs of all checkpoints of a group
    (:func:`~ode_reg._batched.group_points`) are one ``torch.func.vmap`` call; a field that
    ``vmap`` cannot trace is done one checkpoint at a time with ``p.view_as(p)`` aliases.
    A recorded ``W_k`` is substituted the same way, and the gradient in it is pulled back to
    ``theta`` through the weight flow.
    """
    sub = _Substitution.of(traj, params)
    if sub is None or not sub.reaches_only_through(traj, params):
        return None
    full = create_graph and not detach_states
    try:
        return _sensitivities_vmap(traj, adjoints, params, sub, create_graph, full)
    except Exception:  # noqa: BLE001 - a field vmap cannot trace: checkpoint by checkpoint
        if not full:
            return None
        return _sensitivities_aliased(traj, adjoints, params, sub)


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


def _sensitivities_vmap(
    traj: Trajectory,
    adjoints: Tensor,
    params: Sequence[Tensor],
    sub: _Substitution,
    create_graph: bool,
    full: bool,
) -> Tensor:
    primals = tuple(params)
    rows: list[Tensor | None] = [None] * traj.num_checkpoints
    for g in group_points(traj.points):
        zs = torch.stack([traj.states[k] for k in g.index])
        adj = adjoints[g.index]
        if not full:
            zs = zs.detach()
        ws = g.weights
        if not create_graph:
            adj = adj.detach()
            ws = None if ws is None else ws.detach()

        def one(t, z, a, w, *values, g=g):
            if w is None:
                _, vjp = torch.func.vjp(lambda ps: sub(ps, g.evaluate, t, z, values), primals)
                return vjp(a)
            _, vjp = torch.func.vjp(
                lambda ps, wk: sub(ps, g.evaluate, t, z, values, wk), primals, w
            )
            return vjp(a)

        in_dims = (0, 0, 0, None if ws is None else 0, *([0] * len(g.values)))
        with torch.set_grad_enabled(create_graph):
            out = torch.func.vmap(one, in_dims=in_dims)(g.times, zs, adj, ws, *g.values)
        grads, gw = out[0], (out[1] if ws is not None else None)
        flat = torch.cat([gr.reshape(len(g.index), -1) for gr in grads], dim=1)
        for j, k in enumerate(g.index):
            row = flat[j]
            if gw is not None:
                pulled = _pull_back(g.weight_list[j], gw[j], params, create_graph)
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
    rows = []
    for k, pt in enumerate(traj.points):
        w = None if pt.weight is None else pt.weight.view_as(pt.weight)
        fk = sub(aliases, pt, traj.states[k], w)
        if not fk.requires_grad:  # f(t_k, .) depends on neither the state nor the parameters
            rows.append(_flat([None] * len(params), params))
            continue
        inputs = aliases if w is None else [*aliases, w]
        grads = torch.autograd.grad(
            fk, inputs, adjoints[k], create_graph=True, retain_graph=True, allow_unused=True
        )
        row = _flat(grads[: len(params)], params)
        if w is not None and grads[-1] is not None:
            pulled = _pull_back(pt.weight, grads[-1], params, True)
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
    """The reference implementation: one VJP per checkpoint at a detached copy of ``z_k``, and
    for the full derivative :func:`_through_state` (a zero-valued term carrying ``dy_k/dz_k``).
    Works for any field ``traj.field_at`` can evaluate; the fallback of :func:`sensitivities`.
    """
    rows = []
    for k, z in enumerate(traj.states):
        # y_k is the PARTIAL derivative in theta at fixed z_k. z_k itself depends on theta
        # through the trajectory, so f is evaluated at a detached leaf copy: differentiating
        # f(t_k, z_k) directly would add the path through the whole trajectory (a wrong value,
        # and a freed graph on the next checkpoint when create_graph is False).
        z_leaf = z.detach().requires_grad_(create_graph and not detach_states and z.requires_grad)
        fk = traj.field_at(k, z_leaf)
        grads: Sequence[Tensor | None] = [None] * len(params)
        if fk.requires_grad:  # else f(t_k, .) does not depend on the parameters: y_k = 0
            # retain_graph: f may reach theta through tensors shared across checkpoints (the
            # recorded W_k of an orthogonal flow), and the caller's graph must survive.
            grads = torch.autograd.grad(
                fk,
                params,
                grad_outputs=adjoints[k],
                create_graph=create_graph,
                retain_graph=True,
                allow_unused=True,
            )
        row = torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
        )
        if z_leaf.requires_grad and fk.requires_grad:
            row = row + _through_state(fk, params, adjoints[k].detach(), z_leaf, z)
        rows.append(row)
    return torch.stack(rows)


def _through_state(
    fk: Tensor, params: list[Tensor], a: Tensor, z_leaf: Tensor, z: Tensor
) -> Tensor:
    """A zero-valued term whose derivative in ``z`` is ``d y_k / d z_k`` (the full derivative).

    ``(d y / d z_leaf) u`` with ``u = z - z.detach()`` (value 0, carrying ``z``'s graph), as a
    Jacobian-vector product by the double-vjp trick. Since ``u = 0``, its first derivatives in
    ``a`` and ``theta`` vanish, so ``a`` is taken detached: the backward passes here then never
    walk the (large) graph of the adjoints.
    """
    grads = torch.autograd.grad(fk, params, a, create_graph=True, allow_unused=True)
    row = torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
    )
    if not row.requires_grad:  # y_k does not depend on z_k
        return torch.zeros_like(row)
    w = torch.zeros_like(row, requires_grad=True)
    (g,) = torch.autograd.grad(row, z_leaf, w, create_graph=True, allow_unused=True)
    if g is None or not g.requires_grad:
        return torch.zeros_like(row)
    (jvp,) = torch.autograd.grad(g, w, z - z.detach(), create_graph=True, allow_unused=True)
    return torch.zeros_like(row) if jvp is None else jvp
