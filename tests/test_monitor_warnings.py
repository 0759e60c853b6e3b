"""Monitors say what they cannot measure, once; SolverStatsMonitor flags zero-length steps.

Issue 25: ``GradientNormMonitor`` on a plain LightningModule logged no ``adjoint/*`` without a
word (``SpectrumMonitor`` and ``SolverStatsMonitor`` warned), and rk4 on torchdiffeq's float32
grid took extra steps of length 0 (22 of 50 intervals) that showed only as ``dt_min = 0``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdiffeq import odeint as torchdiffeq_odeint

import ode_reg
from ode_reg.callbacks import GradientNormMonitor, OrthogonalityMonitor, SolverStatsMonitor

TIMES = torch.linspace(0.0, 5.0, 51)  # float32: 50 intervals of 0.1
STEP = 0.025  # four rk4 steps an interval, in exact arithmetic


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z))


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=8)


class PlainODE(L.LightningModule):
    """A plain LightningModule calling torchdiffeq (no ``ode_step`` to read)."""

    def __init__(self) -> None:
        super().__init__()
        self.field = Field()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        z = torchdiffeq_odeint(self.field, x, TIMES[:2], method="rk4")
        return z[-1].pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class IntervalRNN(ode_reg.RegularizedODEModule):
    """One rk4 solve per interval of ``TIMES`` (an ODE-RNN's shape), ``options`` given."""

    def __init__(self, options: dict) -> None:
        super().__init__()
        self.field, self.options = Field(), options

    def training_step(self, batch, batch_idx):
        (h,) = batch
        for i in range(len(TIMES) - 1):
            h = ode_reg.odeint(self.field, h, TIMES[i : i + 2], method="rk4", options=self.options)[
                -1
            ]
        return h.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: L.LightningModule, callback: L.Callback, steps: int = 2) -> list[str]:
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, _loader())
    return [str(w.message) for w in caught]


def test_gradient_norm_monitor_on_a_plain_module_says_so_once() -> None:
    monitor = GradientNormMonitor(every_n_steps=1)
    module = PlainODE()
    messages = _fit(module, monitor, steps=3)
    said = [m for m in messages if m.startswith("GradientNormMonitor: PlainODE is not")]
    assert len(said) == 1 and "no adjoint/*" in said[0]
    metrics = module.trainer.callback_metrics
    assert "grad/total_norm" in metrics  # what it can measure, it still logs
    assert not any(k.startswith(("adjoint/", "sensitivity/")) for k in metrics)


def test_orthogonality_monitor_with_nothing_orthogonal_says_so_once() -> None:
    messages = _fit(PlainODE(), OrthogonalityMonitor(every_n_steps=1), steps=3)
    said = [m for m in messages if m.startswith("OrthogonalityMonitor: PlainODE holds no")]
    assert len(said) == 1


def _torchdiffeq_grid_steps(t0: torch.Tensor, t1: torch.Tensor) -> int:
    """Steps of torchdiffeq's fixed grid for one interval, written out by hand (float32)."""
    return int(torch.ceil((t1 - t0) / STEP + 1).item()) - 1


def test_solver_stats_flags_zero_length_steps_of_the_float32_grid_once() -> None:
    steps = [_torchdiffeq_grid_steps(TIMES[i], TIMES[i + 1]) for i in range(50)]
    extra = [n - 4 for n in steps]
    assert set(extra) == {0, 1}
    hit = sum(extra)  # 22 of the 50 intervals on this torch build (the figure)
    monitor = SolverStatsMonitor(every_n_steps=1)
    messages = _fit(IntervalRNN({"step_size": STEP}), monitor, steps=3)
    said = [m for m in messages if "took a step of length 0" in m]
    assert len(said) == 1, messages
    assert f"{hit} of 50 rk4 solves" in said[0] and f"({hit} steps" in said[0]
    assert monitor.last_metrics["solver/nfe"] == 4 * sum(steps)  # 4 rk4 evaluations a step
    assert monitor.last_metrics["solver/dt_min"] < 1e-5 * STEP  # the zero-length step
    # The zero-length steps do not turn the dt early warning off or on.
    assert monitor.warnings == []
    # The README's figures are these counts.
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"{hit} get such a step" in readme
    assert f"{4 * sum(steps)} evaluations instead of {4 * 4 * 50}" in readme


def test_a_grid_that_ends_on_t1_has_no_zero_length_step() -> None:
    """The README's fix: a grid constructor whose last point is t1."""
    grid = {"grid_constructor": lambda f, y0, t: torch.linspace(t[0], t[-1], 5)}
    monitor = SolverStatsMonitor(every_n_steps=1)
    messages = _fit(IntervalRNN(grid), monitor, steps=2)
    assert not [m for m in messages if "took a step of length 0" in m]
    assert monitor.last_metrics["solver/nfe"] == 4 * 4 * 50
    assert monitor.last_metrics["solver/dt_min"] == pytest.approx(STEP, rel=1e-4)


class NoSolve(ode_reg.RegularizedODEModule):
    """A RegularizedODEModule whose step makes no solve (as the copying recipe's RNN cell)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.lin(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_gradient_norm_monitor_says_once_when_a_step_recorded_no_solve() -> None:
    module = NoSolve()
    messages = _fit(module, GradientNormMonitor(every_n_steps=1), steps=3)
    said = [m for m in messages if "made no ode_reg solve" in m]
    assert len(said) == 1  # one line, the module's, naming the monitor and what it still logs
    assert "GradientNormMonitor" in said[0] and "grad/* only" in said[0]
    assert not any(k.startswith("adjoint/") for k in module.trainer.callback_metrics)
