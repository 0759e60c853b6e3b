"""Helpers shared by the result scripts in ``recipes/`` (not part of the library)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ode_reg.summary import profile_ratio  # noqa: F401 - one definition, the summary's

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def output_dir(out: Path | None, fast: bool, default: Path, fast_default: Path) -> Path:
    """Where a result script writes: ``--out`` when given; else ``default`` (under
    ``results/``) for a real run and ``fast_default`` (under ``runs/``) for ``--fast``, so that
    a quick try never overwrites recorded results."""
    return (out or (fast_default if fast else default)).resolve()


def single_thread() -> None:
    """One intra-op thread per run: faster for these small matrices when runs share 2 cores."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_worker(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Run a result script's worker subprocess from the repository root with one torch thread
    (plus ``env``), its output into ``log``; returns the exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    with log.open("w") as fh:
        return subprocess.run(
            cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=full
        ).returncode


def run_recorded(
    tag: str, key: str, cmd: list[str], out: Path, record: Path, env: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """:func:`run_worker` for run ``key``, its log at ``out/logs/<key>.log``; the record it
    wrote, or ``None`` after one line saying that the run failed (and where its log is)."""
    log = out / "logs" / f"{key}.log"
    rc = run_worker(cmd, log, env)
    if rc != 0 or not record.exists():
        print(f"[{tag}] {key} FAILED (rc={rc}), see {log}", flush=True)
        return None
    return json.loads(record.read_text())


def offline_wandb(folder: Path) -> None:
    """Keep W&B offline and its files under ``folder`` (unless the user configured it)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        os.environ.setdefault(var, str(folder))
    folder.mkdir(parents=True, exist_ok=True)


def machine() -> str:
    """A one-line description of where the figures were measured."""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        "1 torch thread per run"
    )


def adjoint_profile(model: Any, x: Tensor, y: Tensor) -> Tensor:
    """``p_k = mean_i |a_{k,i}|`` of the task loss on a held-out batch, for a recipe model:
    :func:`ode_reg.summary.held_out_adjoint_profile` (the summary's and the results table's
    definition), which must find a solve."""
    from ode_reg.summary import held_out_adjoint_profile

    profile = held_out_adjoint_profile(model, x, y)
    if profile is None:
        raise ValueError(f"{type(model).__name__} made no ode_reg.odeint solve on the batch")
    return profile


class Timer:
    """``with Timer() as t: ...``; ``t.seconds`` afterwards."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float))


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
