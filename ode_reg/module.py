"""``RegularizedODEModule``: change the base class and the odeint call, keep ``training_step``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ode_reg._nonfinite import (
    drop_marked_step,
    forget_step_values,
    task_side_nonfinite,
    zero_loss,
)
from ode_reg.recording import SkewPlan, StepRecorder
from ode_reg.regularizers import Regularizer, _distributed, all_reduce_mean
from ode_reg.solve import odeint as _odeint
from ode_reg.solve import odeint_adjoint as _odeint_adjoint
from ode_reg.terms import step_terms
from ode_reg.trajectory import SolveSummary, Trajectory

NONFINITE_POLICIES = ("skip", "raise")


@dataclass
class StepRecord:
    """What the last training step recorded, for the monitoring callbacks.

    Attributes:
        trajectories: every solve recorded in the step, in call order.
        groups: the chained trajectory of each chain (MATH.md: by data dependency).
        adjoints: per chain, the task-loss adjoints ``(K + 1, B, d)`` (detached), when a
            regularizer computed them; else ``None``.
        sensitivities: per chain, ``y_k`` (detached), when computed.
        left_out: indices of recorded solves that are no chain (not reached by the loss).
        solves: what the solver did in every solve of the step, in call order (also the
            stats-only solves of a step that records no trajectory).
    """

    trajectories: list[Trajectory]
    groups: list[Trajectory]
    adjoints: list[Tensor | None]
    sensitivities: list[Tensor | None]
    left_out: list[int] = field(default_factory=list)
    solves: list[SolveSummary] = field(default_factory=list)

    @property
    def chains(self) -> list[Trajectory]:
        """The chained trajectories (the same list as :attr:`groups`)."""
        return self.groups


def _use_shared_backward(module: RegularizedODEModule, active: Sequence[Regularizer]) -> bool:
    """Whether this step takes the task gradient from the adjoints' (plain) backward."""
    return (
        module.shared_backward
        and module.automatic_optimization
        and any(r.needs_adjoints for r in active)
        and not any(r.needs_differentiable_adjoints for r in active)
    )


def _evaluation_mode(active: Sequence[Regularizer]) -> bool | str:
    """Which field evaluations the recorder makes for the sensitivity terms."""
    modes = {bool(getattr(r, "detach_states", False)) for r in active if r.needs_field_evaluations}
    if not modes:
        return False
    if modes == {True}:
        return "detached"
    return "both" if True in modes else "full"


def _detached(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detached(c) for c in x)
    return x


def _light(tr: Trajectory) -> Trajectory:
    """``tr`` (and its parts) with every tensor detached (module level: a recursive closure
    would be a reference cycle, left for the cyclic garbage collector, at every step)."""
    parts = tuple(_light(p) for p in tr.parts)
    out = dataclasses.replace(
        tr,
        states=_detached(tr.states),
        solution=_detached(tr.solution),
        weights=_detached(tr.weights),
        parts=parts,
        _field_at=None,
    )
    owners = getattr(tr, "owners", None)
    if owners is not None:
        index = {id(p): q for p, q in zip(tr.parts, parts)}
        out.owners = tuple((index.get(id(p), p), k) for p, k in owners)  # type: ignore[attr-defined]
    return out


def _released(record: StepRecord) -> StepRecord:
    """``record`` with every tensor detached from the step's autograd graph."""
    if not record.trajectories and not record.groups:  # nothing holds the graph (stats only)
        return record
    return StepRecord(
        [_light(t) for t in record.trajectories],
        [_light(t) for t in record.groups],
        [_detached(a) for a in record.adjoints],
        [_detached(a) for a in record.sensitivities],
        list(record.left_out),
        list(record.solves),
    )


def _is_monitor(callback: object) -> bool:
    return type(callback).__module__.startswith("ode_reg.callbacks")


class RegularizedODEMixin:
    """The ode_reg plug-in as a mixin: ``class M(RegularizedODEMixin, LightningModule)`` for
    either namespace (``lightning.LightningModule`` or ``pytorch_lightning.LightningModule``).

    The loss ``training_step`` returns gets the weighted sum of the active terms added
    (automatic optimization), or ``self.manual_backward(loss)`` adds the terms of the solves
    recorded since the previous ``manual_backward`` call of the step (manual optimization; with
    several optimizers, each call regularizes the solves made before it). Every
    ``ode_reg.odeint`` / ``ode_reg.odeint_adjoint`` call made during the step — anywhere: a
    submodule, a cell, a helper — is recorded, one torchdiffeq solve each; solves are chained by
    data dependency (MATH.md). Each term is logged as ``reg/<name>``, their sum as
    ``reg/total``. ``training_step`` may be defined anywhere in the class hierarchy (a mixin,
    a parent); a ``super().training_step`` call adds the terms once. Validation and test steps
    are untouched.

    Args:
        regularizers: the loss terms, e.g. ``[AdjointMagnitude(0.1), SkewJacobianPenalty(0.01)]``.
        nonfinite: ``"skip"`` drops a term that is NaN/Inf on a step (the decision is collective
            under DDP), counts it and logs ``reg/skipped``; a step whose batch, task loss or
            gradient is NaN/Inf is not applied (no term, no optimizer step; counted in
            ``reg/skipped_steps``, see :mod:`ode_reg._nonfinite`). ``"raise"`` raises
            ``FloatingPointError`` instead, naming what was not finite.
        shared_backward: opt-in. When the active terms need adjoints but none differentiates
            them (``detach_adjoints=True``), take the task gradient of the module's parameters
            from the plain backward pass that gives the adjoints, and return a loss whose
            backward adds it as a constant (same value and gradient, one backward pass of the
            task loss less; automatic optimization only). Caveats, why it is off by default:
            a tensor hook on a parameter sees that gradient in two parts; the task loss sends
            gradients to this module's parameters only; under 16-bit AMP the task gradient is
            taken from the unscaled loss.
        **kwargs: passed on to the LightningModule.

    Raises:
        ValueError: if ``nonfinite`` is not one of ``"skip"``, ``"raise"`` or an element of
            ``regularizers`` is not a :class:`~ode_reg.Regularizer`, or two share a name.

    Example::

        >>> import torch
        >>> import lightning as L
        >>> from ode_reg import AdjointMagnitude, RegularizedODEMixin, odeint
        >>> class Model(RegularizedODEMixin, L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__(regularizers=[AdjointMagnitude(weight=0.1)])
        ...         self.field = torch.nn.Linear(2, 2)
        ...     def training_step(self, batch, batch_idx):
        ...         z = odeint(lambda t, z: self.field(z), batch, torch.tensor([0.0, 1.0]))
        ...         return z[-1].pow(2).mean()
        >>> Model().regularizers[0].name
        'adjoint_magnitude'
    """

    def __init__(
        self,
        regularizers: Sequence[Regularizer] = (),
        *,
        nonfinite: str = "skip",
        shared_backward: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`nonfinite` must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if not isinstance(shared_backward, bool):
            raise ValueError(f"`shared_backward` must be True or False, got {shared_backward!r}")
        regularizers = list(regularizers)
        for r in regularizers:
            if not isinstance(r, Regularizer):
                raise ValueError(
                    f"`regularizers` must hold ode_reg Regularizer instances, got {type(r).__name__}"
                )
        names = [r.name for r in regularizers]
        if len(set(names)) != len(names):
            raise ValueError(f"`regularizers` must have distinct names, got {names}")
        self.regularizers = nn.ModuleList(regularizers)
        self.nonfinite = nonfinite
        self.shared_backward = shared_backward
        self._recorder: StepRecorder | None = None
        self._step_batch: Any = None
        self.ode_step: StepRecord | None = None

    # ------------------------------------------------------------------ the plug-in contract
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Wherever the MRO finds training_step (this class, a mixin, a parent): wrap it once.
        step = getattr(cls, "training_step", None)
        if step is None or getattr(step, "_ode_reg_wrapped", False):
            return
        if (getattr(step, "__module__", None) or "").startswith(
            ("lightning.", "pytorch_lightning.")
        ):
            return  # Lightning's placeholder: leave "not implemented" to Lightning

        @functools.wraps(step)
        def training_step(self: RegularizedODEModule, *args: Any, **kw: Any) -> Any:
            if self._recorder is not None:  # super().training_step from a subclass: outer adds
                return step(self, *args, **kw)
            batch_idx = args[1] if len(args) > 1 else kw.get("batch_idx", 0)
            forget_step_values(self)
            self._step_batch = args[0] if args else kw.get("batch")
            rec = self._new_recorder(int(batch_idx) if isinstance(batch_idx, int) else 0)
            if rec is None:  # no active term and no monitor: torchdiffeq's calls, untouched
                self.ode_step = StepRecord([], [], [], [])
                out = step(self, *args, **kw)
                skipped = self._skip_nonfinite(out)
                return out if skipped is None else skipped
            self._recorder = rec
            try:
                with rec.active():
                    out = step(self, *args, **kw)
            finally:
                self._recorder = None
            return self._add_regularization(out, rec)

        training_step._ode_reg_wrapped = True  # type: ignore[attr-defined]
        cls.training_step = training_step  # type: ignore[method-assign]

    def _active(self) -> list[Regularizer]:
        return [r for r in self.regularizers if r.active(self.global_step)]

    def _monitors(self) -> list[Any]:
        trainer = self._trainer
        return [] if trainer is None else [c for c in trainer.callbacks if _is_monitor(c)]

    def _monitors_due(self) -> bool:
        return bool(self._monitors())

    def _new_recorder(self, batch_idx: int) -> StepRecorder | None:
        active = self._active()
        monitors = self._monitors()
        if not active and not monitors:
            return None
        # A monitor that reads only solver statistics (``needs_chains = False``) needs neither
        # the data dependency between solves nor a y0 that requires grad.
        chains = bool(active) or any(getattr(m, "needs_chains", True) for m in monitors)
        skew = next((r for r in active if r.needs_skew_probes), None)
        plan = None
        if skew is not None:
            gen = skew.generator(self.global_step, self.device, micro=batch_idx)
            plan = SkewPlan(skew.probes, skew.max_states, gen)
        norms = tuple(
            r.plan(self.global_step, self.device, batch_idx)
            for r in active
            if getattr(r, "needs_field_norms", False)
        )
        return StepRecorder(
            field_norms=norms,
            evaluate_fields=_evaluation_mode(active),
            skew=plan,
            adjoint_inputs=any(r.needs_adjoints for r in active),
            refuse_adjoint=tuple(r.name for r in active if r.needs_adjoints),
            chains=chains,
        )

    def odeint(
        self,
        func: Callable[..., Any],
        y0: Any,
        t: Tensor,
        *,
        checkpoints: int | Tensor | Sequence[float] | None = None,
        method: str | None = None,
        options: dict[str, Any] | None = None,
        rtol: Any = 1e-7,
        atol: Any = 1e-9,
        adjoint: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Alias of :func:`ode_reg.odeint` (``adjoint=True``: :func:`ode_reg.odeint_adjoint`).

        Args:
            func: vector field ``f(t, z)``.
            y0: initial state, batch first.
            t: output times (increasing or decreasing).
            checkpoints: see :func:`ode_reg.integrate`.
            method: torchdiffeq method (``None``: ``"dopri5"``, torchdiffeq's default).
            options: torchdiffeq solver options.
            rtol: relative tolerance (adaptive solvers).
            atol: absolute tolerance (adaptive solvers).
            adjoint: solve with ``odeint_adjoint``.
            **kwargs: further torchdiffeq keywords (``event_fn``, ``adjoint_*``).

        Returns:
            What torchdiffeq returns.

        Raises:
            ValueError: on bad arguments, or ``adjoint=True`` with a term that needs adjoints.
        """
        solve = _odeint_adjoint if adjoint else _odeint
        return solve(
            func,
            y0,
            t,
            checkpoints=checkpoints,
            method=method,
            options=options,
            rtol=rtol,
            atol=atol,
            **kwargs,
        )

    # ------------------------------------------------------------------ the terms
    def _collective_any(self, flags: Tensor) -> Tensor:
        if _distributed():
            flags = flags.clone()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def _log_term(self, name: str, value: Tensor, **kw: Any) -> None:
        self.log(name, value, on_step=True, batch_size=1, **kw)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the callbacks' ``on_train_batch_end`` (Lightning calls them first): keep the
        step's record, but detached, so that the forward graph is freed now, not at the next
        step (it is referenced by the recorded states until then).

        Args:
            outputs: the training step's outputs.
            batch: the batch.
            batch_idx: its index.
        """
        super().on_train_batch_end(outputs, batch, batch_idx)  # type: ignore[misc]
        if self.ode_step is not None:
            self.ode_step = _released(self.ode_step)

    def _skip_nonfinite(self, out: Any) -> Any:
        """The step's output with a zero loss if its batch or task loss is not finite
        (automatic optimization; the optimizer step is then dropped), else ``None``."""
        loss = out["loss"] if isinstance(out, dict) else out
        if not self.automatic_optimization or not isinstance(loss, Tensor):
            return None
        if not task_side_nonfinite(self, loss, self._step_batch):
            return None
        zero = zero_loss(self, loss)
        return {**out, "loss": zero} if isinstance(out, dict) else zero

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Drop the optimizer step (every gradient set to ``None``) when the step's batch, task
        loss or a gradient is not finite; counts it in ``reg/skipped_steps``.

        Args:
            optimizer: the optimizer about to step.
        """
        super().on_before_optimizer_step(optimizer)  # type: ignore[misc]
        drop_marked_step(self, optimizer)

    def _step_record(self, rec: StepRecorder) -> StepRecord:
        record = getattr(rec, "step_record", None)
        if record is None:
            record = StepRecord([], [], [], [])
            rec.step_record = record  # type: ignore[attr-defined]
        record.trajectories = [r.traj for r in rec.records]
        record.solves = rec.summaries
        self.ode_step = record
        return record

    def _add_regularization(self, out: Any, rec: StepRecorder) -> Any:
        """After the user's ``training_step``: add the terms to the returned loss (automatic
        optimization), or only record the step (manual optimization, where
        ``manual_backward`` added them)."""
        record = self._step_record(rec)
        skipped = self._skip_nonfinite(out)
        if skipped is not None:  # the batch or task loss is not finite: no term, no step
            return skipped
        if rec.stats_only:  # no term, no chain: the counts are all the step records
            return out
        loss = out["loss"] if isinstance(out, dict) else out
        pending = rec.records[getattr(rec, "consumed", 0) :]
        active = self._active()
        if not self.automatic_optimization or not isinstance(loss, Tensor) or not active:
            structural = rec.chains and isinstance(loss, Tensor) and loss.requires_grad
            if structural and pending and not record.groups:
                # No term: the chains (for the monitors) by the same rules, without adjoints.
                res = step_terms(loss, pending, [], step=self.global_step, params=[])
                record.groups = [ctx.trajectory for ctx in res.chains]
                record.adjoints = [None] * len(record.groups)
                record.sensitivities = [None] * len(record.groups)
            return out
        new_loss = self._regularized(loss, pending, record, rec)
        if isinstance(out, dict):
            return {**out, "loss": new_loss}
        return new_loss

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``manual_backward``, with the step's terms added to ``loss`` first.

        Each call regularizes the solves recorded since the previous call in the same step
        (with two optimizers and two backward passes, each pass gets the terms of its own
        solves).

        Args:
            loss: the loss to backpropagate.
            *args: passed to Lightning's ``manual_backward``.
            **kwargs: passed to Lightning's ``manual_backward``.
        """
        rec = self._recorder
        if isinstance(loss, Tensor) and task_side_nonfinite(self, loss, self._step_batch):
            super().manual_backward(zero_loss(self, loss), *args, **kwargs)  # type: ignore[misc]
            return
        if rec is not None and isinstance(loss, Tensor) and self._active():
            start = getattr(rec, "consumed", 0)
            pending = rec.records[start:]
            rec.consumed = len(rec.records)  # type: ignore[attr-defined]
            if pending:
                loss = self._regularized(loss, pending, self._step_record(rec), rec)
        super().manual_backward(loss, *args, **kwargs)  # type: ignore[misc]

    def _regularized(
        self, loss: Tensor, records: Sequence[Any], record: StepRecord, rec: StepRecorder
    ) -> Tensor:
        """``loss`` plus the weighted active terms on ``records``; logs them, fills ``record``."""
        step = self.global_step
        active = self._active()
        own = [p for p in self.parameters() if p.requires_grad]
        for r in records:  # fields that are modules outside this one (rare)
            own.extend(p for p in r.traj.parameters() if all(p is not q for q in own))
        shared = _use_shared_backward(self, active)
        res = step_terms(
            loss,
            records,
            active,
            step=step,
            params=own,
            extra=own if shared else (),
            reduce_mean=all_reduce_mean,
        )
        record.left_out = res.left_out
        if res.left_out:
            rec.warn(
                "left_out",
                f"ode_reg: {len(res.left_out)} solve(s) of a training step are not reached by the "
                "loss and are left out of the terms (said once)",
            )
        values = [res.values[r.name] for r in active]
        stacked = torch.stack([v.detach() for v in values])
        bad = self._collective_any((~torch.isfinite(stacked)).to(stacked.dtype))
        total = loss.new_zeros(())
        for r, v, b in zip(active, values, bad):
            if b > 0:
                if self.nonfinite == "raise":
                    here = v.item()
                    where = (
                        f"value {here}"
                        if not torch.isfinite(v.detach())
                        else f"on another DDP rank; value here {here}"
                    )
                    raise FloatingPointError(
                        f"regularizer '{r.name}' is not finite at step {step} ({where})"
                    )
                r.skipped += 1
                continue
            if r.zero_value_has_zero_gradient and v.detach() == 0:
                # A sum of squares at 0 has zero gradient: do not walk its graph. Under DDP the
                # terms whose backward communicates (y_k is all-reduced) have the same value,
                # hence the same decision, on every rank.
                v = v.detach()
            total = total + r.scheduled_weight(step) * v
            self._log_term(f"reg/{r.name}", v.detach(), on_epoch=True, sync_dist=True)
        self._log_term("reg/total", total.detach(), on_epoch=True, sync_dist=True)
        skipped = sum(int(r.skipped) for r in self.regularizers)
        self._log_term("reg/skipped", float(skipped), on_epoch=False, reduce_fx="max")
        record.groups.extend(ctx.trajectory for ctx in res.chains)
        record.adjoints.extend(
            ctx.adjoints().detach() if res.adjoints is not None else None for ctx in res.chains
        )
        for ctx in res.chains:
            sens = next((v for k, v in ctx._cache.items() if isinstance(k, tuple)), None)
            record.sensitivities.append(None if sens is None else sens.detach())
        task_grads = res.adjoints.extra if (shared and res.adjoints is not None) else None
        if task_grads is None or all(g is None for g in task_grads):
            new_loss = loss + total
        else:
            # Value: loss + total (the shift is exactly 0). Gradient: the task gradient already
            # computed, plus total's.
            linear = sum((p * g.detach()).sum() for p, g in zip(own, task_grads) if g is not None)
            new_loss = loss.detach() + total + (linear - linear.detach())
        return new_loss


class RegularizedODEModule(RegularizedODEMixin, L.LightningModule):
    """A ``lightning.LightningModule`` with the ode_reg plug-in (:class:`RegularizedODEMixin`).

    Converting a project: ``from torchdiffeq import odeint`` -> ``from ode_reg import odeint``
    and the base class ``LightningModule`` -> ``RegularizedODEModule``; ``training_step`` stays
    as it is.

    Args:
        regularizers: the loss terms.
        nonfinite: ``"skip"`` or ``"raise"`` (see :class:`RegularizedODEMixin`).
        shared_backward: opt-in shared backward (see :class:`RegularizedODEMixin`).
        **kwargs: passed on to ``LightningModule``.

    Raises:
        ValueError: as :class:`RegularizedODEMixin`.

    Example::

        >>> import torch
        >>> from ode_reg import RegularizedODEModule, AdjointMagnitude, odeint
        >>> class Model(RegularizedODEModule):
        ...     def __init__(self):
        ...         super().__init__(regularizers=[AdjointMagnitude(weight=0.1)])
        ...         self.field = torch.nn.Linear(2, 2)
        ...     def training_step(self, batch, batch_idx):
        ...         z = odeint(lambda t, z: self.field(z), batch, torch.tensor([0.0, 1.0]))
        ...         return z[-1].pow(2).mean()
        >>> Model().regularizers[0].name
        'adjoint_magnitude'
    """
