"""``RegularizedODEModule``: change the base class and the odeint call, keep ``training_step``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ode_reg._checks import check_bool, check_choice
from ode_reg._nonfinite import (
    drop_marked_step,
    forget_step_values,
    set_skipped_steps,
    skipped_steps,
    task_side_nonfinite,
    zero_loss,
)
from ode_reg._ranks import Ranks
from ode_reg.plan import Monitor, Need, StepPlan, capture_torchdiffeq
from ode_reg.recording import SkewPlan, StepRecorder
from ode_reg.regularizers import Regularizer
from ode_reg.solve import odeint as _odeint
from ode_reg.solve import odeint_adjoint as _odeint_adjoint
from ode_reg.terms import step_terms
from ode_reg.trajectory import DEFAULT_CHECKPOINTS, SolveSummary, Trajectory

NONFINITE_POLICIES = ("skip", "raise")

#: Where the regularizers' run state (skip counters, probe seeds) is kept in a checkpoint.
RUN_STATE_KEY = "ode_reg_run_state"
#: The tag of a regularizer written into a checkpoint's hyperparameters as plain values.
SPEC_TAG = "ode_reg_regularizer"
_LEGACY_KEY = re.compile(r"^regularizers\.(\d+)\.(\w+)$")


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


def _use_shared_backward(module: RegularizedODEModule, active: Sequence[Regularizer]) -> bool:
    """Whether this step takes the task gradient from the adjoints' (plain) backward."""
    return (
        module.shared_backward
        and module.automatic_optimization
        and any(r.needs_adjoints for r in active)
        and not any(r.needs_differentiable_adjoints for r in active)
        and not _gradient_hooks(module)
    )


def _gradient_hooks(module: nn.Module) -> bool:
    """Whether a hook would see the shared backward's task gradient differently from the plain
    backward's: a tensor hook on a parameter (it would run in the adjoints' pass and again on
    the total), or a module backward hook (the task part would not pass through the module)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
        return True
    for m in module.modules():
        if m._backward_hooks or m._backward_pre_hooks:
            return True
    return any(p._backward_hooks for p in module.parameters() if p.requires_grad)


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
    """``tr`` (and its parts) with every tensor detached and the field dropped (a closure
    field can hold the step's graph and cannot be pickled). Module level: a recursive closure
    would be a reference cycle, left for the cyclic garbage collector, at every step."""
    parts = tuple(_light(p) for p in tr.parts)
    out = dataclasses.replace(
        tr,
        func=None,  # type: ignore[arg-type]
        funcs=(),
        points=None,
        times=_detached(tr.times),
        t=_detached(tr.t),
        event_t=_detached(tr.event_t),
        states=_detached(tr.states),
        solution=_detached(tr.solution),
        weights=_detached(tr.weights),
        parts=parts,
        _field_at=None,
        grad_leaves=(),
    )
    if tr.owners:
        index = {id(p): q for p, q in zip(tr.parts, parts)}
        out.owners = tuple((index.get(id(p), p), k) for p, k in tr.owners)
    return out


def _released_summary(s: SolveSummary) -> SolveSummary:
    """``s`` with its times detached (itself when they hold no graph: a stats-only solve's
    ``t`` is the caller's, usually a plain tensor, and this runs for every solve of a step)."""
    if not (getattr(s.t, "requires_grad", True) or getattr(s.times, "requires_grad", False)):
        return s
    return dataclasses.replace(s, t=_detached(s.t), times=_detached(s.times))


def _released(record: StepRecord) -> StepRecord:
    """``record`` with every tensor detached from the step's autograd graph and no field."""
    return StepRecord(
        [_light(t) for t in record.trajectories],
        [_light(t) for t in record.groups],
        [_detached(a) for a in record.adjoints],
        [_detached(a) for a in record.sensitivities],
        list(record.left_out),
        [_released_summary(s) for s in record.solves],
    )


class StepRelease(Callback):
    """Releases the module's step record at the end of every training batch (installed by
    :class:`RegularizedODEMixin` as the trainer's last callback, so it runs after every monitor
    and whatever the module's own ``on_train_batch_end`` does): ``pl_module.ode_step`` keeps the
    step's values, detached, and no field, so the step's graph is freed now, not at the next
    step, and the fitted module pickles.
    """

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        record = getattr(pl_module, "ode_step", None)
        if isinstance(record, StepRecord):
            pl_module.ode_step = _released(record)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.on_train_batch_end(trainer, pl_module, None, None, 0)


def _regularizers_from(value: Any) -> list[Regularizer]:
    """The regularizer list, rebuilding those given as checkpoint specs (``SPEC_TAG``)."""
    if isinstance(value, (Regularizer, Mapping)) or not isinstance(value, Sequence):
        raise ValueError(
            "`regularizers` must be a sequence of ode_reg Regularizer instances, got "
            f"{type(value).__name__}"
        )
    out = []
    for r in value:
        if isinstance(r, Mapping) and SPEC_TAG in r:
            from ode_reg.models._checkpoint import build_regularizer

            r = build_regularizer(r[SPEC_TAG])
        if not isinstance(r, Regularizer):
            raise ValueError(
                f"`regularizers` must hold ode_reg Regularizer instances, got {type(r).__name__}"
            )
        out.append(r)
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"`regularizers` must have distinct names, got {names}")
    return out


def _plain_hparams(value: Any) -> Any:
    """``value`` with every regularizer replaced by its tagged spec (plain values)."""
    if isinstance(value, Regularizer):
        from ode_reg.models._checkpoint import regularizer_spec

        return {SPEC_TAG: regularizer_spec(value)}
    if isinstance(value, list):
        return [_plain_hparams(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_hparams(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain_hparams(v) for k, v in value.items()}
    return value


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

    Each training step starts with a :class:`~ode_reg.StepPlan`: the terms due on the step and
    the trainer's :class:`~ode_reg.Monitor` callbacks due on it (one cadence rule,
    :func:`ode_reg.due`), and the union of what they need. The step records exactly that, and
    nothing at all when nothing is due. ``ode_step`` (a :class:`StepRecord`) holds the step's
    record from the end of the forward (under manual optimization, from each
    ``manual_backward``) until the end of the batch, when a callback the module installs
    (:class:`StepRelease`) releases it: detached values, no field, whatever the module's own
    hooks do. When something was due and the step made no ode_reg solve, a warning says so
    once, and nothing is added or logged for it. The regularizers are configuration, not
    model state: they are not submodules (the ``state_dict`` is the model's own), their run
    state travels in checkpoints under ``RUN_STATE_KEY``.

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
            task loss less; automatic optimization only). A step where a parameter has a
            tensor hook or a module has a backward hook takes the plain backward instead (so
            the hooks see what they see with the option off). Caveats, why it is off by
            default: the task loss sends gradients to this module's parameters only; under
            16-bit AMP the task gradient is taken from the unscaled loss.
        capture_torchdiffeq: opt-in. Record, during each training step, the calls that other
            code makes to ``torchdiffeq.odeint`` / ``torchdiffeq.odeint_adjoint`` through the
            module attribute (a library such as torchcde that calls torchdiffeq itself), as if
            they were ``ode_reg.odeint`` calls (:func:`ode_reg.capture_torchdiffeq`; the
            attributes are restored when the step ends, also on an exception).
        **kwargs: passed on to the LightningModule.

    Raises:
        ValueError: if ``nonfinite`` is not one of ``"skip"``, ``"raise"``, a flag is not a
            bool, an element of ``regularizers`` is not a :class:`~ode_reg.Regularizer`, or two
            share a name.

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
        capture_torchdiffeq: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        check_bool("shared_backward", shared_backward)
        check_bool("capture_torchdiffeq", capture_torchdiffeq)
        self.regularizers = regularizers  # type: ignore[assignment]
        self.nonfinite = nonfinite
        self.shared_backward = shared_backward
        self.capture_torchdiffeq = capture_torchdiffeq
        self._recorder: StepRecorder | None = None
        self._step_batch: Any = None
        self._plan_now: StepPlan | None = None
        self._consumed = 0
        self.ode_step: StepRecord | None = None
        #: The plan of the last training step (its due terms and monitors).
        self.ode_plan: StepPlan | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def regularizers(self) -> list[Regularizer]:
        """The loss terms: configuration, not model state (no submodule, nothing of them in
        ``state_dict``; their run state travels in the checkpoint under ``RUN_STATE_KEY``)."""
        return self.__dict__.setdefault("_ode_regularizers", [])

    @regularizers.setter
    def regularizers(self, value: Sequence[Regularizer]) -> None:
        self.__dict__["_ode_regularizers"] = _regularizers_from(value)

    def __getstate__(self) -> dict[str, Any]:
        # The step record holds the last step's values (and, before its release, its graph and
        # field): not part of a pickled or copied module.
        state = dict(super().__getstate__())  # type: ignore[misc]
        state["ode_step"] = None
        state["_recorder"] = None
        state["_plan_now"] = None
        state["ode_plan"] = None
        return state

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the regularizers' run state under ``RUN_STATE_KEY`` and write regularizers found
        among the hyperparameters as plain specs (so the checkpoint loads with
        ``weights_only=True`` and ``load_from_checkpoint`` rebuilds them).

        Args:
            checkpoint: the checkpoint dict being written.
        """
        checkpoint[RUN_STATE_KEY] = {
            "terms": [{"name": r.name, "state": r.run_state()} for r in self.regularizers],
            "skipped_steps": skipped_steps(self),
        }
        key = getattr(self, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters")
        hparams = checkpoint.get(key)
        if isinstance(hparams, dict):
            checkpoint[key] = _plain_hparams(hparams)
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the regularizers' run state by term name: a term the checkpoint does not
        know starts fresh, a saved term the module no longer has is dropped (said in one line).
        A checkpoint written when the run state was kept as buffers (``regularizers.<i>.*`` in
        its ``state_dict``) is read by position, and those keys are removed so that the strict
        load of the model's weights succeeds.

        Args:
            checkpoint: the checkpoint dict being loaded.
        """
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        terms = self.regularizers
        weights = checkpoint.get("state_dict")
        legacy: dict[int, dict[str, int]] = {}
        if isinstance(weights, dict):
            for k in [k for k in weights if _LEGACY_KEY.match(k)]:
                i, attr = _LEGACY_KEY.match(k).groups()  # type: ignore[union-attr]
                legacy.setdefault(int(i), {})[attr] = int(weights.pop(k))
        saved = checkpoint.get(RUN_STATE_KEY)
        if saved is not None:
            set_skipped_steps(self, int(saved.get("skipped_steps", 0)))
            by_name = {e["name"]: e["state"] for e in saved.get("terms", [])}
            for r in terms:
                if r.name in by_name:
                    r.load_run_state(by_name[r.name])
            new = [r.name for r in terms if r.name not in by_name]
            dropped = [n for n in by_name if n not in {r.name for r in terms}]
        else:
            for i, state in legacy.items():
                if i < len(terms):
                    terms[i].load_run_state(state)
            new = [r.name for i, r in enumerate(terms) if legacy and i not in legacy]
            dropped = [f"regularizers.{i}" for i in legacy if i >= len(terms)]
        if new or dropped:
            rank_zero_warn(
                f"ode_reg: the checkpoint's terms differ from the module's: new {new} start "
                f"fresh, saved {dropped} are dropped"
            )

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
            self._install_release()
            plan = self.ode_plan = self._plan()
            self._consumed = 0
            self.ode_step = StepRecord([], [], [], [])
            if plan.empty:  # nothing due: torchdiffeq's calls, untouched
                out = step(self, *args, **kw)
                skipped = self._skip_nonfinite(out)
                return out if skipped is None else skipped
            rec = self._new_recorder(plan, int(batch_idx) if isinstance(batch_idx, int) else 0)
            self._recorder, self._plan_now = rec, plan
            capture = (
                capture_torchdiffeq() if self.capture_torchdiffeq else contextlib.nullcontext()
            )
            try:
                with rec.active(), capture:
                    out = step(self, *args, **kw)
            finally:
                self._recorder = None
            try:
                return self._add_regularization(out, rec, plan)
            finally:
                self._plan_now = None
                self._say_if_nothing(plan, rec)

        training_step._ode_reg_wrapped = True  # type: ignore[attr-defined]
        cls.training_step = training_step  # type: ignore[method-assign]

    def _install_release(self) -> None:
        trainer = self._trainer
        if trainer is not None and not any(isinstance(c, StepRelease) for c in trainer.callbacks):
            trainer.callbacks.append(StepRelease())

    def _monitors(self) -> list[Monitor]:
        trainer = self._trainer
        return [] if trainer is None else [c for c in trainer.callbacks if isinstance(c, Monitor)]

    def _plan(self) -> StepPlan:
        """The due consumers of this step and what they need (``StepPlan``)."""
        step = self.global_step
        terms, need = [], Need()
        for r in self.regularizers:
            want = r.need(step)
            if want:
                terms.append(r)
                need = need | want
        monitors = []
        trainer = self._trainer
        for m in self._monitors():
            want = m.need(trainer) if trainer is not None else None
            if want:
                if want.field_evaluations or want.probes:
                    raise ValueError(
                        f"{type(m).__name__}.need() asks for field_evaluations/probes, which are "
                        "the terms' needs: a monitor reads the record (ode_step) and evaluates "
                        "the field itself (Trajectory.field_at); ask for stats/chains/adjoints"
                    )
                monitors.append(m)
                need = need | want
        batch = -1
        if trainer is not None:
            from ode_reg.callbacks._logging import logger_step

            batch = logger_step(trainer)
        return StepPlan(step, terms, monitors, need, batch)

    def _say(self, key: str, message: str) -> None:
        from ode_reg._once import SayOnce

        self.__dict__.setdefault("_ode_reg_said", SayOnce()).warn(message, key=key)

    def _say_if_nothing(self, plan: StepPlan, rec: StepRecorder) -> None:
        """Say it or do it: consumers were due and the step made no ode_reg solve."""
        if rec.summaries or rec.unrecorded:
            return
        names = ", ".join(plan.consumers())
        self._say(
            "no_solve",
            f"ode_reg: training step {plan.step} made no ode_reg solve while {names} "
            "needed one: nothing was measured or added for them on that step (a "
            "GradientNormMonitor logs grad/* only, no adjoint/*). Call "
            "ode_reg.odeint / ode_reg.odeint_adjoint (or self.odeint) instead of torchdiffeq's, "
            "or pass capture_torchdiffeq=True to the module when a library calls "
            "torchdiffeq.odeint itself; a model that solves no ODE needs neither (said once)",
        )

    def _new_recorder(self, plan: StepPlan, batch_idx: int) -> StepRecorder:
        terms = plan.terms
        skew = next((r for r in terms if r.needs_skew_probes), None)
        probes = None
        if skew is not None:
            gen = skew.generator(self.global_step, self.device, micro=batch_idx)
            probes = SkewPlan(skew.probes, skew.max_states, gen)
        # Under DDP, a term that reduces over the batch (y_k) and a monitor that reduces
        # per-checkpoint profiles over ranks need the same checkpoint times on every rank: a
        # solve with no explicit checkpoints gets DEFAULT_CHECKPOINTS equal intervals (MATH.md,
        # Under DDP), never each rank's own step states.
        common = Ranks.of(self).distributed and (
            any(r.reduces_over_batch for r in terms) or (bool(plan.monitors) and plan.need.chains)
        )
        norms = tuple(
            r.plan(self.global_step, self.device, batch_idx)
            for r in terms
            if getattr(r, "needs_field_norms", False)
        )
        return StepRecorder(
            field_norms=norms,
            evaluate_fields=_evaluation_mode(terms),
            skew=probes,
            adjoint_inputs=plan.need.adjoints,
            refuse_adjoint=tuple(r.name for r in terms if r.needs_adjoints),
            chains=plan.need.chains,
            common_checkpoints=DEFAULT_CHECKPOINTS if common else None,
        )

    def odeint(
        self, func: Callable[..., Any], y0: Any, t: Tensor, *, adjoint: bool = False, **kwargs: Any
    ) -> Any:
        """Alias of :func:`ode_reg.odeint` (``adjoint=True``: :func:`ode_reg.odeint_adjoint`).

        Args:
            func: vector field ``f(t, z)``.
            y0: initial state, batch first.
            t: output times (increasing or decreasing).
            adjoint: solve with ``odeint_adjoint``.
            **kwargs: the keywords of :func:`ode_reg.odeint` (``adjoint=True``: of
                :func:`ode_reg.odeint_adjoint`), with their defaults: ``rtol``, ``atol``,
                ``method``, ``options``, ``event_fn``, ``checkpoints``, ``components``,
                ``adjoint_*``.

        Returns:
            What torchdiffeq returns.

        Raises:
            ValueError: on bad arguments, or ``adjoint=True`` with a term that needs adjoints.
        """
        return (_odeint_adjoint if adjoint else _odeint)(func, y0, t, **kwargs)

    # ------------------------------------------------------------------ the terms
    def _collective_any(self, flags: Tensor) -> Tensor:
        """The elementwise maximum of ``flags`` over DDP ranks (``trainer.strategy``)."""
        return Ranks.of(self).reduce(flags, "max")

    def _ranks(self) -> Ranks:
        """The ranks the terms reduce over (``trainer.strategy``)."""
        return Ranks.of(self)

    def _log_term(self, name: str, value: Tensor, **kw: Any) -> None:
        self.log(name, value, on_step=True, batch_size=1, **kw)

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

    @override
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Drop the optimizer step (every gradient set to ``None``) when the step's batch, task
        loss or a gradient is not finite; counts it in ``reg/skipped_steps``.

        Args:
            optimizer: the optimizer about to step.
        """
        super().on_before_optimizer_step(optimizer)  # type: ignore[misc]
        drop_marked_step(self, optimizer)

    def _step_record(self, rec: StepRecorder) -> StepRecord:
        """The step's record (``ode_step``), brought up to date with the recorder."""
        record = self.ode_step
        if record is None:
            record = self.ode_step = StepRecord([], [], [], [])
        record.trajectories = [r.traj for r in rec.records]
        record.solves = list(rec.summaries)
        return record

    def _chains_only(self, loss: Any, pending: Sequence[Any], record: StepRecord) -> None:
        """No term on these solves: the chains (for the monitors) by the same rules, without
        adjoints."""
        if isinstance(loss, Tensor) and loss.requires_grad and pending:
            res = step_terms(loss, pending, [], step=self.global_step, params=[])
            record.groups.extend(ctx.trajectory for ctx in res.chains)
            record.adjoints.extend([None] * len(res.chains))
            record.sensitivities.extend([None] * len(res.chains))
            record.left_out.extend(res.left_out)

    def _add_regularization(self, out: Any, rec: StepRecorder, plan: StepPlan) -> Any:
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
        pending = rec.records[self._consumed :]
        self._consumed = len(rec.records)
        if not pending:
            return out
        if not self.automatic_optimization or not isinstance(loss, Tensor) or not plan.terms:
            if rec.chains:
                self._chains_only(loss, pending, record)
            return out
        new_loss = self._regularized(loss, pending, record, rec, plan.terms)
        if isinstance(out, dict):
            return {**out, "loss": new_loss}
        return new_loss

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``manual_backward``, with the step's terms added to ``loss`` first.

        Each call regularizes the solves recorded since the previous call in the same step
        (with two optimizers and two backward passes, each pass gets the terms of its own
        solves), and brings ``ode_step`` up to date first, so that the monitors measure the
        current batch (their hooks in ``on_before_backward`` and ``on_before_optimizer_step``).

        Args:
            loss: the loss to backpropagate.
            *args: passed to Lightning's ``manual_backward``.
            **kwargs: passed to Lightning's ``manual_backward``.
        """
        rec, plan = self._recorder, self._plan_now
        if isinstance(loss, Tensor) and task_side_nonfinite(self, loss, self._step_batch):
            super().manual_backward(zero_loss(self, loss), *args, **kwargs)  # type: ignore[misc]
            return
        if rec is not None and plan is not None and isinstance(loss, Tensor):
            record = self._step_record(rec)
            pending = rec.records[self._consumed :]
            self._consumed = len(rec.records)
            if pending and plan.terms:
                loss = self._regularized(loss, pending, record, rec, plan.terms)
            elif pending and rec.chains:
                self._chains_only(loss, pending, record)
        super().manual_backward(loss, *args, **kwargs)  # type: ignore[misc]

    def _regularized(
        self,
        loss: Tensor,
        records: Sequence[Any],
        record: StepRecord,
        rec: StepRecorder,
        active: Sequence[Regularizer],
    ) -> Tensor:
        """``loss`` plus the weighted due terms on ``records``; logs them, fills ``record``."""
        step = self.global_step
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
            ranks=self._ranks(),
        )
        record.left_out.extend(res.left_out)
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
        capture_torchdiffeq: opt-in recording of third-party ``torchdiffeq.odeint`` calls
            (see :class:`RegularizedODEMixin`).
        **kwargs: passed on to ``LightningModule``.

    Raises:
        ValueError: as :class:`RegularizedODEMixin`.

    Example::

        >>> import torch
        >>> from ode_reg import RegularizedODEModule, SkewJacobianPenalty
        >>> class Flow(RegularizedODEModule):  # self.odeint: the alias of ode_reg.odeint
        ...     def __init__(self):
        ...         super().__init__(regularizers=[SkewJacobianPenalty(weight=0.01)])
        ...         self.f = torch.nn.Linear(2, 2)
        ...     def training_step(self, x, i):
        ...         return self.odeint(lambda t, z: self.f(z), x, torch.linspace(0, 1, 2))[-1].sum()
        >>> [r.name for r in Flow().regularizers]
        ['skew_jacobian']
    """
