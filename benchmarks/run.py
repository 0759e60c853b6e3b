"""ode_reg benchmarks: the cost of the regularizers, monitors and checkpointed integration.

One run measures, side by side (variants alternated round by round, warm-up first, medians
of wall-clock times; process CPU times are in the JSON):

1. ``steps``: a training step (forward, the terms, backward, optimizer step; outside a
   Trainer) with each regularizer and with all of them, against the plain step, over
   d x B x K = {32, 64, 256} x {32, 128} x {4, 8, 32};
2. ``trainer``: the headline row (d = 64, B = 128, K = 8) inside a ``lightning.Trainer``
   (per-batch time, ``on_train_batch_start`` to ``on_train_batch_end``), and a Trainer epoch
   with the three monitors at their default cadence against one without (also the time spent
   inside the monitors' hooks);
3. ``integrate``: ``ode_reg.integrate`` with K checkpoints against one
   ``torchdiffeq.odeint`` call (RK4, 40 steps), forward and forward + backward;
4. ``lie``: ``OrthogonalFlow``'s Lie steps (exp, Cayley) against RK4 on ``dW/dt = W b``:
   orthogonality defect after N steps and time per step;
5. ``memory``: peak memory of each step variant (profiler allocation records);
6. ``ablation``: the headline step with each fast path switched back to the direct
   implementation, one at a time and all at once;
7. ``issue``: issue 21's table, every case against torchdiffeq's own step in the same run, with
   the targets beside it (``benchmarks/issue_table.py``; its record is
   ``results/benchmarks/issue_table.json``, or ``<out>/issue_table.json`` with ``--out``, rendered into BENCHMARKS.md and the README by
   ``scripts/render_benchmarks.py``). ``python -m benchmarks --sections issue`` runs it alone.

The model (``benchmarks/_models.py``): ``dz/dt = tanh(W z + b)`` with ``W`` d x d, RK4 with
step 0.025 over [0, 1] (40 steps), a batch of B samples, MSE of a linear readout of z(1), SGD.
The variants are listed in ``benchmarks._models.VARIANTS``; the directional constraint uses
gamma = 0.9 (violated at early checkpoints: an active hinge) except in
``directional(satisfied)`` (gamma = 0: value 0, added without its graph).

Usage::

    python -m benchmarks [--quick] [--threads 2] [--out benchmarks/results]
    python benchmarks/run.py --sections steps,integrate

``--quick`` runs the headline row only (< 2 minutes). Results are printed and written to
``<out>/benchmarks.md`` and ``<out>/benchmarks.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import os
import platform
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
import torchdiffeq

from benchmarks._models import STEP_SIZE, VARIANTS, TanhField, make_batch, make_model
from benchmarks._timing import alternate, peak_memory

HEADLINE = (64, 128, 8)
GRID_D = (32, 64, 256)
GRID_B = (32, 128)
GRID_K = (4, 8, 32)
SECTIONS = ("issue", "steps", "trainer", "integrate", "lie", "memory", "ablation")

#: Targets of the issue, as ratios to the plain step / odeint / the epoch without monitors.
TARGETS = {
    "exact(adj+sens+dir)": 3.0,
    "adjoint": 1.5,
    "skew": 1.25,
    "sens+dir(stop-grad)": 1.6,
    "monitors": 1.03,
    "integrate K=8": 1.10,
    "memory exact(adj+sens+dir)": 3.0,
}


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


# --------------------------------------------------------------------------- integrate


def bench_integrate(ks: tuple[int, ...], rounds: int, log) -> list[dict]:
    from ode_reg import integrate

    d, b, _ = HEADLINE
    torch.manual_seed(0)
    f = TanhField(d)
    x = make_batch(d, b)[0]
    t = torch.tensor([0.0, 1.0])
    opts = {"method": "rk4", "options": {"step_size": STEP_SIZE}}

    def solve(k: int | None) -> torch.Tensor:
        if k is None:
            return torchdiffeq.odeint(f, x, t, **opts)[-1]
        return integrate(f, x, t, checkpoints=k, **opts).ys[-1]

    def forward(k):
        return lambda: solve(k)

    def both(k):
        def run():
            solve(k).pow(2).mean().backward()
            f.zero_grad(set_to_none=True)

        return run

    rows = []
    for mode, make in (("forward", forward), ("forward+backward", both)):
        fns = {"odeint": make(None), **{f"K={k}": make(k) for k in ks}}
        res = alternate(fns, rounds, warmup=3, baseline="odeint")
        base = res["odeint"]
        for k in ks:
            name = f"K={k}"
            rows.append(
                {
                    "mode": mode,
                    "K": k,
                    "odeint_ms": 1e3 * base["wall"],
                    "integrate_ms": 1e3 * res[name]["wall"],
                    "ratio": res[name]["paired"],
                    "ratio_of_medians": res[name]["wall"] / base["wall"],
                    "cpu_ratio": res[name]["cpu"] / base["cpu"],
                }
            )
            log(
                f"  integrate {mode:16s} {name:5s} {rows[-1]['integrate_ms']:6.1f} ms vs odeint "
                f"{rows[-1]['odeint_ms']:6.1f} ms: {rows[-1]['ratio']:.2f}"
            )
    return rows


# --------------------------------------------------------------------------- Lie steps


def bench_lie(steps: tuple[int, ...], rounds: int, log, dim: int = 64) -> list[dict]:
    from ode_reg import OrthogonalFlow
    from ode_reg.functional.orthogonal import orthogonality_defect

    h = 0.01
    rows = []
    for dtype in (torch.float32, torch.float64):
        for rule in ("exp", "cayley", "rk4"):
            torch.manual_seed(0)
            flow = OrthogonalFlow(dim, step=rule, step_size=h, weight_dtype=dtype, b_std=1.0)
            w0 = flow.initial_weight(dtype).detach()
            ta = torch.tensor(0.0, dtype=dtype)
            for n in steps:
                tb = torch.tensor(n * h, dtype=dtype)
                with torch.no_grad():
                    run = functools.partial(flow._flow, ta, tb, w0, None, h)
                    if n == steps[0]:  # time per step from the shortest flow, repeated
                        per_step = alternate({"flow": run}, rounds, 1)["flow"]["wall"] / n
                    w, _ = run()
                rows.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "rule": rule,
                        "steps": n,
                        "defect": float(orthogonality_defect(w)),
                        "us_per_step": 1e6 * per_step,
                    }
                )
                log(
                    f"  {rows[-1]['dtype']:7s} {rule:6s} N={n:5d}: defect "
                    f"{rows[-1]['defect']:.2e}, {rows[-1]['us_per_step']:.0f} us/step"
                )
    return rows


# --------------------------------------------------------------------------- memory


def bench_memory(configs: list[tuple[int, int, int]], log) -> list[dict]:
    rows = []
    for d, b, k in configs:
        fns = _step_fns(d, b, k, list(VARIANTS))
        peaks = {}
        for v, fn in fns.items():
            fn()  # allocate the gradients and optimizer state outside the measurement
            peaks[v] = peak_memory(fn)
        row = {
            "d": d,
            "B": b,
            "K": k,
            "plain_MiB": peaks["plain"] / 2**20,
            "ratio": {v: peaks[v] / peaks["plain"] for v in peaks},
            "MiB": {v: peaks[v] / 2**20 for v in peaks},
        }
        rows.append(row)
        log(
            f"  memory d={d} B={b} K={k}: plain {row['plain_MiB']:.1f} MiB  "
            + "  ".join(f"{v} {row['ratio'][v]:.2f}" for v in list(VARIANTS)[1:])
        )
    return rows


# --------------------------------------------------------------------------- ablation


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("fast path disabled by the benchmark")


#: Fast paths switched off one at a time (module attribute -> replacement).
ABLATIONS: dict[str, dict[str, Any]] = {
    "all fast paths": {},
    "sensitivities: per checkpoint (no vmap)": {
        "ode_reg.recording.StepRecorder._batched": lambda *a: None
    },
    "adjoint term: always the extra VJP": {
        "ode_reg.terms.ChainContext._reads_only_the_end": lambda *a: False
    },
    "shared backward on (opt-in)": {
        "ode_reg.module._use_shared_backward": lambda module, active: (
            module.automatic_optimization
            and any(r.needs_adjoints for r in active)
            and not any(r.needs_differentiable_adjoints for r in active)
        )
    },
}
#: All of the above at once: the direct implementation.
ABLATIONS["all fast paths off (direct)"] = {
    path: value
    for name, patch in ABLATIONS.items()
    if name != "shared backward on (opt-in)"
    for path, value in patch.items()
}


@contextlib.contextmanager
def _patched(replacements: dict[str, Any]):
    saved = []
    try:
        for path, value in replacements.items():
            module, name = path.rsplit(".", 1)
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError:  # a class attribute: module.Class.name
                parent, cls = module.rsplit(".", 1)
                mod = getattr(importlib.import_module(parent), cls)
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def _ablation_row(variant: str, ablation: str, r: dict, base: dict) -> dict:
    """One row of the fast-path table from the timings of a variant and of the baseline."""
    return {
        "variant": variant,
        "ablation": ablation,
        "ms": 1e3 * r["wall"],
        "ratio": r["paired"],
        "ratio_of_medians": r["wall"] / base["wall"],
        "cpu_ms": 1e3 * r["cpu"],
        "cpu_ratio": r["cpu"] / base["cpu"],
    }


def bench_ablation(rounds: int, log) -> list[dict]:
    """The headline step with one fast path at a time switched back to the direct one."""
    d, b, k = HEADLINE
    cases = [
        ("plain", "all fast paths"),
        ("plain", "integrate: odeint per interval"),
        ("plain", "all fast paths off (direct)"),
        ("all(+skew)", "all fast paths"),
        ("all(+skew)", "all fast paths off (direct)"),
        ("exact(adj+sens+dir)", "all fast paths"),
        ("exact(adj+sens+dir)", "integrate: odeint per interval"),
        ("exact(adj+sens+dir)", "sensitivities: direct (_through_state)"),
        ("exact(adj+sens+dir)", "sensitivities: aliases, loop over k"),
        ("adjoint", "all fast paths"),
        ("adjoint", "integrate: odeint per interval"),
        ("skew", "all fast paths"),
        ("skew", "skew: loop over k"),
        ("sens+dir(stop-grad)", "all fast paths"),
        ("sens+dir(stop-grad)", "shared backward off (two backwards)"),
    ]
    steps = _step_fns(d, b, k, sorted({v for v, _ in cases}))
    fns = {}
    for variant, ablation in cases:

        def run(step=steps[variant], patch=ABLATIONS[ablation]) -> None:
            with _patched(patch):
                step()

        fns[f"{variant} | {ablation}"] = run
    res = alternate(fns, rounds, baseline="plain | all fast paths")
    base = res["plain | all fast paths"]
    rows = []
    for variant, ablation in cases:
        rows.append(_ablation_row(variant, ablation, res[f"{variant} | {ablation}"], base))
        log(
            f"  {variant:20s} {ablation:40s} {rows[-1]['ms']:7.1f} ms  "
            f"{rows[-1]['ratio']:.2f} x plain (fast)"
        )
    rows += _ablation_ode_rnn(rounds, log)
    return rows


def _ablation_ode_rnn(rounds: int, log, steps: int = 28) -> list[dict]:
    """The same switches on an ODE-RNN (``SequenceModel``, hidden 64, batch 64, ``steps``
    Euler solves chained: ``steps + 1`` checkpoints, each step holding its own input)."""
    from ode_reg.models import SequenceModel

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, steps, 1, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    cases = [
        ("plain", "all fast paths"),
        ("plain", "all fast paths off (direct)"),
        ("exact(adj+sens+dir)", "all fast paths"),
        ("exact(adj+sens+dir)", "all fast paths off (direct)"),
        ("skew", "all fast paths"),
        ("skew", "all fast paths off (direct)"),
    ]
    fns = {}
    for variant, ablation in cases:
        torch.manual_seed(0)
        model = SequenceModel(1, 10, hidden_dim=64, regularizers=VARIANTS[variant]())

        def run(model=model, patch=ABLATIONS[ablation]) -> None:
            with _patched(patch):
                model.training_step((x, y), 0).backward()
            model.zero_grad(set_to_none=True)

        fns[f"{variant} | {ablation}"] = run
    res = alternate(fns, rounds, baseline="plain | all fast paths")
    base = res["plain | all fast paths"]
    rows = []
    for variant, ablation in cases:
        r = res[f"{variant} | {ablation}"]
        rows.append(_ablation_row(f"ODE-RNN T={steps}: {variant}", ablation, r, base))
        log(
            f"  {rows[-1]['variant']:36s} {ablation:30s} {rows[-1]['ms']:7.1f} ms  "
            f"{rows[-1]['ratio']:.2f} x plain (fast)"
        )
    return rows


# --------------------------------------------------------------------------- report


def _mark(value: float, target: float | None, digits: int = 2) -> str:
    if target is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} {'✓' if value <= target else '✗'}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    variants = list(VARIANTS)[1:]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"torch {meta['torch']}, {meta['threads']} thread(s) (`torch.set_num_threads`), "
        f"{meta['cpus']} CPUs, load average at start {meta['load']}, {meta['platform']}; "
        f"total {meta['seconds']:.0f} s. Variants are interleaved call by call (batch by batch "
        "inside the Trainer); a ratio is the median over rounds of the wall-clock time of the "
        "variant over that of the baseline in the same round (ratios of medians and CPU-time "
        "ratios are in the JSON); ✓/✗ against the targets (headline configuration only).",
        "",
    ]
    head = results.get("trainer_steps")
    if head:
        lines += [
            "### Headline: d = 64, B = 128, K = 8, inside a Trainer (per batch)",
            "",
            "| variant | ms / batch | ratio to plain | target |",
            "|---|---:|---:|---:|",
            f"| plain | {head['plain_ms']:.1f} | 1.00 | |",
        ]
        for v in variants:
            t = TARGETS.get(v)
            lines.append(
                f"| {v} | {head['ms'][v]:.1f} | {_mark(head['ratio'][v], t)} | "
                f"{'' if t is None else f'≤ {t}'} |"
            )
        lines.append("")
    mon = results.get("monitors")
    if mon:
        lines += [
            "### Monitors (Orthogonality, Spectrum, GradientNorm) at default cadence",
            "",
            f"Trainer epoch of {mon['batches']} batches (headline plain model, CSVLogger): "
            f"{mon['epoch_s_without']:.2f} s without, {mon['epoch_s_with']:.2f} s with: ratio of "
            f"medians {mon['ratio']:.3f}, median of the ratios of paired (adjacent) epochs "
            f"**{_mark(mon['pair_ratio'], TARGETS['monitors'], 3)}** (CPU-time ratio "
            f"{mon['cpu_ratio']:.3f}); time spent inside the monitors' hooks "
            f"{mon['hooks_s']:.3f} s per epoch, i.e. **1 + hooks / epoch = "
            f"{_mark(mon['hooks_ratio'], TARGETS['monitors'], 3)}** (target ≤ "
            f"{TARGETS['monitors']}). Time outside the batches (between "
            "`on_train_batch_end` and the next `on_train_batch_start`, where the monitors do "
            f"their work): {mon['outside_s_without']:.3f} s without, {mon['outside_s_with']:.3f} "
            "s with. The hook time is the robust figure: on this shared "
            "machine identical epochs vary by more than the monitors cost.",
            "",
        ]
    steps = results.get("steps")
    if steps:
        lines += [
            "### Training step (outside a Trainer): ratio to the plain step",
            "",
            "| d | B | K | plain ms | " + " | ".join(variants) + " |",
            "|---:|---:|---:|---:|" + "---:|" * len(variants),
        ]
        for r in steps:
            is_head = (r["d"], r["B"], r["K"]) == HEADLINE
            cells = [_mark(r["ratio"][v], TARGETS.get(v) if is_head else None) for v in variants]
            bold = "**" if is_head else ""
            lines.append(
                f"| {bold}{r['d']}{bold} | {bold}{r['B']}{bold} | {bold}{r['K']}{bold} | "
                f"{r['plain_ms']:.1f} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    integ = results.get("integrate")
    if integ:
        lines += [
            "### `integrate` with K checkpoints vs one `torchdiffeq.odeint` call (RK4, 40 steps)",
            "",
            "| mode | K | odeint ms | integrate ms | ratio |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in integ:
            t = TARGETS["integrate K=8"] if r["K"] == 8 else None
            lines.append(
                f"| {r['mode']} | {r['K']} | {r['odeint_ms']:.1f} | {r['integrate_ms']:.1f} | "
                f"{_mark(r['ratio'], t)} |"
            )
        lines.append("")
    lie = results.get("lie")
    if lie:
        lines += [
            "### OrthogonalFlow weight steps on dW/dt = W b (d = 64, h = 0.01)",
            "",
            "| dtype | rule | N steps | defect ‖WᵀW − I‖_F | µs / step |",
            "|---|---|---:|---:|---:|",
        ]
        for r in lie:
            lines.append(
                f"| {r['dtype']} | {r['rule']} | {r['steps']} | {r['defect']:.2e} | "
                f"{r['us_per_step']:.0f} |"
            )
        lines.append("")
    mem = results.get("memory")
    if mem:
        lines += [
            "### Peak memory of a training step: ratio to the plain step",
            "",
            "| d | B | K | plain MiB | " + " | ".join(variants) + " |",
            "|---:|---:|---:|---:|" + "---:|" * len(variants),
        ]
        for r in mem:
            is_head = (r["d"], r["B"], r["K"]) == HEADLINE
            cells = []
            for v in variants:
                t = TARGETS.get(f"memory {v}") if is_head else None
                cells.append(_mark(r["ratio"][v], t))
            lines.append(
                f"| {r['d']} | {r['B']} | {r['K']} | {r['plain_MiB']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    abl = results.get("ablation")
    if abl:
        lines += [
            "### What each fast path buys (headline step and an ODE-RNN; switched off one at a "
            "time, or all at once: the direct implementation)",
            "",
            "| variant | fast path switched off | ms | ratio to plain (all fast) |",
            "|---|---|---:|---:|",
        ]
        for r in abl:
            off = "—" if r["ablation"] == "all fast paths" else r["ablation"]
            lines.append(f"| {r['variant']} | {off} | {r['ms']:.1f} | {r['ratio']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the headline row only (< 2 min)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1, see BENCHMARKS.md)",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--out", default="benchmarks/results", help="folder for md and json")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    torch.set_num_threads(args.threads)
    _quiet_lightning()
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True)

    quick = args.quick
    configs = [HEADLINE] if quick else [(d, b, k) for d in GRID_D for b in GRID_B for k in GRID_K]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    argv_str = " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {
        "meta": {
            "command": f"python -m benchmarks {argv_str}".strip(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load": f"{load:.1f}",
            "platform": platform.platform(),
        }
    }
    log(f"ode_reg benchmarks: {torch.get_num_threads()} thread(s), load {load:.1f}")
    issue_record = Path(args.out) / "issue_table.json"
    if args.out == "benchmarks/results" and not quick:  # the default: the committed record
        from benchmarks.issue_table import RECORD as issue_record
    if "issue" in sections:
        from benchmarks import issue_table

        log("issue 21's table (time / torchdiffeq's step):")
        results["issue"] = issue_table.run(
            quick,
            args.rounds,
            issue_record,
            results["meta"]["command"],
            log,
        )["table"]
    if "steps" in sections:
        log("training steps (ratio to plain):")
        results["steps"] = bench_steps(
            configs, args.rounds or (8 if quick else 4), log, args.rounds or (8 if quick else 10)
        )
    if "trainer" in sections:
        log("inside a Trainer:")
        results["trainer_steps"] = bench_trainer_steps(args.rounds or (6 if quick else 20), log)
        results["monitors"] = bench_monitors(
            args.rounds or (2 if quick else 6), 50 if quick else 100, log
        )
    if "integrate" in sections:
        log("integrate vs odeint:")
        results["integrate"] = bench_integrate(
            (8,) if quick else (4, 8, 32), args.rounds or (10 if quick else 25), log
        )
    if "lie" in sections and not quick:
        log("OrthogonalFlow weight steps:")
        results["lie"] = bench_lie((100, 1000), args.rounds or 3, log)
    if "memory" in sections:
        log("peak memory:")
        mem_configs = [HEADLINE] if quick else [HEADLINE, (256, 128, 8), (64, 128, 32)]
        results["memory"] = bench_memory(mem_configs, log)
    if "ablation" in sections and not quick:
        log("fast paths switched off one at a time (headline step):")
        results["ablation"] = bench_ablation(args.rounds or 8, log)
    results["meta"]["seconds"] = time.perf_counter() - start
    text = markdown(results)
    if "issue" in results:
        from benchmarks import issue_table

        record = json.loads(Path(issue_record).read_text())
        text = "### Issue 21's table\n\n" + issue_table.markdown(record) + "\n\n" + text
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.md").write_text(text + "\n")
    (out / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    log("")
    log(text)
    log(f"written: {out / 'benchmarks.md'}, {out / 'benchmarks.json'}")
    return results


if __name__ == "__main__":
    main()
