"""Overhead of the three monitors at their default cadence, as a ratio of training-epoch times.

Runs the same small ODE-RNN-sized training epoch with and without ``OrthogonalityMonitor``,
``SpectrumMonitor`` and ``GradientNormMonitor`` (default cadence: scalars every
``log_every_n_steps`` = 50 batches, plots every 500), alternating the two so that drifts in
machine load hit both, and prints the median epoch times (wall clock and process CPU time)
and their ratios. Both runs log to a
``CSVLogger`` in a temporary folder (plots included), so only the monitors differ.

Usage::

    python benchmarks/monitor_overhead.py [--steps 500] [--repeats 5] [--dim 32] [--batch 64]
        [--threads 0]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ode_reg import RegularizedODEModule
from ode_reg.callbacks import GradientNormMonitor, OrthogonalityMonitor, SpectrumMonitor
from ode_reg.dynamics import AntisymmetricODEFunc


class Model(RegularizedODEModule):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.encoder = nn.utils.parametrizations.orthogonal(nn.Linear(dim, dim))
        self.field = AntisymmetricODEFunc(dim, gamma=0.01)
        self.head = nn.Linear(dim, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        zs = self.odeint(
            self.field,
            self.encoder(x),
            torch.tensor([0.0, 1.0]),
            method="rk4",
            options={"step_size": 0.1},
        )
        return nn.functional.mse_loss(self.head(zs[-1]).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class EpochTimer(Callback):
    """Wall-clock and process CPU time of the training epoch."""

    def __init__(self) -> None:
        self.wall = self.cpu = float("nan")

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module):
        self.wall = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._c0


def epoch_time(
    monitors: bool, args: argparse.Namespace, loader: DataLoader, root: str
) -> tuple[float, float]:
    torch.manual_seed(0)
    timer = EpochTimer()
    callbacks = [timer]
    if monitors:
        callbacks += [OrthogonalityMonitor(), SpectrumMonitor(), GradientNormMonitor()]
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=callbacks,
        logger=CSVLogger(root, name="with" if monitors else "without"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Model(args.dim), loader)
    return timer.wall, timer.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="batches per epoch")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each kind")
    parser.add_argument("--dim", type=int, default=32, help="state dimension")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.steps * args.batch, args.dim, generator=g)
    y = x[:, 0] * x[:, 1]
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=False)
    with tempfile.TemporaryDirectory() as root:
        epoch_time(True, args, loader, root)  # warm-up (imports, matplotlib font cache)
        runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(args.repeats):
            for monitors in (False, True):
                runs[monitors].append(epoch_time(monitors, args, loader, root))
    print(
        f"epoch of {args.steps} steps (dim {args.dim}, batch {args.batch}), "
        f"{args.repeats} alternating pairs:"
    )
    for i, kind in ((0, "wall"), (1, "cpu")):
        without = [r[i] for r in runs[False]]
        with_ = [r[i] for r in runs[True]]
        pairs = [w / o for w, o in zip(with_, without)]
        print(
            f"  {kind:4s} time: without {statistics.median(without):7.3f} s, "
            f"with {statistics.median(with_):7.3f} s; ratio of medians "
            f"{statistics.median(with_) / statistics.median(without):.3f}, "
            f"median pairwise ratio {statistics.median(pairs):.3f}"
        )
    print("  (CPU time is the robust figure on a shared machine; wall time includes others' load)")


if __name__ == "__main__":
    main()
