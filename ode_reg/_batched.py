"""The field at many checkpoints in one vectorized call (``torch.func.vmap`` over checkpoints).

A trajectory's checkpoints are grouped by how the field is evaluated there
(:class:`~ode_reg.trajectory.FieldPoint`): same field, same kind of held attributes. Within a
group the times, the states, the recorded weights ``W_k`` and the held tensors that differ
between checkpoints (an ODE-RNN's input at each step) are stacked along a new leading
dimension and mapped over; everything else is shared. The functions here only describe and
evaluate groups; callers wrap them in ``torch.func`` transforms and fall back to a loop over
checkpoints when a field cannot be vmapped (data-dependent Python control flow, ``.item()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ode_reg._trajectory_data import FieldPoint, call_holding


@dataclass
class PointGroup:
    """Checkpoints whose field evaluations differ only in stacked tensors.

    Attributes:
        index: the checkpoint indices of the group, in order.
        func: the field.
        times: ``(n,)`` the field's own times at those checkpoints.
        shared: held attributes common to the group (set as they are).
        stacked: names of held attributes that differ, in :attr:`values` order.
        values: those attributes stacked, each ``(n, ...)``.
        weights: ``(n, ...)`` recorded ``W_k`` stacked, or ``None``.
        weight_list: the recorded ``W_k`` themselves (for pulling gradients back through them).
    """

    index: list[int]
    func: Callable[..., Tensor]
    times: Tensor
    shared: dict[str, object] = field(default_factory=dict)
    stacked: list[str] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    weights: Tensor | None = None
    weight_list: list[Tensor] = field(default_factory=list)

    def evaluate(
        self, t: Tensor, z: Tensor, values: Sequence[Tensor] = (), weight: Tensor | None = None
    ) -> Tensor:
        """``f(t, z)`` at one checkpoint of the group (inside ``vmap``: all of them), with the
        stacked attributes set to ``values`` and ``W = weight``."""
        if weight is not None:
            return self.func.ode_reg_field_at(t, z, weight)
        return call_holding(self.func, t, z, {**self.shared, **dict(zip(self.stacked, values))})


def _key(pt: FieldPoint) -> tuple:
    snap = pt.snapshot or {}
    parts: list[object] = [id(pt.func), pt.weight is None]
    if pt.weight is not None:
        parts.append((tuple(pt.weight.shape), pt.weight.dtype))
    for name in sorted(snap):
        value = snap[name]
        if isinstance(value, Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device))
        else:
            parts.append((name, id(value)))
    return tuple(parts)


def group_points(
    points: Sequence[FieldPoint], index: Sequence[int] | None = None
) -> list[PointGroup]:
    """Group the checkpoints ``index`` (default all) of ``points`` for vectorized evaluation."""
    index = range(len(points)) if index is None else index
    by_key: dict[tuple, list[int]] = {}
    for k in index:
        by_key.setdefault(_key(points[k]), []).append(k)
    groups = []
    for ks in by_key.values():
        first = points[ks[0]]
        snap = first.snapshot or {}
        shared: dict[str, object] = {}
        stacked: list[str] = []
        values: list[Tensor] = []
        for name in sorted(snap):
            vals = [points[k].snapshot[name] for k in ks]
            if all(v is vals[0] for v in vals):
                shared[name] = vals[0]
            else:
                stacked.append(name)
                values.append(torch.stack(vals))
        weights = None
        weight_list: list[Tensor] = []
        if first.weight is not None:
            weight_list = [points[k].weight for k in ks]
            weights = torch.stack(weight_list)
        groups.append(
            PointGroup(
                list(ks),
                first.func,
                torch.stack([points[k].time for k in ks]),
                shared,
                stacked,
                values,
                weights,
                weight_list,
            )
        )
    return groups
