"""What :class:`~ode_reg.callbacks.SolverStatsMonitor` reduces over DDP ranks.

A step's figures (:func:`reduce_step`: counts summed, step sizes by min / max, the step sizes
themselves gathered for the pooled medians), the collective early-warning decision with every
rank's findings (:func:`decide`), and the epoch aggregates (:class:`EpochCounts`, a torchmetrics
``Metric`` whose states torchmetrics syncs over the ranks in ``compute``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import Metric

from ode_reg._ranks import gather_padded, gather_rows
from ode_reg.callbacks._logging import reduce_values
from ode_reg.callbacks._solver_checks import COUNTS, KINDS, StepSolves
from ode_reg.trajectory import median_value

_INF = float("inf")


class EpochCounts(Metric):
    """One epoch's totals: the counts of :data:`COUNTS` (``sum`` over ranks), the smallest and
    largest accepted step (``min`` / ``max``), the measured steps and the warnings (the same
    on every rank, the decisions being collective: ``max``).

    Example::

        >>> m = EpochCounts()
        >>> m.update([26.0, 0.0, 4.0, 0.0, 1.0], 0.25, 0.25, 0)
        >>> m.compute()["nfe"]
        26.0
    """

    is_differentiable = False
    full_state_update = False

    counts: Tensor
    steps: Tensor
    dt_min: Tensor
    dt_max: Tensor
    warnings: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.add_state("counts", torch.zeros(len(COUNTS), dtype=f64), dist_reduce_fx="sum")
        self.add_state("steps", torch.tensor(0.0, dtype=f64), dist_reduce_fx="max")
        self.add_state("dt_min", torch.tensor(_INF, dtype=f64), dist_reduce_fx="min")
        self.add_state("dt_max", torch.tensor(-_INF, dtype=f64), dist_reduce_fx="max")
        self.add_state("warnings", torch.tensor(0.0, dtype=f64), dist_reduce_fx="max")

    def update(self, counts: list[float], dt_min: float, dt_max: float, warnings: int) -> None:
        """Add totals (``COUNTS`` then the step count), fold in step-size extremes."""
        dev = self.counts.device
        self.counts += torch.tensor(counts[:-1], dtype=torch.float64, device=dev)
        self.steps += counts[-1]
        self.dt_min = torch.minimum(
            self.dt_min, torch.tensor(dt_min, dtype=torch.float64, device=dev)
        )
        self.dt_max = torch.maximum(
            self.dt_max, torch.tensor(dt_max, dtype=torch.float64, device=dev)
        )
        self.warnings += warnings

    def compute(self) -> dict[str, float]:
        """``{count: total, "steps": n, "dt_min", "dt_max", "warnings"}`` as floats."""
        out = dict(zip(COUNTS, self.counts.tolist()))
        out["steps"] = float(self.steps)
        out.update(
            dt_min=float(self.dt_min), dt_max=float(self.dt_max), warnings=float(self.warnings)
        )
        return out


def reduce_step(
    trainer: pl.Trainer, step: StepSolves, per_solve: int
) -> tuple[dict[str, float], list[tuple[int, float]]]:
    """Whole-step figures, equal on every rank (collectives under DDP), and the step sizes of
    all ranks as ``(solve index, |dt|)`` pairs."""
    vals: dict[str, Tensor] = {}
    ops: dict[str, str] = {}

    def put(key: str, value: float, op: str) -> None:
        vals[key] = torch.tensor(float(value), dtype=torch.float64)
        ops[key] = op

    for name in COUNTS:
        put(name, step.total(name), "sum")
    sizes = step.steps
    put("dt_min", min(sizes, default=_INF), "min")
    put("dt_max", max(sizes, default=-_INF), "max")
    put("solves", len(step.solves), "max")
    put("_len", len(sizes), "max")
    for i in range(per_solve):
        s = step.solves[i].stats if i < len(step.solves) else None
        for name in COUNTS:
            put(f"{i}/{name}", getattr(s, name) if s else 0, "sum")
        put(f"{i}/dt_min", min(s.step_sizes, default=_INF) if s else _INF, "min")
        put(f"{i}/dt_max", max(s.step_sizes, default=-_INF) if s else -_INF, "max")
    out = {k: float(v) for k, v in reduce_values(trainer, vals, ops).items()}
    pairs = [(i, d) for i, s in enumerate(step.solves) for d in s.stats.step_sizes]
    if trainer.world_size > 1:
        pooled = gather_padded(trainer.strategy, pairs, 2, int(out["_len"]))
        pairs = [(int(i), d) for i, d in pooled]
    return out, pairs


def step_metrics(
    out: dict[str, float], pairs: list[tuple[int, float]], per_solve: int
) -> dict[str, float]:
    """The ``solver/*`` keys of a step from :func:`reduce_step`'s figures."""
    metrics: dict[str, float] = {f"solver/{name}": out[name] for name in COUNTS}
    metrics["solver/solves"] = out["solves"]
    sizes = [d for _, d in pairs]
    if sizes:
        metrics["solver/dt_min"] = out["dt_min"]
        metrics["solver/dt_median"] = median_value(sizes)
        metrics["solver/dt_max"] = out["dt_max"]
    for i in range(min(per_solve, int(out["solves"]))):
        for name in COUNTS:
            metrics[f"solver/solve{i}/{name}"] = out[f"{i}/{name}"]
        mine = [d for j, d in pairs if j == i]
        if mine:
            metrics[f"solver/solve{i}/dt_min"] = out[f"{i}/dt_min"]
            metrics[f"solver/solve{i}/dt_median"] = median_value(mine)
            metrics[f"solver/solve{i}/dt_max"] = out[f"{i}/dt_max"]
    return metrics


def decide(
    trainer: pl.Trainer, fired: dict[str, list[float]], any_check: bool
) -> list[dict] | None:
    """The collective decision; when it fires, every rank's findings (one dict per rank)."""
    world = trainer.world_size
    if world <= 1:
        return [fired] if fired else None
    if not any_check:
        return None  # no check: no collective either (the same on every rank)
    if not trainer.strategy.reduce_boolean_decision(bool(fired), all=False):
        return None
    row = torch.zeros(len(KINDS), 5, dtype=torch.float64)
    for j, kind in enumerate(KINDS):
        if kind in fired:
            row[j, 0] = 1.0
            row[j, 1:] = torch.tensor(fired[kind], dtype=torch.float64)
    table = gather_rows(trainer.strategy, row)
    return [
        {kind: table[r, j, 1:].tolist() for j, kind in enumerate(KINDS) if table[r, j, 0] > 0}
        for r in range(world)
    ]


def epoch_entry(totals: dict[str, float], epoch: int) -> tuple[dict[str, Any], dict[str, float]]:
    """The :attr:`~ode_reg.callbacks.SolverStatsMonitor.history` entry of an epoch from its
    :class:`EpochCounts` (``steps > 0``), and its ``solver/epoch_*`` keys."""
    steps = int(totals["steps"])
    entry: dict[str, Any] = {"epoch": epoch, "steps": steps}
    for name in COUNTS:
        entry[f"{name}_per_step"] = totals[name] / steps
    for name in ("dt_min", "dt_max"):
        entry[name] = totals[name] if math.isfinite(totals[name]) else None
    entry["warnings"] = int(totals["warnings"])
    keys = {f"solver/epoch_{n}_per_step": entry[f"{n}_per_step"] for n in COUNTS}
    for name in ("dt_min", "dt_max"):
        if entry[name] is not None:
            keys[f"solver/epoch_{name}"] = entry[name]
    keys["solver/epoch_warnings"] = float(entry["warnings"])
    return entry, keys
