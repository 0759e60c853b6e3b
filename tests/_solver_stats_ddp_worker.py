"""Models and runs for ``test_solver_stats.py``; as a script, the 2-rank (gloo) runs.

Usage: ``python tests/_solver_stats_ddp_worker.py OUT_DIR SCENARIO [SCENARIO ...]`` runs each
scenario with ``DDPStrategy(start_method="fork")`` on 2 CPU ranks and saves
``OUT_DIR/<scenario>-rank<r>.pt`` from every rank (and ``<scenario>.status``). The test runs it
in a subprocess with a timeout, so a mismatched collective fails instead of hanging; the
one-process runs of the same scenarios are called in the test process (:func:`run`).

Scenarios:

- ``counts``: a training step with three solves (dopri5, rk4 on a fixed grid, and
  ``odeint_adjoint`` with dopri5), each field counted independently by a forward pre-hook
  (split into the forward pass and the backward pass) and by torchdiffeq's step callbacks on
  the field (accepted and rejected steps, accepted ``|dt|``);
- ``stop``: ``dz/dt = z^2`` from ``z_0 = 0.5``; at one step a single sample (on rank 1 under
  DDP) starts at ``0.995``, near the finite-time singularity at ``t = 1 / z_0``: the step size
  collapses on that rank only, and ``on_warning="stop"`` must stop both ranks at that step.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from ode_reg import Monitor, Need, RegularizedODEModule
from ode_reg.callbacks import SolverStatsMonitor

GLOO_TIMEOUT_S = 30
N, BATCH, DIM = 32, 8, 3
STOP_STEP = 5


class CountingField(nn.Module):
    """A small field that counts its own evaluations and torchdiffeq's step callbacks."""

    def __init__(self, dim: int = DIM, scale: float = 1.0) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.scale = scale
        self.calls = 0
        self.accepted = 0
        self.rejected = 0
        self.steps: list[float] = []
        self.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: Any) -> None:
        self.calls += 1

    def reset(self) -> None:
        self.calls = self.accepted = self.rejected = 0
        self.steps = []

    # torchdiffeq's callbacks, called by ode_reg's probe on the user's field
    def callback_accept_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        self.accepted += 1
        self.steps.append(abs(float(dt)))

    def callback_reject_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        self.rejected += 1

    def callback_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        # fixed grids report each (accepted) step here; adaptive solvers call it before
        # every attempt, so it only counts for the fixed-grid field
        if getattr(self, "fixed", False):
            self.accepted += 1
            self.steps.append(abs(float(dt)))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh(self.lin(z))


class ThreeSolves(RegularizedODEModule):
    """dopri5, then rk4 (fixed grid), then odeint_adjoint (dopri5), one after another."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lr = lr
        self.fa = CountingField(scale=2.0)
        self.fb = CountingField()
        self.fb.fixed = True
        self.fc = CountingField(scale=3.0)
        self.head = nn.Linear(DIM, 1)
        self.t = torch.tensor([0.0, 1.0])

    @property
    def fields(self) -> list[CountingField]:
        return [self.fa, self.fb, self.fc]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        za = self.odeint(self.fa, x, self.t, method="dopri5", rtol=1e-6, atol=1e-8)[-1]
        zb = self.odeint(self.fb, za, self.t, method="rk4", options={"step_size": 0.25})[-1]
        zc = self.odeint(self.fc, zb, self.t, method="dopri5", adjoint=True, rtol=1e-6, atol=1e-8)
        return nn.functional.mse_loss(self.head(zc[-1]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Square(nn.Module):
    """``dz/dt = k z^2``: the solution ``z_0 / (1 - k z_0 t)`` blows up at ``t = 1 / (k z_0)``."""

    def __init__(self, k: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("k", torch.tensor(float(k), dtype=torch.float64))
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.k * self.w * z * z


class Blowup(RegularizedODEModule):
    """Solves ``dz/dt = k z^2`` over ``[0, 1]`` with dopri5; ``schedule(step)`` sets ``k``."""

    def __init__(self, schedule: Any = None, regularizers: Any = ()) -> None:
        super().__init__(regularizers=regularizers)
        self.field = Square()
        self.schedule = schedule
        self.steps_started = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        self.steps_started += 1
        if self.schedule is not None:
            self.field.k.fill_(float(self.schedule(self.global_step)))
        t = torch.tensor([0.0, 1.0], dtype=torch.float64)
        z = self.odeint(self.field, x, t, method="dopri5")
        return z[-1].mean() * 1e-3

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def stop_data() -> torch.Tensor:
    """``z_0 = 0.5`` everywhere but one sample of the global batch ``STOP_STEP`` (on rank 1
    of the interleaved split), which starts at 0.995."""
    x = torch.full((2 * N, 2), 0.5, dtype=torch.float64)
    x[BATCH * STOP_STEP + 3] = 0.995
    return x


class Snapshot(Callback):
    """After the monitor: per step, what it logged and what the fields counted themselves."""

    def __init__(self, monitor: SolverStatsMonitor) -> None:
        self.monitor = monitor
        self.rows: list[dict[str, Any]] = []
        self._fwd: list[int] = []
        self.out: str | None = None
        self.result: dict[str, Any] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for f in getattr(pl_module, "fields", []):
            f.reset()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._fwd = [f.calls for f in getattr(pl_module, "fields", [])]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fields = getattr(pl_module, "fields", [])
        self.rows.append(
            {
                "metrics": dict(self.monitor.last_metrics),
                "forward": list(self._fwd),
                "backward": [f.calls - n for f, n in zip(fields, self._fwd)],
                "accepted": [f.accepted for f in fields],
                "rejected": [f.rejected for f in fields],
                "steps": [list(f.steps) for f in fields],
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        # Saved here: a forked rank (ddp_fork) ends inside fit and never returns from it.
        self.result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "rows": self.rows,
            "warnings": self.monitor.warnings,
            "history": self.monitor.history,
            "global_step": trainer.global_step,
            "steps_started": getattr(pl_module, "steps_started", None),
            "stop_checkpoint": self.monitor.stop_checkpoint,
            "should_stop": trainer.should_stop,
        }
        if self.out is not None:
            name = f"{self.name}-rank{trainer.global_rank}.pt"
            torch.save(self.result, os.path.join(self.out, name))


class TrajectoryReader(Monitor):
    """A monitor (a public ``ode_reg.Monitor``) that reads the step's trajectories on every
    step, so every solve is recorded in full instead of the stats-only solve."""

    needs = Need(stats=True, chains=True)

    def need(self, trainer):
        return self.needs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = pl_module.ode_step
        assert len(record.trajectories) == len(record.solves) == 3


def run(scenario: str, out: str, ddp: bool) -> dict[str, Any]:
    """Train one scenario (2 gloo ranks when ``ddp``); returns this rank's results.
    ``counts_full`` is ``counts`` with every solve recorded in full (one more monitor)."""
    torch.manual_seed(0)
    world = 2 if ddp else 1
    extra: list[Callback] = []
    if scenario == "counts_full":
        scenario, extra = "counts", [TrajectoryReader()]
    if scenario == "counts":
        model: RegularizedODEModule = ThreeSolves(lr=0.5)  # large: the fields change fast
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(N, DIM, generator=g), torch.randn(N, 1, generator=g)
        ds = TensorDataset(x, y)
        monitor = SolverStatsMonitor(every_n_steps=1, per_solve=3)
        kw: dict[str, Any] = {"max_steps": 3}
    else:
        model = Blowup()
        ds = TensorDataset(stop_data())
        monitor = SolverStatsMonitor(
            every_n_steps=1, warmup_steps=3, window=10, on_warning="stop", checkpoint_dir=out
        )
        kw = {"max_epochs": 1}
    snap = Snapshot(monitor)
    snap.name = scenario
    if ddp:
        strategy: Any = DDPStrategy(
            start_method="fork",
            process_group_backend="gloo",
            timeout=timedelta(seconds=GLOO_TIMEOUT_S),
        )
        devices = 2
    else:
        strategy, devices = "auto", 1

    class Loader(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            r = trainer.global_rank
            sub = Subset(ds, list(range(r, len(ds), world)))  # interleaved: rank r, r + 2, ...
            return DataLoader(sub, batch_size=BATCH // world, shuffle=False)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[monitor, *extra, snap],
        **kw,
    )
    snap.out = out if ddp else None
    trainer.fit(model, datamodule=Loader())
    return snap.result


def main() -> None:
    out, scenarios = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    for scenario in scenarios:
        start = time.perf_counter()
        status = "ok"
        try:
            run(scenario, out, ddp=True)
        except Exception:  # recorded; the test reports it
            status = traceback.format_exc(limit=5)
        with open(os.path.join(out, f"{scenario}.status"), "w") as f:
            f.write(f"{time.perf_counter() - start:.3f}\n{status}")


if __name__ == "__main__":
    main()
