"""Recording the solves of one training step, wherever ``ode_reg.odeint`` is called.

A :class:`StepRecorder` is made current (a context variable) for the duration of a
``RegularizedODEModule``'s training step on which a term or monitor is due (built from the
step's :class:`~ode_reg.StepPlan`: it records what the plan needs). ``ode_reg.odeint`` / ``ode_reg.odeint_adjoint``
called anywhere during it (a submodule's ``forward``, an ODE-RNN cell, a helper) record their
solve into it; everywhere else they are torchdiffeq's call and nothing more.

Everything the terms need from the field is evaluated before the call returns, while a
closure's variables and a field's held input still have the values the solve used: the field
at the checkpoint states (for the sensitivity density) and the skew-Jacobian probes. The
data dependency between solves (which solve's result the next ``y0`` was computed from) is
read off the autograd graph at the call, so chains follow the data, not the shapes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ode_reg._batched import PointGroup, group_points
from ode_reg._once import say_once
from ode_reg.adjoint import StackedEvaluation, _Substitution, stacked_evaluations
from ode_reg.functional.indices import spread_indices
from ode_reg.functional.penalties import (
    UNTRACEABLE,
    evaluate_stacked,
    field_norm_rows,
    known_unstackable,
    mark_unstackable,
    rademacher_probes,
    skew_hutchinson,
)
from ode_reg.trajectory import SolveSummary, Trajectory

#: Graph nodes visited at most when looking for the solves a new ``y0`` depends on.
MAX_WALK = 50_000


@dataclass
class Evaluation:
    """``f(t_k, z)`` at a detached copy ``leaf`` of the checkpoint state ``state``."""

    out: Tensor
    leaf: Tensor
    state: Tensor


@dataclass
class BatchedEvaluation:
    """The field at all checkpoints of one solve with per-checkpoint parameter aliases, one
    ``vmap`` call per group of checkpoints (:func:`~ode_reg.adjoint.stacked_evaluations`): the
    gradient in the aliases is the partial derivative ``df(t_k, z_k)/dtheta`` per checkpoint,
    while ``z_k`` stays attached (so ``y_k``'s own gradient is the full one, with no extra term).

    Attributes:
        params: the field's trainable parameters (the real ones).
        groups: the stacked evaluations (each with its checkpoint indices).
    """

    params: list[Tensor]
    groups: list[StackedEvaluation]


@dataclass
class SkewPlan:
    """How the skew-Jacobian probes of this step are drawn."""

    probes: int
    max_states: int | None
    generator: torch.Generator | None


@dataclass
class FieldNormPlan:
    """One RNODE-style term (:class:`~ode_reg.KineticEnergy`, :class:`~ode_reg.JacobianFrobenius`)
    to evaluate at the checkpoints during the solve.

    Attributes:
        name: the term's name (key of :attr:`SolveRecord.field_norms`).
        kind: ``"kinetic"`` (``|f|^2``) or ``"frobenius"`` (``|df/dz|_F^2``, Hutchinson).
        dims: leading per-sample coordinates the term reads (``None``: all).
        probes: Rademacher probes per checkpoint state (``"frobenius"``).
        generator: random generator of the probes.
    """

    name: str
    kind: str
    dims: int | None = None
    probes: int = 1
    generator: torch.Generator | None = None


@dataclass
class SolveRecord:
    """One recorded solve and what the terms need of it.

    Attributes:
        index: position in the step's call order.
        traj: the :class:`~ode_reg.Trajectory`.
        parents: indices of earlier solves whose results ``y0`` was computed from.
        evaluations: the field at each checkpoint (when a sensitivity term is active).
        skew: ``(sum over checkpoints of the probe mean of mean_i |S v|^2, count)``.
        field_norms: per :class:`FieldNormPlan` name, ``(times, rows)``: the checkpoint times
            and the batch mean of the per-sample value at each checkpoint, ``(K + 1,)``.
    """

    index: int
    traj: Trajectory
    parents: list[int] = field(default_factory=list)
    evaluations: list[Evaluation] | None = None
    batched: BatchedEvaluation | None = None
    skew: tuple[Tensor, int] | None = None
    field_norms: dict[str, tuple[Tensor, Tensor]] | None = None

    @property
    def node(self) -> Any:
        sol = self.traj.flat_solution
        if sol is not None:
            return sol.grad_fn
        return self.traj.states[-1].grad_fn


_CURRENT: ContextVar[StepRecorder | None] = ContextVar("ode_reg_recorder", default=None)


def current_recorder() -> StepRecorder | None:
    """The recorder of the training step being run, or ``None`` outside one."""
    return _CURRENT.get()


class StepRecorder:
    """Collects the solves of one training step.

    Args:
        evaluate_fields: evaluate the field at every checkpoint during the call (for the
            sensitivity density): ``"full"`` (the terms' gradient goes through ``z_k``; one
            vectorized call per solve where the field allows), ``"detached"`` (``z_k`` constant),
            ``"both"``, or ``False``.
        skew: draw and evaluate the skew-Jacobian probes during the call.
        adjoint_inputs: start each solve from a grad-requiring alias of ``y0``
            (``integrate(grad_leaf=True)``), so that ``a_0 = dL/dz_0`` exists (value and result
            unchanged).
        chains: find each solve's parents (the data dependency); ``False`` when only solver
            statistics are wanted.
        refuse_adjoint: names of active terms that cannot be computed on an
            ``odeint_adjoint`` solve (``odeint_adjoint`` is then refused with a short message).
        common_checkpoints: the ``checkpoints`` of a recorded solve called without them
            (``None``: the solver's own step states). Under DDP the module sets
            ``DEFAULT_CHECKPOINTS`` equal intervals when a term reduces over the batch, so that
            every rank has its checkpoints at the same times.
    """

    def __init__(
        self,
        *,
        evaluate_fields: bool | str = False,
        skew: SkewPlan | None = None,
        adjoint_inputs: bool = False,
        refuse_adjoint: tuple[str, ...] = (),
        chains: bool = True,
        warn: Callable[[str, str], None] | None = None,
        common_checkpoints: int | None = None,
        field_norms: tuple[FieldNormPlan, ...] = (),
    ) -> None:
        self.evaluate_fields = evaluate_fields
        self.skew = skew
        self.field_norms = tuple(field_norms)
        self.adjoint_inputs = adjoint_inputs
        self.refuse_adjoint = refuse_adjoint
        self.chains = chains
        self.common_checkpoints = common_checkpoints
        self.records: list[SolveRecord] = []
        #: What the solver did in every solve of the step, recorded or stats-only, in call order.
        self.summaries: list[SolveSummary] = []
        #: Solves made inside the step but not recorded (run without grad).
        self.unrecorded = 0
        #: Only solver statistics are wanted: no term is active and no monitor reads the
        #: trajectories (``ode_reg.odeint`` then makes the stats-only solve).
        self.stats_only = not (
            chains
            or evaluate_fields
            or skew is not None
            or adjoint_inputs
            or refuse_adjoint
            or self.field_norms
        )
        self._substitutable: dict[int, bool] = {}
        self._nodes: dict[Any, int] = {}
        self._warn = warn or _warn_once

    # ------------------------------------------------------------------ use
    @contextmanager
    def active(self) -> Iterator[StepRecorder]:
        """Make this recorder current (for ``ode_reg.odeint``) inside the block."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    def warn(self, key: str, message: str) -> None:
        """Warn once per key and process."""
        self._warn(key, message)

    def record(self, traj: Trajectory) -> SolveRecord:
        """Add a finished solve: its parents, and the field evaluations the terms need."""
        rec = SolveRecord(len(self.records), traj)
        rec.parents = self._parents(traj.states[0]) if self.chains else []
        mode = "full" if self.evaluate_fields is True else self.evaluate_fields
        if mode in ("full", "both"):
            rec.batched = self._batched(traj)
        if mode == "detached" or mode == "both" or (mode == "full" and rec.batched is None):
            rec.evaluations = _evaluate(traj)
        if self.skew is not None:
            rec.skew = _skew(traj, self.skew)
        if self.field_norms:
            rec.field_norms = _field_norms(traj, self.field_norms)
        self.records.append(rec)
        self.summaries.append(SolveSummary.of(traj))
        node = rec.node
        if node is not None:
            self._nodes[node] = rec.index
        return rec

    def _batched(self, traj: Trajectory) -> BatchedEvaluation | None:
        """The vectorized evaluation, or ``None`` where it does not apply: a field that is not an
        ``nn.Module`` (no field points: tuple states), a recorded weight flow, a field that
        reaches its parameters through tensors cached outside its forward (checked once per
        field and step), or one ``vmap`` cannot trace (announced once)."""
        func = traj.func
        if not isinstance(func, nn.Module) or traj.weights is not None:
            return None
        if traj.shapes is None and traj.states[0].dim() < 2:  # one unbatched sample
            return None
        params = [p for p in func.parameters() if p.requires_grad]
        sub = _Substitution.of(traj, params) if params else None
        if sub is None:
            return None
        key = id(func)
        ok = self._substitutable.get(key)
        if ok is None:
            ok = sub.reaches_only_through(traj, params)
            self._substitutable[key] = ok
        if not ok:
            return None
        if known_unstackable(func):
            return None
        try:
            groups = stacked_evaluations(traj, params, sub)
        except UNTRACEABLE as err:
            mark_unstackable(func, type(func).__name__, err)
            return None
        return BatchedEvaluation(params, groups)

    # ------------------------------------------------------------------ graph
    def _parents(self, y0: Tensor) -> list[int]:
        """The recorded solves whose result ``y0`` was computed from (a bounded graph walk
        from ``y0`` that stops at recorded results)."""
        if not self._nodes:
            return []
        found, _ = _recorded_results(y0.grad_fn, self._nodes, MAX_WALK)
        return sorted(found)


def read_directly(loss: Tensor, records: list[SolveRecord]) -> set[int]:
    """Solves whose result the loss reads other than through a later recorded solve (a walk
    of the loss's graph that stops at recorded results)."""
    nodes = {r.node: r.index for r in records if r.node is not None}
    found, complete = _recorded_results(loss.grad_fn, nodes, 20 * MAX_WALK)
    if not complete:  # pathological graph: treat every solve as read
        return {r.index for r in records}
    return found


def _recorded_results(start: Any, nodes: dict[Any, int], limit: int) -> tuple[set[int], bool]:
    """The recorded results (``nodes``: result node -> solve index) that the autograd graph
    reaches from ``start`` without passing through another recorded result, and whether the
    walk finished (``False``: it stopped after ``limit`` nodes, with what it had found)."""
    found: set[int] = set()
    if start is None:
        return found, True
    seen = {start}
    stack = [start]
    while stack:
        node = stack.pop()
        hit = nodes.get(node)
        if hit is not None:
            found.add(hit)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
        if len(seen) > limit:
            return found, False
    return found, True


def _warn_once(key: str, message: str) -> None:
    say_once(message, key=f"recording:{key}")


def _evaluate(traj: Trajectory) -> list[Evaluation]:
    out = []
    with torch.enable_grad():
        for k, z in enumerate(traj.states):
            leaf = z.detach().requires_grad_(z.requires_grad)
            out.append(Evaluation(traj.field_at(k, leaf), leaf, z))
    return out


def _skew(traj: Trajectory, plan: SkewPlan) -> tuple[Tensor, int]:
    """Sum over checkpoints of ``E_v |S v|^2 / d`` (the batch mean of ``|S_i v_i|^2 / d``), and
    the number of checkpoints: :func:`~ode_reg.functional.penalties.skew_hutchinson` on one
    stacked evaluation of the field at all of them (per group of
    :func:`~ode_reg._batched.group_points`; one ``vmap`` call each). 1-D states are one sample.
    Tuple states (MATH.md, Tuple states): the probes and ``S v`` are restricted to the
    coordinates of the per-sample rows (:meth:`Trajectory.samples`: the components with the
    batch dimension, or the named ones), so that ``|S v|^2`` sums the samples' blocks
    ``sym(df_c/dz_c)`` of those components (a CNF's ``z`` block without the ``log p`` row when
    ``components=(0,)``), and the mean is over the batch and those coordinates."""
    n = traj.num_checkpoints
    ks = spread_indices(n, plan.max_states)
    shape = traj.states[0].shape
    batched = traj.shapes is None and len(shape) > 1
    states = [traj.states[k] if batched else traj.states[k].reshape(1, -1) for k in ks]
    vs = rademacher_probes(states, plan.probes, plan.generator)
    mask = None
    if traj.shapes is not None:
        first = traj.states[0]
        index = traj.samples(torch.arange(first.numel(), device=first.device).reshape(shape))
        mask = torch.zeros(first.numel(), dtype=first.dtype, device=first.device)
        mask[index.reshape(-1)] = 1.0
        mask = mask.reshape(1, -1)
        vs = vs * mask
    with torch.enable_grad():
        zs = torch.stack(states)
        zs = zs if zs.requires_grad else zs.detach().requires_grad_(True)
        out = _stacked_field(traj, ks, zs, lambda z: z if batched else z.reshape(shape))
        if not batched:
            out = out.reshape(zs.shape)
        total = skew_hutchinson(out, zs, vs, mask).sum()
    return total, len(ks)


def _stacked_field(
    traj: Trajectory, ks: list[int], zs: Tensor, shaped: Callable[[Tensor], Tensor]
) -> Tensor:
    """``f(t_k, z)`` at the stacked states ``zs`` of checkpoints ``ks`` as one autograd tensor:
    one ``vmap`` call per group of :func:`~ode_reg._batched.group_points` (the field's held
    per-checkpoint tensors and recorded ``W_k`` stacked with the states), or of the
    trajectory's field when it records no field points (tuple states); a field ``vmap``
    cannot trace is evaluated checkpoint by checkpoint (announced once,
    :func:`~ode_reg.functional.penalties.evaluate_stacked`)."""
    name = type((traj.funcs or (traj.func,))[0]).__name__
    if traj.points is None:
        return evaluate_stacked(
            lambda t, z, _v: traj.func(t, shaped(z)),
            traj.times[ks].to(zs.dtype),
            zs,
            fallback=lambda j, z: traj.field_at(ks[j], shaped(z)),
            name=name,
            # the user's field (for a tuple state ``traj.func`` is torchdiffeq's wrapper, new
            # at every call): a field that failed once is not tried in vmap again
            key=_weak_key((traj.funcs or (traj.func,))[0]),
        )
    rows: list[Tensor | None] = [None] * len(ks)
    for g in group_points(traj.points, ks):
        pos = [ks.index(k) for k in g.index]
        sub = zs[pos]
        vals = list(g.values) if g.weights is None else [*g.values, g.weights]

        def one(t: Tensor, z: Tensor, values: Sequence[Tensor], g: PointGroup = g) -> Tensor:
            nv = len(g.values)
            w = values[nv] if g.weights is not None else None
            return g.evaluate(t, shaped(z), values[:nv], w)

        out = evaluate_stacked(
            one,
            g.times,
            sub,
            vals,
            fallback=lambda j, z, g=g: traj.field_at(g.index[j], shaped(z)),
            name=name,
            key=_weak_key(g.func),
        )
        for j, p in enumerate(pos):
            rows[p] = out[j]
    return torch.stack(rows)  # type: ignore[arg-type]


def _weak_key(func: object) -> object:
    """``func`` as a cache key of :func:`evaluate_stacked` (``None`` if it cannot be one)."""
    try:
        weakref.ref(func)
    except TypeError:
        return None
    return func


def _field_norms(
    traj: Trajectory, plans: tuple[FieldNormPlan, ...]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Each plan's per-checkpoint batch mean of ``|f_i|^2`` or of the Hutchinson estimate of
    ``|df_i/dz_i|_F^2``, from one field evaluation per checkpoint (at the live state, so the
    terms' gradient goes through ``z_k`` where the solve kept it; ``odeint_adjoint``'s states
    are constants). Per-sample rows as :meth:`Trajectory.samples` (a 1-D or mixed tuple state
    is one sample)."""
    n = traj.num_checkpoints
    first = traj.states[0]
    index = traj.samples(torch.arange(first.numel(), device=first.device).reshape(first.shape))
    index = index.reshape(index.shape[0], -1)  # (samples, coordinates) into the flat state
    probes = {
        p.name: rademacher_probes(traj.states, p.probes, p.generator)
        for p in plans
        if p.kind == "frobenius"
    }
    rows: dict[str, list[Tensor]] = {p.name: [] for p in plans}
    with torch.enable_grad():
        for k in range(n):
            z = traj.states[k]
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            out = traj.field_at(k, z)
            for p in plans:
                vs = probes[p.name][k] if p.kind == "frobenius" else None
                rows[p.name].append(field_norm_rows(out, z, index, p.dims, vs).mean())
    return {name: (traj.times, torch.stack(r)) for name, r in rows.items()}
