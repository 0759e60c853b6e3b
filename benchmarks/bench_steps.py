"""The ``steps`` and ``trainer`` sections of ``python -m benchmarks``: a training step with each
regularizer against the plain step, and the headline row and the monitors inside a Trainer."""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks._models import VARIANTS, make_batch, make_model
from benchmarks._timing import alternate

#: The headline row (d, B, K).
HEADLINE = (64, 128, 8)


# --------------------------------------------------------------------------- steps


def _step_fns(d: int, b: int, k: int, variants: list[str]) -> dict[str, Any]:
    batch = make_batch(d, b)
    fns = {}
    for v in variants:
        model = make_model(v, d, k)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt) -> None:
            loss = model.training_step(batch, 0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[v] = step
    return fns


def bench_steps(
    configs: list[tuple[int, int, int]], rounds: int, log, headline_rounds: int | None = None
) -> list[dict]:
    rows = []
    variants = list(VARIANTS)
    for d, b, k in configs:
        t0 = time.perf_counter()
        n = headline_rounds if (d, b, k) == HEADLINE and headline_rounds else rounds
        res = alternate(_step_fns(d, b, k, variants), n, baseline="plain")
        base = res["plain"]
        row = {
            "d": d,
            "B": b,
            "K": k,
            "rounds": n,
            "plain_ms": 1e3 * base["wall"],
            "plain_cpu_ms": 1e3 * base["cpu"],
            "ratio": {v: res[v]["paired"] for v in variants},
            "ratio_of_medians": {v: res[v]["wall"] / base["wall"] for v in variants},
            "cpu_ratio": {v: res[v]["cpu"] / base["cpu"] for v in variants},
            "ms": {v: 1e3 * res[v]["wall"] for v in variants},
        }
        rows.append(row)
        log(
            f"  d={d:3d} B={b:3d} K={k:2d}  plain {row['plain_ms']:7.1f} ms  "
            + "  ".join(f"{v} {row['ratio'][v]:.2f}" for v in variants[1:])
            + f"  ({time.perf_counter() - t0:.0f} s)"
        )
    return rows


# --------------------------------------------------------------------------- trainer


def _quiet_lightning() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _trainer(callbacks: list, root: str, name: str, **kw: Any):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        callbacks=callbacks,
        logger=CSVLogger(root, name=name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        **kw,
    )


def _loader(d: int, b: int, batches: int):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(2)
    x = torch.randn(batches * b, d, generator=g)
    y = torch.randn(batches * b, 10, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=b, shuffle=False)


def bench_trainer_steps(cycles: int, log) -> dict:
    """Per-batch times of the headline configuration inside one ``Trainer.fit``, the variant
    switched batch by batch (each cycle runs every variant once, in a rotated order), so that
    variants are interleaved as finely as outside a Trainer. The ratio of a variant is the
    median over cycles of its batch time over the plain batch time of the same cycle."""
    from lightning.pytorch.callbacks import Callback
    from torch import nn

    d, b, k = HEADLINE
    variants = list(VARIANTS)
    n = len(variants)
    warm = 2  # cycles not timed
    schedule = [variants[(j + c) % n] for c in range(cycles + warm) for j in range(n)]
    lists = [nn.ModuleList(VARIANTS[v]()) for v in variants]

    class Switch(Callback):
        """Installs the batch's regularizers, and times the batch."""

        def __init__(self) -> None:
            self.wall: dict[str, list[float]] = {v: [] for v in variants}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.regularizers = lists[variants.index(schedule[batch_idx])]
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx >= warm * n:
                self.wall[schedule[batch_idx]].append(time.perf_counter() - self._t0)

    model = make_model("plain", d, k)
    timer = Switch()
    with tempfile.TemporaryDirectory() as root:
        _trainer([timer], root, "switch", max_epochs=1).fit(model, _loader(d, b, len(schedule)))
    # times[v][c]: batch time of variant v in cycle c
    med = {v: statistics.median(timer.wall[v]) for v in variants}
    paired = {
        v: statistics.median(w / p for w, p in zip(timer.wall[v], timer.wall["plain"]))
        for v in variants
    }
    out = {
        "d": d,
        "B": b,
        "K": k,
        "cycles": cycles,
        "plain_ms": 1e3 * med["plain"],
        "ratio": paired,
        "ratio_of_medians": {v: med[v] / med["plain"] for v in variants},
        "ms": {v: 1e3 * med[v] for v in variants},
    }
    log(
        f"  Trainer d={d} B={b} K={k}: plain {out['plain_ms']:.1f} ms/batch  "
        + "  ".join(f"{v} {out['ratio'][v]:.2f}" for v in variants[1:])
    )
    return out


def bench_monitors(rounds: int, batches: int, log) -> dict:
    """A Trainer epoch of the headline plain model with the three monitors at their default
    cadence (``log_every_n_steps`` = 50) against one without; both log to a CSVLogger."""
    from lightning.pytorch.callbacks import Callback

    from ode_reg.callbacks import GradientNormMonitor, OrthogonalityMonitor, SpectrumMonitor

    class EpochTimer(Callback):
        """Epoch time, and the part of it outside ``on_train_batch_start``..``_end``."""

        def on_train_epoch_start(self, trainer, pl_module):
            self._t0, self._c0 = time.perf_counter(), time.process_time()
            self.in_batches = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._b0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.in_batches += time.perf_counter() - self._b0

        def on_train_epoch_end(self, trainer, pl_module):
            self.wall = time.perf_counter() - self._t0
            self.cpu = time.process_time() - self._c0
            self.outside = self.wall - self.in_batches

    def timed(callback: Callback, spent: list[float]) -> Callback:
        """Accumulate the wall time spent in the callback's hooks into ``spent[0]``."""
        for name in dir(type(callback)):
            if not name.startswith("on_"):
                continue
            hook = getattr(callback, name)
            if getattr(hook, "__func__", None) is getattr(Callback, name, None):
                continue  # not overridden

            def wrapper(*args, _hook=hook, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _hook(*args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - t0

            setattr(callback, name, wrapper)
        return callback

    d, b, k = HEADLINE
    loader = _loader(d, b, batches)
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    pairs: list[float] = []  # with / without, the two epochs of one round (adjacent in time)
    in_hooks: list[float] = []
    outside: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as root:
        for r in range(rounds + 1):
            for monitors in (False, True) if r % 2 == 0 else (True, False):
                timer = EpochTimer()
                cbs = [timer]
                spent = [0.0]
                if monitors:
                    cbs += [
                        timed(c, spent)
                        for c in (OrthogonalityMonitor(), SpectrumMonitor(), GradientNormMonitor())
                    ]
                model = make_model("plain", d, k)
                _trainer(cbs, root, f"mon{int(monitors)}", max_epochs=1).fit(model, loader)
                if r > 0:
                    runs[monitors].append((timer.wall, timer.cpu))
                    outside[monitors].append(timer.outside)
                    if monitors:
                        in_hooks.append(spent[0])
            if r > 0:
                pairs.append(runs[True][-1][0] / runs[False][-1][0])
    wall = {m: statistics.median(w for w, _ in runs[m]) for m in runs}
    cpu = {m: statistics.median(c for _, c in runs[m]) for m in runs}
    out = {
        "batches": batches,
        "epoch_s_without": wall[False],
        "epoch_s_with": wall[True],
        "ratio": wall[True] / wall[False],
        "pair_ratio": statistics.median(pairs),
        "cpu_ratio": cpu[True] / cpu[False],
        "hooks_s": statistics.median(in_hooks),
        "hooks_ratio": 1.0 + statistics.median(in_hooks) / wall[False],
        "outside_s_without": statistics.median(outside[False]),
        "outside_s_with": statistics.median(outside[True]),
    }
    log(
        f"  monitors: epoch of {batches} batches {wall[False]:.2f} s without, "
        f"{wall[True]:.2f} s with: {out['ratio']:.3f}, median of paired ratios "
        f"{out['pair_ratio']:.3f} (CPU time {out['cpu_ratio']:.3f}); "
        f"{out['hooks_s']:.3f} s in the monitors' hooks: 1 + hooks / epoch = "
        f"{out['hooks_ratio']:.3f}"
    )
    return out
