"""``RegularizedODEModule``: change the base class and the odeint call, keep ``training_step``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ode_reg.adjoint import adjoints_and_grads
from ode_reg.regularizers import Regularizer, StepContext, _distributed
from ode_reg.trajectory import Trajectory, chain, integrate

NONFINITE_POLICIES = ("skip", "raise")


@dataclass
class StepRecord:
    """What the last training step recorded, for the monitoring callbacks.

    Attributes:
        trajectories: every trajectory ``self.odeint`` produced in the step, in call order.
        adjoints: per chained group, the task-loss adjoints ``(K + 1, B, ...)`` (detached), when a
            regularizer computed them; else ``None``.
        sensitivities: per chained group, ``y_k`` ``(K + 1, P)`` (detached), when computed.
        groups: the chained trajectory of each group of same-shaped trajectories.
    """

    trajectories: list[Trajectory]
    groups: list[Trajectory]
    adjoints: list[Tensor | None]
    sensitivities: list[Tensor | None]


def _group(trajectories: Sequence[Trajectory]) -> list[Trajectory]:
    groups: dict[tuple[int, ...], list[Trajectory]] = {}
    for tr in trajectories:
        groups.setdefault(tuple(tr.states[0].shape), []).append(tr)
    return [chain(g) for g in groups.values()]


def _use_shared_backward(module: RegularizedODEModule, active: Sequence[Regularizer]) -> bool:
    """Whether this step takes the task gradient from the adjoints' (plain) backward."""
    return (
        module.shared_backward
        and module.automatic_optimization
        and any(r.needs_adjoints for r in active)
        and not any(r.needs_differentiable_adjoints for r in active)
    )


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
        self._recording = False
        self._step_trajectories: list[Trajectory] = []
        self.ode_step: StepRecord | None = None

    # ------------------------------------------------------------------ the plug-in contract
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is None or getattr(step, "_ode_reg_wrapped", False):
            return

        @functools.wraps(step)
        def training_step(self: RegularizedODEModule, *args: Any, **kw: Any) -> Any:
            if self._recording:  # a subclass calling super().training_step: the outer call adds
                return step(self, *args, **kw)
            self._recording = True
            self._step_trajectories = []
            try:
                out = step(self, *args, **kw)
            finally:
                self._recording = False
            return self._add_regularization(out)

        training_step._ode_reg_wrapped = True  # type: ignore[attr-defined]
        cls.training_step = training_step  # type: ignore[method-assign]

    def odeint(
        self,
        func: Callable[..., Tensor],
        y0: Tensor,
        t: Tensor,
        *,
        checkpoints: int | Tensor | Sequence[float] | None = None,
        method: str | None = None,
        options: dict[str, Any] | None = None,
        rtol: float = 1e-7,
        atol: float = 1e-9,
        adjoint: bool = False,
    ) -> Tensor:
        """Drop-in for ``torchdiffeq.odeint``: same arguments and result, plus ``checkpoints``.

        Args:
            func: vector field ``f(t, z)``.
            y0: initial state, batch first.
            t: strictly increasing output times.
            checkpoints: see :func:`ode_reg.integrate`.
            method: torchdiffeq method (``None``: ``"dopri5"``, torchdiffeq's default).
            options: torchdiffeq solver options.
            rtol: relative tolerance (adaptive solvers).
            atol: absolute tolerance (adaptive solvers).
            adjoint: solve with ``odeint_adjoint`` (refused when an active regularizer needs
                differentiable adjoints).

        Returns:
            The solution at ``t``, shape ``(len(t), *y0.shape)``.

        Raises:
            ValueError: on bad arguments (see :func:`ode_reg.integrate`), or ``adjoint=True``
                with a regularizer that needs differentiable adjoints.
        """
        if adjoint and self._recording:
            needing = [
                r.name
                for r in self.regularizers
                if r.needs_differentiable_adjoints and r.weight > 0
            ]
            if needing:
                raise ValueError(
                    f"`adjoint=True` (odeint_adjoint) cannot be used with {needing}: their "
                    "terms need a differentiable adjoint, and odeint_adjoint's backward is not "
                    "differentiable. Use adjoint=False or SkewJacobianPenalty."
                )
        traj = integrate(
            func,
            y0,
            t,
            checkpoints=checkpoints,
            method=method,
            options=options,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
        )
        if self._recording:
            self._step_trajectories.append(traj)
        return traj.ys

    # ------------------------------------------------------------------ the terms
    def _collective_any(self, flags: Tensor) -> Tensor:
        if _distributed():
            flags = flags.clone()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def _add_regularization(self, out: Any) -> Any:
        loss = out["loss"] if isinstance(out, dict) else out
        trajectories = self._step_trajectories
        self._step_trajectories = []
        groups = _group(trajectories) if trajectories else []
        record = StepRecord(trajectories, groups, [None] * len(groups), [None] * len(groups))
        self.ode_step = record
        if not isinstance(loss, Tensor) or not self.regularizers:
            return out
        step = self.global_step
        active = [r for r in self.regularizers if r.active(step)]
        if not active:
            return out
        if not groups:
            raise ValueError(
                "regularizers are active but training_step made no self.odeint call: "
                "replace torchdiffeq.odeint by self.odeint"
            )
        # A field that is not an nn.Module (a closure such as ``lambda t, h: cell(h, x)``) has no
        # parameters of its own: take y_k over the module's, those it does not use give zeros.
        own = [p for p in self.parameters() if p.requires_grad]
        # The adjoints need a graph only if some term differentiates them.
        differentiable = any(r.needs_differentiable_adjoints for r in active)
        contexts = [
            StepContext(
                loss,
                g,
                differentiable=differentiable,
                params=None if g.parameters() else own,
                step=step,
            )
            for g in groups
        ]
        # The backward that gives the adjoints also gives the task gradient of the parameters:
        # take both from it, and return a loss whose backward adds that gradient as a constant
        # (a linear term), so the task part is not differentiated a second time.
        # (Only when no term differentiates the adjoints: the double backward walks the
        # forward graph anyway, so there the task gradient costs almost nothing extra in
        # Lightning's backward, while recording the parameter gradients' graph would.)
        task_grads = None
        if _use_shared_backward(self, active):
            adjs, task_grads = adjoints_and_grads(
                loss, [c.trajectory for c in contexts], own, create_graph=False
            )
            for ctx, a in zip(contexts, adjs):
                ctx._adjoints = a
        values = []
        for r in active:
            terms = []
            for ctx in contexts:
                term = r.compute(ctx)
                if r.needs_adjoints:
                    # A non-finite adjoint poisons the term even where the log hides it.
                    term = term + 0.0 * ctx.adjoints().sum()
                terms.append(term)
            values.append(torch.stack(terms).mean())
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
                # A sum of squares at 0 has zero gradient: do not walk its graph (for the
                # adjoint-based terms, a double backward through the trajectory). Under DDP the
                # terms whose backward communicates (y_k is all-reduced) have the same value,
                # hence the same decision, on every rank.
                v = v.detach()
            total = total + r.scheduled_weight(step) * v
            self.log(f"reg/{r.name}", v.detach(), on_step=True, on_epoch=True, sync_dist=True)
        self.log("reg/total", total.detach(), on_step=True, on_epoch=True, sync_dist=True)
        skipped = sum(int(r.skipped) for r in self.regularizers)
        self.log("reg/skipped", float(skipped), on_step=True, on_epoch=False, reduce_fx="max")
        for i, ctx in enumerate(contexts):
            if ctx._adjoints is not None:
                record.adjoints[i] = ctx._adjoints.detach()
            if ctx._sens:
                record.sensitivities[i] = next(iter(ctx._sens.values())).detach()
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
