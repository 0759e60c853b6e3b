"""Run the headline recipes and write ``results/RESULTS.md`` (the README's results table).

Each entry of :data:`RUNS` is one recipe config (``recipes/*.yaml``) with optional overrides
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
import math
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine, md_table, write_json  # noqa: E402

COPY_BASELINE_T100 = 10 * math.log(8) / 120  # memoryless cross-entropy, copying T = 100


#: The digits runs made before recipes/digits.yaml gained its pixel-noise augmentation.
NO_AUGMENTATION = [
    "--trainer.reload_dataloaders_every_n_epochs",
    "0",
    "--data.init_args.pixel_noise_std",
    "0",
]


def epochs(n: int) -> list[str]:
    """Overrides: train ``n`` epochs, the cosine schedule over all of them."""
    return ["--trainer.max_epochs", str(n), "--model.init_args.cosine_epochs", str(n)]


def augmented(n_epochs: int, pixel_noise_std: float) -> list[str]:
    """Overrides of a digits recipe: ``n_epochs`` epochs (cosine over all of them) with the
    training pixels perturbed by N(0, pixel_noise_std²), drawn again every epoch."""
    return [
        "--trainer.max_epochs",
        str(n_epochs),
        "--trainer.reload_dataloaders_every_n_epochs",
        "1",
        "--model.init_args.cosine_epochs",
        str(n_epochs),
        "--data.init_args.pixel_noise_std",
        str(pixel_noise_std),
    ]


#: key -> recipe, label, overrides, metric, target (comparison, value, text)
RUNS: dict[str, dict[str, Any]] = {
    "two_moons_antisymmetric": dict(
        recipe="two_moons.yaml",
        model="antisymmetric flow (16)",
        metric="test_acc",
        target=(">=", 0.97, "≥ 97 %"),
    ),
    "two_moons_skew_linear": dict(
        recipe="two_moons_skew_linear.yaml",
        model="skew-linear flow (16)",
        metric="test_acc",
        target=("<=", "logreg", "≤ logistic regression"),
    ),
    "digits_pixel": dict(
        recipe="digits.yaml",
        model="antisymmetric ODE-RNN + adjoint reg. (every 4th step)",
        overrides=[
            *epochs(60),
            *NO_AUGMENTATION,
        ],
        metric="test_acc",
        target=(">=", 0.97, "≥ 97 %"),
    ),
    "digits_pixel_noreg_lr0.01": dict(
        recipe="digits.yaml",
        model="antisymmetric ODE-RNN, no reg., lr 0.01, batch 64 (tuning)",
        overrides=[
            "--model.init_args.lr",
            "0.01",
            "--data.init_args.batch_size",
            "64",
            "--model.init_args.regularizers",
            "[]",
            *epochs(60),
            *NO_AUGMENTATION,
        ],
        metric="test_acc",
        target=(">=", 0.97, "≥ 97 %"),
    ),
    "digits_pixel_long": dict(
        recipe="digits.yaml",
        model="antisymmetric ODE-RNN + adjoint reg. (every 4th step), weight decay 1e-4",
        overrides=[
            *epochs(150),
            "--model.init_args.weight_decay",
            "0.0001",
            *NO_AUGMENTATION,
        ],
        metric="test_acc",
        target=(">=", 0.97, "≥ 97 %"),
    ),
    "digits_pixel_aug": dict(
        recipe="digits.yaml",
        model="antisymmetric ODE-RNN + adjoint reg. (every 4th step), pixel noise 0.4",
        overrides=augmented(100, 0.4),
        metric="test_acc",
        target=(">=", 0.97, "≥ 97 %"),
    ),
    "digits_pixel_aug150": dict(
        recipe="digits.yaml",
        model="antisymmetric ODE-RNN + adjoint reg. (every 4th step), pixel noise 0.5",
        overrides=augmented(150, 0.5),
        metric="test_acc",
        target=(">=", 0.97, "≥ 97 %"),
    ),
    "digits_permuted": dict(
        recipe="digits_permuted.yaml",
        model="antisymmetric ODE-RNN + adjoint reg. (every 4th step)",
        metric="test_acc",
        target=(">=", 0.95, "≥ 95 %"),
    ),
    "digits_permuted_aug": dict(
        recipe="digits_permuted.yaml",
        model="antisymmetric ODE-RNN + adjoint reg. (every 4th step), pixel noise 0.4",
        overrides=augmented(100, 0.4),
        metric="test_acc",
        target=(">=", 0.95, "≥ 95 %"),
    ),
    "digits_permuted_h256": dict(
        recipe="digits_permuted.yaml",
        model="antisymmetric ODE-RNN (256) + adjoint reg. (every 4th step), pixel noise 0.5",
        overrides=[*augmented(100, 0.5), "--model.init_args.hidden_dim", "256"],
        metric="test_acc",
        target=(">=", 0.95, "≥ 95 %"),
    ),
    "digits_permuted_h256_150": dict(
        recipe="digits_permuted.yaml",
        model="antisymmetric ODE-RNN (256) + adjoint reg. (every 4th step), pixel noise 0.5",
        overrides=[*augmented(150, 0.5), "--model.init_args.hidden_dim", "256"],
        metric="test_acc",
        target=(">=", 0.95, "≥ 95 %"),
    ),
    "digits_permuted_h256_200": dict(
        recipe="digits_permuted.yaml",
        model="antisymmetric ODE-RNN (256) + adjoint reg. (every 4th step), pixel noise 0.5",
        overrides=[*augmented(200, 0.5), "--model.init_args.hidden_dim", "256"],
        metric="test_acc",
        target=(">=", 0.95, "≥ 95 %"),
    ),
    "digits_permuted_h256_noise08": dict(
        recipe="digits_permuted.yaml",
        model="antisymmetric ODE-RNN (256) + adjoint reg. (every 4th step), pixel noise 0.8",
        overrides=[*augmented(100, 0.8), "--model.init_args.hidden_dim", "256"],
        metric="test_acc",
        target=(">=", 0.95, "≥ 95 %"),
    ),
    "noise_padded_antisymmetric_adjoint": dict(
        recipe="digits_noise_padded.yaml",
        model="antisymmetric ODE-RNN (256) + adjoint reg. (every 4th step)",
        metric="test_acc",
        target=(">=", 0.85, "≥ 85 %"),
    ),
    "noise_padded_antisymmetric_adjoint_h64": dict(
        recipe="digits_noise_padded.yaml",
        model="antisymmetric ODE-RNN (64) + adjoint reg. (every 4th step)",
        overrides=["--model.init_args.hidden_dim", "64"],
        metric="test_acc",
        target=(">=", 0.85, "≥ 85 %"),
    ),
    "noise_padded_unstructured": dict(
        recipe="digits_noise_padded.yaml",
        model="unstructured ODE-RNN (256, baseline)",
        overrides=[
            "--model.init_args.cell",
            "unstructured",
            "--model.init_args.regularizers",
            "[]",
        ],
        metric="test_acc",
        target=None,
    ),
    "noise_padded_gru": dict(
        recipe="digits_noise_padded.yaml",
        model="GRU (256, reference)",
        overrides=[
            "--model.init_args.cell",
            "gru",
            "--model.init_args.regularizers",
            "[]",
            "--trainer.callbacks",
            "[]",
        ],
        metric="test_acc",
        target=None,
    ),
    "adding_t200": dict(
        recipe="adding.yaml",
        model="gated antisymmetric ODE-RNN + adjoint reg. (every 4th step)",
        metric="test_mse",
        target=("<=", 0.01, "MSE ≤ 0.01 (baseline 0.167)"),
    ),
    "adding_t200_12ep": dict(
        recipe="adding.yaml",
        model="gated antisymmetric ODE-RNN + adjoint reg. (every 4th step)",
        overrides=epochs(12),
        metric="test_mse",
        target=("<=", 0.01, "MSE ≤ 0.01 (baseline 0.167)"),
    ),
    "copying_t100": dict(
        recipe="copying.yaml",
        model="gated antisymmetric ODE-RNN + adjoint reg. (every 4th step)",
        metric="test_loss",
        target=(
            "<=",
            0.1 * COPY_BASELINE_T100,
            f"CE ≤ {0.1 * COPY_BASELINE_T100:.4f} (10 % of 0.173)",
        ),
    ),
    "copying_t100_long": dict(
        recipe="copying.yaml",
        model="gated antisymmetric ODE-RNN + adjoint reg. (every 4th step)",
        overrides=[
            "--data.init_args.n_train",
            "10000",
            *epochs(8),
        ],
        metric="test_loss",
        target=(
            "<=",
            0.1 * COPY_BASELINE_T100,
            f"CE ≤ {0.1 * COPY_BASELINE_T100:.4f} (10 % of 0.173)",
        ),
    ),
}


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
    held_out_ratio = None
    model, dm = cli.model, cli.datamodule
    if getattr(model, "field", None) is not None:
        from _common import adjoint_profile, profile_ratio

        x, y = dm.dataset("test").tensors
        held_out_ratio = profile_ratio(adjoint_profile(model, x[:256], y[:256]))
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
        "with `ode_reg.adjoints` on up to 256 test samples.",
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="run keys (default: all)")
    p.add_argument("--fast", action="store_true", help="2 steps per run, into results/fast/")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--render", action="store_true", help="only render RESULTS.md")
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
            log = out / "logs" / f"{key}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            with log.open("w") as fh:
                rc = subprocess.run(
                    cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env
                ).returncode
            if rc != 0 or not record_path.exists():
                print(f"[results] {key} FAILED (rc={rc}), see {log}", flush=True)
                return
            rec = json.loads(record_path.read_text())
            write_json(store, load_records(out))
            print(f"[results] {key}: {_metric_text(rec)}, {rec['wall_s']:.0f} s", flush=True)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(one, [k for k in keys if k in RUNS]))
    records = load_records(out)
    write_json(store, records)
    print(render(records, out / "RESULTS.md"))


if __name__ == "__main__":
    main()
