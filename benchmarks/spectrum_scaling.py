"""SpectrumMonitor on a large state: dense eigenvalues against the matrix-free Krylov estimate.

A model with a ``d``-dimensional state (default 2304 = 48 x 48), ``f(t, z) = tanh(W z + b)``,
RK4 over [0, 1]. Printed, side by side:

- the training step (median of ``--steps`` Trainer steps, no monitor measuring);
- one ``SpectrumMonitor`` measurement with its defaults (4 samples x 3 checkpoints) by each
  method: ``krylov`` (the default above ``dense_max_dim = 256``: 32-vector Arnoldi basis,
  2 thick restarts, 64 vector-Jacobian products per checkpoint) and, with ``--dense``, the
  dense eigenvalues (``d`` VJPs and an ``O(d^3)`` eigendecomposition per sample);
- the share of an epoch at the default cadence (one measurement every
  ``log_every_n_steps = 50`` steps): ``measurement / (50 x step)``;
- with ``--epoch N``, a real Trainer epoch of ``N`` steps with and without the monitor
  (alternating, medians of ``--repeats``): the measured overhead;
- the estimate's accuracy at one sampled state: abscissa and radius of the Ritz values
  against ``torch.linalg.eigvals`` of the dense Jacobian.

Usage::

    python benchmarks/spectrum_scaling.py [--dim 2304] [--batch 32] [--steps 5] [--dense]
        [--epoch 100] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ode_reg import RegularizedODEModule
from ode_reg.callbacks import SpectrumMonitor
from ode_reg.functional.spectra import jacobian_ritz_values

CADENCE = 50  # Trainer(log_every_n_steps) default: the monitor's default scalar cadence


class Field(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.bias = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return torch.tanh(nn.functional.linear(z, self.weight, self.bias))


class Big(RegularizedODEModule):
    def __init__(self, d: int, step_size: float) -> None:
        super().__init__()
        self.field = Field(d)
        self.readout = nn.Linear(d, 10)
        self.step_size = step_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.odeint(
            self.field,
            x,
            torch.tensor([0.0, 1.0]),
            method="rk4",
            options={"step_size": self.step_size},
        )[-1]
        return nn.functional.mse_loss(self.readout(z), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.epoch_wall = self.epoch_cpu = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)

    def on_train_epoch_start(self, trainer, pl_module):
        self._w0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_wall = time.perf_counter() - self._w0
        self.epoch_cpu = time.process_time() - self._c0


def run(args, steps: int, callbacks: list[Callback]) -> tuple[Big, StepTimer]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * args.batch, args.dim, generator=g)
    y = torch.randn(steps * args.batch, 10, generator=g)
    model = Big(args.dim, args.step_size)
    timer = StepTimer()
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[timer, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=args.batch))
    return model, timer


def timed(fn, repeats: int = 1) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2304, help="state dimension")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--step-size", type=float, default=0.25, help="RK4 step over [0, 1]")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed")
    parser.add_argument("--dense", action="store_true", help="also time the dense method")
    parser.add_argument("--epoch", type=int, default=0, help="steps of a real epoch (0: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="epoch pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    # A monitor that is never due keeps the step recorded (ode_step) without measuring.
    idle = SpectrumMonitor(every_n_steps=10**9)
    model, timer = run(args, args.steps + 1, [idle])
    step = statistics.median(timer.times[1:])  # the first step warms up
    print(
        f"state {args.dim}, batch {args.batch}, RK4 step {args.step_size}; training step "
        f"{step:.3f} s (median of {args.steps}); {torch.get_num_threads()} thread(s)"
    )
    for method in ("krylov", "dense") if args.dense else ("krylov",):
        mon = SpectrumMonitor(method=method)
        mon.measure(model)  # warm-up
        seconds = timed(lambda mon=mon: mon.measure(model), repeats=3 if method == "krylov" else 1)
        share = seconds / (CADENCE * step)
        print(
            f"  SpectrumMonitor(method={method!r}): {seconds:8.3f} s per measurement = "
            f"{seconds / step:7.2f} steps; at the default cadence (every {CADENCE} steps) "
            f"{100 * share:6.2f} % of an epoch"
        )

    # Accuracy at one state: the last checkpoint, sample 0.
    chain = model.ode_step.groups[0]
    z = chain.states[-1].detach()
    field = model.field
    t = chain.times[-1]
    ritz = jacobian_ritz_values(field, t, z, rows=[0])[0]
    t0 = time.perf_counter()
    x = z[:1].clone().requires_grad_(True)
    out = field(t, x)
    rows_j = [torch.autograd.grad(out[0, j], x, retain_graph=True)[0][0] for j in range(args.dim)]
    eig = torch.linalg.eigvals(torch.stack(rows_j).double())
    dense_s = time.perf_counter() - t0
    ta, tr = float(eig.real.max()), float(eig.abs().max())
    ea, er = float(ritz.real.max()), float(ritz.abs().max())
    print(
        f"  accuracy at one state (dense: {dense_s:.1f} s): abscissa {ea:.5f} vs {ta:.5f} "
        f"(error {ea - ta:+.5f}, {100 * (ea - ta) / tr:+.2f} % of the radius), radius "
        f"{er:.5f} vs {tr:.5f} (error {100 * (er - tr) / tr:+.2f} %)"
    )

    if args.epoch > 0:
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for r in range(args.repeats):
            for with_monitor in (False, True) if r % 2 == 0 else (True, False):
                cbs = [SpectrumMonitor()] if with_monitor else []
                _, tm = run(args, args.epoch, cbs)
                runs[with_monitor].append((tm.epoch_wall, tm.epoch_cpu))
        for i, kind in ((0, "wall"), (1, "cpu")):
            without = statistics.median(v[i] for v in runs[False])
            with_ = statistics.median(v[i] for v in runs[True])
            print(
                f"  epoch of {args.epoch} steps, {kind:4s} time: without {without:7.2f} s, "
                f"with SpectrumMonitor() {with_:7.2f} s: ratio {with_ / without:.3f}"
            )


if __name__ == "__main__":
    main()
