"""Overhead of ``SolverStatsMonitor`` at its default cadence, as a ratio of training-epoch times.

Five kinds of run of the same training epoch, alternated (the order reversed every other round,
so that drifts in machine load and position effects hit all of them alike): no monitor; the
stats-only recording alone (``record``: a do-nothing ``ode_reg.Monitor`` that needs the solver
counts, ``Need(stats=True)``, so each solve is the module's stats-only solve);
``SolverStatsMonitor`` alone (recording included: attaching it turns the recording on); the
three other monitors; the three plus ``SolverStatsMonitor`` (its own cost where the recording is
on anyway). The CPU time spent inside the monitor's own hooks is measured as well, as a share
of the epoch. With ``--per-step`` the kinds ``none`` / ``record`` / ``solver`` are instead
switched step by step inside one run (one Trainer, the callbacks swapped at each batch start),
which on a shared machine is far less noisy than whole epochs in separate Trainers. Default cadence:
scalars every ``log_every_n_steps`` = 50 batches, step-size histograms every 500, the NFE plot
at the epoch end; every run logs to a ``CSVLogger`` in a temporary folder (plots included).
Prints the median epoch times (process CPU time and wall clock) and the ratios side by side.

Usage::

    python benchmarks/solver_stats_overhead.py [--steps 300] [--repeats 3] [--dim 32]
        [--batch 64] [--method rk4|dopri5] [--threads 1] [--per-step]

With ``--digits`` it times one training epoch of the main job (``recipes/digits.yaml``, its
three monitors with and without ``SolverStatsMonitor``, CSV logger, no validation).

With ``--nfe-example`` it measures instead the worked example of the README: the two-moons
recipe's model (``recipes/two_moons.yaml``: antisymmetric flow, hidden 16, horizon 2, lr 0.01,
batch 64) for ``--epochs`` epochs with and without ``SkewJacobianPenalty(weight)``, once with
the recipe's solver (rk4, step 0.1) and once with dopri5 (torchdiffeq's default tolerances),
and prints the forward field evaluations per training step of each epoch, as
``SolverStatsMonitor`` logs them (``solver/epoch_nfe_per_step``).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/solver_stats_overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.monitor_overhead import EpochTimer
from ode_reg import Monitor, Need, RegularizedODEModule
from ode_reg.callbacks import (
    GradientNormMonitor,
    OrthogonalityMonitor,
    SolverStatsMonitor,
    SpectrumMonitor,
)
from ode_reg.dynamics import AntisymmetricODEFunc

KINDS = ("none", "record", "solver", "three", "three+solver")


class RecordOnly(Monitor):
    """A monitor that reads nothing but asks for what ``SolverStatsMonitor`` asks for (the
    solver counts, ``Need(stats=True)``): the module's stats-only recording alone."""

    needs = Need(stats=True)

    def need(self, trainer):
        return self.needs  # every training batch, as SolverStatsMonitor


class Model(RegularizedODEModule):
    def __init__(self, dim: int, method: str) -> None:
        super().__init__()
        self.encoder = nn.utils.parametrizations.orthogonal(nn.Linear(dim, dim))
        self.field = AntisymmetricODEFunc(dim, gamma=0.01)
        self.head = nn.Linear(dim, 1)
        self.method = method

    def training_step(self, batch, batch_idx):
        x, y = batch
        kw = {"options": {"step_size": 0.1}} if self.method == "rk4" else {"rtol": 1e-5}
        zs = self.odeint(
            self.field, self.encoder(x), torch.tensor([0.0, 1.0]), method=self.method, **kw
        )
        return nn.functional.mse_loss(self.head(zs[-1]).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def digits_epoch(kind: str, root: str) -> tuple[float, float, float, float]:
    """One epoch of the main job (``recipes/digits.yaml``: ODE-RNN, 64 Euler solves a step,
    ``AdjointMagnitude`` every 4th step, its three monitors, ``log_every_n_steps=10``)."""
    from ode_reg import AdjointMagnitude
    from ode_reg.data import DigitsDataModule
    from ode_reg.models import SequenceModel

    L.seed_everything(0, verbose=False)
    model = SequenceModel(
        input_dim=1, output_dim=10, task="classification", cell="antisymmetric",
        hidden_dim=128, step=0.2, gamma=0.01, recurrent_std=1.0, solver="euler", lr=0.002,
        cosine_epochs=100, regularizers=[AdjointMagnitude(weight=0.01, every_n_steps=4)],
    )  # fmt: skip
    data = DigitsDataModule(order="pixel", batch_size=32, seed=0, pixel_noise_std=0.4)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[*monitors(kind), timer],
        logger=CSVLogger(root, name=kind.replace("+", "_")),
        log_every_n_steps=10,
        reload_dataloaders_every_n_epochs=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    inside, plots = [0.0], [0.0]
    for cb in trainer.callbacks:
        if isinstance(cb, SolverStatsMonitor):
            for name in ("on_train_batch_end", "on_train_epoch_end"):
                setattr(cb, name, _timed(getattr(cb, name), inside))
            cb._log_step_sizes = _timed(cb._log_step_sizes, plots)
    trainer.fit(model, datamodule=data)
    return timer.wall, timer.cpu, inside[0], plots[0]


def digits(args: argparse.Namespace) -> None:
    kinds = ("three", "three+solver")
    runs: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as root:
        digits_epoch("three+solver", root)  # warm-up
        for _ in range(args.repeats):
            for kind in kinds:
                runs[kind].append(digits_epoch(kind, root))
    med = {k: statistics.median(r[1] for r in runs[k]) for k in kinds}
    pair = statistics.median(a[1] / b[1] for a, b in zip(runs["three+solver"], runs["three"]))
    own = statistics.median(r[2] / r[1] for r in runs["three+solver"])
    hist = statistics.median(r[3] / r[1] for r in runs["three+solver"])
    print(
        f"main job (recipes/digits.yaml), one training epoch, {args.repeats} alternating rounds, "
        f"{torch.get_num_threads()} thread(s):"
    )
    print(
        f"  cpu : three monitors {med['three']:.2f} s, three + SolverStatsMonitor "
        f"{med['three+solver']:.2f} s; ratio {med['three+solver'] / med['three']:.4f} "
        f"(pairwise {pair:.4f})"
    )
    print(
        f"  CPU time inside SolverStatsMonitor's hooks: {own:.3%} of the epoch "
        f"(step-size histogram PNGs {hist:.3%})"
    )


def monitors(kind: str) -> list[Callback]:
    out: list[Callback] = []
    if kind.startswith("three"):
        out += [OrthogonalityMonitor(), SpectrumMonitor(), GradientNormMonitor()]
    if kind.endswith("solver"):
        out.append(SolverStatsMonitor())
    if kind == "record":
        out.append(RecordOnly())
    return out


def make_loader(steps: int, batch: int, dim: int) -> DataLoader:
    """The synthetic regression batches the overhead runs train on (``steps`` of ``batch``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch, dim, generator=g)
    y = x[:, 0] * x[:, 1]
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def per_step(args: argparse.Namespace, loader: DataLoader) -> dict[str, float]:
    """``none`` / ``record`` / ``solver`` switched at every batch in one run: per-step CPU
    times (batch start to the next batch start, so the monitor's batch-end hook is included).
    Prints the figures and returns the monitor's share of a step (``median``/``mean`` of
    solver / none − 1), the number of steps of each kind and the load average."""
    kinds = ("none", "record", "solver")
    extra = {"none": [], "record": [RecordOnly()], "solver": [SolverStatsMonitor()]}
    times: dict[str, list[float]] = {k: [] for k in kinds}

    class Switch(Callback):
        kind: str | None = None
        start = 0.0
        others: list[Callback] | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.process_time()
            if self.kind is not None and batch_idx > 3 * len(kinds):  # after a warm-up
                times[self.kind].append(now - self.start)
            if self.others is None:  # Lightning's own callbacks, if any, stay
                self.others = [c for c in trainer.callbacks if c is not self]
            self.kind = kinds[batch_idx % len(kinds)]
            trainer.callbacks = [self, *extra[self.kind], *self.others]
            self.start = time.process_time()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_epochs=args.repeats,
            callbacks=[Switch()],
            logger=CSVLogger(root, name="per_step"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(Model(args.dim, args.method), loader)
    med = {k: statistics.median(v) for k, v in times.items()}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    print(
        f"per-step switching, {args.repeats} epoch(s) of {args.steps} steps ({args.method}, dim "
        f"{args.dim}, batch {args.batch}, {torch.get_num_threads()} thread(s)), "
        f"{len(times['none'])} steps of each kind; CPU time per step:"
    )
    for k in kinds:
        print(
            f"  {k:6s}: median {1e3 * med[k]:.3f} ms (x{med[k] / med['none']:.4f}), "
            f"mean {1e3 * mean[k]:.3f} ms (x{mean[k] / mean['none']:.4f})"
        )
    print(
        f"  the monitor's own share over the recording: median "
        f"{med['solver'] / med['record'] - 1:+.2%}, mean {mean['solver'] / mean['record'] - 1:+.2%}"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"issue 21 row, SolverStatsMonitor alone, cheapest step: "
        f"{med['solver'] / med['none'] - 1:+.2%} a step (median of per-step CPU times, solver / "
        f"none; mean {mean['solver'] / mean['none'] - 1:+.2%}; load {load:.1f}; target <= 1 %)"
    )
    return {
        "median": med["solver"] / med["none"] - 1,
        "mean": mean["solver"] / mean["none"] - 1,
        "steps": len(times["none"]),
        "load": load,
    }


def epoch_time(
    kind: str, args: argparse.Namespace, loader: DataLoader, root: str
) -> tuple[float, float, float, float]:
    torch.manual_seed(0)
    timer = EpochTimer()
    # The timer last: its epoch-end hook runs after the monitors' epoch-end work.
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[*monitors(kind), timer],
        logger=CSVLogger(root, name=kind.replace("+", "_")),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    inside, plots = [0.0], [0.0]
    for cb in trainer.callbacks:
        if isinstance(cb, SolverStatsMonitor):  # time spent inside its own hooks
            for name in ("on_train_batch_end", "on_train_epoch_end"):
                setattr(cb, name, _timed(getattr(cb, name), inside))
            cb._log_step_sizes = _timed(cb._log_step_sizes, plots)  # the histogram PNG
    trainer.fit(Model(args.dim, args.method), loader)
    return timer.wall, timer.cpu, inside[0], plots[0]


def _timed(hook, total: list[float]):
    def wrapper(*a, **kw):
        start = time.process_time()
        try:
            return hook(*a, **kw)
        finally:
            total[0] += time.process_time() - start

    return wrapper


def nfe_example(args: argparse.Namespace) -> None:
    from ode_reg import SkewJacobianPenalty
    from ode_reg.data import TwoMoonsDataModule
    from ode_reg.models import FlowClassifier

    class Dopri5Classifier(FlowClassifier):
        """The recipe's model with dopri5 (its own steps as checkpoints) instead of rk4."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z0 = self.hparams.init_scale * self.encoder(x)
            zs = self.odeint(self.field, z0, self.span.to(x.dtype), method="dopri5")
            return self.decoder(zs[-1])

    print(
        f"two moons (recipes/two_moons.yaml model), {args.epochs} epochs each; forward NFE per "
        "training step, by epoch (SolverStatsMonitor, solver/epoch_nfe_per_step):"
    )
    curves: list = []
    for solver, cls in (
        ("rk4 step 0.1 (the recipe)", FlowClassifier),
        ("dopri5", Dopri5Classifier),
    ):
        for reg in (None, args.skew_weight):
            L.seed_everything(0, verbose=False)
            regs = [] if reg is None else [SkewJacobianPenalty(weight=reg)]
            model = cls(
                input_dim=2,
                num_classes=2,
                flow="antisymmetric",
                hidden_dim=16,
                horizon=2.0,
                step_size=0.1,
                lr=0.01,
                regularizers=regs,
            )
            data = TwoMoonsDataModule(n_samples=1000, noise=0.1, batch_size=64, seed=0)
            mon = SolverStatsMonitor()
            start = time.perf_counter()
            trainer = L.Trainer(
                max_epochs=args.epochs,
                callbacks=[mon],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="cpu",
                devices=1,
            )
            trainer.fit(model, datamodule=data)
            wall = time.perf_counter() - start
            acc = trainer.validate(model, datamodule=data, verbose=False)[0]["val/acc"]
            nfe = " ".join(f"{e['nfe_per_step']:.0f}" for e in mon.history)
            name = "no regularizer" if reg is None else f"SkewJacobianPenalty({reg})"
            curves.append((f"{solver.split()[0]}, {name}", mon.history))
            print(
                f"  {solver:26s} {name:26s} NFE/step by epoch: {nfe}   "
                f"rejected/step last epoch {mon.history[-1]['rejected_per_step']:.1f}, "
                f"val acc {acc:.3f}, {wall:.0f} s"
            )
    if args.plot:
        from ode_reg.plotting import new_figure, save_figure

        fig = new_figure(6.4, 4.4)
        ax = fig.add_subplot(1, 1, 1)
        for i, (label, hist) in enumerate(curves):
            ax.plot(
                [e["epoch"] for e in hist],
                [e["nfe_per_step"] for e in hist],
                marker="os"[i % 2],
                ls="-" if "no regularizer" in label else "--",
                color=f"C{i // 2}",
                label=label,
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel("forward field evaluations per training step\n(mean over the epoch)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, frameon=False, loc="lower right")
        ax.set_title(
            "two moons: solver field evaluations per training step,\n"
            f"with and without SkewJacobianPenalty ({args.epochs} epochs, seed 0)",
            fontsize=9,
        )
        fig.subplots_adjust(left=0.16, right=0.97, bottom=0.12, top=0.86)
        print(f"  plot: {save_figure(fig, args.plot)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="batches per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind")
    parser.add_argument("--dim", type=int, default=32, help="state dimension")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--method", default="rk4", choices=("rk4", "dopri5"), help="solver")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--nfe-example", action="store_true", help="the README's worked example")
    parser.add_argument("--digits", action="store_true", help="one epoch of the main job instead")
    parser.add_argument(
        "--per-step", action="store_true", help="switch the kinds step by step in one run"
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the worked example")
    parser.add_argument("--skew-weight", type=float, default=0.1, help="its regularizer weight")
    parser.add_argument("--plot", default=None, help="PNG path for the example's NFE curves")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.nfe_example:
        nfe_example(args)
        return
    if args.digits:
        digits(args)
        return

    loader = make_loader(args.steps, args.batch, args.dim)
    if args.per_step:
        per_step(args, loader)
        return
    runs: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as root:
        epoch_time("three+solver", args, loader, root)  # warm-up (imports, font cache)
        for r in range(args.repeats):
            for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                runs[kind].append(epoch_time(kind, args, loader, root))
    print(
        f"epoch of {args.steps} steps ({args.method}, dim {args.dim}, batch {args.batch}, "
        f"{torch.get_num_threads()} thread(s)), {args.repeats} alternating rounds; "
        "median epoch time and ratios:"
    )
    for i, what in ((1, "cpu"), (0, "wall")):
        med = {k: statistics.median(r[i] for r in runs[k]) for k in KINDS}
        pair = {
            (a, b): statistics.median(x[i] / y[i] for x, y in zip(runs[a], runs[b]))
            for a, b in (("solver", "none"), ("three+solver", "three"))
        }
        pair.update(
            {
                (a, b): statistics.median(x[i] / y[i] for x, y in zip(runs[a], runs[b]))
                for a, b in (("record", "none"), ("solver", "record"))
            }
        )
        print(
            f"  {what:4s}: none {med['none']:.3f} s, record {med['record']:.3f} s, "
            f"solver {med['solver']:.3f} s, three {med['three']:.3f} s, "
            f"three+solver {med['three+solver']:.3f} s"
        )
        print(
            f"        record / none {med['record'] / med['none']:.4f} "
            f"(pairwise {pair[('record', 'none')]:.4f})   "
            f"solver / record {med['solver'] / med['record']:.4f} "
            f"(pairwise {pair[('solver', 'record')]:.4f})"
        )
        print(
            f"        solver / none {med['solver'] / med['none']:.4f} "
            f"(pairwise {pair[('solver', 'none')]:.4f})   "
            f"three+solver / three {med['three+solver'] / med['three']:.4f} "
            f"(pairwise {pair[('three+solver', 'three')]:.4f})"
        )
    for kind in ("solver", "three+solver"):
        own = statistics.median(r[2] / r[1] for r in runs[kind])
        hist = statistics.median(r[3] / r[1] for r in runs[kind])
        print(
            f"  CPU time inside SolverStatsMonitor's hooks ({kind}): {own:.2%} of the epoch, "
            f"of which the step-size histogram PNG(s) {hist:.2%}, the rest {own - hist:.2%}"
        )
    from ode_reg.callbacks.solver_stats import nfe_figure
    from ode_reg.plotting import save_figure

    with tempfile.TemporaryDirectory() as root:
        start = time.process_time()
        save_figure(nfe_figure(list(range(30)), [50.0] * 30, step=1), f"{root}/nfe.png")
        plot = time.process_time() - start
    epoch = statistics.median(r[1] for r in runs["none"])
    print(
        f"  one NFE-per-epoch plot (drawn every 10 epochs and at the end, after the timed "
        f"epoch here): {plot:.3f} s CPU, {plot / 10 / epoch:.2%} of this epoch per epoch"
    )
    print("  (CPU time is the robust figure on a shared machine; wall time includes others' load)")


if __name__ == "__main__":
    main()
