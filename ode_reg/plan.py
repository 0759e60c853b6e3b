"""What a training step records, for whom and when: one explicit plan per step.

Every consumer of a step's solves (a :class:`~ode_reg.Regularizer`, a :class:`Monitor`)
declares what it needs from the step as a :class:`Need`, and when, through the one cadence
rule :func:`due`. At the start of each training step (and at each ``manual_backward``) the
module builds a :class:`StepPlan` from the consumers that are due; the step records exactly the
union of their needs, and nothing at all when none is due (``ode_reg.odeint`` is then
torchdiffeq's call).

The cadence rule is Lightning's logging convention (``log_every_n_steps``): a consumer with
cadence ``n`` is due on step ``s`` (counted from 0) when ``(s + 1) % n == 0``, i.e. on the
``n``-th, ``2n``-th, ... step. Terms count ``global_step``, monitors Lightning's logger step;
the two are equal with one optimizer and no gradient accumulation. So a monitor whose cadence
is a multiple of a term's is due exactly on steps where that term is due (terms every 4th
step, monitors every 20th: each monitored step is a regularized one), and there it reads the
adjoints the term already computed (``StepRecord.adjoints``) instead of recomputing them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torchdiffeq
from lightning.pytorch.callbacks import Callback

__all__ = ["Monitor", "Need", "StepPlan", "capture_torchdiffeq", "due"]


def due(step: int, every_n: int, offset: int = 0) -> bool:
    """The one cadence rule of terms and monitors: step ``step`` (from 0) is due for a cadence of
    ``every_n`` steps when ``(step + 1 - offset) % every_n == 0`` (Lightning's
    ``log_every_n_steps`` convention); ``every_n <= 0`` is never due.

    Args:
        step: the step counter (``global_step`` for terms, the logger step for monitors).
        every_n: the cadence.
        offset: shift of the grid (``0``: the ``n``-th, ``2n``-th, ... step).

    Returns:
        Whether the step is due.

    Example::

        >>> [s for s in range(12) if due(s, 4)]
        [3, 7, 11]
        >>> [s for s in range(40) if due(s, 4) and due(s, 10)]
        [19, 39]
    """
    return every_n > 0 and (step + 1 - offset) % every_n == 0


@dataclass(frozen=True)
class Need:
    """What a consumer needs recorded from the solves of a step; needs combine with ``|``.

    Attributes:
        stats: the solver's counts and step sizes (``StepRecord.solves``).
        chains: the checkpoint states and the chains (data dependency between solves), with
            grad-requiring inputs so that the backward reaches every checkpoint.
        adjoints: the task-loss adjoints ``a_k``: computed by a term (a monitor reads them in
            ``StepRecord.adjoints`` on steps where a term computed them, or from the backward
            with tensor hooks on the checkpoint states, as ``GradientNormMonitor`` does).
        field_evaluations: the field evaluated at the checkpoints during the solve (a term's
            need; a monitor asking for it is refused: it evaluates the field from the record).
        probes: the skew-Jacobian probes drawn during the solve (a term's need, likewise).
    """

    stats: bool = False
    chains: bool = False
    adjoints: bool = False
    field_evaluations: bool = False
    probes: bool = False

    def __or__(self, other: Need) -> Need:
        # Field by field (``dataclasses.astuple`` deep-copies: this runs at every step).
        if not self:
            return other
        if not other:
            return self
        return Need(
            self.stats or other.stats,
            self.chains or other.chains,
            self.adjoints or other.adjoints,
            self.field_evaluations or other.field_evaluations,
            self.probes or other.probes,
        )

    def __bool__(self) -> bool:
        return bool(
            self.stats or self.chains or self.adjoints or self.field_evaluations or self.probes
        )


@dataclass
class StepPlan:
    """The due consumers of one training step (or one ``manual_backward``) and their union need.

    Attributes:
        step: the global step.
        terms: the due regularizers.
        monitors: the due monitors.
        need: the union of their needs (empty: nothing is recorded).
        batch: Lightning's logger step of the batch (``-1`` without a trainer); it does not
            change within a batch, while ``global_step`` advances at each optimizer step.
    """

    step: int
    terms: list[Any]
    monitors: list[Monitor]
    need: Need
    batch: int = -1

    @property
    def empty(self) -> bool:
        """Nothing is due: the step records nothing."""
        return not self.need

    def consumers(self) -> list[str]:
        """Names of the due consumers (for messages)."""
        return [f"{type(r).__name__}" for r in self.terms] + [
            type(m).__name__ for m in self.monitors
        ]


class Monitor(Callback):
    """Base of every monitor that reads a :class:`~ode_reg.RegularizedODEModule`'s step record.

    The module finds monitors with ``isinstance(callback, Monitor)``: subclasses (of this class
    or of a built-in monitor) and third-party monitors are planned for like the built-in ones.
    A monitor author implements:

    - :attr:`needs` (class attribute): what the monitor reads from a due step, a :class:`Need`
      (default: the chains and their states, ``Need(stats=True, chains=True)``);
    - :meth:`cadences`: its cadences in steps (default ``(every_n_steps,)``, ``None`` meaning
      ``Trainer(log_every_n_steps)``); the monitor is due on a step when any cadence is
      (:func:`due` on Lightning's logger step, and only on the micro-batch that steps the
      optimizer under gradient accumulation). Override :meth:`need` instead for another rule;
    - the Lightning hooks where it reads ``pl_module.ode_step`` (a
      :class:`~ode_reg.StepRecord`: available from the end of the forward, or from each
      ``manual_backward`` under manual optimization, until the end of the batch, when the module
      releases it).

    Example::

        >>> from ode_reg import Need
        >>> class NfeMonitor(Monitor):
        ...     needs = Need(stats=True)
        ...     def __init__(self, every_n_steps=None):
        ...         self.every_n_steps = every_n_steps
        ...     def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ...         if self.need(trainer) is not None:
        ...             pl_module.log("nfe", float(sum(s.nfe for s in pl_module.ode_step.solves)))
        >>> NfeMonitor(every_n_steps=5).needs
        Need(stats=True, chains=False, adjoints=False, field_evaluations=False, probes=False)
    """

    #: What a due step records for this monitor.
    needs: Need = Need(stats=True, chains=True)
    #: Scalar cadence in steps (``None``: ``Trainer(log_every_n_steps)``).
    every_n_steps: int | None = None

    def cadences(self, trainer: pl.Trainer) -> Sequence[int]:
        """The cadences (in steps) on which this monitor reads a step."""
        return (
            int(trainer.log_every_n_steps) if self.every_n_steps is None else self.every_n_steps,
        )

    def need(self, trainer: pl.Trainer) -> Need | None:
        """What the current training batch must record for this monitor (``None``: not due)."""
        from ode_reg.callbacks._logging import is_due

        if any(is_due(trainer, n) for n in self.cadences(trainer)):
            return self.needs
        return None

    @staticmethod
    def terms_due(trainer: pl.Trainer) -> bool:
        """Whether a term of the trainer's module is due on the current training batch: a
        monitor that overrides :meth:`need` with ``return self.needs if self.terms_due(trainer)
        else None`` observes exactly the regularized steps, and reads there the adjoints the
        terms computed (``ode_step.adjoints``)."""
        from ode_reg.callbacks._logging import logger_step

        module = trainer.lightning_module
        plan = getattr(module, "ode_plan", None)
        if isinstance(plan, StepPlan) and plan.batch == logger_step(trainer):
            return bool(plan.terms)  # inside the batch: its plan (global_step may have moved)
        step = int(module.global_step) if module is not None else 0
        return any(r.active(step) for r in getattr(module, "regularizers", ()))


# --------------------------------------------------------------------------- capture
_CAPTURING: ContextVar[bool] = ContextVar("ode_reg_capturing", default=False)
_INSIDE: ContextVar[bool] = ContextVar("ode_reg_inside_capture", default=False)


def _captured(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def call(func: Any = None, y0: Any = None, t: Any = None, **kw: Any) -> Any:
        if _INSIDE.get() or not _CAPTURING.get():
            return original(func, y0, t, **kw)  # ode_reg's own call into torchdiffeq
        from ode_reg import solve

        token = _INSIDE.set(True)
        try:
            return getattr(solve, name)(func, y0, t, **kw)
        finally:
            _INSIDE.reset(token)

    call._ode_reg_capture = True  # type: ignore[attr-defined]
    return call


@contextlib.contextmanager
def capture_torchdiffeq() -> Iterator[None]:
    """Route the calls that other code makes to ``torchdiffeq.odeint`` / ``odeint_adjoint``
    (through the module attribute, as ``torchdiffeq.odeint(...)``) to :func:`ode_reg.odeint` /
    :func:`ode_reg.odeint_adjoint` inside the block, so that a library that calls torchdiffeq
    itself (torchcde-style) is recorded by the training step. The attributes are restored when
    the block ends, also on an exception. A name bound before the block (``from torchdiffeq
    import odeint`` in the library) is not reached: that library must be converted.

    :class:`~ode_reg.RegularizedODEModule` does this for each training step with
    ``capture_torchdiffeq=True``.

    Example::

        >>> import torch, torchdiffeq
        >>> original = torchdiffeq.odeint
        >>> with capture_torchdiffeq():
        ...     out = torchdiffeq.odeint(lambda t, z: -z, torch.ones(2), torch.tensor([0.0, 1.0]))
        >>> torchdiffeq.odeint is original
        True
    """
    saved = {name: getattr(torchdiffeq, name) for name in ("odeint", "odeint_adjoint")}
    patched = any(getattr(f, "_ode_reg_capture", False) for f in saved.values())
    token = _CAPTURING.set(True)
    try:
        if not patched:
            for name, f in saved.items():
                setattr(torchdiffeq, name, _captured(name, f))
        yield
    finally:
        _CAPTURING.reset(token)
        if not patched:
            for name, f in saved.items():
                setattr(torchdiffeq, name, f)
