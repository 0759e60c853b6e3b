"""Solver statistics monitor: what the ODE solver did in each training step, with an early warning.

Counts come from the solves a :class:`~ode_reg.RegularizedODEModule` records in its training
step (``pl_module.ode_step.solves``, each with its
:class:`~ode_reg.trajectory.SolverStats`): torchdiffeq's own field evaluations, the accepted
and rejected steps and the accepted step sizes. They are read in ``on_train_batch_end``, after
the backward pass, so the field evaluations of ``odeint_adjoint``'s backward solve are known.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from typing_extensions import override

from ode_reg._checks import check_int, check_range
from ode_reg.callbacks._logging import (
    WANDB_MAX_BINS,
    _file_dir,
    has_plot_sink,
    is_due,
    log_figure,
    log_scalars,
    logger_step,
    plot_path,
    reduce_values,
    resolve_every_n,
)
from ode_reg.functional.indices import spread_indices
from ode_reg.plan import Monitor, Need
from ode_reg.plotting import histogram_figure, new_figure, save_figure
from ode_reg.trajectory import DEFAULT_CHECKPOINTS, SolveSummary, median_value

__all__ = ["ON_WARNING", "SolverStatsMonitor", "nfe_figure"]

#: What the monitor does when a warning fires.
ON_WARNING = ("log", "stop")

_INF = float("inf")
#: The keys that also go to ``trainer.callback_metrics`` (all go to the loggers).
_CALLBACK_METRICS = ("solver/nfe", "solver/warning")
#: The epoch keys that also go to ``trainer.callback_metrics``.
_EPOCH_CALLBACK_METRICS = ("solver/epoch_nfe_per_step", "solver/epoch_warnings")
#: How much less often than W&B / TensorBoard histograms the step-size PNG files are drawn
#: by default (``plot_every_n_steps=None``).
PNG_FACTOR = 10
#: Counts summed over ranks; step sizes reduced by min / max.
_COUNTS = ("nfe", "nfe_backward", "accepted", "rejected")


@dataclass
class _Solve:
    """One recorded solve, rank-local."""

    nfe: int
    nfe_backward: int
    accepted: int
    rejected: int
    steps: list[float]
    method: str
    field: str
    #: the smallest step that was not cut short to land on a forced step end (the warning's).
    check_min: float | None
    #: fixed-grid steps of (almost) zero length (:func:`zero_length_steps`).
    zero_steps: int = 0


@dataclass
class _Step:
    """What one optimizer step's solves did (the micro-batches of an accumulation merged)."""

    solves: list[_Solve] = field(default_factory=list)
    adjoint_ratio: float | None = None
    adjoint_chain: int = -1

    def total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.solves)

    @property
    def steps(self) -> list[float]:
        return [d for s in self.solves for d in s.steps]


#: A fixed-grid step shorter than this fraction of the solve's longest step is "zero-length".
ZERO_STEP_FRACTION = 1e-3


def _is_fixed_grid(traj: SolveSummary) -> bool:
    return traj.method in SOLVERS and not issubclass(
        SOLVERS[traj.method], RKAdaptiveStepsizeODESolver
    )


def zero_length_steps(traj: SolveSummary) -> int:
    """How many steps of a fixed-grid solve are of (almost) zero length.

    torchdiffeq builds a fixed grid as ``t0 + i * step_size`` in the times' precision and ends
    it with ``t1``: when ``(t1 - t0) / step_size`` rounds to just above an integer (float32
    times, ``step_size=0.025`` on intervals of 0.1: 22 of 50 intervals of ``linspace(0, 5,
    51)``), the grid gets one more point a hair before ``t1``, and the solver takes a step of
    length 0 (or a few ulps) that costs a full step of field evaluations. Counted as steps
    shorter than :data:`ZERO_STEP_FRACTION` times the solve's longest one; adaptive solvers
    are not counted (their short steps land on requested times).

    Example::

        >>> from types import SimpleNamespace as NS
        >>> zero_length_steps(NS(method="rk4", stats=NS(step_sizes=[0.025] * 4 + [0.0])))
        1
    """
    steps = traj.stats.step_sizes
    if not steps or not _is_fixed_grid(traj):
        return 0
    longest = max(abs(d) for d in steps)
    return sum(abs(d) <= ZERO_STEP_FRACTION * longest for d in steps)


def _check_min(traj: SolveSummary) -> float | None:
    """The smallest accepted step of a solve, leaving out steps the solver was made to cut.

    With explicit checkpoints an adaptive solver must end a step on each checkpoint time
    (torchdiffeq's ``step_t``): a step that would pass one is shortened to land on it, and the
    steps after it regrow from there (at most 10x each). Those short steps say nothing about
    the field, so the warning leaves out every step that ends on an interior checkpoint time
    and the increasing run of steps after it. A solve whose checkpoints are the solver's own
    step states (the default, and every stats-only solve) has no cut steps and keeps all of
    them.
    """
    steps = traj.stats.step_sizes
    if not steps:
        return None
    if _is_fixed_grid(traj):
        # Nothing is cut on a fixed grid; zero-length steps (warned about on their own) would
        # make the running median of the minima 0 and hide every later dt warning.
        longest = max(abs(d) for d in steps)
        regular = [d for d in steps if abs(d) > ZERO_STEP_FRACTION * longest]
        return min(regular or steps)
    if traj.times is None or traj.method not in SOLVERS:
        return min(steps)  # a field that integrates itself: nothing is cut
    times = [float(x) for x in traj.times.detach().cpu().tolist()]
    if len(times) < 3 or len(traj.t) < 2:
        return min(steps)
    t0 = float(traj.t[0])
    span = abs(float(traj.t[-1]) - t0)
    tol = 1e-5 * max(span, 1e-12)
    starts, ends, acc = [], [], 0.0
    for d in steps:
        starts.append(acc)
        acc += d
        ends.append(acc)
    inner = [abs(x - t0) for x in times[1:-1]]
    default = spread_indices(len(steps), DEFAULT_CHECKPOINTS + 1)
    if len(default) == len(times) - 1 and all(
        abs(starts[i] - abs(x - t0)) <= tol for i, x in zip(default, times[:-1])
    ):
        return min(steps)  # the solver's own step states: nothing was forced
    skip = [False] * len(steps)
    j = 0
    for i, e in enumerate(ends):
        if any(abs(e - c) <= tol for c in inner):
            skip[i] = True
            ref = steps[i - 1] if i > 0 else _INF
            j = i + 1
            while j < len(steps) and steps[j] > steps[j - 1] and steps[j] < ref:
                skip[j] = True
                j += 1
    kept = [d for d, s in zip(steps, skip) if not s]
    return min(kept) if kept else min(steps)


def _profile_ratio(adj: Tensor) -> float | None:
    """``max_k p_k / min_k p_k`` with ``p_k = mean_i |a_{k,i}|`` over the checkpoints the loss
    reaches (``p_k > 0``, finite); ``None`` when fewer than two are."""
    a = adj.detach()
    norms = a.norm(dim=-1, keepdim=True) if a.dim() == 2 else a.flatten(2).norm(dim=2)
    p = norms.double().mean(dim=1)
    p = p[torch.isfinite(p) & (p > 0)]
    if p.numel() < 2:
        return None
    return float(p.max() / p.min())


def _g(x: float) -> str:
    return f"{x:.3g}"


def nfe_figure(
    epochs: Sequence[int],
    forward: Sequence[float],
    backward: Sequence[float] | None = None,
    *,
    step: int | None = None,
    methods: Sequence[str] = (),
) -> Figure:
    """Field evaluations per training step against the epoch.

    Args:
        epochs: the epochs (x axis).
        forward: mean forward field evaluations per training step in each epoch.
        backward: the same for ``odeint_adjoint``'s backward solves (drawn when any is > 0).
        step: the training step the figure is drawn at (in the title), or ``None``.
        methods: the solvers used (in the title).

    Returns:
        The figure.

    Raises:
        ValueError: if the sequences differ in length or are empty.

    Example::

        >>> fig = nfe_figure([0, 1, 2], [26.0, 32.0, 44.0], step=30, methods=["dopri5"])
        >>> fig.axes[0].get_xlabel()
        'epoch'
    """
    n = len(epochs)
    if n == 0 or len(forward) != n or (backward is not None and len(backward) != n):
        raise ValueError(
            "`epochs`, `forward` (and `backward`) must be non-empty and of one length, got "
            f"{n}, {len(forward)}" + ("" if backward is None else f", {len(backward)}")
        )
    fig = new_figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    x = [int(e) for e in epochs]
    ax.plot(x, list(forward), marker="o", ms=4, color="C0", label="forward solves")
    if backward is not None and any(b > 0 for b in backward):
        ax.plot(x, list(backward), marker="s", ms=4, color="C1", label="adjoint backward solves")
        total = [f + b for f, b in zip(forward, backward)]
        ax.plot(x, total, ls="--", color="0.4", label="total")
        ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel("field evaluations per training step\n(mean over the epoch, all solves)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    when = f"epochs {x[0]}–{x[-1]}" if n > 1 else f"epoch {x[0]}"
    if step is not None:
        when += f", through training step {step}"
    what = "solver field evaluations (NFE) per training step"
    if methods:
        what += f" ({', '.join(sorted(set(methods)))})"
    ax.set_title(f"{what}\n{when}", fontsize=10)
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.12, top=0.86)
    return fig


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
    (by default 10x less often as PNG files: a figure costs ~0.1 s), and
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
    ``solver/warning`` and prints one line (what, in which solve, on which rank, at which step)
    at the first step of a run of warning steps; ``on_warning="stop"`` then saves a checkpoint
    (``trainer.save_checkpoint``, to ``checkpoint_dir`` or the checkpoint callback's folder)
    and stops the run cleanly (``trainer.should_stop = True``). A field that jumps to failure
    within one step cannot be warned about: the solver raises in that step.

    Args:
        every_n_steps: log the scalars every n training steps (``>= 1``); ``None`` follows
            ``Trainer(log_every_n_steps=...)``.
        plot_every_n_steps: histogram cadence (``>= 1``); ``None`` is ``10 * every_n_steps``
            for W&B and TensorBoard and ``100 * every_n_steps`` for PNG files (one figure
            costs about 0.1 s of matplotlib).
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
            end of training; ``None``: only at the end (one plot costs about 0.2 s).

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
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, 1)
        if plot_every_n_steps is not None:
            check_int("plot_every_n_steps", plot_every_n_steps, 1)
        check_int("per_solve", per_solve, 0)
        if dt_fraction is not None:
            check_range("dt_fraction", dt_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if nfe_factor is not None:
            check_range("nfe_factor", nfe_factor, 1.0, low_open=True)
        if adjoint_orders is not None:
            check_range("adjoint_orders", adjoint_orders, 0.0, low_open=True)
        check_int("adjoint_steps", adjoint_steps, 1)
        check_int("window", window, 3)
        if (
            isinstance(warmup_steps, bool)
            or not isinstance(warmup_steps, int)
            or not 1 <= warmup_steps <= window
        ):
            raise ValueError(
                f"`warmup_steps` must be an integer in [1, window={window}], got {warmup_steps!r}"
            )
        if on_warning not in ON_WARNING:
            raise ValueError(f"`on_warning` must be one of {ON_WARNING}, got {on_warning!r}")
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise ValueError(
                f"`checkpoint_dir` must be a path or None, got {type(checkpoint_dir).__name__}"
            )
        if not isinstance(prog_bar, bool):
            raise ValueError(f"`prog_bar` must be a bool, got {prog_bar!r}")
        if plot_every_n_epochs is not None:
            check_int("plot_every_n_epochs", plot_every_n_epochs, 1)
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= WANDB_MAX_BINS:
            raise ValueError(f"`bins` must be an integer in [1, {WANDB_MAX_BINS}], got {bins!r}")
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
        #: Every warning: ``step``, ``epoch``, ``kinds`` and the printed ``message`` (rank zero's).
        self.warnings: list[dict[str, Any]] = []
        #: The values logged at the last logged step (reduced across ranks).
        self.last_metrics: dict[str, float] = {}
        #: Path of the checkpoint saved by ``on_warning="stop"``.
        self.stop_checkpoint: str | None = None
        self._dt_window: deque[float] = deque(maxlen=window)
        self._nfe_window: deque[float] = deque(maxlen=window)
        self._adj_window: deque[float] = deque(maxlen=adjoint_steps)
        self._pending = _Step()
        self._in_warning = False
        self._methods: set[str] = set()
        self._warned: set[str] = set()
        self._reset_epoch(-1)

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
        """The solver counts (and the chains, for a subclass that sets ``needs_chains``)."""
        return Need(stats=True, chains=bool(self.needs_chains))

    @override
    def need(self, trainer: pl.Trainer) -> Need | None:
        """Every training batch: the epoch sums and the early warnings read every step."""
        return self.needs

    # ------------------------------------------------------------------ collection
    def _reset_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._epoch_sums = {name: 0.0 for name in (*_COUNTS, "steps", "warnings")}
        self._epoch_dt = [_INF, -_INF]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _warn_zero_steps(self, trainer: pl.Trainer, step: _Step) -> None:
        """One warning (per monitor) at the first step whose fixed-grid solves took
        zero-length steps (rank zero's solves; :func:`zero_length_steps`)."""
        hit = [s for s in step.solves if s.zero_steps]
        if not hit or "zero_steps" in self._warned:
            return
        extra = sum(s.zero_steps for s in hit)
        nfe = sum(s.nfe * s.zero_steps / max(len(s.steps), 1) for s in hit)
        methods = ", ".join(sorted({s.method for s in hit}))
        self._warn_once(
            "zero_steps",
            f"SolverStatsMonitor: at step {logger_step(trainer)}, {len(hit)} of "
            f"{len(step.solves)} {methods} solves took a step of length 0 ({extra} steps, "
            f"about {nfe:.0f} of the step's {step.total('nfe')} field evaluations): torchdiffeq "
            "builds the fixed grid as t0 + i * step_size in the times' float precision, and "
            "where (t1 - t0) / step_size rounds to just above an integer it adds a point a hair "
            "before t1. Fix: a grid that ends on t1, e.g. options={'grid_constructor': lambda "
            "f, y0, t: torch.linspace(t[0], t[-1], n + 1)} (README, Monitors). Warned once.",
        )

    def _collect(self, pl_module: pl.LightningModule) -> None:
        record = getattr(pl_module, "ode_step", None)
        if record is None:
            self._warn_once(
                "module",
                "SolverStatsMonitor: the module records no solves (`ode_step`); it needs an "
                "ode_reg.RegularizedODEModule whose training step calls ode_reg.odeint",
            )
            return
        step = self._pending
        for solve in record.solves:
            s = solve.stats
            step.solves.append(
                _Solve(
                    nfe=s.nfe,
                    nfe_backward=s.nfe_backward,
                    accepted=s.accepted,
                    rejected=s.rejected,
                    steps=s.step_sizes,
                    method=solve.method,
                    field=solve.field,
                    check_min=_check_min(solve),
                    zero_steps=zero_length_steps(solve),
                )
            )
            self._methods.add(solve.method)
        for g, adj in enumerate(getattr(record, "adjoints", None) or []):
            if adj is None:
                continue
            ratio = _profile_ratio(adj)
            if ratio is not None and (step.adjoint_ratio is None or ratio > step.adjoint_ratio):
                step.adjoint_ratio, step.adjoint_chain = ratio, g

    # ------------------------------------------------------------------ the checks
    def _check(self, step: _Step) -> dict[str, list[float]]:
        """Rank-local checks of one step against the running medians (then updates them)."""
        fired: dict[str, list[float]] = {}
        checks_on = len(self._nfe_window) >= self.warmup_steps
        mins = [(s.check_min, i) for i, s in enumerate(step.solves) if s.check_min is not None]
        if mins:
            low, where = min(mins)
            if self.dt_fraction is not None and checks_on and len(self._dt_window) > 0:
                med = median_value(self._dt_window)
                if med > 0 and low < self.dt_fraction * med:
                    fired["dt"] = [low / med, low, med, float(where)]
            self._dt_window.append(low)
        if step.solves:
            nfe = float(step.total("nfe") + step.total("nfe_backward"))
            if self.nfe_factor is not None and checks_on:
                med = median_value(self._nfe_window)
                if med > 0 and nfe > self.nfe_factor * med:
                    where = max(
                        range(len(step.solves)),
                        key=lambda i: step.solves[i].nfe + step.solves[i].nfe_backward,
                    )
                    fired["nfe"] = [nfe / med, nfe, med, float(where)]
            self._nfe_window.append(nfe)
        if step.adjoint_ratio is not None:
            orders = math.log10(max(step.adjoint_ratio, 1.0))
            if self.adjoint_orders is not None and checks_on and self._adj_window:
                rise = orders - min(self._adj_window)
                if rise >= self.adjoint_orders:
                    fired["adjoint"] = [
                        rise,
                        step.adjoint_ratio,
                        10 ** min(self._adj_window),
                        float(step.adjoint_chain),
                    ]
            self._adj_window.append(orders)
        return fired

    def _decide(self, trainer: pl.Trainer, fired: dict[str, list[float]]) -> list[dict] | None:
        """The collective decision; when it fires, every rank's findings (one row per rank)."""
        world = trainer.world_size
        if world <= 1:
            return [fired] if fired else None
        if self.dt_fraction is None and self.nfe_factor is None and self.adjoint_orders is None:
            return None  # no check: no collective either (the same on every rank)
        if not trainer.strategy.reduce_boolean_decision(bool(fired), all=False):
            return None
        kinds = ("dt", "nfe", "adjoint")
        row = torch.zeros(world, len(kinds), 5, dtype=torch.float64)
        r = trainer.global_rank
        for j, kind in enumerate(kinds):
            if kind in fired:
                row[r, j, 0] = 1.0
                row[r, j, 1:] = torch.tensor(fired[kind], dtype=torch.float64)
        device = trainer.strategy.root_device
        table = trainer.strategy.reduce(row.to(device), reduce_op="sum").cpu()
        out = []
        for rank in range(world):
            found = {
                kind: table[rank, j, 1:].tolist()
                for j, kind in enumerate(kinds)
                if table[rank, j, 0] > 0
            }
            out.append(found)
        return out

    def _message(
        self, trainer: pl.Trainer, step: int, found: list[dict], solves: list[_Solve]
    ) -> tuple[str, list[str]]:
        parts, kinds = [], []
        world = trainer.world_size

        def where(index: float, rank: int) -> str:
            i = int(index)
            text = f"solve {i}"
            if rank == trainer.global_rank and 0 <= i < len(solves):
                text += f" ({solves[i].method}, field {solves[i].field})"
            return text + (f" on rank {rank}" if world > 1 else "")

        for rank, kinds_here in enumerate(found):
            if "dt" in kinds_here:
                ratio, low, med, i = kinds_here["dt"]
                parts.append(
                    f"smallest step size {_g(low)} is {_g(ratio)}x its running median "
                    f"{_g(med)} (threshold {self.dt_fraction}x) in {where(i, rank)}"
                )
                kinds.append("dt")
            if "nfe" in kinds_here:
                ratio, nfe, med, i = kinds_here["nfe"]
                parts.append(
                    f"{nfe:.0f} field evaluations are {_g(ratio)}x their running median "
                    f"{med:.0f} (threshold {self.nfe_factor}x; most in {where(i, rank)})"
                )
                kinds.append("nfe")
            if "adjoint" in kinds_here:
                rise, ratio, low, g = kinds_here["adjoint"]
                parts.append(
                    f"adjoint ratio max/min {_g(ratio)} rose {rise:.2g} orders of magnitude "
                    f"above {_g(low)} within {self.adjoint_steps} steps (threshold "
                    f"{self.adjoint_orders}) in chain {int(g)}"
                    + (f" on rank {rank}" if world > 1 else "")
                )
                kinds.append("adjoint")
        head = (
            f"ode_reg SolverStatsMonitor: solver warning at training step {step} "
            f"(epoch {trainer.current_epoch}): "
        )
        tails = []
        if {"dt", "nfe"} & set(kinds):
            tails.append("the solver may be about to fail (step-size underflow, too many steps)")
        if "adjoint" in kinds:
            tails.append("gradients through the solve may explode or vanish")
        return head + "; ".join(parts) + "; " + " and ".join(tails), sorted(set(kinds))

    # ------------------------------------------------------------------ reduction
    def _reduce_step(self, trainer: pl.Trainer, step: _Step) -> tuple[dict[str, float], list]:
        """Whole-step figures, equal on every rank (collectives under DDP), and the step sizes
        of all ranks as ``(solve index, |dt|)`` pairs."""
        n = self.per_solve
        vals: dict[str, Tensor] = {}
        ops: dict[str, str] = {}

        def put(key: str, value: float, op: str) -> None:
            vals[key] = torch.tensor(float(value), dtype=torch.float64)
            ops[key] = op

        for name in _COUNTS:
            put(name, step.total(name), "sum")
        sizes = step.steps
        put("dt_min", min(sizes, default=_INF), "min")
        put("dt_max", max(sizes, default=-_INF), "max")
        put("solves", len(step.solves), "max")
        put("_len", len(sizes), "max")
        for i in range(n):
            s = step.solves[i] if i < len(step.solves) else None
            for name in _COUNTS:
                put(f"{i}/{name}", getattr(s, name) if s else 0, "sum")
            put(f"{i}/dt_min", min(s.steps, default=_INF) if s else _INF, "min")
            put(f"{i}/dt_max", max(s.steps, default=-_INF) if s else -_INF, "max")
        out = {k: float(v) for k, v in reduce_values(trainer, vals, ops).items()}
        pairs = [(i, d) for i, s in enumerate(step.solves) for d in s.steps]
        if trainer.world_size > 1:
            length = int(out["_len"])
            local = torch.full((2, max(length, 1)), float("nan"), dtype=torch.float64)
            if pairs:
                local[:, : len(pairs)] = torch.tensor(pairs, dtype=torch.float64).T
            device = trainer.strategy.root_device
            gathered = trainer.strategy.all_gather(local.to(device)).cpu()
            flat = gathered.permute(1, 0, 2).reshape(2, -1)
            keep = torch.isfinite(flat[1])
            pairs = [(int(i), float(d)) for i, d in flat[:, keep].T.tolist()]
        return out, pairs

    def _step_metrics(self, out: dict[str, float], pairs: list) -> dict[str, float]:
        metrics: dict[str, float] = {f"solver/{name}": out[name] for name in _COUNTS}
        metrics["solver/solves"] = out["solves"]
        sizes = [d for _, d in pairs]
        if sizes:
            metrics["solver/dt_min"] = out["dt_min"]
            metrics["solver/dt_median"] = median_value(sizes)
            metrics["solver/dt_max"] = out["dt_max"]
        for i in range(min(self.per_solve, int(out["solves"]))):
            for name in _COUNTS:
                metrics[f"solver/solve{i}/{name}"] = out[f"{i}/{name}"]
            mine = [d for j, d in pairs if j == i]
            if mine:
                metrics[f"solver/solve{i}/dt_min"] = out[f"{i}/dt_min"]
                metrics[f"solver/solve{i}/dt_median"] = median_value(mine)
                metrics[f"solver/solve{i}/dt_max"] = out[f"{i}/dt_max"]
        return metrics

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch != trainer.current_epoch:
            self._reset_epoch(trainer.current_epoch)

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
        if pl_module.automatic_optimization:
            should_accumulate = getattr(trainer.fit_loop, "_should_accumulate", None)
            if should_accumulate is not None and should_accumulate():
                return  # the optimizer step's other micro-batches are still to come
        step, self._pending = self._pending, _Step()
        measured = bool(step.solves)
        if trainer.world_size > 1:  # every rank takes the same branch (collectives below)
            measured = trainer.strategy.reduce_boolean_decision(measured, all=False)
        if not measured:
            # Say it or do it: no ode_reg solve this step (the module says so once): nothing
            # was measured, so no solver/* value is logged and the epoch sums are untouched.
            return
        self._warn_zero_steps(trainer, step)
        sums = self._epoch_sums
        for name in _COUNTS:
            sums[name] += step.total(name)
        sums["steps"] += 1
        sizes = step.steps
        if sizes:
            self._epoch_dt = [min(self._epoch_dt[0], min(sizes)), max(self._epoch_dt[1], *sizes)]
        found = self._decide(trainer, self._check(step))
        every = resolve_every_n(trainer, self.every_n_steps)
        scalars_due = is_due(trainer, every)
        # W&B / TensorBoard histograms cost about a millisecond, a PNG figure about 0.1 s:
        # by default the PNG files are drawn 10x less often (an explicit cadence is for both).
        native_due = is_due(trainer, self.plot_every_n_steps or 10 * every)
        png_due = is_due(trainer, self.plot_every_n_steps or PNG_FACTOR * 10 * every)
        plot_due = native_due or png_due
        now = logger_step(trainer)
        metrics: dict[str, float] = {}
        if found is not None:
            sums["warnings"] += 1
            message, kinds = self._message(trainer, now, found, step.solves)
            self.warnings.append(
                {
                    "step": now,
                    "epoch": int(trainer.current_epoch),
                    "kinds": kinds,
                    "message": message,
                }
            )
            if not self._in_warning and trainer.is_global_zero:
                print(message, file=sys.stderr, flush=True)
        self._in_warning = found is not None
        pairs: list = []
        if scalars_due or plot_due or found is not None:
            out, pairs = self._reduce_step(trainer, step)
            if scalars_due or found is not None:
                metrics = self._step_metrics(out, pairs)
        if metrics:
            metrics["solver/warning"] = 1.0 if found is not None else 0.0
            metrics["solver/warnings"] = float(len(self.warnings))
            self.last_metrics = dict(metrics)
            self._log(trainer, pl_module, metrics)
        if plot_due and pairs and trainer.is_global_zero and has_plot_sink(trainer):
            self._log_step_sizes(trainer, [d for _, d in pairs], now, native_due, png_due)
        if found is not None and self.on_warning == "stop":
            self._stop(trainer, now)

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]
    ) -> None:
        """All keys to the loggers (rank zero, at the logger step); the main ones also to
        ``callback_metrics`` (``pl_module.log`` costs about 0.5 ms a key: the per-solve keys
        and the rest go to the loggers only, as :func:`log_scalars` would send them)."""
        main = {k: metrics[k] for k in _CALLBACK_METRICS if k in metrics}
        log_scalars(trainer, pl_module, main, prog_bar=("solver/nfe",) if self.prog_bar else ())
        if trainer.is_global_zero and trainer.loggers:
            step = logger_step(trainer)
            rest = {k: float(v) for k, v in metrics.items() if k not in main}
            for logger in trainer.loggers:
                logger.log_metrics(rest, step=step)

    def _log_step_sizes(
        self, trainer: pl.Trainer, sizes: list[float], step: int, native: bool, png: bool
    ) -> None:
        """``log10 |dt|`` of the step's accepted steps as a histogram (rank zero): W&B
        (``wandb.Histogram``, at most 512 bins) and TensorBoard when ``native`` is due, a
        labelled PNG under a file logger's folder when ``png`` is."""
        v = torch.tensor(sizes, dtype=torch.float64)
        v = v[torch.isfinite(v) & (v > 0)].log10()
        if v.numel() == 0:
            return
        key, bins = "solver/step_size_log10", min(self.bins, WANDB_MAX_BINS)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                if not native:
                    continue
                import wandb

                hist = wandb.Histogram(v.numpy(), num_bins=bins)
                logger.log_metrics({key: hist}, step=step)  # type: ignore[dict-item]
            elif isinstance(logger, TensorBoardLogger):
                if native:
                    logger.experiment.add_histogram(key, v.numpy(), global_step=step)
            elif png and (log_dir := _file_dir(logger)) is not None:
                fig = histogram_figure(
                    v,
                    bins=bins,
                    title=f"accepted step sizes, training step {step}, all solves",
                    xlabel="log10 |dt| of an accepted step (dt in ODE time units)",
                )
                save_figure(fig, plot_path(log_dir, key, step))

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
        if trainer.is_global_zero:
            print(
                f"ode_reg SolverStatsMonitor: stopping the run at training step {step}; "
                f"checkpoint saved to {path}",
                file=sys.stderr,
                flush=True,
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sums = self._epoch_sums
        steps = int(sums["steps"])
        vals = {name: torch.tensor(sums[name], dtype=torch.float64) for name in _COUNTS}
        vals["dt_min"] = torch.tensor(self._epoch_dt[0], dtype=torch.float64)
        vals["dt_max"] = torch.tensor(self._epoch_dt[1], dtype=torch.float64)
        ops = {**dict.fromkeys(_COUNTS, "sum"), "dt_min": "min", "dt_max": "max"}
        out = {k: float(v) for k, v in reduce_values(trainer, vals, ops).items()}
        if steps == 0:
            return
        entry: dict[str, Any] = {"epoch": int(trainer.current_epoch), "steps": steps}
        for name in _COUNTS:
            entry[f"{name}_per_step"] = out[name] / steps
        entry["dt_min"] = out["dt_min"] if math.isfinite(out["dt_min"]) else None
        entry["dt_max"] = out["dt_max"] if math.isfinite(out["dt_max"]) else None
        entry["warnings"] = int(sums["warnings"])
        if self.history and self.history[-1]["epoch"] == entry["epoch"]:
            self.history[-1] = entry
        else:
            self.history.append(entry)
        epoch_keys = {f"solver/epoch_{n}_per_step": entry[f"{n}_per_step"] for n in _COUNTS}
        for name in ("dt_min", "dt_max"):
            if entry[name] is not None:
                epoch_keys[f"solver/epoch_{name}"] = entry[name]
        epoch_keys["solver/epoch_warnings"] = float(entry["warnings"])
        # Two keys also to callback_metrics (Lightning logs them at the epoch end); all of
        # them to the loggers directly, at the epoch's last step (pl_module.log costs ~1 ms
        # a key).
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
        self._reset_epoch(trainer.current_epoch)
        self._epoch = -1

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
        return {
            "history": [dict(e) for e in self.history],
            "warnings": [dict(w) for w in self.warnings],
            "dt_window": list(self._dt_window),
            "nfe_window": list(self._nfe_window),
            "adj_window": list(self._adj_window),
            "epoch": self._epoch,
            "epoch_sums": dict(self._epoch_sums),
            "epoch_dt": list(self._epoch_dt),
            "methods": sorted(self._methods),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(e) for e in state_dict["history"]]
        self.warnings = [dict(w) for w in state_dict["warnings"]]
        self._dt_window = deque(state_dict["dt_window"], maxlen=self.window)
        self._nfe_window = deque(state_dict["nfe_window"], maxlen=self.window)
        self._adj_window = deque(state_dict["adj_window"], maxlen=self.adjoint_steps)
        self._epoch = int(state_dict["epoch"])
        self._epoch_sums = dict(state_dict["epoch_sums"])
        self._epoch_dt = list(state_dict["epoch_dt"])
        self._methods = set(state_dict.get("methods", ()))
