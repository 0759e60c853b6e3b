"""The horizon sweep: which term turns a failing run into a learning one, at which horizon.

The experiment list is data: ``recipes/sweep.yaml`` (recipe, horizons, seeds, step budget,
common overrides, variants). Every run is ``ode-reg fit --config <recipe> <overrides>`` in its
own subprocess with one torch thread, ``--jobs`` at a time; its record (command, seed, steps,
wall time, test metric, held-out adjoint max/min ratio) is written to
``results/sweep/records/<variant>_T<T>_s<seed>.json`` when it finishes, and runs with a record
are skipped (resumable; ``--rerun`` ignores them). From the records alone (``--render``) the
script writes ``results/sweep/SWEEP.md`` (per-run rows and the mean ± std / success-rate
table) and two plots: the test metric against ``T`` per variant with error bars, and the
held-out adjoint ratio against ``T``.

Usage::

    python recipes/sweep.py                  # the whole sweep (budget: see SWEEP.md)
    python recipes/sweep.py --only gru unstructured --horizons 100
    python recipes/sweep.py --render         # tables and plots from the records only
    python recipes/sweep.py --fast --out /tmp/sweep   # 2 steps per run, T = 20 (the tests)

``--fast`` writes into ``runs/sweep_fast/`` unless ``--out`` says otherwise, never into the
recorded ``results/sweep/``; a records folder that mixes budgets (fast and full runs, or
different step budgets) is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS,
    ROOT,
    adjoint_profile,
    machine,
    md_table,
    output_dir,
    profile_ratio,
    run_recorded,
    write_json,
)  # noqa: E402

SPEC = Path(__file__).resolve().parent / "sweep.yaml"
FAST_OUT = ROOT / "runs" / "sweep_fast"


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    """The sweep's YAML, checked: every variant has a unique key, a label, a cell."""
    import yaml

    spec = yaml.safe_load(path.read_text())
    spec["_path"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    keys = [v["key"] for v in spec["variants"]]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: variant keys must be unique, got {keys}")
    for v in spec["variants"]:
        for field in ("key", "label", "cell", "regularizers"):
            if field not in v:
                raise ValueError(f"{path}: variant {v.get('key')!r} lacks {field!r}")
    return spec


def _value(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def run_key(variant: str, horizon: int, seed: int) -> str:
    return f"{variant}_T{horizon}_s{seed}"


def command(spec: dict[str, Any], variant: dict[str, Any], horizon: int, seed: int) -> list[str]:
    """The ``ode-reg fit`` arguments of one run, as a reader would type them."""
    args = ["fit", "--config", spec["recipe"]]
    for k, v in spec["common"].items():
        args += [k, _value(v)]
    args += ["--model.init_args.cell", variant["cell"]]
    args += ["--model.init_args.regularizers", _value(variant["regularizers"])]
    for k, v in variant.get("overrides", {}).items():
        args += [k, _value(v)]
    args += ["--trainer.max_steps", str(spec["max_steps"])]
    args += ["--data.init_args.seq_len", str(horizon)]
    args += ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    return args


def _plumbing(run_dir: Path, fast: bool) -> list[str]:
    """Output folders, no progress bar; in ``--fast`` mode 2 steps on tiny splits."""
    args = [
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
    ]
    if fast:
        args += ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
        args += ["--data.init_args.n_train", "64", "--data.init_args.n_val", "32"]
        args += ["--data.init_args.n_test", "32"]
    return args


def worker(spec: dict[str, Any], key: str, record: Path, out: Path, fast: bool) -> None:
    """Run one sweep run in this process and write its record."""
    import torch

    torch.set_num_threads(1)
    from ode_reg.cli import run

    variant_key, horizon, seed = _parse_key(key)
    variant = next(v for v in spec["variants"] if v["key"] == variant_key)
    public = command(spec, variant, horizon, seed)
    start = time.perf_counter()
    cli = run(public + _plumbing(out / "runs" / key, fast))
    wall = time.perf_counter() - start
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    ratio = None
    if getattr(model, "field", None) is not None:
        x, y = dm.dataset("test").tensors
        ratio = profile_ratio(adjoint_profile(model, x[:256], y[:256]))
    write_json(
        record,
        {
            "key": key,
            "variant": variant_key,
            "label": variant["label"],
            "T": horizon,
            "seed": seed,
            "steps": int(trainer.global_step),
            "epochs": int(trainer.current_epoch),
            "wall_s": wall,
            "test_mse": metrics.get("test/mse"),
            "test_loss": metrics.get("test/loss"),
            "adjoint_ratio_held_out": ratio,
            "nonfinite_skipped": int(getattr(model, "nonfinite_skipped", 0) or 0),
            "command": "ode-reg " + shlex.join(public),
            "fast": fast,
            "budget": {
                "fast": fast,
                "max_steps": 2 if fast else spec["max_steps"],
                "batch_size": spec["common"].get("--data.init_args.batch_size"),
            },
        },
    )


def _parse_key(key: str) -> tuple[str, int, int]:
    head, seed = key.rsplit("_s", 1)
    variant, horizon = head.rsplit("_T", 1)
    return variant, int(horizon), int(seed)


def record_budget(r: dict[str, Any]) -> dict[str, Any]:
    """A record's budget: its ``budget`` field, or for records written before it existed, the
    fast flag and the ``--trainer.max_steps`` of its command (a fast run's 2 steps were set
    outside the command, hence the flag)."""
    if "budget" in r:
        return {k: r["budget"].get(k) for k in ("fast", "max_steps")}
    words = r["command"].split()
    steps = (
        words[words.index("--trainer.max_steps") + 1] if "--trainer.max_steps" in words else None
    )
    fast = bool(r.get("fast", False))
    return {"fast": fast, "max_steps": 2 if fast else (int(steps) if steps else None)}


def load_records(out: Path) -> list[dict[str, Any]]:
    """The records under ``out/records``.

    Raises:
        ValueError: if they mix budgets (fast and full runs, or different step budgets).
    """
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    budgets: dict[str, str] = {}
    for r in records:
        budgets.setdefault(json.dumps(record_budget(r), sort_keys=True), r["key"])
    if len(budgets) > 1:
        raise ValueError(
            f"{out}/records mixes budgets {sorted(budgets)} (e.g. runs "
            f"{sorted(budgets.values())}): use separate --out folders"
        )
    return records


def summarize(spec: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, T): mean ± std of the metric, success rate, ratio, wall time."""
    metric, below = spec["success"]["metric"], spec["success"]["below"]
    rows = []
    for v in spec["variants"]:
        for horizon in spec["horizons"]:
            rs = [r for r in records if r["variant"] == v["key"] and r["T"] == horizon]
            vals = [r[metric] for r in rs if r.get(metric) is not None]
            if not vals:
                continue
            finite = [x for x in vals if math.isfinite(x)]
            m = statistics.fmean(finite) if finite else math.nan
            s = statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else math.nan)
            ratios = [r["adjoint_ratio_held_out"] for r in rs if r.get("adjoint_ratio_held_out")]
            rows.append(
                {
                    "variant": v["key"],
                    "label": v["label"],
                    "T": horizon,
                    "runs": len(vals),
                    "seeds": sorted(r["seed"] for r in rs),
                    "mean": m,
                    "std": s,
                    "successes": sum(1 for x in vals if math.isfinite(x) and x < below),
                    "ratio_median": statistics.median_high(ratios) if ratios else None,
                    "ratio_min": min(ratios) if ratios else None,
                    "ratio_max": max(ratios) if ratios else None,
                    "wall_mean_s": sum(r["wall_s"] for r in rs) / len(rs),
                    "steps": sorted({r["steps"] for r in rs}),
                }
            )
    return rows


def plot(spec: dict[str, Any], rows: list[dict[str, Any]], out: Path, stamp: str) -> list[Path]:
    """``sweep_metric.png`` (metric vs T, error bars) and ``sweep_adjoint_ratio.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, below = spec["success"]["metric"], spec["success"]["below"]
    baseline = spec["success"].get("baseline")
    paths = []
    for name, ylabel in (
        ("metric", f"test {metric.removeprefix('test_').upper()} (mean ± std over seeds)"),
        ("adjoint_ratio", "held-out adjoint max/min over the sequence (median, range)"),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, v in enumerate(spec["variants"]):
            vr = [r for r in rows if r["variant"] == v["key"]]
            if name == "adjoint_ratio":
                vr = [r for r in vr if r["ratio_median"] is not None]
            if not vr:
                continue
            xs = [r["T"] * (1 + 0.02 * (i - 3)) for r in vr]
            if name == "metric":
                ys = [r["mean"] for r in vr]
                err = [r["std"] for r in vr]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=v["label"])
            else:
                ys = [r["ratio_median"] for r in vr]
                lo = [r["ratio_median"] - r["ratio_min"] for r in vr]
                hi = [r["ratio_max"] - r["ratio_median"] for r in vr]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=v["label"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(spec["horizons"])
        ax.set_xticklabels([str(t) for t in spec["horizons"]])
        ax.minorticks_off()
        ax.set_xlabel("sequence length T (adding problem)")
        ax.set_ylabel(ylabel)
        if name == "metric":
            ax.axhline(below, color="k", ls="--", lw=1, label=f"success: MSE < {below}")
            if baseline:
                ax.axhline(baseline, color="gray", ls=":", lw=1, label="constant prediction (1/6)")
            ax.set_title(f"Adding problem: test MSE against horizon ({stamp})")
        else:
            ax.axhline(1.0, color="k", ls="--", lw=1, label="constant adjoint norm")
            ax.set_title(f"Adding problem: adjoint max/min against horizon ({stamp})")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out / f"sweep_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def render(
    spec: dict[str, Any], out: Path, elapsed_s: float | None = None, jobs: int | None = None
) -> str:
    """``SWEEP.md`` and the two plots, from the records under ``out``."""
    records = load_records(out)
    rows = summarize(spec, records)
    meta_path = out / "sweep_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if elapsed_s is not None:
        meta["wall_s_total"] = meta.get("wall_s_total", 0.0) + elapsed_s
        meta["jobs"] = jobs
        write_json(meta_path, meta)
    stamp = time.strftime("%Y-%m-%d", time.gmtime(max((out / "records").stat().st_mtime, 0)))
    if rows:
        plot(spec, rows, out, stamp)
    metric, below = spec["success"]["metric"], spec["success"]["below"]
    table = [
        [
            r["label"],
            r["T"],
            ", ".join(map(str, r["seeds"])),
            f"{r['mean']:.4f} ± {r['std']:.4f}",
            f"{r['successes']}/{r['runs']}",
            "-" if r["ratio_median"] is None else f"{r['ratio_median']:.3g}",
            f"{r['wall_mean_s']:.0f} s",
        ]
        for r in rows
    ]
    total = sum(r["wall_s"] for r in records)
    text = [
        "# Horizon sweep: adding problem",
        "",
        f"Made by `python recipes/sweep.py` from `{spec.get('_path', 'recipes/sweep.yaml')}`; "
        "records in "
        f"`{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}/records/`. "
        f"Measured on {machine()}, {meta.get('jobs') or 2} run(s) at a time beside other jobs "
        f"(wall times are upper bounds for a quiet machine). Every run: {spec['max_steps']} "
        f"optimizer steps of batch {spec['common'].get('--data.init_args.batch_size')}, gradient "
        f"clipping at norm {spec['common'].get('--trainer.gradient_clip_val')}, the test "
        "split evaluated with the final weights. Success: "
        f"{metric} < {below}. The adjoint ratio is max_k / min_k of mean_i |dL/dz_k| over the "
        "sequence on 256 test sequences after training (median over seeds; ODE cells only).",
        "",
        f"Runs: {len(records)}; summed run wall time {total / 60:.1f} min"
        + (
            f"; sweep wall time (all invocations) {meta['wall_s_total'] / 60:.1f} min."
            if meta.get("wall_s_total")
            else "."
        ),
        "",
        md_table(
            [
                "model",
                "T",
                "seeds",
                f"{metric} mean ± std",
                "success",
                "adjoint max/min",
                "wall / run",
            ],
            table,
        ),
        "",
        "![metric against T](sweep_metric.png)",
        "",
        "![adjoint ratio against T](sweep_adjoint_ratio.png)",
        "",
        "Per run:",
        "",
        md_table(
            ["run", "steps", "wall", metric, "adjoint max/min", "command"],
            [
                [
                    r["key"],
                    r["steps"],
                    f"{r['wall_s']:.0f} s",
                    "-" if r.get(metric) is None else f"{r[metric]:.4g}",
                    "-"
                    if r.get("adjoint_ratio_held_out") is None
                    else f"{r['adjoint_ratio_held_out']:.3g}",
                    f"`{r['command']}`",
                ]
                for r in records
            ],
        ),
    ]
    md = "\n".join(text) + "\n"
    (out / "SWEEP.md").write_text(md)
    write_json(out / "summary.json", rows)
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, default=SPEC, help="the sweep's YAML")
    p.add_argument("--only", nargs="*", default=None, help="variant keys (default: all)")
    p.add_argument("--horizons", nargs="*", type=int, default=None, help="T values (default: all)")
    p.add_argument("--seeds", nargs="*", type=int, default=None, help="seeds (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--rerun", action="store_true", help="run even where a record exists")
    p.add_argument("--render", action="store_true", help="only the tables and plots")
    p.add_argument("--fast", action="store_true", help="2 steps per run at T = 20 (tests)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default results/sweep; with --fast runs/sweep_fast)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    spec = load_spec(args.spec)
    if args.fast:
        spec["horizons"], spec["seeds"] = [20], [0]
    out = output_dir(args.out, args.fast, RESULTS / "sweep", FAST_OUT)
    if args.worker:
        worker(spec, args.worker, args.record, out, args.fast)
        return
    known = [v["key"] for v in spec["variants"]]
    if args.only is not None and (bad := [k for k in args.only if k not in known]):
        p.error(f"--only: unknown variants {bad}; known: {known}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.only is not None:
        spec["variants"] = [v for v in spec["variants"] if v["key"] in args.only]
    if args.horizons:
        spec["horizons"] = args.horizons
    if args.seeds:
        spec["seeds"] = args.seeds
    (out / "records").mkdir(parents=True, exist_ok=True)
    if args.render:
        print(render(load_spec(args.spec) if not args.fast else spec, out))
        return
    existing = load_records(out)  # refuses a folder that already mixes budgets
    want = {"fast": args.fast, "max_steps": 2 if args.fast else spec["max_steps"]}
    if existing and record_budget(existing[0]) != want:
        p.error(
            f"{out}/records hold runs of budget {record_budget(existing[0])}, this invocation's "
            f"is {want}: use another --out"
        )
    keys = [
        run_key(v["key"], t, s)
        for t in sorted(spec["horizons"])
        for v in spec["variants"]
        for s in spec["seeds"]
    ]
    todo = [k for k in keys if args.rerun or not (out / "records" / f"{k}.json").exists()]
    print(f"[sweep] {len(todo)} of {len(keys)} runs to do, {args.jobs} at a time", flush=True)

    def one(key: str) -> None:
        record = out / "records" / f"{key}.json"
        cmd = [sys.executable, __file__, "--worker", key, "--record", str(record)]
        cmd += ["--out", str(out), "--spec", str(args.spec)] + (["--fast"] if args.fast else [])
        env = {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        r = run_recorded("sweep", key, cmd, out, record, env)
        if r is None:
            return
        print(f"[sweep] {key}: MSE {r['test_mse']:.4g}, {r['wall_s']:.0f} s", flush=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))
    print(
        render(
            load_spec(args.spec) if not args.fast else spec,
            out,
            time.perf_counter() - start,
            args.jobs,
        )
    )


if __name__ == "__main__":
    main()
