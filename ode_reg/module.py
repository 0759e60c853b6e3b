"""``RegularizedODEModule``: change the base class and the odeint call, keep ``training_step``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ode_reg.recording import SkewPlan, StepRecorder, read_directly
from ode_reg.regularizers import Regularizer, _distributed, all_reduce_mean
from ode_reg.solve import odeint as _odeint
from ode_reg.solve import odeint_adjoint as _odeint_adjoint
from ode_reg.terms import build_chains, reached_records, step_terms
from ode_reg.trajectory import Trajectory, chain

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
    """

    trajectories: list[Trajectory]
    groups: list[Trajectory]
    adjoints: list[Tensor | None]
    sensitivities: list[Tensor | None]
    left_out: list[int] = field(default_factory=list)

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


def _is_monitor(callback: object) -> bool:
    return type(callback).__module__.startswith("ode_reg.callbacks")


class RegularizedODEModule(L.LightningModule):
    """A LightningModule whose ``training_step`` loss gets the ode_reg terms added.

    Replace ``torchdiffeq.odeint(func, y0, t, ...)`` by ``self.odeint(func, y0, t, ...)`` and
    the base class ``LightningModule`` by this one; ``training_step`` stays as it is. In each
    training step, the trajectories of all ``self.odeint`` calls are recorded (calls whose
    states have the same shape are chained, as an ODE-RNN's steps are), the active
    regularizers are evaluated on them, and their weighted sum is added to the returned loss.
    Each term is logged as ``reg/<name>``, their sum as ``reg/total``. Validation and test steps
    are untouched.

    Args:
        regularizers: the loss terms, e.g. ``[AdjointMagnitude(0.1), SkewJacobianPenalty(0.01)]``.
        nonfinite: ``"skip"`` drops a term that is NaN/Inf on a step (the decision is collective
            under DDP), counts it and logs ``reg/skipped``; ``"raise"`` raises instead.
        shared_backward: when the active terms need adjoints but none differentiates them
            (``detach_adjoints=True``), take the task gradient of the module's parameters from
            the same plain backward pass that gives the adjoints, and return a loss whose
            backward adds it as a constant, instead of differentiating the task loss again in
            Lightning's backward (same value, same gradient, one backward pass less; automatic
            optimization only). Set ``False`` if the task loss must also send gradients to
            tensors that are not parameters of this module.

    Raises:
        ValueError: if ``nonfinite`` is not one of ``"skip"``, ``"raise"`` or an element of
            ``regularizers`` is not a :class:`~ode_reg.Regularizer`, or two share a name.

    Example::

        >>> import torch
        >>> from ode_reg import RegularizedODEModule, AdjointMagnitude
        >>> class Model(RegularizedODEModule):
        ...     def __init__(self):
        ...         super().__init__(regularizers=[AdjointMagnitude(weight=0.1)])
        ...         self.field = torch.nn.Linear(2, 2)
        ...     def training_step(self, batch, batch_idx):
        ...         z = self.odeint(lambda t, z: self.field(z), batch, torch.tensor([0.0, 1.0]))
        ...         return z[-1].pow(2).mean()
        >>> Model().regularizers[0].name
        'adjoint_magnitude'
    """

    def __init__(
        self,
        regularizers: Sequence[Regularizer] = (),
        *,
        nonfinite: str = "skip",
        shared_backward: bool = True,
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
        self.ode_step: StepRecord | None = None

    # ------------------------------------------------------------------ the plug-in contract
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is None or getattr(step, "_ode_reg_wrapped", False):
            return

        @functools.wraps(step)
        def training_step(self: RegularizedODEModule, *args: Any, **kw: Any) -> Any:
            if self._recorder is not None:  # super().training_step from a subclass: outer adds
                return step(self, *args, **kw)
            batch_idx = args[1] if len(args) > 1 else kw.get("batch_idx", 0)
            rec = self._new_recorder(int(batch_idx) if isinstance(batch_idx, int) else 0)
            if rec is None:  # no active term and no monitor: torchdiffeq's calls, untouched
                self.ode_step = StepRecord([], [], [], [])
                return step(self, *args, **kw)
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

    def _monitors_due(self) -> bool:
        trainer = self._trainer
        return trainer is not None and any(_is_monitor(c) for c in trainer.callbacks)

    def _new_recorder(self, batch_idx: int) -> StepRecorder | None:
        active = self._active()
        if not active and not self._monitors_due():
            return None
        skew = next((r for r in active if r.needs_skew_probes), None)
        plan = None
        if skew is not None:
            gen = skew.generator(self.global_step, self.device, micro=batch_idx)
            plan = SkewPlan(skew.probes, skew.max_states, gen)
        return StepRecorder(
            evaluate_fields=_evaluation_mode(active),
            skew=plan,
            adjoint_inputs=any(r.needs_adjoints for r in active),
            refuse_adjoint=tuple(r.name for r in active if r.needs_adjoints),
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

    def _add_regularization(self, out: Any, rec: StepRecorder) -> Any:
        loss = out["loss"] if isinstance(out, dict) else out
        records = rec.records
        record = StepRecord([r.traj for r in records], [], [], [])
        self.ode_step = record
        step = self.global_step
        active = self._active()
        if not isinstance(loss, Tensor) or not active:
            if isinstance(loss, Tensor) and loss.requires_grad and records:
                live = [r for r in records if r.node is not None]
                reached = reached_records(live, read_directly(loss, live))
                record.groups = [chain([r.traj for r in c]) for c in build_chains(live, reached)]
                record.adjoints = [None] * len(record.groups)
                record.sensitivities = [None] * len(record.groups)
            return out
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
        record.groups = [ctx.trajectory for ctx in res.chains]
        record.adjoints = [
            ctx.adjoints().detach() if res.adjoints is not None else None for ctx in res.chains
        ]
        record.sensitivities = []
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
        if isinstance(out, dict):
            return {**out, "loss": new_loss}
        return new_loss
