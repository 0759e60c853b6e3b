"""SolverStatsMonitor (issue 12): counts against independent counts, the early warning, plots.

References: a forward pre-hook on each field (field evaluations, split into the forward and the
backward pass) and torchdiffeq's own step callbacks on the field (accepted and rejected steps,
accepted ``|dt|``), in one process and summed over 2 gloo ranks; a field whose solution runs
into a finite-time singularity as training goes on, against torchdiffeq's "underflow in dt";
ordinary training runs that must never warn.
"""

from __future__ import annotations

import csv
import glob
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _solver_stats_ddp_worker import STOP_STEP, Blowup, CountingField, run
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ode_reg import AdjointMagnitude, IntegrationError, Monitor, Need, RegularizedODEModule
from ode_reg.callbacks import SolverStatsMonitor
from ode_reg.callbacks._logging import plot_path
from ode_reg.callbacks.solver_stats import nfe_figure
from ode_reg.summary import format_summary

WORKER = Path(__file__).with_name("_solver_stats_ddp_worker.py")
WORKER_TIMEOUT_S = 180
COUNTS = ("nfe", "nfe_backward", "accepted", "rejected")


def trainer(callbacks: list, **kw: Any) -> L.Trainer:
    kw.setdefault("logger", False)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "argname"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"plot_every_n_steps": 0}, "plot_every_n_steps"),
        ({"per_solve": -1}, "per_solve"),
        ({"dt_fraction": 0.0}, "dt_fraction"),
        ({"dt_fraction": 1.0}, "dt_fraction"),
        ({"nfe_factor": 1.0}, "nfe_factor"),
        ({"nfe_factor": float("inf")}, "nfe_factor"),
        ({"adjoint_orders": 0}, "adjoint_orders"),
        ({"adjoint_steps": 0}, "adjoint_steps"),
        ({"window": 2}, "window"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"warmup_steps": 60, "window": 50}, "warmup_steps"),
        ({"on_warning": "raise"}, "on_warning"),
        ({"checkpoint_dir": 3}, "checkpoint_dir"),
        ({"prog_bar": 1}, "prog_bar"),
        ({"bins": 513}, "bins"),
    ],
)
def test_bad_arguments_raise_a_short_value_error(kwargs, argname):
    with pytest.raises(ValueError, match=f"`{argname}`") as info:
        SolverStatsMonitor(**kwargs)
    assert len(str(info.value)) < 120
    if argname in ("dt_fraction", "nfe_factor", "adjoint_orders", "warmup_steps"):
        assert "[" in str(info.value) or "(" in str(info.value)  # the accepted range


# --------------------------------------------------------------------------- counts


def check_rows_against_own_counts(rows: list[dict]) -> None:
    """One process: every logged count is the fields' own count, solve by solve."""
    assert len(rows) == 3
    for row in rows:
        m = row["metrics"]
        for i in range(3):
            assert m[f"solver/solve{i}/nfe"] == row["forward"][i] > 0
            assert m[f"solver/solve{i}/nfe_backward"] == row["backward"][i]
            assert m[f"solver/solve{i}/accepted"] == row["accepted"][i] > 0
            assert m[f"solver/solve{i}/rejected"] == row["rejected"][i]
            steps = row["steps"][i]
            assert m[f"solver/solve{i}/dt_min"] == pytest.approx(min(steps), rel=1e-12)
            assert m[f"solver/solve{i}/dt_max"] == pytest.approx(max(steps), rel=1e-12)
            assert m[f"solver/solve{i}/dt_median"] == pytest.approx(
                statistics.median(steps), rel=1e-12
            )
        # backprop through the solver: no backward field evaluation; odeint_adjoint: its solve's
        assert row["backward"][:2] == [0, 0] and row["backward"][2] > 0
        # dopri5: 2 initial evaluations, then 6 per attempted step; rk4: 4 per step
        for i in (0, 2):
            assert row["forward"][i] == 2 + 6 * (row["accepted"][i] + row["rejected"][i])
        assert row["forward"][1] == 4 * row["accepted"][1] and row["accepted"][1] == 4
        assert m["solver/nfe"] == sum(row["forward"])
        assert m["solver/nfe_backward"] == sum(row["backward"])
        assert m["solver/accepted"] == sum(row["accepted"])
        assert m["solver/rejected"] == sum(row["rejected"])
        pooled = [d for s in row["steps"] for d in s]
        assert m["solver/dt_min"] == pytest.approx(min(pooled), rel=1e-12)
        assert m["solver/dt_median"] == pytest.approx(statistics.median(pooled), rel=1e-12)
        assert m["solver/solves"] == 3 and m["solver/warning"] == 0.0


@pytest.mark.parametrize("scenario", ["counts", "counts_full"])
def test_counts_equal_the_fields_own_count_in_one_process(tmp_path, scenario):
    # counts: the monitor alone (the stats-only solve); counts_full: every solve recorded in
    # full, as on a step where a term is active or another monitor reads the trajectories
    res = run(scenario, str(tmp_path), ddp=False)
    check_rows_against_own_counts(res["rows"])
    assert any(r["rejected"][2] > 0 for r in res["rows"])  # rejections happen and are counted
    (epoch,) = res["history"]
    totals = [r["metrics"]["solver/nfe"] for r in res["rows"]]
    assert epoch["nfe_per_step"] == pytest.approx(sum(totals) / 3)
    assert epoch["steps"] == 3 and epoch["warnings"] == 0


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("solver_ddp")
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), "counts", "stop"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the forked ranks die with it
        # every warning silenced but the monitor's own line (rank_zero_warn)
        env=dict(os.environ, PYTHONWARNINGS="ignore,default:ode_reg SolverStatsMonitor"),
    )
    try:
        log, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log = f"TIMED OUT after {WORKER_TIMEOUT_S} s\n{log}"
    res: dict[str, Any] = {"log": log, "out": out}
    for scenario in ("counts", "stop"):
        status = out / f"{scenario}.status"
        res[f"{scenario}_status"] = (
            status.read_text().partition("\n")[2] if status.exists() else None
        )
        files = sorted(out.glob(f"{scenario}-rank*.pt"))
        res[scenario] = [torch.load(f, weights_only=False) for f in files]
    return res


@pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform in ("win32", "darwin"),
    reason="needs torch.distributed with gloo and fork",
)
def test_counts_under_ddp_are_the_sums_of_the_ranks_own_counts(ddp):
    assert ddp["counts_status"].strip() == "ok", ddp["counts_status"] or ddp["log"][-3000:]
    r0, r1 = ddp["counts"]
    assert r0["world_size"] == r1["world_size"] == 2
    for a, b in zip(r0["rows"], r1["rows"], strict=True):
        assert a["metrics"] == b["metrics"]  # every rank logs the same reduced values
        m = a["metrics"]
        for i in range(3):
            for name, own in (
                ("nfe", "forward"),
                ("nfe_backward", "backward"),
                ("accepted", "accepted"),
                ("rejected", "rejected"),
            ):
                assert m[f"solver/solve{i}/{name}"] == a[own][i] + b[own][i], (i, name)
            steps = a["steps"][i] + b["steps"][i]
            assert m[f"solver/solve{i}/dt_min"] == pytest.approx(min(steps), rel=1e-12)
            assert m[f"solver/solve{i}/dt_max"] == pytest.approx(max(steps), rel=1e-12)
            assert m[f"solver/solve{i}/dt_median"] == pytest.approx(
                statistics.median(steps), rel=1e-12
            )
        assert a["backward"][2] > 0 and b["backward"][2] > 0
        assert a["backward"][:2] == b["backward"][:2] == [0, 0]
        assert m["solver/nfe"] == sum(a["forward"]) + sum(b["forward"])
        assert m["solver/nfe_backward"] == sum(a["backward"]) + sum(b["backward"])
        pooled = [d for s in a["steps"] + b["steps"] for d in s]
        assert m["solver/dt_median"] == pytest.approx(statistics.median(pooled), rel=1e-12)
    assert r0["history"] == r1["history"]
    totals = [r["metrics"]["solver/nfe"] for r in r0["rows"]]
    assert r0["history"][0]["nfe_per_step"] == pytest.approx(sum(totals) / 3)


@pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform in ("win32", "darwin"),
    reason="needs torch.distributed with gloo and fork",
)
def test_a_warning_on_one_rank_stops_both_ranks_at_that_step(ddp, tmp_path):
    assert ddp["stop_status"].strip() == "ok", ddp["stop_status"] or ddp["log"][-3000:]
    r0, r1 = ddp["stop"]
    # only rank 1 met the stiff sample; the decision is collective: both stop after that step
    for r in (r0, r1):
        assert [w["step"] for w in r["warnings"]] == [STOP_STEP]
        assert "dt" in r["warnings"][0]["kinds"]
        assert r["global_step"] == STOP_STEP + 1 and r["should_stop"]
        assert Path(r["stop_checkpoint"]).name == f"solver-warning-step={STOP_STEP}.ckpt"
    assert "on rank 1" in r0["warnings"][0]["message"]
    assert "on rank 0" not in r0["warnings"][0]["message"]
    ckpt = torch.load(r0["stop_checkpoint"], weights_only=False)
    assert ckpt["global_step"] == STOP_STEP + 1
    printed = [line for line in ddp["log"].splitlines() if "solver warning at" in line]
    assert len(printed) == 1  # one line, from rank zero
    # the same data in one process: the warning comes at the same step
    single = run("stop", str(tmp_path), ddp=False)
    assert [w["step"] for w in single["warnings"]] == [STOP_STEP]


def test_gradient_accumulation_counts_every_micro_batch():
    from _solver_stats_ddp_worker import Snapshot, ThreeSolves

    mon = SolverStatsMonitor(every_n_steps=1, per_solve=0)
    snap = Snapshot(mon)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
    trainer([mon, snap], max_steps=2, accumulate_grad_batches=2).fit(
        ThreeSolves(), DataLoader(TensorDataset(x, y), batch_size=4)
    )
    rows = snap.rows
    assert len(rows) == 4
    for k in (1, 3):  # the optimizer steps at the second micro-batch of each pair
        both = rows[k - 1 : k + 1]
        assert rows[k]["metrics"]["solver/nfe"] == sum(sum(r["forward"]) for r in both)
        assert rows[k]["metrics"]["solver/nfe_backward"] == sum(sum(r["backward"]) for r in both)
    assert mon.history[0]["steps"] == 2


# --------------------------------------------------------------------------- early warning


def blowup_loader(steps: int) -> DataLoader:
    """``z_0`` from 0.5 to 1: the largest sample meets ``t* = 1 / k`` first."""
    x = torch.linspace(0.5, 1.0, 4, dtype=torch.float64)[:, None].expand(4, 2).contiguous()
    return DataLoader(TensorDataset(x.repeat(steps, 1)), batch_size=4)


def stiffening(step: int) -> float:
    """``k`` grows toward 1.02 over training; past ``k = 1`` the solution of ``dz/dt = k z^2``
    from ``z_0 = 1`` blows up before ``t = 1``."""
    return 1.02 - 0.3 * 0.85**step


def test_the_warning_comes_steps_before_torchdiffeq_underflows(recwarn, tmp_path):
    mon = SolverStatsMonitor(every_n_steps=5, warmup_steps=5)
    model = Blowup(stiffening)
    with pytest.raises(IntegrationError, match="underflow in dt"):
        trainer([mon], max_steps=100).fit(model, blowup_loader(100))
    failed = model.steps_started - 1  # the step whose solve raised
    warned = [w["step"] for w in mon.warnings]
    assert warned and warned == list(range(warned[0], failed))  # every step until the failure
    assert failed - warned[0] >= 2
    assert all("dt" in w["kinds"] for w in mon.warnings)
    assert stiffening(warned[0]) < 1.0  # still a finite solution when it warned
    lines = [str(w.message) for w in recwarn if "solver warning at" in str(w.message)]
    assert len(lines) == 1  # one warning (rank_zero_warn) for the run of warning steps
    assert f"training step {warned[0]}" in lines[0] and "solve 0 (dopri5, field Square)" in lines[0]
    assert "smallest step size" in lines[0] and "running median" in lines[0]
    assert mon.last_metrics["solver/warning"] == 1.0  # logged at each warning step

    # on_warning="stop": the run ends cleanly at the first warning, with a checkpoint
    stop = SolverStatsMonitor(every_n_steps=5, warmup_steps=5, on_warning="stop")
    model = Blowup(stiffening)
    t = trainer([stop], max_steps=100, default_root_dir=str(tmp_path))
    t.fit(model, blowup_loader(100))
    assert t.global_step == warned[0] + 1 and model.steps_started == warned[0] + 1
    assert stop.stop_checkpoint == str(
        tmp_path / "checkpoints" / f"solver-warning-step={warned[0]}.ckpt"
    )
    ckpt = torch.load(stop.stop_checkpoint, weights_only=False)
    assert ckpt["global_step"] == warned[0] + 1
    resumed = SolverStatsMonitor(every_n_steps=5, warmup_steps=5)
    resumed.load_state_dict(next(v for k, v in ckpt["callbacks"].items() if "SolverStats" in k))
    assert [w["step"] for w in resumed.warnings] == [warned[0]]


class Linear(nn.Module):
    """``dz/dt = a z``: the adjoint profile's max/min ratio over ``[0, 1]`` is ``exp(a)``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(0.1, dtype=torch.float64))
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.a * self.w * z


class AdjointJump(RegularizedODEModule):
    def __init__(self, jump_at: int) -> None:
        super().__init__(regularizers=[AdjointMagnitude(weight=1e-3)])
        self.field = Linear()
        self.jump_at = jump_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        self.field.a.fill_(6.0 if self.global_step >= self.jump_at else 0.1)
        t = torch.tensor([0.0, 1.0], dtype=torch.float64)
        z = self.odeint(self.field, x, t, method="rk4", options={"step_size": 0.125})
        return z[-1].pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_adjoint_ratio_rising_orders_of_magnitude_warns():
    mon = SolverStatsMonitor(every_n_steps=1, warmup_steps=3, adjoint_orders=2.0)
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    trainer([mon], max_steps=8).fit(AdjointJump(6), DataLoader(TensorDataset(x), batch_size=4))
    # exp(6 - 0.1) = 365: 2.56 orders of magnitude within one step; a fixed grid: no other sign
    assert [w["step"] for w in mon.warnings][:1] == [6]
    assert mon.warnings[0]["kinds"] == ["adjoint"]
    message = mon.warnings[0]["message"]
    assert "rose 2.6 orders of magnitude" in message and "in chain 0" in message
    assert message.endswith("gradients through the solve may explode or vanish")


class Ordinary(RegularizedODEModule):
    """An MLP field trained by Adam with dopri5: nothing is wrong with it."""

    def __init__(self, checkpoints: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 4))
        self.head = nn.Linear(4, 1)
        self.checkpoints = checkpoints

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        z = self.odeint(
            lambda t, z: self.f(z),
            x,
            torch.tensor([0.0, 1.0]),
            method="dopri5",
            checkpoints=self.checkpoints,
        )
        return nn.functional.mse_loss(self.head(z[-1]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class RawMin(Monitor):
    """The raw smallest step of each training step. A public ``ode_reg.Monitor`` that reads
    trajectories on every step, so the solves are recorded in full, with their checkpoints (a
    stats-only solve leaves ``checkpoints`` out, as the unrecorded call does)."""

    needs = Need(stats=True, chains=True)

    def __init__(self) -> None:
        self.mins: list[float] = []

    def need(self, trainer):
        return self.needs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert len(pl_module.ode_step.trajectories) == len(pl_module.ode_step.solves)
        self.mins.append(min(s.stats.dt_min for s in pl_module.ode_step.solves))


@pytest.mark.parametrize("checkpoints", [None, 8])
def test_an_ordinary_run_never_warns(checkpoints):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(35 * 32, 4, generator=g)
    y = (x[:, :1] * x[:, 1:2]).sin()
    mon, raw = SolverStatsMonitor(), RawMin()
    trainer([mon, raw], max_steps=35).fit(
        Ordinary(checkpoints), DataLoader(TensorDataset(x, y), batch_size=32)
    )
    assert mon.warnings == []
    assert mon.history[0]["steps"] == 35
    if checkpoints is not None:
        # The check has teeth here: explicit checkpoints make dopri5 cut steps short to land
        # on them, and a plain "min step < 0.1 x running median" would have fired.
        worst = min(raw.mins[i] / statistics.median(raw.mins[:i]) for i in range(10, 35))
        assert worst < 0.1


# --------------------------------------------------------------------------- loggers, plots


def test_csv_logger_gets_step_and_epoch_keys_and_the_plots(tmp_path):
    from _solver_stats_ddp_worker import ThreeSolves

    logger = CSVLogger(tmp_path, name="run")
    mon = SolverStatsMonitor(
        every_n_steps=2, plot_every_n_steps=3, per_solve=1, plot_every_n_epochs=1
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g)
    trainer([mon], max_epochs=2, logger=logger).fit(
        ThreeSolves(), DataLoader(TensorDataset(x, y), batch_size=4)
    )
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    steps = sorted(int(r["step"]) for r in rows if r.get("solver/nfe"))
    assert steps == [1, 3, 5]
    assert {k for r in rows for k, v in r.items() if v and k.startswith("solver/solve")} - {
        "solver/solves"
    } == {f"solver/solve0/{k}" for k in (*COUNTS, "dt_min", "dt_median", "dt_max")}
    epochs = [r for r in rows if r.get("solver/epoch_nfe_per_step")]
    assert len(epochs) == 2
    for r, h in zip(epochs, mon.history, strict=True):
        assert float(r["solver/epoch_nfe_per_step"]) == pytest.approx(h["nfe_per_step"])
    for key in ("solver/epoch_nfe_backward_per_step", "solver/epoch_dt_min"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 2 and all(v > 0 for v in values), key
    folder = os.path.dirname(plot_path(logger.log_dir, "solver/step_size_log10", 0))
    assert sorted(os.listdir(folder)) == ["step_0000002.png", "step_0000005.png"]
    nfe_plots = glob.glob(os.path.join(logger.log_dir, "plots", "solver", "nfe_per_epoch", "*"))
    assert len(nfe_plots) == 2
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in nfe_plots)


def test_default_histogram_cadence_is_ten_times_sparser_as_png_files(tmp_path):
    """``plot_every_n_steps=None``: W&B / TensorBoard every 10 scalar cadences, PNG files
    (a ~0.1 s matplotlib figure each) every 100; TensorBoard is the native sink here."""
    from lightning.pytorch.loggers import TensorBoardLogger

    pytest.importorskip("tensorboard")
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb = TensorBoardLogger(tmp_path, name="tb")
    seen: list[int] = []
    real = tb.experiment.add_histogram

    def spy(tag, values, global_step=None, **kw):
        seen.append(int(global_step))
        return real(tag, values, global_step=global_step, **kw)

    tb.experiment.add_histogram = spy
    x = torch.full((200, 2), 0.5, dtype=torch.float64)
    trainer([SolverStatsMonitor(every_n_steps=1)], max_steps=200, logger=[csv_logger, tb]).fit(
        Blowup(), DataLoader(TensorDataset(x), batch_size=1)
    )
    assert seen == list(range(9, 200, 10))
    folder = os.path.dirname(plot_path(csv_logger.log_dir, "solver/step_size_log10", 0))
    assert sorted(os.listdir(folder)) == ["step_0000099.png", "step_0000199.png"]


def test_offline_wandb_gets_the_histogram_and_the_nfe_plot(tmp_path, monkeypatch):
    import wandb
    from _solver_stats_ddp_worker import ThreeSolves
    from lightning.pytorch.loggers import WandbLogger
    from test_callbacks import read_wandb_history

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="ode-reg-test")
    mon = SolverStatsMonitor(every_n_steps=1, plot_every_n_steps=2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    try:
        trainer([mon], max_epochs=1, logger=logger).fit(
            ThreeSolves(), DataLoader(TensorDataset(x, y), batch_size=4)
        )
    finally:
        wandb.finish()
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = read_wandb_history(run_file)
    assert sorted(r["trainer/global_step"] for r in rows if "solver/nfe" in r) == [0, 1]
    (hist,) = [r["solver/step_size_log10"] for r in rows if "solver/step_size_log10" in r]
    assert hist["_type"] == "histogram"
    assert len(hist["bins"]) == len(hist["values"]) + 1 <= 513
    steps = [r["solver/accepted"] for r in rows if "solver/accepted" in r]
    assert sum(hist["values"]) == steps[1]  # step 1's accepted steps, all solves
    (img,) = [r["solver/nfe_per_epoch"] for r in rows if "solver/nfe_per_epoch" in r]
    assert img["_type"] == "images/separated"
    run_dir = Path(run_file).parent
    assert (run_dir / "files" / img["filenames"][0]).read_bytes()[:4] == b"\x89PNG"
    assert any("solver/epoch_nfe_per_step" in r for r in rows)


def test_nfe_figure_is_labelled():
    fig = nfe_figure([0, 1, 2], [26.0, 32.0, 44.0], [0.0, 10.0, 12.0], step=30, methods=["dopri5"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "epoch"
    assert "field evaluations per training step" in ax.get_ylabel()
    assert ax.get_title() == (
        "solver field evaluations (NFE) per training step (dopri5)\n"
        "epochs 0–2, through training step 30"
    )
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "forward solves",
        "adjoint backward solves",
        "total",
    ]
    with pytest.raises(ValueError, match="`epochs`"):
        nfe_figure([0, 1], [1.0])


def test_state_dict_round_trip():
    mon = SolverStatsMonitor(window=5, warmup_steps=3)
    mon.history = [{"epoch": 0, "nfe_per_step": 26.0}]
    mon._checks.nfe.extend([1.0, 2.0, 3.0])
    other = SolverStatsMonitor(window=5, warmup_steps=3)
    other.load_state_dict(mon.state_dict())
    assert other.history == mon.history and list(other._checks.nfe) == [1.0, 2.0, 3.0]
    assert other._checks.nfe.maxlen == 5
    assert SolverStatsMonitor().state_key != SolverStatsMonitor(every_n_steps=3).state_key


def test_summary_prints_nfe_per_step_of_the_first_and_last_epoch():
    from ode_reg.summary import _solver_nfe

    mon = SolverStatsMonitor()
    mon.history = [
        {"epoch": 0, "nfe_per_step": 26.0, "nfe_backward_per_step": 0.0},
        {"epoch": 4, "nfe_per_step": 38.5, "nfe_backward_per_step": 0.0},
    ]
    mon.warnings = [{"step": 3, "epoch": 1, "kinds": ["dt"], "message": "m"}]
    nfe = _solver_nfe(trainer([mon], max_steps=1))
    assert nfe == {
        "first": {"epoch": 0, "nfe": 26.0, "nfe_backward": 0.0},
        "last": {"epoch": 4, "nfe": 38.5, "nfe_backward": 0.0},
        "warnings": 1,
    }
    text = format_summary({"epochs": 5, "steps": 10, "run_dir": "runs/x", "solver_nfe": nfe})
    (line,) = [x for x in text.splitlines() if "NFE" in x]
    assert line.endswith("   26 / 38 (epochs 0 / 4)")  # rounded to whole evaluations
    (line,) = [x for x in text.splitlines() if "early warnings" in x]
    assert line.split()[-1] == "1"
    assert "NFE" not in format_summary({"epochs": 1, "steps": 1, "run_dir": "r"})
    assert _solver_nfe(trainer([], max_steps=1)) is None


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_recorded_solve_leaves_no_reference_cycle(method: str) -> None:
    """A recorded solve is freed by reference counting: no probe <-> step-callback cycle that
    would keep its probe, states and autograd nodes alive until the cyclic collector runs
    (issue 12: that cost the stats-only recording a gen-0 collection every few steps)."""
    import gc

    from ode_reg.module import StepRecord, _released
    from ode_reg.trajectory import integrate

    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.lin(z)

    field = Field()
    opts = {"options": {"step_size": 0.1}} if method == "rk4" else {}
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            traj = integrate(
                field, torch.ones(2, 3), torch.tensor([0.0, 1.0]), method=method, **opts
            )
            traj.ys.sum().backward()
            assert traj.stats.accepted == len(traj.stats.step_sizes) > 0
            _released(StepRecord([traj], [], [], []))
        del traj
        assert gc.collect() == 0
    finally:
        gc.enable()


# --------------------------------------------------------------------------- the stats-only solve


def _tuple_field(counter: list[int]):
    def f(t: torch.Tensor, s: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        counter[0] += 1
        return s[1], -torch.sin(s[0])

    return f


@pytest.mark.parametrize("case", ["dopri5", "rk4", "adjoint", "tuple", "backwards"])
def test_stats_only_solve_is_torchdiffeqs_call_and_counts_like_the_full_recording(case):
    """``solve_counted`` returns torchdiffeq's result bit for bit with torchdiffeq's number of
    field evaluations (a forward pre-hook), and the same statistics as the full recording
    (``integrate``); for ``odeint_adjoint`` the backward evaluations as well."""
    import torchdiffeq

    from ode_reg.trajectory import integrate, solve_counted

    torch.manual_seed(0)
    adjoint = case == "adjoint"
    t = torch.tensor([1.0, 0.0]) if case == "backwards" else torch.linspace(0.0, 1.0, 5)
    kw: dict[str, Any] = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-8}
    if case == "rk4":
        kw = {"method": "rk4", "options": {"step_size": 0.1}}
    calls = [0]
    if case == "tuple":
        field: Any = _tuple_field(calls)
        y0: Any = (torch.randn(4, 2, requires_grad=True), torch.randn(4, 2))

        def count() -> int:
            return calls[0]
    else:
        field = CountingField(scale=2.0)
        y0 = torch.randn(4, 3)

        def count() -> int:
            return field.calls

    def solve(kind: str) -> tuple[Any, Any, int, int]:
        start = count()
        if kind == "plain":
            fn = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
            out, stats = fn(field, y0, t, **kw), None
        elif kind == "counted":
            out, summary = solve_counted(field, y0, t, adjoint=adjoint, **kw)
            stats = summary.stats
        else:
            traj = integrate(field, y0, t, adjoint=adjoint, grad_leaf=False, **kw)
            out, stats = traj.ys, traj.stats
        forward = count() - start
        first = out[0] if isinstance(out, tuple) else out
        first[-1].sum().backward()
        return out, stats, forward, count() - start - forward

    plain, _, nfe, nfe_back = solve("plain")
    counted, stats, nfe_counted, back_counted = solve("counted")
    _, full, _, _ = solve("full")
    for a, b in zip(
        plain if case == "tuple" else (plain,), counted if case == "tuple" else (counted,)
    ):
        assert torch.equal(a, b)
    assert (nfe_counted, back_counted) == (nfe, nfe_back)
    assert stats.nfe == nfe and stats.nfe_backward == nfe_back
    assert (nfe_back > 0) == adjoint
    assert stats == full  # nfe, nfe_backward, accepted, rejected, step sizes
    # the accepted steps cover the span; an adaptive solver's last one may pass its end (the
    # output is interpolated)
    span = abs(float(t[-1] - t[0]))
    assert sum(stats.step_sizes[:-1]) < span <= sum(stats.step_sizes) * (1 + 1e-6)


def test_the_monitor_alone_records_no_trajectory_and_ignores_checkpoints():
    """With only ``SolverStatsMonitor`` attached the step keeps counts and no trajectory, and
    the solves are the unrecorded module's: ``checkpoints`` (which a full recording turns
    into forced dopri5 step ends) change nothing, so the NFE equals the run with no monitor."""

    class Reader(Callback):
        def __init__(self) -> None:
            self.nfe: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            record = pl_module.ode_step
            assert record.trajectories == []
            self.nfe.append(sum(s.stats.nfe for s in record.solves))

    class Hooked(Ordinary):
        def __init__(self) -> None:
            super().__init__(checkpoints=8)
            self.calls: list[int] = []
            self.f.register_forward_pre_hook(
                lambda m, a: self.calls.__setitem__(-1, self.calls[-1] + 1)
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.calls.append(0)
            return super().training_step(batch, batch_idx)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * 16, 4, generator=g)
    y = x[:, :1].sin()
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    plain, monitored, reader = Hooked(), Hooked(), Reader()
    trainer([], max_steps=4).fit(plain, data)
    trainer([SolverStatsMonitor(), reader], max_steps=4).fit(monitored, data)
    assert monitored.calls == plain.calls == reader.nfe
    for p, q in zip(plain.parameters(), monitored.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_users_own_step_callbacks_are_still_called():
    """torchdiffeq calls the field's step callbacks; behind ode_reg's probe they must still be
    found wherever they live: a method, an attribute of a function, an attribute set on a
    module instance."""
    from ode_reg.trajectory import integrate, solve_counted

    seen: list[str] = []

    def fn(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -z

    fn.callback_step = lambda t0, y0, dt: seen.append("function")

    class Plain(nn.Module):
        def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return -z

    mod = Plain()
    mod.callback_step = lambda t0, y0, dt: seen.append("instance")
    t, kw = torch.tensor([0.0, 1.0]), {"method": "rk4", "options": {"step_size": 0.25}}
    for field, name in ((fn, "function"), (mod, "instance")):
        seen.clear()
        solve_counted(field, torch.ones(2, 2), t, adjoint=False, **kw)
        assert seen == [name] * 4
        seen.clear()
        integrate(field, torch.ones(2, 2), t, **kw)
        assert seen == [name] * 4
    method = CountingField()
    method.fixed = True
    solve_counted(method, torch.ones(2, 3), t, adjoint=False, **kw)
    assert method.accepted == 4 and method.calls == 16
