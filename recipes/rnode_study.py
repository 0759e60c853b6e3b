"""Where each regularizer pays: solver cost (NFE per training step) at equal updates, dopri5.

The experiment list is data: ``recipes/rnode_study.yaml`` (models, solver tolerance, epochs,
seeds, variants: none, RNODE's kinetic + Frobenius terms, ``SkewJacobianPenalty``,
``AdjointMagnitude``). Every run trains one model with one variant and seed in its own
subprocess with one torch thread (one run at a time: ``recipes/_common.run_worker``) and writes
its record (budget, test metric, NFE per training step forward and backward per epoch from
``SolverStatsMonitor``, wall time) to ``<out>/records/<model>_<variant>_s<seed>.json``; runs
with a record are skipped (resumable). From the records alone (``--render``) it writes
``<out>/STUDY.md`` (mean ± std over seeds per model and variant) and ``<out>/rnode_nfe.png``
(NFE per step by epoch). A records folder that mixes budgets (fast and full runs, or runs of
different epochs, data or tolerance) is refused.

Where it writes: the full study into ``results/rnode_study/``; ``--fast`` (one seed, 2 epochs
of 3 batches: the tests) into ``runs/rnode_study_fast/`` unless ``--out`` says otherwise, so a
quick try never touches the recorded results.

Usage::

    python recipes/rnode_study.py                   # the whole study (budget: STUDY.md)
    python recipes/rnode_study.py --only moons --variants none rnode
    python recipes/rnode_study.py --render          # tables and plot from the records only
    python recipes/rnode_study.py --fast --out /tmp/rnode   # seconds (the tests)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    ROOT,
    machine,
    md_table,
    output_dir,
    run_recorded,
    write_json,
)

SPEC = Path(__file__).resolve().parent / "rnode_study.yaml"
DEFAULT_OUT = RESULTS / "rnode_study"
FAST_OUT = ROOT / "runs" / "rnode_study_fast"


def load_spec(path: Path = SPEC, fast: bool = False) -> dict[str, Any]:
    """The study's YAML, checked (unique keys, a metric per model); ``fast`` applies its
    ``fast`` block (seeds, epochs, batch limits)."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    spec["_path"] = (
        str(Path(path).relative_to(ROOT)) if Path(path).is_relative_to(ROOT) else str(path)
    )
    for group in ("models", "variants"):
        keys = [m["key"] for m in spec[group]]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{path}: {group} keys must be unique, got {keys}")
    for m in spec["models"]:
        for field in ("key", "label", "build", "metric", "epochs", "model", "data"):
            if field not in m:
                raise ValueError(f"{path}: model {m.get('key')!r} lacks {field!r}")
    spec["fast_mode"] = bool(fast)
    if fast:
        f = spec.get("fast", {})
        spec["seeds"] = f.get("seeds", spec["seeds"][:1])
        for m in spec["models"]:
            m["epochs"] = f.get("epochs", 1)
    return spec


def run_key(model: str, variant: str, seed: int) -> str:
    return f"{model}_{variant}_s{seed}"


def budget(spec: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs of one model comparable: the same epochs, batch limits, data,
    model arguments and solver (a records folder must hold one budget per model)."""
    f = spec.get("fast", {}) if spec["fast_mode"] else {}
    return {
        "fast": spec["fast_mode"],
        "epochs": model["epochs"],
        "limit_train_batches": f.get("limit_train_batches"),
        "limit_test_batches": f.get("limit_test_batches"),
        "solver": spec["solver"],
        "model": model["model"],
        "data": model["data"],
    }


# --------------------------------------------------------------------------- one run
def _regularizers(model: dict[str, Any], variant: dict[str, Any]) -> list[Any]:
    out = []
    for r in variant["regularizers"]:
        mod, _, name = r["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(mod), name)
        kwargs = {**r.get("init_args", {}), **model.get("term_args", {}).get(name, {})}
        out.append(cls(**kwargs))
    return out


def build(spec: dict[str, Any], model: dict[str, Any], regs: list[Any], seed: int) -> tuple:
    """The LightningModule and data module of one run."""
    import ode_reg.data as data_mod
    from ode_reg.models import CNF2D, FlowClassifier

    solver = spec["solver"]
    data = getattr(data_mod, model["data"]["class"])(**model["data"]["args"], seed=seed)
    if model["build"] == "cnf":
        return CNF2D(**model["model"], **solver, regularizers=regs), data

    class StudyFlowClassifier(FlowClassifier):
        """The flow classifier with dopri5 at the study's tolerance (its own steps as
        checkpoints) and, for images, the flattened pixels as the input."""

        def forward(self, x):  # noqa: ANN001, ANN202
            x = x.flatten(1)
            z0 = self.hparams.init_scale * self.encoder(x)
            zs = self.odeint(self.field, z0, self.span.to(x.dtype), **solver)
            return self.decoder(zs[-1])

    if model["build"] not in ("flow_classifier", "block_classifier"):
        raise ValueError(f"unknown build {model['build']!r}")
    return StudyFlowClassifier(**model["model"], regularizers=regs), data


def worker(spec: dict[str, Any], key: str, record: Path) -> None:
    """Train one run in this process and write its record."""
    import lightning as L
    import torch

    from ode_reg import SolverStatsMonitor

    torch.set_num_threads(1)
    mkey, vkey, seed = _parse_key(spec, key)
    model_spec = next(m for m in spec["models"] if m["key"] == mkey)
    variant = next(v for v in spec["variants"] if v["key"] == vkey)
    L.seed_everything(seed, verbose=False)
    regs = _regularizers(model_spec, variant)
    model, data = build(spec, model_spec, regs, seed)
    monitor = SolverStatsMonitor(nfe_factor=None, dt_fraction=None, adjoint_orders=None)
    b = budget(spec, model_spec)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=model_spec["epochs"],
        limit_train_batches=b["limit_train_batches"] or 1.0,
        limit_val_batches=0,
        limit_test_batches=b["limit_test_batches"] or 1.0,
        num_sanity_val_steps=0,
        inference_mode=False,  # the CNF takes its exact trace by autograd at test time
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    steps = int(trainer.global_step)
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    metric = test.get(model_spec["metric"]["key"])
    hist = [
        {
            "epoch": int(e["epoch"]),
            "steps": int(e["steps"]),
            "nfe_per_step": float(e["nfe_per_step"]),
            "nfe_backward_per_step": float(e["nfe_backward_per_step"]),
            "rejected_per_step": float(e["rejected_per_step"]),
        }
        for e in monitor.history
    ]
    total = sum(e["steps"] for e in hist) or 1
    write_json(
        record,
        {
            "key": key,
            "model": mkey,
            "variant": vkey,
            "label": variant["label"],
            "seed": seed,
            "steps": steps,
            "epochs": int(trainer.current_epoch),
            "wall_s": wall,
            "metric_key": model_spec["metric"]["key"],
            "metric": None if metric is None else float(metric),
            "nfe_per_step": sum(e["nfe_per_step"] * e["steps"] for e in hist) / total,
            "nfe_backward_per_step": sum(e["nfe_backward_per_step"] * e["steps"] for e in hist)
            / total,
            "nfe_last_epoch": hist[-1]["nfe_per_step"] if hist else None,
            "history": hist,
            "budget": b,
            "regularizers": [repr(r) for r in regs],
            "command": f"python recipes/rnode_study.py --only {mkey} --variants {vkey} "
            f"--seeds {seed}" + (" --fast" if spec["fast_mode"] else ""),
        },
    )


def _parse_key(spec: dict[str, Any], key: str) -> tuple[str, str, int]:
    head, seed = key.rsplit("_s", 1)
    for m in spec["models"]:
        if head.startswith(m["key"] + "_"):
            return m["key"], head[len(m["key"]) + 1 :], int(seed)
    raise ValueError(f"unknown run key {key!r}")


# --------------------------------------------------------------------------- from the records
def load_records(out: Path) -> list[dict[str, Any]]:
    """The records under ``out/records``.

    Raises:
        ValueError: if they mix budgets: fast and full runs, or runs of one model with
            different epochs, batch limits, data, model arguments or solver.
    """
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    fast = {bool(r["budget"]["fast"]) for r in records}
    if len(fast) > 1:
        raise ValueError(f"{out}/records mixes fast and full runs: use separate --out folders")
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        seen = by_model.setdefault(r["model"], {})
        text = json.dumps(r["budget"], sort_keys=True)
        seen.setdefault(text, r)
        if len(seen) > 1:
            keys = [x["key"] for x in seen.values()]
            raise ValueError(
                f"{out}/records mixes budgets for model {r['model']!r} (runs {keys}): "
                "use separate --out folders"
            )
    return records


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(spec: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, variant): mean ± std over seeds of the metric and NFE per step."""
    rows = []
    for m in spec["models"]:
        for v in spec["variants"]:
            rs = [r for r in records if r["model"] == m["key"] and r["variant"] == v["key"]]
            if not rs:
                continue
            row = {"model": m["key"], "model_label": m["label"], "variant": v["key"]}
            row["label"] = v["label"]
            row["metric_name"] = m["metric"]["name"]
            row["higher_is_better"] = bool(m["metric"]["higher_is_better"])
            row["seeds"] = sorted(r["seed"] for r in rs)
            row["steps"] = sorted({r["steps"] for r in rs})
            for name in ("metric", "nfe_per_step", "nfe_backward_per_step", "nfe_last_epoch"):
                row[name], row[name + "_std"] = _mean_std([r[name] for r in rs])
            row["wall_mean_s"] = statistics.fmean(r["wall_s"] for r in rs)
            rows.append(row)
    return rows


def savings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and regularized variant: the NFE per step saved against no regularizer (in %,
    the mean over training) and the metric lost (in the metric's units, positive = worse)."""
    out = []
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["variant"] == "none"), None)
        if base is None or r["variant"] == "none":
            continue
        saved = 100.0 * (1.0 - r["nfe_per_step"] / base["nfe_per_step"])
        lost = (
            base["metric"] - r["metric"] if r["higher_is_better"] else r["metric"] - base["metric"]
        )
        out.append({**r, "nfe_saved_pct": saved, "metric_lost": lost})
    return out


def verdict(rows: list[dict[str, Any]]) -> str:
    """One sentence: which term buys the most solver savings per unit of metric lost.

    Per variant, summed over the models: the NFE per step saved (%, training mean, against no
    regularizer) over the metric lost (% of the unregularized metric; a metric that improved
    counts as 0 lost, so gains on one model do not offset losses on another).
    """
    sv = savings(rows)
    if not sv:
        return "(no regularized variant with a baseline in the records yet)"
    base = {r["model"]: r for r in rows if r["variant"] == "none"}
    score = {}
    for r in sv:
        b = base[r["model"]]
        lost_pct = max(0.0, 100.0 * r["metric_lost"] / abs(b["metric"]))
        s = score.setdefault(r["variant"], {"label": r["label"], "saved": 0.0, "lost": 0.0})
        s["saved"] += r["nfe_saved_pct"]
        s["lost"] += lost_pct
        s["n"] = s.get("n", 0) + 1

    def ratio(s: dict[str, Any]) -> float:
        return s["saved"] / s["lost"] if s["lost"] > 0 else math.inf

    ranked = sorted(score.values(), key=lambda s: (-ratio(s), -s["saved"]))
    top = ranked[0]
    best = max((r for r in sv if r["label"] == top["label"]), key=lambda r: r["nfe_saved_pct"])
    b = base[best["model"]]
    others = "; ".join(
        f"{s['label']} {s['saved']:+.0f} % for {s['lost']:.1f} % ({ratio(s):.1f})"
        for s in ranked[1:]
    )
    return (
        f"Per unit of metric lost, {top['label']} buys the most solver savings: "
        f"{top['saved']:+.0f} % NFE per step summed over {top['n']} model(s) for "
        f"{top['lost']:.1f} % of the metric lost ({ratio(top):.1f} % NFE per % lost; "
        f"{others}); its largest saving, {best['nfe_saved_pct']:+.0f} % on the "
        f"{best['model_label']}, comes at {best['metric_name']} {best['metric']:.3f} ± "
        f"{best['metric_std']:.3f} against {b['metric']:.3f} ± {b['metric_std']:.3f} without "
        "a term."
    )


def table(rows: list[dict[str, Any]]) -> str:
    """The per (model, variant) table, mean ± std over seeds."""
    sv = {(r["model"], r["variant"]): r for r in savings(rows)}

    def pm(r: dict[str, Any], name: str, fmt: str) -> str:
        return f"{r[name]:{fmt}} ± {r[name + '_std']:{fmt}}"

    return md_table(
        [
            "model",
            "variant",
            "seeds",
            "steps",
            "test metric",
            "NFE / step (fwd, training mean)",
            "NFE / step (fwd, last epoch)",
            "NFE / step (bwd)",
            "NFE saved",
            "wall / run",
        ],
        [
            [
                r["model_label"],
                r["label"],
                len(r["seeds"]),
                "/".join(map(str, r["steps"])),
                f"{r['metric_name']} {pm(r, 'metric', '.3f')}",
                pm(r, "nfe_per_step", ".1f"),
                pm(r, "nfe_last_epoch", ".1f"),
                f"{r['nfe_backward_per_step']:.0f}",
                "–"
                if (r["model"], r["variant"]) not in sv
                else f"{sv[(r['model'], r['variant'])]['nfe_saved_pct']:+.0f} %",
                f"{r['wall_mean_s']:.0f} s",
            ]
            for r in rows
        ],
    )


def plot(spec: dict[str, Any], records: list[dict[str, Any]], path: Path) -> Path:
    """NFE per training step by epoch, one panel per model, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in spec["models"] if any(r["model"] == m["key"] for r in records)]
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(4.6 * max(len(models), 1), 4.2))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    for ax, m in zip(axes, models):
        for i, v in enumerate(spec["variants"]):
            rs = [r for r in records if r["model"] == m["key"] and r["variant"] == v["key"]]
            if not rs:
                continue
            n = min(len(r["history"]) for r in rs)
            ep = [rs[0]["history"][e]["epoch"] for e in range(n)]
            per = [[r["history"][e]["nfe_per_step"] for r in rs] for e in range(n)]
            mean = [statistics.fmean(p) for p in per]
            std = [statistics.stdev(p) if len(p) > 1 else 0.0 for p in per]
            ax.plot(ep, mean, marker="o", ms=3, color=f"C{i}", label=v["label"])
            ax.fill_between(
                ep,
                [a - b for a, b in zip(mean, std)],
                [a + b for a, b in zip(mean, std)],
                color=f"C{i}",
                alpha=0.15,
            )
        ax.set_title(m["label"], fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("forward NFE per training step (epoch mean)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7, loc="lower left")
    tol = spec["solver"]
    fig.suptitle(
        f"Solver cost during training: {tol['method']} rtol={tol['rtol']:g} atol={tol['atol']:g} "
        f"(mean ± std over {len(spec['seeds'])} seed(s))",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(spec: dict[str, Any], out: Path, elapsed_s: float | None = None) -> str:
    """``STUDY.md``, ``summary.json`` and ``rnode_nfe.png`` from the records under ``out``."""
    records = load_records(out)
    rows = summarize(spec, records)
    meta_path = out / "study_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if elapsed_s is not None:
        meta["wall_s_total"] = meta.get("wall_s_total", 0.0) + elapsed_s
        write_json(meta_path, meta)
    if records:
        plot(spec, records, out / "rnode_nfe.png")
    total = sum(r["wall_s"] for r in records)
    where = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    tol = spec["solver"]
    epochs = ", ".join(f"{m['label']} {m['epochs']}" for m in spec["models"])
    text = [
        "# Solver cost at equal updates: RNODE's terms beside the note's",
        "",
        f"Made by `python recipes/rnode_study.py` from `{spec['_path']}`"
        + (" (--fast)" if spec["fast_mode"] else "")
        + f"; records in `{where}/records/`. Measured on {machine()}, one run at a time under "
        "`nice` beside other jobs (wall times are upper bounds). Solver: "
        f"{tol['method']}, rtol {tol['rtol']:g}, atol {tol['atol']:g}, backpropagation "
        "through the solver's operations (`odeint`, which `AdjointMagnitude` needs), so the "
        "backward NFE is 0 by construction and the backward cost follows the forward NFE. "
        f"Epochs (every variant of a model the same updates): {epochs}. NFE / step: the "
        "forward field evaluations of a training step (`SolverStatsMonitor`), mean over all "
        "training steps (and over the last epoch), then mean ± std over seeds; NFE saved: "
        "against no regularizer, training mean. Test metric with the final weights.",
        "",
        f"Runs: {len(records)}; summed run wall time {total / 60:.1f} min"
        + (
            f"; study wall time {meta['wall_s_total'] / 60:.1f} min."
            if meta.get("wall_s_total")
            else "."
        ),
        "",
        table(rows),
        "",
        verdict(rows),
        "",
        "![NFE per training step by epoch](rnode_nfe.png)",
        "",
        "Per run:",
        "",
        md_table(
            ["run", "steps", "wall", "metric", "NFE / step", "command"],
            [
                [
                    r["key"],
                    r["steps"],
                    f"{r['wall_s']:.0f} s",
                    "–" if r["metric"] is None else f"{r['metric']:.4g}",
                    f"{r['nfe_per_step']:.1f}",
                    f"`{r['command']}`",
                ]
                for r in records
            ],
        ),
    ]
    md = "\n".join(text) + "\n"
    (out / "STUDY.md").write_text(md)
    write_json(out / "summary.json", rows)
    return md


def readme_block(out: Path = DEFAULT_OUT, spec_path: Path = SPEC) -> str:
    """The README's block: the table and the one-sentence verdict from the recorded study."""
    spec = load_spec(spec_path)
    rows = summarize(spec, load_records(out)) if (out / "records").exists() else []
    if not rows:
        return "(not run yet: `python recipes/rnode_study.py`)"
    return table(rows) + "\n\n" + verdict(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, default=SPEC, help="the study's YAML")
    p.add_argument("--only", nargs="*", default=None, help="model keys (default: all)")
    p.add_argument("--variants", nargs="*", default=None, help="variant keys (default: all)")
    p.add_argument("--seeds", nargs="*", type=int, default=None, help="seeds (default: all)")
    p.add_argument("--rerun", action="store_true", help="run even where a record exists")
    p.add_argument("--render", action="store_true", help="only the tables and plot")
    p.add_argument("--fast", action="store_true", help="2 epochs of 3 batches, one seed (tests)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default results/rnode_study; with --fast runs/rnode_study_fast)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    spec = load_spec(args.spec, fast=args.fast)
    out = output_dir(args.out, args.fast, DEFAULT_OUT, FAST_OUT)
    if args.worker:
        worker(spec, args.worker, args.record)
        return
    for flag, given, known in (
        ("--only", args.only, [m["key"] for m in spec["models"]]),
        ("--variants", args.variants, [v["key"] for v in spec["variants"]]),
    ):
        if given is not None and (bad := [k for k in given if k not in known]):
            p.error(f"{flag}: unknown keys {bad}; known: {known}")
    full = load_spec(args.spec, fast=args.fast)
    if args.only is not None:
        spec["models"] = [m for m in spec["models"] if m["key"] in args.only]
    if args.variants is not None:
        spec["variants"] = [v for v in spec["variants"] if v["key"] in args.variants]
    if args.seeds:
        spec["seeds"] = args.seeds
    (out / "records").mkdir(parents=True, exist_ok=True)
    if args.render:
        print(render(full, out))
        return
    existing = load_records(out)  # refuses a folder that already mixes budgets
    for m in spec["models"]:
        old = next((r["budget"] for r in existing if r["model"] == m["key"]), None)
        if old is not None and old != json.loads(json.dumps(budget(spec, m))):
            p.error(
                f"{out}/records hold {m['key']} runs of another budget ({old}); this "
                f"invocation's is {budget(spec, m)}: use another --out"
            )
    keys = [
        run_key(m["key"], v["key"], s)
        for m in spec["models"]
        for s in spec["seeds"]
        for v in spec["variants"]
    ]
    todo = [k for k in keys if args.rerun or not (out / "records" / f"{k}.json").exists()]
    print(f"[rnode] {len(todo)} of {len(keys)} runs to do, one at a time -> {out}", flush=True)
    start = time.perf_counter()
    for key in todo:
        record = out / "records" / f"{key}.json"
        cmd = [sys.executable, __file__, "--worker", key, "--record", str(record)]
        cmd += ["--out", str(out), "--spec", str(args.spec)] + (["--fast"] if args.fast else [])
        r = run_recorded("rnode", key, cmd, out, record)
        if r is None:
            continue
        print(
            f"[rnode] {key}: {r['metric_key']} {r['metric']:.4g}, NFE/step "
            f"{r['nfe_per_step']:.1f}, {r['wall_s']:.0f} s",
            flush=True,
        )
        try:  # keep STUDY.md current while the study runs (partial records are honest ones)
            render(full, out, None)
        except Exception as exc:  # noqa: BLE001 - rendering must not stop the runs
            print(f"[rnode] render failed: {exc}", flush=True)
    print(render(full, out, time.perf_counter() - start))


if __name__ == "__main__":
    main()
