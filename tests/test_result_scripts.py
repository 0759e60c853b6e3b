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
