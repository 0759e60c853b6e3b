"""The step's terms as a function of the recorded solves, the loss and the active regularizers.

Usable from a plain training loop::

    recorder = StepRecorder(...)
    with recorder.active():
        loss = model(batch)                      # calls ode_reg.odeint anywhere
    result = step_terms(loss, recorder.records, regularizers, step=i)
    (loss + result.total).backward()

:class:`~ode_reg.RegularizedODEModule` is a thin shell that records, calls this and logs.

Chains (MATH.md, Notation): a solve whose ``y0`` was computed from an earlier solve's result
continues that solve's chain; a solve on which two later ones depend starts two chains (one
per path from a first solve to a last one). Solves that the loss does not reach are no chain.
Every term is computed per chain and averaged over chains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from ode_reg._ranks import Ranks
from ode_reg.functional.penalties import time_integral
from ode_reg.functional.sensitivity import sensitivity_at_leaf, sensitivity_density
from ode_reg.recording import SolveRecord
from ode_reg.trajectory import Trajectory, chain, starts_from_end

#: A sample is reached when its reference adjoint norm is above this fraction of the batch's
#: largest (MATH.md, Reached samples, scale-free).
REACHED_FRACTION = 1e-6
#: Reached reference norms spread over more than this factor, in a chain with an adaptive
#: solve: the flow-only adjoint takes its own vector-Jacobian product with per-sample unit
#: cotangents, so that a heavy sample's adjoint cannot leak into a light one's in proportion to
#: their weights through the shared step sizes.
UNEQUAL_SPREAD = 1e3


def _zeros_like_flat(p: Tensor) -> Tensor:
    return torch.zeros_like(p).reshape(-1)


@dataclass
class Adjoints:
    """Total adjoints of every recorded solve, from one backward pass.

    Attributes:
        per_record: for each solve (by index), one adjoint per checkpoint (solver-state shape).
        reads: for each solve, whether the loss reads an output before the last requested time.
        extra: ``dL/dx`` of further inputs (``None`` where the loss does not depend on them).
    """

    per_record: dict[int, list[Tensor]]
    reads: dict[int, bool]
    extra: list[Tensor | None] = field(default_factory=list)


def record_adjoints(
    loss: Tensor,
    records: Sequence[SolveRecord],
    extra: Sequence[Tensor] = (),
    create_graph: bool = False,
) -> Adjoints:
    """``a_k = dL/dz_k`` at every checkpoint of every solve, and ``dL/dx`` of ``extra``.

    Args:
        loss: scalar loss.
        records: the recorded solves.
        extra: further tensors (e.g. parameters) to differentiate the loss in.
        create_graph: make the results differentiable (for terms trained on the adjoints).

    Returns:
        :class:`Adjoints`; checkpoints the loss does not reach get zeros.
    """
    inputs: list[Tensor] = []
    slots: list[tuple[int, int]] = []
    for rec in records:
        for j, x in enumerate(rec.traj.autograd_inputs()):
            if x.requires_grad:
                inputs.append(x)
                slots.append((rec.index, j))
    n = len(inputs)
    wanted = [*inputs, *[x for x in extra]]
    if not wanted or not loss.requires_grad:
        grads: Sequence[Tensor | None] = [None] * len(wanted)
    else:
        grads = torch.autograd.grad(
            loss, wanted, create_graph=create_graph, retain_graph=True, allow_unused=True
        )
    got = dict(zip(slots, grads[:n]))
    per_record: dict[int, list[Tensor]] = {}
    reads: dict[int, bool] = {}
    for rec in records:
        tr = rec.traj
        xs = tr.autograd_inputs()
        out = []
        for j, x in enumerate(xs):
            g = got.get((rec.index, j))
            if tr.end_from_solution and j == len(xs) - 1:
                reads[rec.index] = bool(g is not None and bool((g[:-1] != 0).any()))
                out.append(torch.zeros_like(tr.states[-1]) if g is None else g[-1])
            else:
                out.append(torch.zeros_like(x) if g is None else g)
        reads.setdefault(rec.index, False)
        per_record[rec.index] = out
    return Adjoints(per_record, reads, list(grads[n:]))


def reached_records(records: Sequence[SolveRecord], direct: set[int]) -> set[int]:
    """Solves the loss reaches: read directly, or an ancestor of one that is."""
    reached = set(direct)
    for rec in reversed(records):
        if rec.index in reached:
            reached.update(rec.parents)
    return reached


def build_chains(records: Sequence[SolveRecord], reached: set[int]) -> list[list[SolveRecord]]:
    """Paths from a first solve to a last one through the data dependency (reached solves
    only; a solve with several parents continues the latest one)."""
    by_index = {r.index: r for r in records}
    parent: dict[int, int | None] = {}
    children: dict[int, list[int]] = {}
    for rec in records:
        if rec.index not in reached:
            continue
        ps = [p for p in rec.parents if p in reached]
        parent[rec.index] = max(ps) if ps else None
        if ps:
            children.setdefault(max(ps), []).append(rec.index)
    chains = []
    for i in sorted(parent):
        if children.get(i):
            continue
        path = [i]
        while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
        chains.append([by_index[j] for j in reversed(path)])
    return chains


class ChainContext:
    """What one chain of one training step offers the regularizers; computed lazily, once.

    Args:
        loss: the task loss.
        records: the chain's solves, in order.
        adjoints: the step's :class:`Adjoints` (``None`` if no active term needs them).
        differentiable: whether the adjoints are differentiable.
        params: the parameters ``y_k`` is taken over.
        step: the global step.
        ranks: the DDP ranks (:class:`~ode_reg._ranks.Ranks`; default one process): the
            sensitivity density is their differentiable mean, at the agreed ``k*``.
    """

    def __init__(
        self,
        loss: Tensor,
        records: Sequence[SolveRecord],
        adjoints: Adjoints | None,
        *,
        differentiable: bool,
        params: Sequence[Tensor],
        step: int,
        ranks: Ranks | None = None,
    ) -> None:
        self.loss = loss
        self.records = list(records)
        self.trajectory: Trajectory = chain([r.traj for r in self.records])
        owners = self.trajectory.checkpoint_owners()
        rec_of = {id(r.traj): r for r in self.records}
        self.owners: list[tuple[SolveRecord, int]] = [(rec_of[id(tr)], k) for tr, k in owners]
        self._adj = adjoints
        self.differentiable = differentiable
        self.params = list(params)
        self.step = step
        self.ranks = ranks or Ranks()
        self._cache: dict[object, object] = {}

    #: Start the flow-only adjoints' VJP at ``Trajectory.end_edge`` where there is one;
    #: ``False`` starts it at the solution's last row (the reference, for tests and benchmarks).
    _from_end_edge: bool = True

    # ------------------------------------------------------------------ adjoints
    def raw_adjoints(self) -> list[Tensor]:
        """Total adjoints per checkpoint, in the solver's state shape."""
        if self._adj is None:
            raise RuntimeError("no adjoints were computed for this step")
        return [self._adj.per_record[rec.index][k] for rec, k in self.owners]

    def _samples(self, xs: Sequence[Tensor]) -> Tensor:
        """Per-sample form ``(n, B, d)``, zero-padded to the widest state of the chain (norms
        and the reached test are unchanged by the padding)."""
        rows = [rec.traj.samples(x) for (rec, _), x in zip(self.owners, xs)]
        rows = [r.reshape(r.shape[0], -1) for r in rows]
        if len({r.shape[0] for r in rows}) != 1:
            rows = [r.reshape(1, -1) for r in rows]
        width = max(r.shape[1] for r in rows)
        rows = [torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows]
        return torch.stack(rows)

    def adjoints(self) -> Tensor:
        """``a_k`` in per-sample form ``(K + 1, B, d)`` (total derivatives)."""
        if "adj" not in self._cache:
            self._cache["adj"] = self._samples(self.raw_adjoints())
        return self._cache["adj"]  # type: ignore[return-value]

    def kstar(self) -> int:
        """The last reached checkpoint (some sample's adjoint is non-zero there)."""
        if "kstar" not in self._cache and self._adj is None:
            self._cache["kstar"] = len(self.owners) - 1
        if "kstar" not in self._cache:
            a = self.adjoints().detach()
            nz = (a != 0).flatten(1).any(1)
            idx = torch.nonzero(nz).flatten()
            self._cache["kstar"] = int(idx[-1]) if idx.numel() else -1
        return self._cache["kstar"]  # type: ignore[return-value]

    def common_kstar(self) -> int:
        """``k*`` agreed across DDP ranks (the largest rank's; the local one in one process),
        after checking that every rank holds the same number of checkpoints."""
        if "common_kstar" not in self._cache:
            ks = self.kstar()
            if self.ranks.distributed:
                self.ranks.agree("checkpoint counts", [len(self.owners)])
                ks = int(self.ranks.max([ks])[0])
            self._cache["common_kstar"] = ks
        return self._cache["common_kstar"]  # type: ignore[return-value]

    def reference_norms(self) -> Tensor:
        """``|a_{k*,i}|`` per sample, ``(B,)`` (detached)."""
        return self.adjoints()[self.kstar()].detach().flatten(1).norm(dim=1)

    def reached_samples(self) -> Tensor:
        """Samples the loss reaches, ``(B,)`` booleans: reference adjoint ``|a_{k*,i}|`` above
        :data:`REACHED_FRACTION` of the batch's largest (MATH.md, Reached samples, scale-free),
        so that samples whose weight underflows (a ``logsumexp`` over the batch) add nothing."""
        ref = self.reference_norms()
        return (ref > REACHED_FRACTION * ref.max()) & (ref > 0)

    def flow_adjoints(self) -> Tensor:
        """``ā_k = d(c . z_{k*}) / dz_k`` for ``k <= k*``, per-sample form; ``c = a_{k*}``.

        Equal to ``a_k`` (no extra work) when the chain is one solve whose loss reads only its
        end; otherwise one more vector-Jacobian product from ``z_{k*}`` (when ``z_{k*}`` is the
        last row of a torchdiffeq solution, from the value copied into it:
        ``Trajectory.end_edge``). When an adaptive solve
        of the chain couples samples of very different weights through its step sizes
        (reached reference norms spread over more than :data:`UNEQUAL_SPREAD`), the product is
        taken with the unit cotangents ``c_i = a_{k*,i} / |a_{k*,i}|`` of the reached samples
        (0 for the others), so that a heavy sample's adjoint enters a light one's with weight
        1, not with their weight ratio (MATH.md, Reached samples, scale-free). Elsewhere the
        per-sample ratios do not depend on the weights (each sample's flow is linear in its
        own cotangent), and :func:`~ode_reg.functional.adjoint_magnitude_penalty` divides each
        sample by its reference norm, so its ``eps`` guard is relative to the sample's scale.
        """
        if "flow" in self._cache:
            return self._cache["flow"]  # type: ignore[return-value]
        ks = self.kstar()
        raw = self.raw_adjoints()
        ref = self.reference_norms()
        reached = self.reached_samples()
        coupled = self._coupled(ref, reached)
        if self._reads_only_the_end() and ks == len(raw) - 1 and not coupled:
            flow = self.adjoints()[: ks + 1]
        else:
            rec, k = self.owners[ks]
            target = _output(rec, k)
            cot = raw[ks]
            if coupled:
                tiny = torch.finfo(ref.dtype).tiny
                cot = _per_sample_scaled(rec, cot, torch.where(reached, 1 / ref.clamp(tiny), 0.0))
            inputs, slots = [], []
            for j in range(ks):
                r, kk = self.owners[j]
                x = _input(r, kk)
                if x.requires_grad:
                    inputs.append(x)
                    slots.append(j)
            grads: Sequence[Tensor | None] = []
            if inputs and target.requires_grad:
                # From the edge into the solution's last row (the same derivative: stacking or
                # copying is the identity), not from the row: a VJP from the row would carry
                # zero cotangents through all other outputs (also in the double backward).
                edge = rec.traj.end_edge if _is_end(rec, k) and self._from_end_edge else None
                grads = torch.autograd.grad(
                    [target if edge is None else edge],
                    inputs,
                    [cot],
                    create_graph=self.differentiable,
                    retain_graph=True,
                    allow_unused=True,
                )
            got = dict(zip(slots, grads))
            rows = []
            for j in range(ks):
                r, kk = self.owners[j]
                g = got.get(j)
                if g is not None and _is_end(r, kk):
                    g = g[-1]
                rows.append(torch.zeros_like(raw[j]) if g is None else g)
            rows.append(cot)
            flow = self._samples(rows)
        self._cache["flow"] = flow
        return flow

    def batch_size(self) -> int:
        """``B``: the number of samples of the chain's first solve (per-sample form)."""
        tr = self.records[0].traj
        return int(tr.samples(tr.states[0]).shape[-2])

    @property
    def has_adjoints(self) -> bool:
        """Whether the step computed the batch's adjoints (for a term that needs them)."""
        return self._adj is not None

    def subsampled_flow_adjoints(
        self, m: int, generator: torch.Generator | None = None, draw: Tensor | None = None
    ) -> Tensor:
        """``ā_k`` of ``m`` reached samples drawn uniformly without replacement, from a re-solve
        of those samples alone (:class:`~ode_reg.AdjointMagnitude` ``subsample``; MATH.md,
        Sub-batch estimator), per-sample form ``(K + 1, m, d)``.

        The reference cotangent ``c = a_K`` is the gradient of the loss in the solution's last
        row (differentiable: a backward through the loss's head only, not through the solve);
        the drawn samples are re-solved from their ``z_0`` over the solve's span with its
        method and keywords, at their own default checkpoints (a fixed grid: the batch's; an
        adaptive solver: its own steps, as forcing the batch's checkpoint times as step ends
        would cost more steps than the batch solve took), and ``ā_k`` is one
        differentiable VJP of ``(c_i / |c_i|) . z_K`` through the re-solve (unit cotangents,
        as for a coupled chain: each sample's terms do not depend on its weight).

        Args:
            m: the number of samples to draw (all reached samples if fewer).
            generator: the generator of the draw.
            draw: the sample indices to take instead of a draw (tests).

        Raises:
            ValueError: if the chain is not one ``ode_reg.odeint`` solve of a tensor state
                with a batch dimension, or the loss does not read its last output.
        """
        from ode_reg.adjoint import adjoints
        from ode_reg.trajectory import integrate

        tr = self.records[0].traj
        why = None
        if len(self.records) != 1:
            why = f"a chain of {len(self.records)} solves"
        elif tr.adjoint_method:
            why = "an odeint_adjoint solve"
        elif tr.shapes is not None or tr.states[0].dim() < 2:
            why = "a tuple state or a state without a batch dimension"
        elif tr.weights is not None or tr.event_t is not None or tr.solution is None:
            why = "an orthogonal-flow, event or self-integrating solve"
        elif tr.solve_kwargs is None:
            why = "a trajectory not made by ode_reg.odeint"
        if why is None:
            sol = tr.flat_solution
            (g,) = torch.autograd.grad(
                self.loss, [sol], create_graph=True, retain_graph=True, allow_unused=True
            )
            if g is None or not bool((g[-1].detach() != 0).any()):
                why = "a loss that does not read the solve's last output"
        if why is not None:
            raise ValueError(
                f"AdjointMagnitude(subsample={m}) re-solves a sub-batch of one ode_reg.odeint "
                f"solve of a tensor state whose last output the loss reads; this step has {why}: "
                "use subsample=None (the exact term)"
            )
        c = g[-1]
        ref = c.detach().flatten(1).norm(dim=1)
        reached = torch.nonzero((ref > REACHED_FRACTION * ref.max()) & (ref > 0)).flatten()
        if draw is None:
            pick = torch.randperm(reached.numel(), generator=generator)[:m].to(reached.device)
            draw = reached[pick]
        tiny = torch.finfo(ref.dtype).tiny
        scale = ref[draw].clamp_min(tiny).reshape(-1, *([1] * (c.dim() - 1)))
        cot = c[draw] / scale
        kw = tr.solve_kwargs
        sub = integrate(
            tr.funcs[0] if tr.funcs else tr.func,
            tr.states[0][draw],
            tr.t[[0, -1]],
            method=tr.method,
            rtol=kw["rtol"],
            atol=kw["atol"],
            options=kw["options"],
        )
        flow = adjoints((cot * sub.states[-1]).sum(), sub, create_graph=True)
        return sub.samples(flow)

    def _coupled(self, ref: Tensor, reached: Tensor) -> bool:
        """Whether an adaptive solve of the chain may carry a heavy sample's adjoint into a
        light one's through its step sizes (one error norm per batch), with reached reference
        norms that differ by more than :data:`UNEQUAL_SPREAD`."""
        if int(reached.sum()) < 2:
            return False
        r = ref[reached]
        if float(r.max() / r.min()) <= UNEQUAL_SPREAD:
            return False
        return any(_adaptive(rec.traj.method) for rec in self.records)

    def _reads_only_the_end(self) -> bool:
        """Whether the loss reads the chain only at its end, so that ``ā_k = a_k``.

        No solve has a read before its last output time, and each next solve starts from the
        previous result with nothing else reading it: the adjoint arriving at that result (the
        solution's last row, all its readers) equals the one entering the next solve (its
        ``y0``). A link through other operations (an RNN cell update) cannot be told apart from
        a read without a vector-Jacobian product, so it counts as "not only the end".
        """
        adj = self._adj
        if any(adj.reads[r.index] for r in self.records):
            return False
        for prev, nxt in zip(self.records, self.records[1:]):
            if not starts_from_end(prev.traj, nxt.traj.states[0]):
                return False
            arrived = adj.per_record[prev.index][-1]
            entered = adj.per_record[nxt.index][0]
            if not torch.equal(arrived, entered):
                return False
        return True

    # ------------------------------------------------------------------ sensitivities
    def sensitivities(self, detach_states: bool = False, detach_adjoints: bool = False) -> Tensor:
        """``y_k`` for ``k <= k*`` (the differentiable mean over DDP ranks, at the ``k*`` they
        agree on: :meth:`common_kstar`), shape ``(k* + 1, P)``."""
        key = ("sens", detach_states, detach_adjoints)
        if key in self._cache:
            return self._cache[key]  # type: ignore[return-value]
        raw = self.raw_adjoints()
        ks = self.common_kstar()
        rows: list[Tensor | None] = [None] * (ks + 1)
        batched: dict[int, list[int]] = {}
        for j in range(ks + 1):
            rec, k = self.owners[j]
            if rec.batched is not None and not detach_states:
                batched.setdefault(rec.index, []).append(j)
                continue
            if rec.evaluations is None:
                raise RuntimeError("the field was not evaluated during the solve")
            ev = rec.evaluations[k]
            a = raw[j].detach() if detach_adjoints else raw[j]
            rows[j] = sensitivity_at_leaf(
                ev.out, ev.leaf, ev.state, a, self.params, detach_states=detach_states
            )
        by_index = {r.index: r for r in self.records}
        for index, js in batched.items():
            rec = by_index[index]
            for j, row in zip(js, self._batched_rows(rec, js, raw, detach_adjoints)):
                rows[j] = row
        y = self.ranks.mean(torch.stack(rows))
        self._cache[key] = y
        return y

    def _batched_rows(
        self, rec: SolveRecord, js: list[int], raw: list[Tensor], detach_adjoints: bool
    ) -> list[Tensor]:
        """``y_k`` of the chain positions ``js`` (all in ``rec``) from its vectorized
        evaluation: one VJP in the per-checkpoint parameter aliases per group
        (:func:`~ode_reg.functional.sensitivity.sensitivity_density`)."""
        ev = rec.batched
        assert ev is not None
        want = {self.owners[j][1]: j for j in js}
        by_k: dict[int, Tensor] = {}
        for grp in ev.groups:
            pos = [i for i, k in enumerate(grp.index) if k in want]
            if not pos:
                continue
            # The adjoints as the cotangent of the group's rows, stacked once (zeros for the
            # rows not wanted), not written in one row at a time.
            zero = torch.zeros_like(grp.out[0])
            rows = []
            for k in grp.index:
                j = want.get(k)
                a = zero if j is None else raw[j]
                rows.append(a.detach() if detach_adjoints else a)
            cot = torch.stack(rows)
            flat = sensitivity_density(grp.out, grp.aliases, cot, per_checkpoint=True)
            for i in pos:
                by_k[grp.index[i]] = flat[i]
        # The field's parameters in the order of ``self.params`` (zeros for the others).
        offsets, start = {}, 0
        for p in ev.params:
            offsets[id(p)] = (start, start + p.numel())
            start += p.numel()
        out = []
        for j in js:
            row = by_k[self.owners[j][1]]
            parts = []
            for p in self.params:
                span = offsets.get(id(p))
                parts.append(_zeros_like_flat(p) if span is None else row[span[0] : span[1]])
            out.append(torch.cat(parts))
        return out

    # ------------------------------------------------------------------ skew
    def skew(self) -> Tensor:
        """``R_skew`` of the chain: ``T^2`` times the mean over its checkpoints of
        ``E_v |S v|^2 / d`` (``T`` the chain's length in time)."""
        total = None
        count = 0
        span = 0.0
        for rec in self.records:
            if rec.skew is None:
                raise RuntimeError("the skew-Jacobian probes were not drawn during the solve")
            s, n = rec.skew
            total = s if total is None else total + s
            count += n
            span += rec.traj.span
        return span**2 * total / max(count, 1)

    # ------------------------------------------------------------------ RNODE's terms
    def field_norm(self, name: str) -> Tensor:
        """The chain's ``int`` of the batch-mean integrand of the term ``name``
        (:class:`~ode_reg.KineticEnergy`, :class:`~ode_reg.JacobianFrobenius`): the sum over
        its solves of the trapezoid rule over each solve's checkpoint times."""
        total = None
        for rec in self.records:
            norms = rec.field_norms
            if norms is None or name not in norms:
                raise RuntimeError(
                    f"the field norms of term '{name}' were not evaluated during the solve"
                )
            value = time_integral(*norms[name])
            total = value if total is None else total + value
        assert total is not None
        return total


def _adaptive(method: str) -> bool:
    return method in SOLVERS and issubclass(SOLVERS[method], RKAdaptiveStepsizeODESolver)


def _per_sample_scaled(rec: SolveRecord, x: Tensor, weights: Tensor) -> Tensor:
    """``x`` (solver-state shape) with each sample's entries times ``weights[i]``: the weights
    laid out per sample and mapped back through the (linear, entry-permuting)
    ``Trajectory.samples``; entries outside the sample rows (left-out components) get 0."""
    rows = rec.traj.samples(x.detach())
    if rows.shape[-2] != weights.numel():  # the chain's solves differ in batch: one sample
        return x * weights.reshape(-1)[0]
    _, back = torch.func.vjp(rec.traj.samples, x.detach())
    (w,) = back(weights.to(x.dtype)[:, None].expand_as(rows).contiguous())
    return x * w


def _is_end(rec: SolveRecord, k: int) -> bool:
    return rec.traj.end_from_solution and k == rec.traj.num_checkpoints - 1


def _input(rec: SolveRecord, k: int) -> Tensor:
    return rec.traj.flat_solution if _is_end(rec, k) else rec.traj.states[k]


def _output(rec: SolveRecord, k: int) -> Tensor:
    return rec.traj.flat_solution[-1] if _is_end(rec, k) else rec.traj.states[k]


@dataclass
class StepTerms:
    """What :func:`step_terms` computed.

    Attributes:
        values: each active regularizer's unweighted value (mean over chains), by name.
        chains: the chain contexts (their trajectories, adjoints, sensitivities).
        adjoints: the step's :class:`Adjoints` (or ``None``).
        left_out: recorded solves that are no chain (not reached by the loss).
    """

    values: dict[str, Tensor]
    chains: list[ChainContext]
    adjoints: Adjoints | None
    left_out: list[int]


def step_terms(
    loss: Tensor,
    records: Sequence[SolveRecord],
    active: Sequence[object],
    *,
    step: int,
    params: Sequence[Tensor],
    extra: Sequence[Tensor] = (),
    ranks: Ranks | None = None,
    differentiable: bool | None = None,
) -> StepTerms:
    """Every active term on the chains of the recorded solves (a pure function of its inputs).

    Args:
        loss: the task loss of the step (scalar).
        records: the step's recorded solves (``StepRecorder.records``).
        active: the regularizers to apply (``ode_reg.Regularizer`` instances).
        step: the global step.
        params: parameters the sensitivity density is taken over.
        extra: further tensors to differentiate the loss in, in the adjoints' backward pass
            (``StepTerms.adjoints.extra``).
        ranks: the DDP ranks (default one process; a module passes ``Ranks.of(self)``, its
            trainer's strategy). Terms that reduce over the batch (``reduces_over_batch``)
            first check that every rank has as many chains, then all-reduce ``y_k``.
        differentiable: whether the adjoints must be differentiable (default: whether an
            active term trains on them).

    Returns:
        :class:`StepTerms` (values are unweighted; each the mean over chains).

    Raises:
        ValueError: if terms are active but no solve was recorded.

    Example::

        >>> import torch
        >>> from ode_reg import AdjointMagnitude, odeint
        >>> from ode_reg.recording import StepRecorder
        >>> lin = torch.nn.Linear(2, 2)
        >>> rec = StepRecorder(adjoint_inputs=True)
        >>> with rec.active():
        ...     loss = odeint(lambda t, z: lin(z), torch.ones(3, 2), torch.tensor([0.0, 1.0]))[-1].sum()
        >>> out = step_terms(loss, rec.records, [AdjointMagnitude()], step=0, params=list(lin.parameters()))
        >>> sorted(out.values)
        ['adjoint_magnitude']
    """
    from ode_reg.recording import read_directly

    if not records:
        raise ValueError(
            "regularizers are active but this training step made no ode_reg.odeint call: "
            "use `from ode_reg import odeint` instead of torchdiffeq's"
        )
    live = [r for r in records if r.node is not None or r.traj.states[0].requires_grad]
    batch = max((int(r.traj.samples(r.traj.states[0]).shape[-2]) for r in live), default=0)
    # A sub-batch estimator (AdjointMagnitude(subsample=m), m < B) takes its adjoints from its
    # own re-solve: the batch's adjoints (and their graph) only for the other terms.
    exact = [r for r in active if not (hasattr(r, "subsampled") and r.subsampled(batch))]
    needs_adj = any(getattr(r, "needs_adjoints", False) for r in exact)
    if differentiable is None:
        differentiable = any(getattr(r, "needs_differentiable_adjoints", False) for r in exact)
    adj = None
    if needs_adj:
        adj = record_adjoints(loss, live, extra, create_graph=differentiable)
        reached = {
            i for i, xs in adj.per_record.items() if any(bool((x.detach() != 0).any()) for x in xs)
        }
    else:
        reached = reached_records(live, read_directly(loss, live))
    chains = build_chains(live, reached)
    left_out = [r.index for r in records if r.index not in reached]
    contexts = [
        ChainContext(
            loss,
            c,
            adj,
            differentiable=differentiable,
            params=params,
            step=step,
            ranks=ranks,
        )
        for c in chains
    ]
    ranks = ranks or Ranks()
    if ranks.distributed and any(getattr(r, "reduces_over_batch", False) for r in active):
        ranks.agree("numbers of chains", [len(contexts)])
    values: dict[str, Tensor] = {}
    for r in active:
        terms = []
        for ctx in contexts:
            term = r.compute(ctx)
            if r.needs_adjoints and ctx._adj is not None:
                # A non-finite adjoint poisons the term even where the log hides it. Its
                # value is what the step's guard reads; detached, so that the double backward
                # does not walk the whole total-adjoint graph for a zero contribution.
                term = term + 0.0 * ctx.adjoints().detach().sum()
            terms.append(term)
        values[r.name] = torch.stack(terms).mean() if terms else loss.new_zeros(())
    return StepTerms(values, contexts, adj, left_out)
