"""DDP scenarios for ``test_ddp.py`` and ``test_reliability.py``, run in a fresh process.

Usage: ``python tests/_ddp_worker.py OUT_DIR SCENARIO [SCENARIO ...]``.

Each scenario trains the same model twice: with ``strategy="ddp_fork"`` on 2 CPU ranks (gloo),
each rank taking an interleaved half of every global batch, and in one process with the whole
batch. Every rank of every run saves ``OUT_DIR/<scenario>-<mode>-rank<r>.pt`` holding the final
parameters, the per-step values of ``trainer.callback_metrics["reg/*"]`` (synchronized across
ranks by ``sync_dist``), the per-step values the rank itself passed to ``self.log``, the
regularizers' ``skipped`` buffers and a fingerprint of the RNG state at each step. A pytest run
under the ``ddp`` strategy would relaunch pytest itself (ANCHORS.md), and a hang inside a test
process could not be timed out: hence this script, which the tests run with a timeout. Gloo
collectives time out after ``GLOO_TIMEOUT_S`` so that a mismatched collective fails instead of
hanging.
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
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn import functional as F

from ode_reg import (
    AdjointMagnitude,
    DirectionalConstraint,
    JacobianFrobenius,
    KineticEnergy,
    RegularizedODEModule,
    SensitivityMagnitude,
    SkewJacobianPenalty,
    SpectralConstraint,
)
from ode_reg.callbacks import GradientNormMonitor, SolverStatsMonitor, SpectrumMonitor
from ode_reg.terms import ChainContext as StepContext
from ode_reg.trajectory import DEFAULT_CHECKPOINTS

N, BATCH, DIM = 64, 16, 4
GLOO_TIMEOUT_S = 30


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Field(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, 8)
        self.l2 = nn.Linear(8, dim)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.l2(torch.tanh(self.l1(z))))


class CubicField(Field):
    """``Field`` minus ``z^3``: stiffer where ``|z|`` is large (local rate ``-3 z^2``), so a
    batch of large states takes more dopri5 steps than one of small states."""

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return super().forward(t, z) - z.pow(3)


class CaptureLogger(Logger):
    """Keeps every ``log_metrics`` call (the monitors log to the loggers on rank zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class DiagonalField(nn.Module):
    """``f(z) = c * tanh(a * z + b)`` coordinate-wise: a diagonal Jacobian, for which every
    Rademacher probe gives the exact ``|J|_F^2`` (``|J^T v|^2 = sum_j J_jj^2 v_j^2``), so the
    Frobenius term is deterministic and DDP can be compared with one process exactly."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.b = nn.Parameter(torch.linspace(-0.3, 0.3, dim))
        self.c = nn.Parameter(torch.ones(dim))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.c * torch.tanh(self.a * z + self.b)


class FlakyAdjointMagnitude(AdjointMagnitude):
    """``AdjointMagnitude`` whose value is ``inf`` on ``bad_step`` on rank ``bad_rank`` only."""

    def __init__(self, weight: float, bad_step: int, bad_rank: int, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        self.bad_step, self.bad_rank = bad_step, bad_rank
        self.current_step = -1

    def compute(self, ctx: StepContext) -> torch.Tensor:
        value = super().compute(ctx)
        if self.current_step == self.bad_step and rank() == self.bad_rank:
            value = value + float("inf")
        return value


def regularizers(scenario: str, mode: str) -> list:
    if scenario in ("parity", "parity_local"):
        return [
            AdjointMagnitude(1.0),
            SensitivityMagnitude(1.0),
            DirectionalConstraint(gamma=1.0, weight=1.0),
        ]
    if scenario == "stopgrad":
        stop = dict(detach_states=True, detach_adjoints=True)
        return [
            SensitivityMagnitude(1.0, **stop),
            DirectionalConstraint(gamma=1.0, weight=1.0, **stop),
        ]
    if scenario == "spectral":
        return [
            SpectralConstraint(gamma=0.9, weight=0.5),
            SensitivityMagnitude(0.2),
            AdjointMagnitude(0.2),
        ]
    if scenario == "every_n":
        return [
            SensitivityMagnitude(0.2, every_n_steps=2),
            AdjointMagnitude(0.2, every_n_steps=3, warmup_steps=4),
            DirectionalConstraint(gamma=0.9, weight=0.5, every_n_steps=2),
        ]
    if scenario == "skew":
        return [SkewJacobianPenalty(1.0, probes=16)]
    if scenario == "unequal":
        return [
            AdjointMagnitude(0.2),
            SensitivityMagnitude(0.2),
            DirectionalConstraint(gamma=1.0, weight=0.2),
            SkewJacobianPenalty(0.01, probes=2),
        ]
    if scenario == "rnode":
        return [KineticEnergy(0.5), JacobianFrobenius(0.5, every_n_steps=2, warmup_steps=3)]
    if scenario == "nonfinite":
        # In one process the only rank (0) meets the bad value; under DDP only rank 1 does.
        return [
            FlakyAdjointMagnitude(0.2, bad_step=1, bad_rank=0 if mode == "single" else 1),
            SensitivityMagnitude(0.2),
        ]
    if scenario == "loss_nan":  # the task loss is NaN at step 1 on one rank (see DDPModel)
        return [AdjointMagnitude(0.2), SensitivityMagnitude(0.2)]
    if scenario.startswith("step_"):  # one bare training_step, bad on rank 1
        return [FlakyAdjointMagnitude(0.2, bad_step=0, bad_rank=1), SensitivityMagnitude(0.2)]
    raise ValueError(f"unknown scenario {scenario!r}")


class DDPModel(RegularizedODEModule):
    def __init__(self, scenario: str, mode: str) -> None:
        super().__init__(
            regularizers=regularizers(scenario, mode),
            nonfinite="raise" if scenario == "step_raise" else "skip",
        )
        torch.manual_seed(0)
        if scenario == "spectral":
            from ode_reg.dynamics import OrthogonalFlow

            self.field: nn.Module = OrthogonalFlow(DIM, step="exp", step_size=0.25)
        elif scenario == "unequal":
            self.field = CubicField(DIM)
        elif scenario == "rnode":
            self.field = DiagonalField(DIM)
        else:
            self.field = Field(DIM)
        self.head = nn.Linear(DIM, 1)
        self.lr = 0.0 if scenario == "skew" else 0.1
        self.scenario, self.mode = scenario, mode
        # loss_nan: NaN task loss at step 1, on the only rank (single) or on rank 1 (DDP)
        self.nan_rank = (0 if mode == "single" else 1) if scenario == "loss_nan" else None
        self.logged: list[dict[str, float]] = []
        self.rng: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.logged.append({})
        self.rng.append(int(torch.get_rng_state().double().mul(torch.arange(5056.0)).sum()))
        for r in self.regularizers:
            if isinstance(r, FlakyAdjointMagnitude):
                r.current_step = self.global_step
        if self.scenario == "unequal":
            # dopri5 with no explicit checkpoints: under DDP the module gives every rank the
            # common times (DEFAULT_CHECKPOINTS equal intervals); the one-process reference
            # asks for the same times explicitly (MATH.md, Under DDP).
            z = self.odeint(
                self.field,
                x,
                torch.tensor([0.0, 1.0]),
                rtol=1e-6,
                atol=1e-8,
                checkpoints=DEFAULT_CHECKPOINTS if self.mode == "single" else None,
            )
        else:
            z = self.odeint(
                self.field,
                x,
                torch.tensor([0.0, 1.0]),
                method="rk4",
                options={"step_size": 0.25},
                checkpoints=4,
            )
        loss = F.mse_loss(self.head(z[-1]), y)
        self.log("task", loss, sync_dist=True)
        if self.global_step == 1 and rank() == self.nan_rank:
            loss = loss * float("nan")
        return loss

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if self.logged and isinstance(value, (int, float, torch.Tensor)):
            self.logged[-1][name] = float(value)
        super().log(name, value, *args, **kwargs)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N, DIM, generator=g)
        y = torch.randn(N, 1, generator=g)
        if self.scenario == "unequal":
            x[0::2] *= 0.1  # rank 0 (even indices): small, nearly linear, few steps
            x[1::2] *= 3.0  # rank 1 (odd indices): the stiff one
        ds = torch.utils.data.TensorDataset(x, y)
        w, r = self.trainer.world_size, self.trainer.global_rank
        sub = torch.utils.data.Subset(ds, list(range(r, N, w)))  # interleaved: rank r, r + w, ...
        return torch.utils.data.DataLoader(sub, batch_size=BATCH // w, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def exact_skew(field: nn.Module, states: torch.Tensor, span: float) -> float:
    """``T^2 mean_{k,i} |sym(J(z_{k,i}))|_F^2 / d`` by full Jacobians: the expectation of the
    estimate (R_skew's normalisation, MATH.md)."""
    z = states.detach().reshape(-1, states.shape[-1])
    jac = torch.vmap(torch.func.jacrev(lambda v: field(None, v[None])[0]))(z)
    sym = 0.5 * (jac + jac.mT)
    return float(sym.pow(2).sum((-2, -1)).mean()) * span**2 / states.shape[-1]


class Recorder(Callback):
    def __init__(self, out: str, scenario: str, mode: str) -> None:
        self.out, self.scenario, self.mode = out, scenario, mode
        self.synced: list[dict[str, float]] = []
        self.exact: list[float] = []
        self.solves: list[dict[str, Any]] = []
        self.error: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = pl_module.logged[-1]
        self.synced.append(
            {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if k in logged or k.removesuffix("_step") in logged
            }
        )
        if self.scenario == "unequal":
            s = pl_module.ode_step.solves[0].stats
            self.solves.append(
                {
                    "accepted": s.accepted,
                    "nfe": s.nfe,
                    "times": pl_module.ode_step.groups[0].times.tolist(),
                }
            )
        if self.scenario == "skew":
            group = pl_module.ode_step.groups[0]
            self.exact.append(exact_skew(pl_module.field, group.checkpoint_states, group.span))

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.error = f"{type(exception).__name__}: {exception}"
        self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module)

    def save(self, trainer, pl_module) -> None:
        r = trainer.global_rank
        torch.save(
            {
                "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
                "synced": self.synced,
                "logged": pl_module.logged,
                "skipped": {reg.name: int(reg.skipped) for reg in pl_module.regularizers},
                "skipped_steps": int(getattr(pl_module, "_ode_reg_skipped_steps", 0)),
                "rng": pl_module.rng,
                "exact": self.exact,
                "solves": self.solves,
                "captured": [row for lg in trainer.loggers for row in getattr(lg, "rows", [])],
                "steps": trainer.global_step,
                "error": self.error,
                "world_size": trainer.world_size,
            },
            os.path.join(self.out, f"{self.scenario}-{self.mode}-rank{r}.pt"),
        )


def run(out: str, scenario: str, mode: str) -> None:
    if mode == "ddp":
        strategy: Any = DDPStrategy(
            start_method="fork",
            process_group_backend="gloo",
            timeout=timedelta(seconds=GLOO_TIMEOUT_S),
        )
        kw: dict[str, Any] = dict(strategy=strategy, devices=2)
    else:
        kw = dict(devices=1)
    torch.manual_seed(0)
    model = DDPModel(scenario, mode)
    callbacks: list[Callback] = [Recorder(out, scenario, mode)]
    if scenario == "unequal":  # every monitor, at every step
        callbacks = [
            SolverStatsMonitor(every_n_steps=1),
            GradientNormMonitor(every_n_steps=1, compute_sensitivities=True),
            SpectrumMonitor(every_n_steps=1),
            *callbacks,
        ]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2 if scenario == "every_n" else 1,
        logger=CaptureLogger() if scenario == "unequal" else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        **kw,
    )
    if scenario != "parity_local":
        trainer.fit(model)
        return
    # A mutant for the tests' sake: y_k NOT all-reduced across ranks (each rank's own).
    from ode_reg._ranks import Ranks

    saved = Ranks.mean
    Ranks.mean = lambda self, x: x  # type: ignore[method-assign]
    try:
        trainer.fit(model)
    finally:
        Ranks.mean = saved  # type: ignore[method-assign]


def _bare_rank(r: int, out: str, scenario: str, port: int) -> None:
    """One ``training_step`` per rank on a bare gloo process group (no Trainer).

    Lightning's launcher SIGTERMs the other ranks as soon as one raises, so whether every
    rank raised (``nonfinite="raise"``) is observed here, where each rank catches its own.
    """
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=r, world_size=2, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    try:
        model = DDPModel(scenario, "ddp")
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(N, DIM, generator=g), torch.randn(N, 1, generator=g)
        batch = (x[r:BATCH:2], y[r:BATCH:2])
        result: dict[str, Any] = {"rank": r}
        try:
            loss = model.training_step(batch, 0)
            loss.backward()
            result["loss"] = float(loss)
            result["task"] = model.logged[-1]["task"]
        except FloatingPointError as exc:
            result["raised"] = f"{type(exc).__name__}: {exc}"
        result["skipped"] = {reg.name: int(reg.skipped) for reg in model.regularizers}
        dist.barrier()
        torch.save(result, os.path.join(out, f"{scenario}-ddp-rank{r}.pt"))
    finally:
        dist.destroy_process_group()


def run_bare(out: str, scenario: str) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_bare_rank, args=(out, scenario, port), nprocs=2, start_method="fork")


def main() -> None:
    out, scenarios = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    for scenario in scenarios:
        if scenario.startswith("step_"):
            start = time.perf_counter()
            status = "ok"
            try:
                run_bare(out, scenario)
            except Exception:
                status = traceback.format_exc(limit=3)
            with open(os.path.join(out, f"{scenario}-ddp.status"), "w") as f:
                f.write(f"{time.perf_counter() - start:.3f}\n{status}")
            continue
        for mode in ("ddp",) if scenario == "parity_local" else ("single", "ddp"):
            start = time.perf_counter()
            status = "ok"
            try:
                run(out, scenario, mode)
            except Exception:  # recorded; the test decides whether it was expected
                status = traceback.format_exc(limit=3)
            with open(os.path.join(out, f"{scenario}-{mode}.status"), "w") as f:
                f.write(f"{time.perf_counter() - start:.3f}\n{status}")


if __name__ == "__main__":
    main()
