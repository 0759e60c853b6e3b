"""Run the headline recipes and write ``results/RESULTS.md`` (the README's results table).

Each entry of ``recipes/experiments.yaml`` (:data:`RUNS`) is one recipe config (``recipes/*.yaml``) with optional overrides
(more epochs, another cell, no regularizer). Every run goes through the ``ode-reg`` CLI
in-process (``ode_reg.cli.run``), in its own subprocess with one torch thread; at most
``--jobs`` run at once. Each run's record (command, seed, epochs, wall time, test metrics,
adjoint ratio) is written to ``results/records/<key>.json`` as it finishes, so a partial rerun
(``--only``) keeps the others; ``results/results.json`` merges them and ``RESULTS.md`` is
rendered from all of them (``records/_notes.json`` holds a note per run: what was tried).

Usage::

    python recipes/results.py                      # every run (about an hour on 2 cores)
    python recipes/results.py --only two_moons_antisymmetric digits_pixel
    python recipes/results.py --fast               # 2 steps each, into results/fast/ (tests)
    python recipes/results.py --render             # only rewrite RESULTS.md from the JSON
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine, md_table, run_recorded, write_json  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parent / "experiments.yaml"


def load_runs(path: Path = EXPERIMENTS) -> dict[str, dict[str, Any]]:
    """The run list of ``recipes/experiments.yaml``: key -> recipe (file name under
    ``recipes/``), model label, overrides (flat argument list), metric, target
    ``(comparison, value, text)`` or None.

    Raises:
        ValueError: on a duplicate key or a run without recipe, model or metric.
    """
    import yaml

    runs: dict[str, dict[str, Any]] = {}
    for entry in yaml.safe_load(path.read_text())["runs"]:
        key = entry.get("key")
        if key in runs:
            raise ValueError(f"{path}: duplicate run key {key!r}")
        missing = [f for f in ("key", "recipe", "model", "metric") if f not in entry]
        if missing:
            raise ValueError(f"{path}: run {key!r} lacks {missing}")
        target = entry.get("target")
        runs[key] = {
            "recipe": Path(entry["recipe"]).name,
            "model": entry["model"],
            "metric": entry["metric"],
            "overrides": [str(x) for kv in (entry.get("overrides") or {}).items() for x in kv],
            "target": None if target is None else (target["op"], target["value"], target["text"]),
            "readme": entry.get("readme"),
        }
    return runs


RUNS = load_runs()


def command(key: str, fast: bool, root: Path, extra: list[str] | None = None) -> list[str]:
    """The ``ode-reg fit`` arguments of one run."""
    spec = RUNS[key]
    args = [
        "fit",
        "--config",
        f"recipes/{spec['recipe']}",
        *spec.get("overrides", []),
        *(extra or []),
    ]
    run_dir = root / "runs" / key
    args += ["--trainer.default_root_dir", str(run_dir)]
    args += [
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        "--trainer.logger.init_args.name",
        key,
    ]
    args += ["--trainer.enable_progress_bar", "false"]
    if fast:
        args += [
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.limit_test_batches",
            "1",
        ]
        data = _data_args(spec["recipe"])
        for name, value in (("n_train", 128), ("n_val", 32), ("n_test", 32)):
            if name in data:
                args += [f"--data.init_args.{name}", str(value)]
    return args


def _data_args(recipe: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ROOT / "recipes" / recipe).read_text())["data"]["init_args"]


def worker(
    key: str, record_path: Path, fast: bool, root: Path, extra: list[str] | None = None
) -> None:
    """Run one recipe in this process and write its record."""
    import torch

    torch.set_num_threads(1)
    from ode_reg.cli import run
    from ode_reg.summary import run_dir

    args = command(key, fast, root, extra)
    start = time.perf_counter()
    cli = run(args)
    wall = time.perf_counter() - start
    trainer = cli.trainer
    summary_file = run_dir(trainer) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    # The summary's held-out adjoint max/min (ode_reg.summary.held_out_adjoint_ratio: the
    # first 256 test samples after training), so the table and the command print one figure.
    held_out_ratio = summary.get("adjoint_ratio_held_out")
    config = cli.config["fit"] if "fit" in cli.config else cli.config
    record = {
        "key": key,
        "recipe": f"recipes/{RUNS[key]['recipe']}",
        "model": RUNS[key]["model"],
        "seed": int(config.get("seed_everything") or 0),
        "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "wall_s": wall,
        "test_acc": metrics.get("test/acc"),
        "test_mse": metrics.get("test/mse"),
        "test_loss": metrics.get("test/loss"),
        "adjoint_ratio_max_min": summary.get("adjoint_ratio_max_min"),
        "adjoint_ratio_held_out": held_out_ratio,
        "command": "ode-reg " + shlex.join(_public(args)),
        "threads": torch.get_num_threads(),
    }
    write_json(record_path, record)


def _public(args: list[str]) -> list[str]:
    """The command as a reader would type it (without the output-folder plumbing)."""
    out, skip = [], 0
    for a in args:
        if skip:
            skip -= 1
            continue
        if a in (
            "--trainer.default_root_dir",
            "--trainer.logger.init_args.save_dir",
            "--trainer.logger.init_args.name",
            "--trainer.enable_progress_bar",
        ):
            skip = 1
            continue
        out.append(a)
    return out


def logistic_regression_two_moons() -> dict[str, Any]:
    """Reference: a linear classifier on the raw two-moons inputs, same split as the recipe."""
    from sklearn.linear_model import LogisticRegression

    from ode_reg.data import TwoMoonsDataModule

    data = _data_args("two_moons.yaml")
    dm = TwoMoonsDataModule(**data)
    dm.setup()
    x, y = dm.dataset("train").tensors
    xt, yt = dm.dataset("test").tensors
    start = time.perf_counter()
    clf = LogisticRegression().fit(x.numpy(), y.numpy())
    acc = float(clf.score(xt.numpy(), yt.numpy()))
    return {
        "key": "two_moons_logreg",
        "recipe": "(sklearn)",
        "model": "logistic regression on raw (x1, x2)",
        "seed": data.get("seed", 0),
        "epochs": "-",
        "wall_s": time.perf_counter() - start,
        "test_acc": acc,
        "command": "python recipes/results.py --only two_moons_logreg",
    }


def _met(record: dict[str, Any], logreg: float | None) -> str:
    spec = RUNS.get(record["key"])
    if spec is None or spec["target"] is None:
        return "(reference)"
    op, value, _ = spec["target"]
    got = record.get(spec["metric"])
    if got is None:
        return "?"
    if value == "logreg":
        if logreg is None:
            return "?"
        value = logreg + 1e-9
    ok = got >= value if op == ">=" else got <= value
    return "yes" if ok else "**no**"


def _metric_text(record: dict[str, Any]) -> str:
    spec = RUNS.get(record["key"])
    name = spec["metric"] if spec else "test_acc"
    v = record.get(name)
    if v is None:
        return "?"
    if name == "test_acc":
        return f"acc {100 * v:.1f} %"
    if name == "test_mse":
        return f"MSE {v:.4f}"
    return f"CE {v:.4f}"


def load_records(out: Path) -> dict[str, dict[str, Any]]:
    """All run records: one ``records/<key>.json`` per run (the source of truth, so that
    concurrent invocations never overwrite each other), plus ``records/_notes.json``."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted((out / "records").glob("*.json")):
        records[path.stem] = json.loads(path.read_text())
    return records


def render(records: dict[str, dict[str, Any]], out: Path) -> str:
    logreg = records.get("two_moons_logreg", {}).get("test_acc")
    order = ["two_moons_logreg", *RUNS]
    rows = []
    for key in order:
        r = records.get(key)
        spec = RUNS.get(key)
        target = spec["target"][2] if spec and spec["target"] else "-"
        if r is None:
            if spec is not None:
                recipe = f"recipes/{spec['recipe']}"
                rows.append(
                    [
                        key,
                        recipe,
                        spec["model"],
                        "-",
                        "-",
                        "-",
                        "not run yet",
                        "-",
                        target,
                        "not run",
                    ]
                )
            continue
        ratio = r.get("adjoint_ratio_held_out")
        rows.append(
            [
                key,
                r["recipe"],
                spec["model"] if spec else r["model"],
                r["seed"],
                r["epochs"],
                f"{r['wall_s']:.0f} s",
                _metric_text(r),
                "-" if ratio is None else f"{ratio:.3g}",
                target,
                _met(r, logreg),
            ]
        )
    header = [
        "run",
        "recipe",
        "model",
        "seed",
        "epochs",
        "wall time",
        "test metric",
        "adjoint max/min (held-out batch)",
        "target",
        "met?",
    ]
    text = [
        "# Results",
        "",
        "Made by `python recipes/results.py` (records in `results/results.json`). "
        f"Measured on {machine()}; two to five runs shared the machine's two cores at a time "
        "(one torch thread each), alongside other jobs, so wall times are upper bounds for a "
        "quiet 2-core machine and are not comparable between rows. "
        "Wall time covers fit and test (not the Python start-up). Test metrics are on the held-out "
        "test split, evaluated with the final weights. The adjoint ratio is max_k / min_k of "
        "mean_i |dL/dz_k| over the sequence (or the flow's checkpoints), computed after training "
        "with `ode_reg.adjoints` on the first 256 test samples "
        "(`ode_reg.summary.held_out_adjoint_ratio`, the figure the `ode-reg` summary prints as "
        '"held-out adjoint max/min"; README, "Reading the summary").',
        "",
        md_table(header, rows),
        "",
        "Commands (run from the repository root):",
        "",
    ]
    for key in order:
        r = records.get(key)
        if r is not None:
            text.append(f"- `{key}`: `{r['command']}`")
    text += [
        "",
        "Also: `results/ablation.md` (`python recipes/ablation.py`: regularizers x cells, adjoint ratio and "
        "accuracy) and `results/alpha_sweep.md` (`python recipes/alpha_sweep.py`: field scale and initial-state "
        "scale on two moons).",
    ]
    notes = records.get("_notes", {})
    if notes:
        text += ["", "Notes:", ""]
        text += [f"- `{k}`: {v}" for k, v in notes.items()]
    md = "\n".join(text) + "\n"
    out.write_text(md)
    return md


README = ROOT / "README.md"


def _readme_table(records: dict[str, dict[str, Any]]) -> str:
    """The README's results table: the runs with a ``readme`` label, in the YAML's order."""
    logreg = records.get("two_moons_logreg", {}).get("test_acc")
    rows = []
    if logreg is not None:
        rows.append(["two moons", "logistic regression on raw inputs", "–", "0 s"])
        rows[-1] += [f"acc {100 * logreg:.1f} %", "–", "reference", ""]
    for key, spec in RUNS.items():
        r = records.get(key)
        if not spec.get("readme"):
            continue
        target = spec["target"][2] if spec["target"] else "reference"
        if r is None:
            rows.append([spec["readme"], spec["model"], "–", "–", "not run yet", "–", target, ""])
            continue
        ratio = r.get("adjoint_ratio_held_out")
        met = _met(r, logreg).replace("**", "").replace("(reference)", "")
        rows.append(
            [
                spec["readme"],
                spec["model"],
                r["epochs"],
                f"{r['wall_s']:.0f} s",
                _metric_text(r),
                "–" if ratio is None else f"{ratio:.3g}",
                target,
                met,
            ]
        )
    header = ["recipe", "model", "epochs", "wall", "test metric", "held-out adjoint max/min"]
    return md_table([*header, "target", "met?"], rows)


def _sweep_table(spec_name: str = "sweep.yaml", folder: str = "sweep") -> str:
    """A sweep's summary (mean ± std, success rate, ratio, wall) from its records."""
    import sweep

    spec = sweep.load_spec(ROOT / "recipes" / spec_name)
    rows = sweep.summarize(spec, sweep.load_records(RESULTS / folder))
    if not rows:
        return f"(not run yet: `python recipes/sweep.py --spec recipes/{spec_name}`)"
    seeds = len(spec["seeds"])
    budget = f"{spec['max_steps']} × {spec['common']['--data.init_args.batch_size']}"
    return md_table(
        [
            "model",
            "T",
            "steps × batch",
            f"test MSE (mean ± std, {seeds} seeds)" if seeds > 1 else "test MSE (1 seed)",
            "MSE < 0.01",
            "adjoint max/min",
            "wall / run",
        ],
        [
            [
                r["label"],
                r["T"],
                budget,
                f"{r['mean']:.4f} ± {r['std']:.4f}" if r["runs"] > 1 else f"{r['mean']:.4f}",
                f"{r['successes']}/{r['runs']}",
                "–" if r["ratio_median"] is None else f"{r['ratio_median']:.3g}",
                f"{r['wall_mean_s']:.0f} s",
            ]
            for r in rows
        ],
    )


def readme_blocks(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The README's generated blocks, by marker name (``<!-- NAME:begin -->``...``end``)."""
    return {
        "results-table": _readme_table(records),
        "sweep-table": _sweep_table(),
        "sweep-long-table": _sweep_table("sweep_long.yaml", "sweep_long"),
        "rnode-study-table": _rnode_table(),
    }


def _rnode_table() -> str:
    """The RNODE study's table and verdict, from ``results/rnode_study/records``."""
    import rnode_study

    return rnode_study.readme_block()


def update_readme(records: dict[str, dict[str, Any]], check: bool = False) -> list[str]:
    """Rewrite (or with ``check`` only compare) the README's generated blocks; returns the
    names of the blocks that were (or would be) changed.

    Raises:
        ValueError: if a block's markers are missing from the README.
    """
    text = README.read_text()
    changed = []
    for name, body in readme_blocks(records).items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in text or end not in text:
            raise ValueError(f"README.md lacks the markers {begin} ... {end}")
        head, rest = text.split(begin, 1)
        old, tail = rest.split(end, 1)
        if old.strip() != body.strip():
            changed.append(name)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    if changed and not check:
        README.write_text(text)
    return changed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="run keys (default: all)")
    p.add_argument("--fast", action="store_true", help="2 steps per run, into results/fast/")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--render", action="store_true", help="only render RESULTS.md and the README")
    p.add_argument(
        "--check-readme", action="store_true", help="exit 1 if the README's tables are stale"
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/)")
    p.add_argument("--extra", default="", help="extra ode-reg overrides for every run, one string")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = args.out or (RESULTS / "fast" if args.fast else RESULTS)
    out = out.resolve()
    if args.worker:
        worker(args.worker, args.record, args.fast, out, shlex.split(args.extra))
        return
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    records = load_records(out)
    if args.check_readme:
        stale = update_readme(records, check=True)
        if stale:
            sys.exit(
                f"README.md blocks {stale} differ from the records: python recipes/results.py --render"
            )
        return
    if not args.render:
        keys = args.only if args.only is not None else ["two_moons_logreg", *RUNS]
        unknown = [k for k in keys if k not in RUNS and k != "two_moons_logreg"]
        if unknown:
            p.error(f"unknown run keys {unknown}; known: {['two_moons_logreg', *RUNS]}")
        if "two_moons_logreg" in keys:
            write_json(out / "records" / "two_moons_logreg.json", logistic_regression_two_moons())
            records = load_records(out)
            write_json(store, records)

        def one(key: str) -> None:
            record_path = out / "records" / f"{key}.json"
            record_path.unlink(missing_ok=True)
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                key,
                "--record",
                str(record_path),
                "--out",
                str(out),
            ]
            if args.fast:
                cmd.append("--fast")
            if args.extra:
                cmd.append(f"--extra={args.extra}")
            rec = run_recorded("results", key, cmd, out, record_path)
            if rec is None:
                return
            write_json(store, load_records(out))
            print(f"[results] {key}: {_metric_text(rec)}, {rec['wall_s']:.0f} s", flush=True)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(one, [k for k in keys if k in RUNS]))
    records = load_records(out)
    write_json(store, records)
    print(render(records, out / "RESULTS.md"))
    if out == RESULTS.resolve():
        print(f"README.md blocks rewritten: {update_readme(records) or 'none changed'}")


if __name__ == "__main__":
    main()
