"""The early warning of :class:`~ode_reg.callbacks.SolverStatsMonitor`: three checks of a step
against running medians of the steps before it, and the one-line message when one fires.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

from ode_reg.callbacks._solver_checks import StepSolves, check_min
from ode_reg.trajectory import SolveSummary


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


def _g(x: float) -> str:
    return f"{x:.3g}"
