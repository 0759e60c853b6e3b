"""The sensitivity density ``y_k = sum_i a_{k,i} df(t_k, z_{k,i})/dtheta`` (MATH.md): the one
implementation, as functions of an evaluation of the field.

``y_k`` is a vector-Jacobian product of the field's value at checkpoint ``k`` with the adjoint
``a_k`` as cotangent, in the parameters at fixed ``z_k`` (the partial derivative). Where the
field is evaluated is up to the caller (:func:`ode_reg.sensitivities` after a solve, the step
recorder during one); there are two ways to hold ``theta`` apart from the ``theta`` that ``z_k``
depends on through the trajectory:

- per-checkpoint aliases (``p`` expanded along a leading checkpoint dimension, or
  ``p.view_as(p)``) substituted into the field, at the live ``z_k``: the gradient in the aliases
  is the partial derivative and, with ``create_graph``, ``y_k`` is itself a function of ``a_k``,
  ``z_k`` and ``theta`` whose gradient is the full one (:func:`sensitivity_density`);
- the real parameters at a detached leaf copy of ``z_k`` (any field, closures included): the
  partial derivative again, and the path through ``z_k`` added by :func:`through_state`, a
  zero-valued term (:func:`sensitivity_at_leaf`).

Both give the same values and gradients (``tests/test_fast_paths.py``,
``tests/test_sensitivity_functional.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def sensitivity_density(
    out: Tensor,
    wrt: Sequence[Tensor],
    adjoints: Tensor,
    *,
    per_checkpoint: bool,
    create_graph: bool = True,
) -> Tensor:
    """``y = a . d out / d wrt``, flattened: the vector-Jacobian product that is ``y_k``.

    Args:
        out: the field's value, ``(n, *state)`` at ``n`` checkpoints (``per_checkpoint``) or
            ``(*state)`` at one.
        wrt: the tensors the field read as its parameters: per-checkpoint aliases
            ``(n, *p.shape)`` (``per_checkpoint``), or the parameters themselves (one
            checkpoint). Other per-checkpoint inputs (a recorded ``W_k``) may follow; their
            gradients are the trailing columns.
        adjoints: the cotangent, shaped like ``out``.
        per_checkpoint: whether ``out`` and ``wrt`` carry a leading checkpoint dimension.
        create_graph: make the result differentiable.

    Returns:
        ``(n, P)`` (``per_checkpoint``) or ``(P,)``, ``P`` the total size of ``wrt`` (of one
        checkpoint); zeros where ``out`` does not depend on a tensor.

    Example::

        >>> import torch
        >>> w = torch.tensor([[1.0, 2.0], [0.0, 1.0]], requires_grad=True)
        >>> z = torch.ones(3, 2)
        >>> a = torch.ones(3, 2)
        >>> y = sensitivity_density(z @ w.T, [w], a, per_checkpoint=False)  # sum_i a_i z_i^T
        >>> y.tolist()
        [3.0, 3.0, 3.0, 3.0]
    """
    wrt = list(wrt)
    lead = (out.shape[0],) if per_checkpoint else ()
    if not out.requires_grad:
        return torch.cat(
            [out.new_zeros(*lead, w[0].numel() if lead else w.numel()) for w in wrt], -1
        )
    grads = torch.autograd.grad(
        out, wrt, adjoints, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    parts = [
        (torch.zeros_like(w) if g is None else g).reshape(*lead, -1) for g, w in zip(grads, wrt)
    ]
    return torch.cat(parts, dim=-1)


def sensitivity_at_leaf(
    out: Tensor,
    leaf: Tensor,
    state: Tensor,
    adjoint: Tensor,
    params: Sequence[Tensor],
    *,
    create_graph: bool = True,
    detach_states: bool = False,
) -> Tensor:
    """``y_k`` from ``out = f(t_k, leaf)`` at a detached leaf copy ``leaf`` of ``z_k = state``:
    :func:`sensitivity_density` in the parameters, plus (unless ``detach_states``, and with
    ``create_graph``) :func:`through_state`, so that the gradient of ``y_k`` is the full one.

    Args:
        out: the field at the leaf.
        leaf: ``state.detach()`` (requiring grad for the full derivative).
        state: the live checkpoint state.
        adjoint: ``a_k``.
        params: the parameters ``y_k`` is taken over.
        create_graph: make ``y_k`` differentiable.
        detach_states: treat ``z_k`` as a constant in ``y_k`` (MATH.md's stop-gradient option).

    Returns:
        ``(P,)``.
    """
    row = sensitivity_density(out, params, adjoint, per_checkpoint=False, create_graph=create_graph)
    if (
        create_graph
        and not detach_states
        and out.requires_grad
        and leaf.requires_grad
        and state.requires_grad
    ):
        row = row + through_state(out, params, adjoint.detach(), leaf, state)
    return row


def through_state(
    out: Tensor, params: Sequence[Tensor], adjoint: Tensor, leaf: Tensor, state: Tensor
) -> Tensor:
    """A zero-valued term whose derivative in ``state`` is ``d y_k / d z_k`` (the full derivative).

    ``(d y / d leaf) u`` with ``u = state - state.detach()`` (value 0, carrying ``state``'s
    graph), as a Jacobian-vector product by the double-vjp trick. Since ``u = 0``, its first
    derivatives in ``adjoint`` and ``theta`` vanish, so the adjoint is taken detached: the
    backward passes here then never walk the (large) graph of the adjoints.
    """
    row = sensitivity_density(out, params, adjoint, per_checkpoint=False, create_graph=True)
    if not row.requires_grad:  # y_k does not depend on z_k
        return torch.zeros_like(row)
    w = torch.zeros_like(row, requires_grad=True)
    (g,) = torch.autograd.grad(row, leaf, w, create_graph=True, allow_unused=True)
    if g is None or not g.requires_grad:
        return torch.zeros_like(row)
    (jvp,) = torch.autograd.grad(g, w, state - state.detach(), create_graph=True, allow_unused=True)
    return torch.zeros_like(row) if jvp is None else jvp
