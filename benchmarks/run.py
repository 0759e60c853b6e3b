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
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks._models import VARIANTS
from benchmarks.bench_ablation import bench_ablation
from benchmarks.bench_solves import bench_integrate, bench_lie, bench_memory
from benchmarks.bench_steps import (
    HEADLINE,
    _quiet_lightning,
    bench_monitors,
    bench_steps,
    bench_trainer_steps,
)

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
