"""The result scripts in ``recipes/`` run end to end in ``--fast`` mode (a couple of steps each)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    import os

    wandb = tmp_path / "wandb"
    wandb.mkdir()
    extra = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb),
        "WANDB_CACHE_DIR": str(wandb),
        "WANDB_DATA_DIR": str(wandb),
        "OMP_NUM_THREADS": "1",
    }
    return {**os.environ, **extra}


def _run(script: str, out: Path, env: dict[str, str], *extra: str) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / script),
        "--fast",
        "--jobs",
        "1",
        "--out",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_alpha_sweep_fast(tmp_path: Path, env: dict[str, str]) -> None:
    _run("alpha_sweep.py", tmp_path, env)
    data = json.loads((tmp_path / "alpha_sweep.json").read_text())
    assert len(data["runs"]) == 8
    for r in data["runs"]:
        if r["flow"] == "skew_linear":  # norm-preserving flow: |z(T)| = |z(0)|
            assert abs(r["zT_norm"] - r["z0_norm"]) <= 1e-3 * r["z0_norm"]
        assert r["adjoint_ratio_max_min"] >= 1.0
    assert (tmp_path / "alpha_sweep.png").stat().st_size > 0
    assert "| flow |" in (tmp_path / "alpha_sweep.md").read_text()


def test_ablation_fast(tmp_path: Path, env: dict[str, str]) -> None:
    _run("ablation.py", tmp_path, env)
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert {(r["cell"], r["reg"]) for r in data["runs"]} == {
        (c, g)
        for c in ("unstructured", "antisymmetric")
        for g in ("none", "adjoint", "sens_dir", "sens_dir_stopgrad", "skew")
    }
    for r in data["runs"]:
        assert r["adjoint_ratio_max_min"] >= 1.0
        assert len(r["adjoint_profile"]) == 17  # T = 16 steps + the initial state
    assert (tmp_path / "ablation.png").stat().st_size > 0


def test_results_fast(tmp_path: Path, env: dict[str, str]) -> None:
    _run("results.py", tmp_path, env, "--only", "two_moons_logreg", "two_moons_skew_linear")
    records = json.loads((tmp_path / "results.json").read_text())
    assert set(records) >= {"two_moons_logreg", "two_moons_skew_linear"}
    rec = records["two_moons_skew_linear"]
    assert rec["steps"] == 2 and rec["command"].startswith("ode-reg fit --config recipes/")
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| run | recipe |" in table and "two_moons_skew_linear" in table


def test_sweep_fast(tmp_path: Path, env: dict[str, str]) -> None:
    _run("sweep.py", tmp_path, env, "--only", "unstructured_adjoint", "gru")
    records = sorted((tmp_path / "records").glob("*.json"))
    assert [p.stem for p in records] == ["gru_T20_s0", "unstructured_adjoint_T20_s0"]
    for path in records:
        r = json.loads(path.read_text())
        assert r["steps"] == 2 and r["T"] == 20 and r["seed"] == 0
        assert r["test_mse"] is not None and r["test_mse"] >= 0
        assert r["command"].startswith("ode-reg fit --config recipes/adding.yaml")
        assert "--data.init_args.seq_len 20" in r["command"]
        assert "--trainer.gradient_clip_val 1.0" in r["command"]
    adj = json.loads(records[1].read_text())
    assert "AdjointMagnitude" in adj["command"] and adj["adjoint_ratio_held_out"] >= 1.0
    md = (tmp_path / "SWEEP.md").read_text()
    assert "| unstructured + AdjointMagnitude | 20 | 0 |" in md
    for name in ("sweep_metric.png", "sweep_adjoint_ratio.png"):
        assert (tmp_path / name).stat().st_size > 0
    # Resumable: a second invocation finds both records and runs nothing.
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "sweep.py"),
            "--fast",
            "--out",
            str(tmp_path),
            "--only",
            "unstructured_adjoint",
            "gru",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "0 of 2 runs to do" in proc.stdout
    # A records folder that mixes budgets is refused: one recorded 400-step run beside the
    # fast ones makes the render fail, naming the problem, and writes no table.
    (tmp_path / "SWEEP.md").unlink()
    full = sorted((ROOT / "results" / "sweep" / "records").glob("*.json"))[0]
    (tmp_path / "records" / full.name).write_text(full.read_text())
    proc = _script("sweep.py", env, "--fast", "--out", str(tmp_path), "--render")
    assert proc.returncode != 0 and "mixes budgets" in proc.stderr
    assert not (tmp_path / "SWEEP.md").exists()


def _script(script: str, env: dict[str, str], *args: str, timeout: int = 300):
    """``python recipes/<script> <args>`` from the repository root, output captured."""
    cmd = [sys.executable, str(ROOT / "recipes" / script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _tree_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_fast_runs_never_write_into_results(env: dict[str, str]) -> None:
    """Without --out, the fast modes of the sweep and of the RNODE study write under runs/,
    never into results/ (the recorded sweep was once overwritten by a 2-step try)."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import rnode_study
    import sweep

    for mod in (sweep, rnode_study):
        assert not mod.FAST_OUT.resolve().is_relative_to((ROOT / "results").resolve())
    before = _tree_digest(ROOT / "results")
    for script in ("sweep.py", "rnode_study.py"):  # --render: the output folder, no training
        proc = _script(script, env, "--fast", "--render")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert _tree_digest(ROOT / "results") == before
    assert (sweep.FAST_OUT / "SWEEP.md").exists() and (rnode_study.FAST_OUT / "STUDY.md").exists()


def test_rnode_study_fast(tmp_path: Path, env: dict[str, str]) -> None:
    """The study's fast mode (2 epochs of 3 batches, seed 0): one record per run with the
    budget, equal updates per variant, NFE per step from SolverStatsMonitor; STUDY.md, the
    plot and the verdict rendered from the records; a folder mixing budgets is refused."""
    args = ("--fast", "--out", str(tmp_path), "--only", "cnf", "--variants", "none", "rnode")
    proc = _script("rnode_study.py", env, *args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "records").glob("*.json")}
    assert sorted(records) == ["cnf_none_s0", "cnf_rnode_s0"]
    for r in records.values():
        assert r["steps"] == 6 and r["epochs"] == 2 and r["budget"]["fast"] is True
        assert len(r["history"]) == 2 and all(e["steps"] == 3 for e in r["history"])
        assert r["nfe_per_step"] > 0 and r["nfe_backward_per_step"] == 0  # odeint: no adjoint solve
        assert r["nfe_per_step"] == pytest.approx(sum(e["nfe_per_step"] for e in r["history"]) / 2)
        assert r["metric"] is not None and math.isfinite(r["metric"])
    assert "KineticEnergy" in " ".join(records["cnf_rnode_s0"]["regularizers"])
    md = (tmp_path / "STUDY.md").read_text()
    assert "| 2-D CNF (two moons density) | no regularizer | 1 | 6 |" in md
    assert "Per unit of metric lost" in md
    assert (tmp_path / "rnode_nfe.png").stat().st_size > 0
    # mixing budgets: a record of another epoch count beside these is refused
    other = dict(records["cnf_none_s0"], key="cnf_skew_s0", variant="skew")
    other["budget"] = {**other["budget"], "epochs": 3}
    (tmp_path / "records" / "cnf_skew_s0.json").write_text(json.dumps(other))
    proc = _script("rnode_study.py", env, "--fast", "--out", str(tmp_path), "--render")
    assert proc.returncode != 0 and "mixes budgets" in proc.stderr


def test_sweep_summary_statistics() -> None:
    """Mean, sample std and success count of the table, against the numbers written out."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import sweep

    spec = {
        "horizons": [100],
        "success": {"metric": "test_mse", "below": 0.01},
        "variants": [{"key": "v", "label": "V", "cell": "unstructured", "regularizers": []}],
    }
    values = [0.002, 0.005, 0.2]
    records = [
        {
            "variant": "v",
            "T": 100,
            "seed": s,
            "test_mse": m,
            "wall_s": 10.0 * (s + 1),
            "adjoint_ratio_held_out": r,
            "steps": 600,
        }
        for s, (m, r) in enumerate(zip(values, [3.0, 1.5, 40.0], strict=True))
    ]
    (row,) = sweep.summarize(spec, records)
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert row["mean"] == pytest.approx(mean) and row["std"] == pytest.approx(std)
    assert row["successes"] == 2 and row["runs"] == 3
    assert row["ratio_median"] == 3.0 and row["ratio_min"] == 1.5 and row["ratio_max"] == 40.0
    assert row["wall_mean_s"] == pytest.approx(20.0)
