"""The heuristics of :class:`~ode_reg.callbacks.SolverStatsMonitor`, apart from Lightning.

What one step's solves did (:class:`StepSolves`), which of their steps the early warning reads
(:func:`check_min`, :func:`zero_length_steps`), the adjoint profile ratio, and the running
medians the warnings compare against (:class:`EarlyWarning`). Plain Python on a handful of
floats per solve: the monitor runs this at every training step, so it stays a few microseconds.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from ode_reg._checks import check_int, check_range
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


class RunningMedian:
    """The median of the last ``window`` values: a deque in arrival order and the same values
    kept sorted (``bisect``), so that a median is a lookup, not a sort, at every step.

    Example::

        >>> m = RunningMedian(3)
        >>> for v in (5.0, 1.0, 3.0, 4.0):
        ...     m.append(v)
        >>> list(m), m.median()
        ([1.0, 3.0, 4.0], 3.0)
    """

    def __init__(self, window: int, values: Any = ()) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []
        for v in values:
            self.append(v)

    @property
    def maxlen(self) -> int | None:
        return self.values.maxlen

    def append(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self.values[0])]
        self.values.append(value)
        bisect.insort(self._sorted, value)

    def extend(self, values: Any) -> None:
        for v in values:
            self.append(v)

    def median(self) -> float:
        s, n = self._sorted, len(self._sorted)
        if n == 0:
            raise ValueError("median of no values")
        m = n // 2
        return float(s[m]) if n % 2 else 0.5 * (s[m - 1] + s[m])

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Any:
        return iter(self.values)


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


class EarlyWarning:
    """The three checks against running medians (rank-local; the monitor makes them collective).

    Args:
        dt_fraction: step-size threshold (``None``: off).
        nfe_factor: field-evaluation threshold (``None``: off).
        adjoint_orders: adjoint-ratio rise in orders of magnitude (``None``: off).
        adjoint_steps: measured steps the rise is taken over.
        window: steps in the running medians.
        warmup_steps: steps in the window before the checks start.

    Example::

        >>> ew = EarlyWarning(0.1, 3.0, None, 5, window=5, warmup_steps=3)
        >>> ew.any_check
        True
    """

    def __init__(
        self,
        dt_fraction: float | None,
        nfe_factor: float | None,
        adjoint_orders: float | None,
        adjoint_steps: int,
        *,
        window: int,
        warmup_steps: int,
    ) -> None:
        self.dt_fraction = dt_fraction
        self.nfe_factor = nfe_factor
        self.adjoint_orders = adjoint_orders
        self.adjoint_steps = adjoint_steps
        self.warmup_steps = warmup_steps
        self.dt = RunningMedian(window)
        self.nfe = RunningMedian(window)
        self.adj: deque[float] = deque(maxlen=adjoint_steps)

    @property
    def any_check(self) -> bool:
        """Whether any check is on (the same on every rank)."""
        return (self.dt_fraction, self.nfe_factor, self.adjoint_orders) != (None, None, None)

    def check(
        self, step: StepSolves, mins: list[tuple[float, int]] | None = None
    ) -> dict[str, list[float]]:
        """Rank-local checks of one step against the running medians (then updates them):
        per kind that fired, ``[ratio or rise, value, reference, where]``. ``mins``: each
        solve's :func:`check_min` with its index (:func:`tally`; computed when ``None``)."""
        fired: dict[str, list[float]] = {}
        on = len(self.nfe) >= self.warmup_steps
        solves = step.solves
        if mins is None:
            mins = [(m, i) for i, s in enumerate(solves) if (m := check_min(s)) is not None]
        if mins:
            low, where = min(mins)
            if self.dt_fraction is not None and on and len(self.dt):
                med = self.dt.median()
                if med > 0 and low < self.dt_fraction * med:
                    fired["dt"] = [low / med, low, med, float(where)]
            self.dt.append(low)
        if solves:
            each = [s.stats.nfe + s.stats.nfe_backward for s in solves]
            nfe = float(sum(each))
            if self.nfe_factor is not None and on:
                med = self.nfe.median()
                if med > 0 and nfe > self.nfe_factor * med:
                    fired["nfe"] = [nfe / med, nfe, med, float(each.index(max(each)))]
            self.nfe.append(nfe)
        if step.adjoint_ratio is not None:
            orders = math.log10(max(step.adjoint_ratio, 1.0))
            if self.adjoint_orders is not None and on and self.adj:
                low = min(self.adj)
                if orders - low >= self.adjoint_orders:
                    fired["adjoint"] = [
                        orders - low,
                        step.adjoint_ratio,
                        10**low,
                        float(step.adjoint_chain),
                    ]
            self.adj.append(orders)
        return fired

    def message(
        self,
        step: int,
        epoch: int,
        found: list[dict],
        solves: list[SolveSummary],
        rank: int,
        world: int,
    ) -> tuple[str, list[str]]:
        """The one-line warning for the findings of every rank (``found[r]``) and its kinds."""
        parts, kinds = [], []

        def where(index: float, r: int) -> str:
            i = int(index)
            text = f"solve {i}"
            if r == rank and 0 <= i < len(solves):
                text += f" ({solves[i].method}, field {solves[i].field})"
            return text + (f" on rank {r}" if world > 1 else "")

        for r, here in enumerate(found):
            if "dt" in here:
                ratio, low, med, i = here["dt"]
                parts.append(
                    f"smallest step size {_g(low)} is {_g(ratio)}x its running median "
                    f"{_g(med)} (threshold {self.dt_fraction}x) in {where(i, r)}"
                )
                kinds.append("dt")
            if "nfe" in here:
                ratio, nfe, med, i = here["nfe"]
                parts.append(
                    f"{nfe:.0f} field evaluations are {_g(ratio)}x their running median "
                    f"{med:.0f} (threshold {self.nfe_factor}x; most in {where(i, r)})"
                )
                kinds.append("nfe")
            if "adjoint" in here:
                rise, ratio, low, g = here["adjoint"]
                parts.append(
                    f"adjoint ratio max/min {_g(ratio)} rose {rise:.2g} orders of magnitude "
                    f"above {_g(low)} within {self.adjoint_steps} steps (threshold "
                    f"{self.adjoint_orders}) in chain {int(g)}"
                    + (f" on rank {r}" if world > 1 else "")
                )
                kinds.append("adjoint")
        head = (
            f"ode_reg SolverStatsMonitor: solver warning at training step {step} (epoch {epoch}): "
        )
        tails = []
        if {"dt", "nfe"} & set(kinds):
            tails.append("the solver may be about to fail (step-size underflow, too many steps)")
        if "adjoint" in kinds:
            tails.append("gradients through the solve may explode or vanish")
        return head + "; ".join(parts) + "; " + " and ".join(tails), sorted(set(kinds))

    def state_dict(self) -> dict[str, list[float]]:
        return {
            "dt_window": list(self.dt),
            "nfe_window": list(self.nfe),
            "adj_window": list(self.adj),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dt = RunningMedian(self.dt.maxlen or 1, state["dt_window"])
        self.nfe = RunningMedian(self.nfe.maxlen or 1, state["nfe_window"])
        self.adj = deque(state["adj_window"], maxlen=self.adj.maxlen)


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


def _g(x: float) -> str:
    return f"{x:.3g}"
