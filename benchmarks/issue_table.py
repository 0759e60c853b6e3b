"""The performance table of issue 21, measured side by side against torchdiffeq's own step.

Every row is one case of a training step (forward + backward of the loss, terms included),
timed interleaved with torchdiffeq's plain step on the same model in the same run
(:func:`benchmarks._timing.alternate`: warm-up, rotated order, the median over rounds of the
ratio within a round). Besides the median the record keeps the lowest and highest per-round
ratio (``lo``/``hi``), so the spread on a shared machine is visible.

Cases: the drop-in module of ``benchmarks/dropin.py`` (d = 64, B = 128; dopri5 on ``[0, 1]``,
dopri5 with a loss over 100 output times, rk4 with step 1/16), and three models in the shapes of
public code: an ODE block in a classifier (dopri5), a CNF with a Hutchinson divergence and a
tuple state ``(z, delta_logp)`` (:class:`ode_reg.models.cnf.CNFField`), a latent ODE whose
decoder reads all 50 output times; and an augmented neural ODE (zero channels appended) for the
skew term. The ``SolverStatsMonitor`` row is its share of a step (switched on and off at every
batch of one run, :func:`benchmarks.solver_stats_overhead.per_step`); the main-job row reads the
recorded run (``results/main_job/summary.json``), which this command does not re-run.

Run: ``python -m benchmarks --sections issue`` (part of ``python -m benchmarks``), or
``python -m benchmarks.issue_table [--quick] [--rounds N]``. Writes
``results/benchmarks/issue_table.json`` (the record, committed) and ``.md``; ``--quick`` (one
repeat of two rounds, about 10 s: a smoke run) writes ``benchmarks/results/`` instead;
``python scripts/render_benchmarks.py`` puts the table into BENCHMARKS.md and the README.
``--cases augmented cnf --variants SkewJacobianPenalty`` measures only those cases and variants
(each against torchdiffeq's step, as in the full run) and writes to the quick path unless
``--out`` is given: a cheap way to iterate on some rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchdiffeq
from torch import nn

import ode_reg
from benchmarks._timing import alternate
from benchmarks.dropin import make as dropin_step
from ode_reg import (
    AdjointMagnitude,
    DirectionalConstraint,
    SensitivityMagnitude,
    SkewJacobianPenalty,
)
from ode_reg.models.cnf import CNFField
from ode_reg.terms import ChainContext

RECORD = Path("results/benchmarks/issue_table.json")
#: where a ``--quick`` (smoke) run writes, so that it never replaces the committed record.
QUICK_RECORD = Path("benchmarks/results/issue_table.json")
MAIN_JOB = Path("results/main_job/summary.json")


#: The sub-batch estimator's row: ``AdjointMagnitude(subsample=m)`` on the headline case.
SUBSAMPLE_M = 16
SUBSAMPLE = f"AdjointMagnitude, subsample={SUBSAMPLE_M}"


def _exact() -> list:
    return [AdjointMagnitude(0.1), SensitivityMagnitude(0.1), DirectionalConstraint(0.5, 0.1)]


def _stepper(module: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        loss_fn().backward()

    return step


class _Shape(ode_reg.RegularizedODEModule):
    """A model of one of the public-code shapes; ``solve`` is torchdiffeq's or ode_reg's."""

    def __init__(self, kind: str, solve: Callable[..., Any], regularizers: list) -> None:
        super().__init__(regularizers=regularizers)
        torch.manual_seed(0)
        self.kind, self.solve = kind, solve
        g = torch.Generator().manual_seed(1)
        if kind == "classifier":
            self.inp = nn.Linear(64, 64)
            self.field = _MLP(64, 64)
            self.out = nn.Linear(64, 10)
            self.x = torch.randn(128, 64, generator=g)
            self.y = torch.randint(0, 10, (128,), generator=g)
            self.t = torch.tensor([0.0, 1.0])
        elif kind == "augmented":
            self.field = _MLP(2 + 6, 32)
            self.out = nn.Linear(8, 2)
            self.x = torch.randn(256, 2, generator=g)
            self.y = torch.randint(0, 2, (256,), generator=g)
            self.t = torch.tensor([0.0, 1.0])
        elif kind == "cnf":
            self.field = CNFField(2, 32)
            self.x = torch.randn(256, 2, generator=g)
            self.t = torch.tensor([0.0, 1.0])
        elif kind == "latent":
            self.enc = nn.Linear(8, 16)
            self.field = _MLP(16, 32)
            self.dec = nn.Linear(16, 8)
            self.t = torch.linspace(0.0, 2.0, 50)
            self.x = torch.randn(64, 8, generator=g)
            self.target = torch.randn(50, 64, 8, generator=g)
        else:
            raise ValueError(f"unknown shape {kind!r}")

    def training_step(self, batch: Any = None, batch_idx: int = 0) -> torch.Tensor:
        k = self.kind
        if k == "classifier":
            z = self.solve(self.field, torch.tanh(self.inp(self.x)), self.t)[-1]
            return nn.functional.cross_entropy(self.out(z), self.y)
        if k == "augmented":
            y0 = torch.cat([self.x, self.x.new_zeros(self.x.shape[0], 6)], dim=-1)
            z = self.solve(self.field, y0, self.t)[-1]
            return nn.functional.cross_entropy(self.out(z), self.y)
        if k == "cnf":
            self.field.draw_probes(self.x, torch.Generator().manual_seed(2))
            zero = self.x.new_zeros(self.x.shape[0], 1)
            z, dlogp = self.solve(self.field, (self.x, zero), self.t, rtol=1e-5, atol=1e-5)
            logp = -0.5 * z[-1].pow(2).sum(-1) - dlogp[-1].squeeze(-1)
            return -logp.mean()
        zs = self.solve(self.field, self.enc(self.x), self.t)
        return (self.dec(zs) - self.target).pow(2).mean()


class _MLP(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, d))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _shape_step(kind: str, solve: Callable[..., Any], regularizers: list) -> Callable[[], None]:
    model = _Shape(kind, solve, regularizers)
    return _stepper(model, model.training_step)


#: (case, variant) -> factory of the step; "torchdiffeq" is each case's baseline.
def _cases() -> dict[str, dict[str, Callable[[], Callable[[], None]]]]:
    def dropin(case: str) -> dict[str, Callable[[], Callable[[], None]]]:
        return {
            "torchdiffeq": lambda: dropin_step(torchdiffeq.odeint, [], case),
            "converted, no term": lambda: dropin_step(ode_reg.odeint, [], case),
            "AdjointMagnitude": lambda: dropin_step(ode_reg.odeint, [AdjointMagnitude(0.1)], case),
            "adj+sens+dir": lambda: dropin_step(ode_reg.odeint, _exact(), case),
        }

    def shape(kind: str, term: Callable[[], list], name: str) -> dict[str, Any]:
        return {
            "torchdiffeq": lambda: _shape_step(kind, torchdiffeq.odeint, []),
            "converted, no term": lambda: _shape_step(kind, ode_reg.odeint, []),
            name: lambda: _shape_step(kind, ode_reg.odeint, term()),
        }

    def from_row(case: str) -> Callable[[], None]:
        step = dropin_step(ode_reg.odeint, [AdjointMagnitude(0.1)], case)

        def run() -> None:
            ChainContext._from_end_edge = False
            try:
                step()
            finally:
                ChainContext._from_end_edge = True

        return run

    many = dropin("dopri5_100")
    many["AdjointMagnitude, flow VJP from the row (before)"] = lambda: from_row("dopri5_100")
    head = dropin("dopri5")
    head[SUBSAMPLE] = lambda: dropin_step(
        ode_reg.odeint, [AdjointMagnitude(0.1, subsample=SUBSAMPLE_M, seed=0)], "dopri5"
    )
    rk4 = dropin("rk4")
    del rk4["AdjointMagnitude"]
    return {
        "dopri5": head,
        "dopri5_100": many,
        "rk4": rk4,
        "classifier": shape("classifier", lambda: [AdjointMagnitude(0.1)], "AdjointMagnitude"),
        "latent": shape("latent", lambda: [AdjointMagnitude(0.1)], "AdjointMagnitude"),
        "cnf": shape("cnf", lambda: [SkewJacobianPenalty(0.01, seed=0)], "SkewJacobianPenalty"),
        "augmented": shape(
            "augmented", lambda: [SkewJacobianPenalty(0.01, seed=0)], "SkewJacobianPenalty"
        ),
    }


#: The issue's table: (row label, target, [(case, variant), ...]); a row with several
#: measurements is met when each is.
ROWS: list[tuple[str, float | None, list[tuple[str, str]]]] = [
    (
        "no term, converted vs torchdiffeq (time): dopri5 / dopri5 100 outputs / rk4",
        1.05,
        [
            ("dopri5", "converted, no term"),
            ("dopri5_100", "converted, no term"),
            ("rk4", "converted, no term"),
        ],
    ),
    (
        "`AdjointMagnitude`, loss over all 100 dopri5 outputs",
        2.5,
        [("dopri5_100", "AdjointMagnitude")],
    ),
    (
        "the same, flow-only VJP started at the solution's last row (the code before issue 21)",
        None,
        [("dopri5_100", "AdjointMagnitude, flow VJP from the row (before)")],
    ),
    (
        "adjoint + sensitivity + directional, loss over 100 outputs",
        3.0,
        [("dopri5_100", "adj+sens+dir")],
    ),
    (
        "adjoint + sensitivity + directional, headline rk4 / dopri5",
        2.0,
        [("rk4", "adj+sens+dir"), ("dopri5", "adj+sens+dir")],
    ),
    ("`AdjointMagnitude` every step, headline (dopri5)", 1.5, [("dopri5", "AdjointMagnitude")]),
    (
        f"`AdjointMagnitude` every step, headline (dopri5), subsample={SUBSAMPLE_M} of 128",
        1.5,
        [("dopri5", SUBSAMPLE)],
    ),
    (
        "`SkewJacobianPenalty` on an augmented neural ODE / a CNF with `ode_reg.odeint`",
        1.2,
        [("augmented", "SkewJacobianPenalty"), ("cnf", "SkewJacobianPenalty")],
    ),
    (
        "shape of public code: ODE block in a classifier (dopri5), no term / `AdjointMagnitude`",
        None,
        [("classifier", "converted, no term"), ("classifier", "AdjointMagnitude")],
    ),
    (
        "shape of public code: CNF, Hutchinson divergence, tuple state, no term",
        1.05,
        [("cnf", "converted, no term")],
    ),
    (
        "shape of public code: latent ODE reading all 50 times, no term / `AdjointMagnitude`",
        None,
        [("latent", "converted, no term"), ("latent", "AdjointMagnitude")],
    ),
]

#: The monitor-overhead row: measured by :func:`benchmarks.solver_stats_overhead.per_step`
#: (the monitor switched on and off at every batch of one run), not against torchdiffeq.
SOLVER_STATS_ROW = ("`SolverStatsMonitor` alone, cheapest step (rk4, d = 32, B = 64)", 0.01)


def solver_stats_share(quick: bool, log: Callable[[str], None] = print) -> dict[str, float]:
    """The monitor's share of a step: per-step CPU times with and without it, switched at every
    batch of one Lightning run (``benchmarks/solver_stats_overhead.py --per-step``)."""
    from benchmarks.solver_stats_overhead import make_loader, per_step

    steps, repeats = (60, 1) if quick else (300, 3)
    args = argparse.Namespace(steps=steps, repeats=repeats, dim=32, batch=64, method="rk4")
    t0 = time.perf_counter()
    out = per_step(args, make_loader(steps, args.batch, args.dim))
    log(f"  SolverStatsMonitor share {out['median']:+.2%} ({time.perf_counter() - t0:.0f} s)")
    return out


def _paired(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, float]]:
    """One interleaved timing of the variants against ``torchdiffeq`` (:func:`alternate`)."""
    names = list(fns)
    out = alternate(fns, rounds, baseline="torchdiffeq")
    return {n: {"ratio": out[n]["paired"], "ms": 1e3 * out[n]["wall"]} for n in names}


def measure(
    rounds: int,
    quick: bool,
    log: Callable[[str], None] = print,
    only: list[str] | None = None,
    variants_only: list[str] | None = None,
) -> dict[str, Any]:
    """Run every case (variants interleaved with torchdiffeq's step), three repeats of
    ``rounds`` rounds each (one in ``quick`` mode); the figure of a variant is the median of
    its per-repeat paired ratios, ``lo``/``hi`` the extremes over repeats. ``only`` restricts
    the run to those cases, ``variants_only`` to those variants (and the baseline)."""
    repeats = 1 if quick else 3
    cases: dict[str, dict[str, Any]] = {}
    for case, variants in _cases().items():
        if only is not None and case not in only:
            continue
        if variants_only is not None:
            variants = {
                n: v for n, v in variants.items() if n == "torchdiffeq" or n in variants_only
            }
        t0 = time.perf_counter()
        fns = {name: make() for name, make in variants.items()}
        runs = [_paired(fns, rounds) for _ in range(repeats)]
        cases[case] = {}
        for name in fns:
            ratios = [r[name]["ratio"] for r in runs]
            cases[case][name] = {
                "ratio": statistics.median(ratios),
                "lo": min(ratios),
                "hi": max(ratios),
                "ms": statistics.median(r[name]["ms"] for r in runs),
            }
        log(
            f"  {case:11s} "
            + "  ".join(f"{n} {v['ratio']:.2f}" for n, v in cases[case].items())
            + f"  ({time.perf_counter() - t0:.0f} s)"
        )
    return {"cases": cases, "rounds": rounds, "repeats": repeats}


def table(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's rows from measured cases (and the recorded main job, if present)."""
    cases = results["cases"]
    rows = []
    for label, target, cells in ROWS:
        got = [cases[c][v] for c, v in cells if c in cases and v in cases[c]]
        if len(got) != len(cells):
            continue
        met = None if target is None else all(g["ratio"] <= target for g in got)
        rows.append(
            {
                "case": label,
                "measured": " / ".join(f"{g['ratio']:.2f}×" for g in got),
                "spread": " / ".join(f"{g['lo']:.2f}–{g['hi']:.2f}" for g in got),
                "target": "" if target is None else f"≤ {target}×",
                "met": "" if met is None else ("met" if met else "**missed**"),
            }
        )
    share = results.get("solver_stats")
    if share:
        label, target = SOLVER_STATS_ROW
        rows.append(
            {
                "case": label,
                "measured": f"{100 * share['median']:+.2f} % a step",
                "spread": f"mean {100 * share['mean']:+.2f} %, {share['steps']} steps each",
                "target": f"≤ {100 * target:.0f} % a step",
                "met": "met" if share["median"] <= target else "**missed**",
            }
        )
    job = results.get("main_job")
    if job:
        met = job["wall_s"] <= 600 and job["test_acc"] >= 0.965
        rows.append(
            {
                "case": "main job: fit + test (recorded run, not re-run; set-up not included)",
                "measured": f"{job['wall_s']:.0f} s at {100 * job['test_acc']:.1f} % test acc.",
                "spread": "",
                "target": "≤ 600 s at ≥ 96.5 %",
                "met": ("met" if met else "**missed**") + f" (`{job['source']}`)",
            }
        )
    return {"rows": rows}


def markdown(record: dict[str, Any]) -> str:
    """The table of a record as markdown (what BENCHMARKS.md and the README show)."""
    meta = record["meta"]
    lines = [
        "| case | measured (time / torchdiffeq) | spread over repeats | target | met? |",
        "|---|---:|---:|---|---|",
    ]
    for r in record["table"]["rows"]:
        lines.append(
            f"| {r['case']} | {r['measured']} | {r['spread']} | {r['target']} | {r['met']} |"
        )
    lines += [
        "",
        f"`{meta['command']}`: torch {meta['torch']}, {meta['threads']} thread, "
        f"{meta['cpus']} CPUs (load average {meta['load']} when the record was written), "
        f"{meta['device']}; "
        f"{record['measured']['repeats']} repeat(s) of {record['measured']['rounds']} "
        f"interleaved rounds; {meta['seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def _main_job() -> dict[str, Any] | None:
    if not MAIN_JOB.exists():
        return None
    d = json.loads(MAIN_JOB.read_text())
    return {"wall_s": d["wall_s"], "test_acc": d["test_acc"], "source": str(MAIN_JOB)}


def run(
    quick: bool = False,
    rounds: int | None = None,
    out: Path = RECORD,
    command: str = "python -m benchmarks.issue_table",
    log=print,
    only: list[str] | None = None,
    variants_only: list[str] | None = None,
) -> dict[str, Any]:
    """Measure, build the table, write ``out`` (JSON) and its ``.md`` twin; return the record."""
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    rounds = rounds or (2 if quick else 7)
    measured = measure(rounds, quick, log, only, variants_only)
    if only is None and variants_only is None:
        measured["solver_stats"] = solver_stats_share(quick, log)
    measured["main_job"] = _main_job()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    record = {
        "meta": {
            "command": command,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load": f"{load:.1f}",
            "device": "CPU, " + platform.platform(),
            "seconds": time.perf_counter() - start,
            "quick": quick,
        },
        "measured": {"rounds": rounds, "repeats": measured["repeats"]},
        "cases": measured["cases"],
        "solver_stats": measured.get("solver_stats"),
        "table": table(measured),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record) + "\n")
    log(markdown(record))
    log(f"written: {out}, {out.with_suffix('.md')}")
    return record


def retable(path: Path = RECORD) -> dict[str, Any]:
    """Rebuild the table of the record at ``path`` from its measured cases and the main job's
    current record (``results/main_job/summary.json``), without measuring again."""
    record = json.loads(path.read_text())
    record["table"] = table(
        {
            "cases": record["cases"],
            "solver_stats": record.get("solver_stats"),
            "main_job": _main_job(),
        }
    )
    path.write_text(json.dumps(record, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(record) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat of 2 rounds (smoke)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--out",
        default=None,
        help=f"record path (default {RECORD}; with --quick {QUICK_RECORD}, not committed)",
    )
    parser.add_argument(
        "--retable",
        action="store_true",
        help="rebuild the table of the record at --out (main job re-read), measuring nothing",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        choices=list(_cases()),
        help="measure only these cases (the record then goes to the quick path unless --out)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="measure only these variants of each case (and torchdiffeq's baseline)",
    )
    args = parser.parse_args(argv)
    partial = args.cases is not None or args.variants is not None
    default = QUICK_RECORD if args.quick or partial else RECORD
    out = Path(args.out) if args.out else default
    if args.retable:
        print(markdown(retable(out)))
        return
    torch.set_num_threads(1)
    cmd = "python -m benchmarks.issue_table" + (" --quick" if args.quick else "")
    if args.cases:
        cmd += " --cases " + " ".join(args.cases)
    if args.variants:
        cmd += " --variants " + " ".join(repr(v) for v in args.variants)
    run(args.quick, args.rounds, out, cmd, only=args.cases, variants_only=args.variants)


if __name__ == "__main__":
    main()
