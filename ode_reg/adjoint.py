"""Adjoints ``a_k = dL/dz_k`` and sensitivity densities ``y_k = a_k df/dtheta`` (MATH.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

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
    if not loss.requires_grad or not any(s.requires_grad for s in traj.states):
        raise ValueError("`loss` does not depend on the trajectory: no state requires grad")
    grads = torch.autograd.grad(
        loss, traj.states, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    if all(g is None for g in grads):
        raise ValueError("`loss` does not depend on the trajectory's states")
    return torch.stack(
        [torch.zeros_like(s) if g is None else g for g, s in zip(grads, traj.states)]
    )


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
        detach_states: treat ``z_k`` as constants inside ``y_k`` (a cheaper approximation of
            the full derivative; off by default).

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
