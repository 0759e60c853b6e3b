"""Solver statistics monitor: what the ODE solver did in each training step, with an early warning.

Counts come from the solves a :class:`~ode_reg.RegularizedODEModule` records in its training
step (``pl_module.ode_step.solves``, each with its
:class:`~ode_reg.trajectory.SolverStats`): torchdiffeq's own field evaluations, the accepted
and rejected steps and the accepted step sizes. They are read in ``on_train_batch_end``, after
the backward pass, so the field evaluations of ``odeint_adjoint``'s backward solve are known.
The heuristics are in :mod:`ode_reg.callbacks._solver_checks` and
:mod:`ode_reg.callbacks._solver_warning`, what is reduced over ranks in
:mod:`ode_reg.callbacks._solver_reduce`, the NFE figure in :mod:`ode_reg.plotting`.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ode_reg._once import SayOnce
from ode_reg.callbacks._logging import (
    accumulating,
    has_plot_sink,
    log_figure,
    log_histogram,
    log_scalars,
    logger_step,
    metric_state,
    resolve_every_n,
    restore_metric_state,
)
from ode_reg.callbacks._solver_checks import (
    COUNTS,
    ON_WARNING,
    StepSolves,
    check_arguments,
    tally,
    zero_length_steps,
    zero_steps_message,
)
from ode_reg.callbacks._solver_reduce import (
    EpochCounts,
    decide,
    epoch_entry,
    reduce_step,
    step_metrics,
)
from ode_reg.callbacks._solver_warning import EarlyWarning
from ode_reg.plan import Monitor, Need, due
from ode_reg.plotting import nfe_figure

__all__ = ["ON_WARNING", "SolverStatsMonitor", "nfe_figure", "zero_length_steps"]

_INF = float("inf")
#: The keys that also go to ``trainer.callback_metrics`` (all go to the loggers).
_CALLBACK_METRICS = ("solver/nfe", "solver/warning")
#: The epoch keys that also go to ``trainer.callback_metrics``.
_EPOCH_CALLBACK_METRICS = ("solver/epoch_nfe_per_step", "solver/epoch_warnings")
#: How much less often than W&B / TensorBoard histograms the step-size PNG files are drawn
#: by default (``plot_every_n_steps=None``).
PNG_FACTOR = 10


class SolverStatsMonitor(Monitor):
    r"""Logs what the solver did in each training step, and warns before it fails.

    For every solve a :class:`~ode_reg.RegularizedODEModule` records in a training step
    (every ``ode_reg.odeint`` / ``ode_reg.odeint_adjoint`` / ``self.odeint`` call; attaching
    this monitor turns the recording on), it reads torchdiffeq's counts in
    ``on_train_batch_end``, after the backward pass. On a step where it is the only thing
    recorded (no active term, no monitor that reads trajectories) each solve is a stats-only
    solve (:func:`ode_reg.trajectory.solve_counted`): torchdiffeq's call on a counting field,
    with no states kept and ``checkpoints`` unused, so the solve is the unmonitored one.

    - ``nfe``: field evaluations of the forward solve (torchdiffeq's own calls; evaluations
      the regularizers make for their terms are not counted);
    - ``nfe_backward``: field evaluations of ``odeint_adjoint``'s backward (adjoint) solve.
      **It is 0 for a solve that backpropagates through the solver's operations**
      (``ode_reg.odeint``): autograd replays the recorded operations and calls no field;
    - ``accepted`` / ``rejected`` steps (fixed grids: every step accepted, none rejected);
    - the smallest, median and largest accepted step size ``|dt|``.

    Logged keys (scalars; under DDP summed over ranks for counts, min / max over ranks for
    step sizes, and the median pooled over all ranks' steps, so every rank logs the same):

    - per step, summed over the step's solves: ``solver/nfe``, ``solver/nfe_backward``,
      ``solver/accepted``, ``solver/rejected``, ``solver/dt_min``, ``solver/dt_median``,
      ``solver/dt_max`` and ``solver/solves`` (solves in the step);
    - per solve, for the first ``per_solve`` solves of the step (in call order):
      ``solver/solve<i>/nfe``, ``.../nfe_backward``, ``.../accepted``, ``.../rejected``,
      ``.../dt_min``, ``.../dt_median``, ``.../dt_max``;
    - ``solver/warning`` (1 at a step where a warning fired, else 0; logged at every warning
      step even off the cadence) and ``solver/warnings`` (warnings so far);
    - per epoch (``on_epoch``): ``solver/epoch_nfe_per_step``,
      ``solver/epoch_nfe_backward_per_step``, ``solver/epoch_accepted_per_step``,
      ``solver/epoch_rejected_per_step`` (means over the epoch's training steps of the
      whole-batch sums), ``solver/epoch_dt_min``, ``solver/epoch_dt_max`` and
      ``solver/epoch_warnings``. The epoch figures count every training step, not only the
      logged ones.

    Plots (rank zero; W&B, TensorBoard, or PNG files under a file logger's ``log_dir``, as the
    other monitors): ``solver/step_size_log10``, a histogram of ``log10 |dt|`` of the step's
    accepted steps (all ranks, at most 512 bins for W&B) every ``plot_every_n_steps``
    (by default 10x less often as PNG files, which cost more: BENCHMARKS.md), and
    ``solver/nfe_per_epoch``, the forward (and adjoint backward) field evaluations per training
    step against the epoch, every ``plot_every_n_epochs`` epochs and at the end of training.
    :attr:`history` keeps the per-epoch figures
    (the ``ode-reg`` summary prints the first and last epoch's).

    Early warning (checked at every training step, on each rank's own solves; the decision is
    collective under DDP, ``trainer.strategy.reduce_boolean_decision``, so all ranks warn and
    stop together):

    - the step's smallest step size falls below ``dt_fraction`` times its running median over
      the last ``window`` steps (steps cut short to land on an explicit checkpoint time, and
      the regrowth after them, are left out of this check; ``solver/dt_min`` is the true
      minimum);
    - the step's field evaluations (forward + backward) rise above ``nfe_factor`` times
      their running median;
    - the adjoint ratio ``max_k mean_i |a_k,i| / min_k mean_i |a_k,i|`` (from
      ``pl_module.ode_step.adjoints``, per chain; only on steps where a regularizer computed
      the adjoints) rises by ``adjoint_orders`` orders of magnitude above its smallest value
      over the last ``adjoint_steps`` steps where it was measured.

    Every key reaches the loggers; ``solver/nfe`` and ``solver/warning`` also reach
    ``trainer.callback_metrics`` (for ``ModelCheckpoint``,
    ``EarlyStopping``, the progress bar), as do ``solver/epoch_nfe_per_step`` and
    ``solver/epoch_warnings``; :attr:`last_metrics` holds all keys of the last logged step and
    :attr:`history` all epoch figures.

    The checks start once ``warmup_steps`` steps are in the window. A warning logs
    ``solver/warning`` and warns one line (``rank_zero_warn``: what, in which solve, on which
    rank, at which step) at the first step of a run of warning steps; ``on_warning="stop"`` then saves a checkpoint
    (``trainer.save_checkpoint``, to ``checkpoint_dir`` or the checkpoint callback's folder)
    and stops the run cleanly (``trainer.should_stop = True``). A field that jumps to failure
    within one step cannot be warned about: the solver raises in that step.

    Args:
        every_n_steps: log the scalars every n training steps (``>= 1``); ``None`` follows
            ``Trainer(log_every_n_steps=...)``.
        plot_every_n_steps: histogram cadence (``>= 1``); ``None`` is ``10 * every_n_steps``
            for W&B and TensorBoard and ``100 * every_n_steps`` for PNG files (a matplotlib
            figure's cost: BENCHMARKS.md).
        per_solve: log per-solve keys for the first this many solves of a step (``>= 0``).
        dt_fraction: step-size threshold, in ``(0, 1)``; ``None`` turns the check off.
        nfe_factor: field-evaluation threshold, in ``(1, inf)``; ``None`` turns it off.
        adjoint_orders: adjoint-ratio rise in orders of magnitude, in ``(0, inf)``; ``None``
            turns it off.
        adjoint_steps: how many earlier measured steps the rise is taken over (``>= 1``).
        window: steps in the running medians (``>= 3``).
        warmup_steps: steps in the window before the checks start, in ``[1, window]``.
        on_warning: ``"log"`` or ``"stop"``.
        checkpoint_dir: where ``"stop"`` saves its checkpoint (default: the
            ``ModelCheckpoint``'s folder, else ``<default_root_dir>/checkpoints``).
        prog_bar: show ``solver/nfe`` in the progress bar.
        bins: bins of the step-size histogram, in ``[1, 512]``.
        plot_every_n_epochs: draw the NFE-per-epoch plot every n epochs (``>= 1``) and at the
            end of training; ``None``: only at the end.

    Raises:
        ValueError: if an argument is out of its range (the message names it and the range).

    Example::

        >>> import lightning as L
        >>> from ode_reg.callbacks import SolverStatsMonitor
        >>> trainer = L.Trainer(callbacks=[SolverStatsMonitor(on_warning="stop")])
    """

    #: Reads solver statistics only: when it is the only monitor and no term is active, the
    #: module records no data dependency between solves and leaves y0 as it is.
    needs_chains = False

    def __init__(
        self,
        every_n_steps: int | None = None,
        plot_every_n_steps: int | None = None,
        *,
        per_solve: int = 4,
        dt_fraction: float | None = 0.1,
        nfe_factor: float | None = 3.0,
        adjoint_orders: float | None = 2.0,
        adjoint_steps: int = 5,
        window: int = 50,
        warmup_steps: int = 10,
        on_warning: str = "log",
        checkpoint_dir: str | os.PathLike[str] | None = None,
        prog_bar: bool = False,
        bins: int = 64,
        plot_every_n_epochs: int | None = 10,
    ) -> None:
        check_arguments(locals())
        self.every_n_steps = every_n_steps
        self.plot_every_n_steps = plot_every_n_steps
        self.per_solve = per_solve
        self.dt_fraction = dt_fraction
        self.nfe_factor = nfe_factor
        self.adjoint_orders = adjoint_orders
        self.adjoint_steps = adjoint_steps
        self.window = window
        self.warmup_steps = warmup_steps
        self.on_warning = on_warning
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.prog_bar = prog_bar
        self.bins = bins
        self.plot_every_n_epochs = plot_every_n_epochs
        self._plotted = 0
        #: Per epoch: ``epoch``, ``steps``, ``nfe_per_step``, ``nfe_backward_per_step``,
        #: ``accepted_per_step``, ``rejected_per_step``, ``dt_min``, ``dt_max``, ``warnings``.
        self.history: list[dict[str, Any]] = []
        #: Every warning: ``step``, ``epoch``, ``kinds`` and the ``message`` (rank zero's).
        self.warnings: list[dict[str, Any]] = []
        #: The values logged at the last logged step (reduced across ranks).
        self.last_metrics: dict[str, float] = {}
        #: Path of the checkpoint saved by ``on_warning="stop"``.
        self.stop_checkpoint: str | None = None
        self._checks = EarlyWarning(
            dt_fraction, nfe_factor, adjoint_orders, adjoint_steps,
            window=window, warmup_steps=warmup_steps,
        )  # fmt: skip
        self._pending = StepSolves()
        self._in_warning = False
        self._methods: set[str] = set()
        self._said = SayOnce()
        self._zero_steps_said = False
        #: The epoch's totals (torchmetrics syncs them over ranks); the steps since the last
        #: flush are added up in plain floats first (:meth:`_flush`), so that a training step
        #: costs no Metric update.
        self._epoch_counts = EpochCounts()
        self._epoch = -1
        self._reset_buffer()

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it at every callback hook call (the profiler's action name), about
        # ten times a training step: built once per (every_n_steps, window).
        args = (self.every_n_steps, self.window)
        cached = self.__dict__.get("_state_key")
        if cached is None or cached[0] != args:
            key = self._generate_state_key(every_n_steps=args[0], window=args[1])
            cached = self._state_key = (args, key)
        return cached[1]

    @property
    def needs(self) -> Need:  # type: ignore[override]
        """The solver counts (and the chains, for a subclass that sets ``needs_chains``);
        built once (the module asks at every training step)."""
        chains = bool(self.needs_chains)
        cached = self.__dict__.get("_needs")
        if cached is None or cached.chains != chains:
            cached = self._needs = Need(stats=True, chains=chains)
        return cached

    @override
    def need(self, trainer: pl.Trainer) -> Need | None:
        """Every training batch: the epoch sums and the early warnings read every step."""
        return self.needs

    # ------------------------------------------------------------------ the epoch totals
    def _reset_buffer(self) -> None:
        self._buf = [0.0] * (len(COUNTS) + 1)  # COUNTS, then the measured steps
        self._buf_dt = [_INF, -_INF]
        self._buf_warnings = 0

    def _flush(self, force: bool = False) -> None:
        """The steps added up since the last flush into the epoch's Metric (``force``: also
        when there are none, so that the Metric counts as updated before ``compute``)."""
        if force or self._buf[-1] or self._buf_warnings:
            self._epoch_counts.update(self._buf, *self._buf_dt, self._buf_warnings)
        self._reset_buffer()

    def _new_epoch(self, epoch: int) -> None:
        self._reset_buffer()
        self._epoch_counts.reset()
        self._epoch = epoch

    # ------------------------------------------------------------------ collection
    def _collect(self, pl_module: pl.LightningModule) -> None:
        record = getattr(pl_module, "ode_step", None)
        if record is None:
            self._said.warn(
                "SolverStatsMonitor: the module records no solves (`ode_step`); it needs an "
                "ode_reg.RegularizedODEModule whose training step calls ode_reg.odeint"
            )
            return
        summaries = record.solves
        self._pending.solves.extend(summaries)
        for s in summaries:
            if s.method not in self._methods:
                self._methods.add(s.method)
        if record.adjoints:
            self._pending.add_adjoints(record.adjoints)

    def _warn_zero_steps(self, trainer: pl.Trainer, step: StepSolves) -> None:
        """One warning (per monitor) at the first step whose fixed-grid solves took
        zero-length steps (rank zero's solves; :func:`zero_length_steps`)."""
        message = zero_steps_message(logger_step(trainer), step.solves)
        if message is not None:
            self._zero_steps_said = True
            rank_zero_warn(message)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch != trainer.current_epoch:
            self._new_epoch(trainer.current_epoch)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._collect(pl_module)
        if accumulating(trainer):
            return  # the optimizer step's other micro-batches are still to come
        step, self._pending = self._pending, StepSolves()
        solves = step.solves
        world = trainer.world_size
        measured = bool(solves)
        if world > 1:  # every rank takes the same branch (collectives below)
            measured = trainer.strategy.reduce_boolean_decision(measured, all=False)
        if not measured:
            # Say it or do it: no ode_reg solve this step (the module says so once): nothing
            # was measured, so no solver/* value is logged and the epoch sums are untouched.
            return
        counts, low, high, mins, zero = tally(step)
        if zero and not self._zero_steps_said:
            self._warn_zero_steps(trainer, step)
        buf, dt = self._buf, self._buf_dt
        for i, c in enumerate(counts):
            buf[i] += c
        buf[4] += 1
        dt[0], dt[1] = min(dt[0], low), max(dt[1], high)
        found = decide(trainer, self._checks.check(step, mins), self._checks.any_check)
        now = logger_step(trainer)
        every = resolve_every_n(trainer, self.every_n_steps)
        hist = self.plot_every_n_steps
        # W&B / TensorBoard histograms are cheap, a PNG figure is not (BENCHMARKS.md):
        # by default the PNG files are drawn 10x less often (an explicit cadence is for both).
        scalars_due = due(now, every)
        native_due = due(now, hist or 10 * every)
        png_due = due(now, hist or PNG_FACTOR * 10 * every)
        if found is None and not (scalars_due or native_due or png_due):
            self._in_warning = False
            return  # the common step: counted, checked, nothing to log
        if found is not None:
            self._buf_warnings += 1
            message, kinds = self._checks.message(
                now, int(trainer.current_epoch), found, solves, trainer.global_rank, world
            )
            self.warnings.append(
                {
                    "step": now,
                    "epoch": int(trainer.current_epoch),
                    "kinds": kinds,
                    "message": message,
                }
            )
            if not self._in_warning:
                rank_zero_warn(message)
        self._in_warning = found is not None
        out, pairs = reduce_step(trainer, step, self.per_solve)
        if scalars_due or found is not None:
            metrics = step_metrics(out, pairs, self.per_solve)
            metrics["solver/warning"] = 1.0 if found is not None else 0.0
            metrics["solver/warnings"] = float(len(self.warnings))
            self.last_metrics = dict(metrics)
            self._log(trainer, pl_module, metrics)
        if (native_due or png_due) and pairs and trainer.is_global_zero and has_plot_sink(trainer):
            self._log_step_sizes(trainer, [d for _, d in pairs], now, native_due, png_due)
        if found is not None and self.on_warning == "stop":
            self._stop(trainer, now)

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]
    ) -> None:
        """All keys to the loggers (rank zero, at the logger step, one ``log_metrics`` call);
        the main ones also to ``callback_metrics``."""
        main = {k: metrics[k] for k in _CALLBACK_METRICS if k in metrics}
        rest = {k: float(v) for k, v in metrics.items() if k not in main}
        prog_bar = ("solver/nfe",) if self.prog_bar else ()
        log_scalars(trainer, pl_module, main, prog_bar=prog_bar, extra=rest)

    def _log_step_sizes(
        self, trainer: pl.Trainer, sizes: list[float], step: int, native: bool, png: bool
    ) -> None:
        """``log10 |dt|`` of the step's accepted steps as a histogram (rank zero,
        :func:`log_histogram`): W&B and TensorBoard when ``native`` is due, a labelled PNG under
        a file logger's folder when ``png`` is."""
        v = torch.tensor(sizes, dtype=torch.float64)
        log_histogram(
            trainer,
            "solver/step_size_log10",
            v[v > 0].log10(),
            step,
            bins=self.bins,
            xlabel="log10 |dt| of an accepted step (dt in ODE time units)",
            title=f"accepted step sizes, training step {step}, all solves",
            native=native,
            files=png,
        )

    def _stop(self, trainer: pl.Trainer, step: int) -> None:
        folder = self.checkpoint_dir
        if folder is None:
            cb = trainer.checkpoint_callback
            folder = getattr(cb, "dirpath", None) if cb is not None else None
        if folder is None:
            folder = os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(os.fspath(folder), f"solver-warning-step={step}.ckpt")
        trainer.save_checkpoint(path)  # every rank calls it (the decision was collective)
        self.stop_checkpoint = path
        trainer.should_stop = True
        rank_zero_info(
            f"ode_reg SolverStatsMonitor: stopping the run at training step {step}; "
            f"checkpoint saved to {path}"
        )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_counts.to(pl_module.device)
        self._flush(force=True)
        # A collective under DDP (torchmetrics syncs the states): every rank, every epoch.
        totals = self._epoch_counts.compute()
        steps = int(totals["steps"])
        if steps == 0:
            self._new_epoch(-1)
            return
        entry, epoch_keys = epoch_entry(totals, int(trainer.current_epoch))
        if self.history and self.history[-1]["epoch"] == entry["epoch"]:
            self.history[-1] = entry
        else:
            self.history.append(entry)
        # Two keys also to callback_metrics (Lightning logs them at the epoch end); all of
        # them to the loggers directly, at the epoch's last step (a pl_module.log call per key
        # per step would cost more than the monitor itself).
        for key in _EPOCH_CALLBACK_METRICS:
            pl_module.log(key, epoch_keys[key], on_step=False, on_epoch=True, batch_size=1)
        if trainer.is_global_zero and trainer.loggers:
            rest = {k: v for k, v in epoch_keys.items() if k not in _EPOCH_CALLBACK_METRICS}
            step = max(logger_step(trainer) - 1, 0)
            for logger in trainer.loggers:
                logger.log_metrics(rest, step=step)
        every = self.plot_every_n_epochs
        if every is not None and (entry["epoch"] + 1) % every == 0:
            self._plot_nfe(trainer)
        self._new_epoch(-1)

    def _plot_nfe(self, trainer: pl.Trainer) -> None:
        h = self.history
        self._plotted = len(h)
        if not h or not trainer.is_global_zero or not has_plot_sink(trainer):
            return
        fig = nfe_figure(
            [e["epoch"] for e in h],
            [e["nfe_per_step"] for e in h],
            [e["nfe_backward_per_step"] for e in h],
            step=logger_step(trainer),
            methods=sorted(self._methods),
        )
        log_figure(trainer, "solver/nfe_per_epoch", fig)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._plotted != len(self.history):  # the last epochs are not drawn yet
            self._plot_nfe(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {
            "history": [dict(e) for e in self.history],
            "warnings": [dict(w) for w in self.warnings],
            **self._checks.state_dict(),
            "epoch": self._epoch,
            "epoch_counts": metric_state(self._epoch_counts),
            "methods": sorted(self._methods),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(e) for e in state_dict["history"]]
        self.warnings = [dict(w) for w in state_dict["warnings"]]
        self._checks.load_state_dict(state_dict)
        self._new_epoch(int(state_dict["epoch"]))
        if "epoch_counts" in state_dict:
            restore_metric_state(self._epoch_counts, state_dict["epoch_counts"])
        self._methods = set(state_dict.get("methods", ()))
