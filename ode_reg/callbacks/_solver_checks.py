"""The heuristics of :class:`~ode_reg.callbacks.SolverStatsMonitor`, apart from Lightning.

What one step's solves did (:class:`StepSolves`), which of their steps the early warning reads
(:func:`check_min`, :func:`zero_length_steps`), the adjoint profile ratio, and the running
medians the warnings compare against (:class:`EarlyWarning`). Plain Python on a handful of
floats per solve: the monitor runs this at every training step, so it stays a few microseconds.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from ode_reg._checks import check_bool, check_choice, check_int, check_range
from ode_reg.callbacks._logging import WANDB_MAX_BINS
from ode_reg.functional.indices import spread_indices
from ode_reg.trajectory import DEFAULT_CHECKPOINTS, SolveSummary

#: A fixed-grid step shorter than this fraction of the solve's longest step is "zero-length".
ZERO_STEP_FRACTION = 1e-3
#: The counts of a solve (summed over solves and ranks).
COUNTS = ("nfe", "nfe_backward", "accepted", "rejected")
#: The kinds of warning, in the order of the rank table.
KINDS = ("dt", "nfe", "adjoint")
_INF = float("inf")
#: What the monitor does when a warning fires.
ON_WARNING = ("log", "stop")


@dataclass
class StepSolves:
    """What one optimizer step's solves did (the micro-batches of an accumulation merged):
    the module's :class:`~ode_reg.trajectory.SolveSummary` of each solve, as recorded (no copy:
    the monitor's per-step work is a list extend), and the largest adjoint profile ratio."""

    solves: list[SolveSummary] = field(default_factory=list)
    adjoint_ratio: float | None = None
    adjoint_chain: int = -1

    def total(self, name: str) -> int:
        return sum(getattr(s.stats, name) for s in self.solves)

    @property
    def steps(self) -> list[float]:
        return [d for s in self.solves for d in s.stats.step_sizes]

    def add_adjoints(self, adjoints: Any) -> None:
        """Keep the largest adjoint profile ratio over the chains (and which chain)."""
        for g, adj in enumerate(adjoints or ()):
            ratio = None if adj is None else profile_ratio(adj)
            if ratio is not None and (self.adjoint_ratio is None or ratio > self.adjoint_ratio):
                self.adjoint_ratio, self.adjoint_chain = ratio, g


@functools.cache
def is_fixed_grid(method: str) -> bool:
    """Whether ``method`` is one of torchdiffeq's fixed-grid solvers."""
    return method in SOLVERS and not issubclass(SOLVERS[method], RKAdaptiveStepsizeODESolver)


def zero_length_steps(traj: SolveSummary) -> int:
    """How many steps of a fixed-grid solve are of (almost) zero length.

    torchdiffeq builds a fixed grid as ``t0 + i * step_size`` in the times' precision and ends
    it with ``t1``: when ``(t1 - t0) / step_size`` rounds to just above an integer (float32
    times, ``step_size=0.025`` on intervals of 0.1: 22 of 50 intervals of ``linspace(0, 5,
    51)``), the grid gets one more point a hair before ``t1``, and the solver takes a step of
    length 0 (or a few ulps) that costs a full step of field evaluations. Counted as steps
    shorter than :data:`ZERO_STEP_FRACTION` times the solve's longest one; adaptive solvers
    are not counted (their short steps land on requested times).

    Args:
        traj: the solve (its ``method`` and ``stats.step_sizes``).

    Returns:
        The number of zero-length steps.

    Example::

        >>> from types import SimpleNamespace as NS
        >>> zero_length_steps(NS(method="rk4", stats=NS(step_sizes=[0.025] * 4 + [0.0])))
        1
    """
    steps = traj.stats.step_sizes
    if not steps or not is_fixed_grid(traj.method):
        return 0
    cut = ZERO_STEP_FRACTION * max(steps)
    return 0 if min(steps) > cut else sum(d <= cut for d in steps)


def zero_steps_message(step: int, solves: list[SolveSummary]) -> str | None:
    """The warning about the zero-length steps of a step's solves (``None``: none)."""
    hit = [(s, n) for s in solves if (n := zero_length_steps(s))]
    if not hit:
        return None
    extra = sum(n for _, n in hit)
    nfe = sum(s.stats.nfe * n / max(len(s.stats.step_sizes), 1) for s, n in hit)
    total = sum(s.stats.nfe for s in solves)
    methods = ", ".join(sorted({s.method for s, _ in hit}))
    return (
        f"SolverStatsMonitor: at step {step}, {len(hit)} of {len(solves)} {methods} solves "
        f"took a step of length 0 ({extra} steps, about {nfe:.0f} of the step's {total} field "
        "evaluations): torchdiffeq builds the fixed grid as t0 + i * step_size in the times' "
        "float precision, and where (t1 - t0) / step_size rounds to just above an integer it "
        "adds a point a hair before t1. Fix: a grid that ends on t1, e.g. "
        "options={'grid_constructor': lambda f, y0, t: torch.linspace(t[0], t[-1], n + 1)} "
        "(README, Monitors). Warned once."
    )


def check_min(traj: SolveSummary) -> float | None:
    """The smallest accepted step of a solve, leaving out steps the solver was made to cut.

    With explicit checkpoints an adaptive solver must end a step on each checkpoint time
    (torchdiffeq's ``step_t``): a step that would pass one is shortened to land on it, and the
    steps after it regrow from there (at most 10x each). Those short steps say nothing about
    the field, so the warning leaves out every step that ends on an interior checkpoint time
    and the increasing run of steps after it. A solve whose checkpoints are the solver's own
    step states (the default, and every stats-only solve) has no cut steps and keeps all of
    them. The step sizes are ``|dt|`` (:class:`~ode_reg.trajectory.SolverStats`).
    """
    steps = traj.stats.step_sizes
    if not steps:
        return None
    low = min(steps)
    if is_fixed_grid(traj.method):
        # Nothing is cut on a fixed grid; zero-length steps (warned about on their own) would
        # make the running median of the minima 0 and hide every later dt warning.
        cut = ZERO_STEP_FRACTION * max(steps)
        if low > cut:
            return low
        return min((d for d in steps if d > cut), default=low)
    if traj.times is None or traj.method not in SOLVERS:
        return low  # a stats-only solve, or a field that integrates itself: nothing is cut
    return _uncut_min(traj, steps)


def _uncut_min(traj: SolveSummary, steps: list[float]) -> float:
    times = [float(x) for x in traj.times.detach().cpu().tolist()]  # type: ignore[union-attr]
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


def profile_ratio(adj: Tensor) -> float | None:
    """``max_k p_k / min_k p_k`` with ``p_k = mean_i |a_{k,i}|`` over the checkpoints the loss
    reaches (``p_k > 0``, finite); ``None`` when fewer than two are."""
    a = adj.detach()
    norms = a.norm(dim=-1, keepdim=True) if a.dim() == 2 else a.flatten(2).norm(dim=2)
    p = norms.double().mean(dim=1)
    p = p[torch.isfinite(p) & (p > 0)]
    if p.numel() < 2:
        return None
    return float(p.max() / p.min())


def tally(step: StepSolves) -> tuple[list[float], float, float, list[tuple[float, int]], bool]:
    """One pass over a step's solves: the counts of :data:`COUNTS`, the smallest and largest
    accepted step, each solve's :func:`check_min` (with its index) and whether a fixed-grid
    solve took a zero-length step (:func:`zero_length_steps`). The common solve costs a
    ``min`` and a ``max`` of its step sizes."""
    counts = [0.0, 0.0, 0.0, 0.0]
    low, high, mins, zero = _INF, -_INF, [], False
    for i, s in enumerate(step.solves):
        st = s.stats
        counts[0] += st.nfe
        counts[1] += st.nfe_backward
        counts[2] += st.accepted
        counts[3] += st.rejected
        sizes = st.step_sizes
        if not sizes:
            continue
        lo, hi = min(sizes), max(sizes)
        low, high = min(low, lo), max(high, hi)
        fixed = is_fixed_grid(s.method)
        if fixed and lo <= ZERO_STEP_FRACTION * hi:
            zero = True
            mins.append((check_min(s), i))  # type: ignore[arg-type]
        elif fixed or s.times is None:
            mins.append((lo, i))
        else:
            mins.append((check_min(s), i))  # type: ignore[arg-type]
    return counts, low, high, mins, zero


def check_arguments(args: dict[str, Any]) -> None:
    """The checks of :class:`~ode_reg.callbacks.SolverStatsMonitor`'s arguments (its ``locals()``).

    Raises:
        ValueError: naming the first argument out of its range, and the range.
    """
    every_n_steps, plot_every_n_steps = args["every_n_steps"], args["plot_every_n_steps"]
    per_solve, dt_fraction, nfe_factor = args["per_solve"], args["dt_fraction"], args["nfe_factor"]
    adjoint_orders, adjoint_steps = args["adjoint_orders"], args["adjoint_steps"]
    window, warmup_steps, on_warning = args["window"], args["warmup_steps"], args["on_warning"]
    checkpoint_dir, prog_bar, bins = args["checkpoint_dir"], args["prog_bar"], args["bins"]
    plot_every_n_epochs = args["plot_every_n_epochs"]
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
    check_choice("on_warning", on_warning, ON_WARNING)
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise ValueError(
            f"`checkpoint_dir` must be a path or None, got {type(checkpoint_dir).__name__}"
        )
    check_bool("prog_bar", prog_bar)
    if plot_every_n_epochs is not None:
        check_int("plot_every_n_epochs", plot_every_n_epochs, 1)
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= WANDB_MAX_BINS:
        raise ValueError(f"`bins` must be an integer in [1, {WANDB_MAX_BINS}], got {bins!r}")
