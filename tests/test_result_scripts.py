"""The result scripts in ``recipes/`` run end to end in ``--fast`` mode (a couple of steps each)."""

from __future__ import annotations

import json
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
