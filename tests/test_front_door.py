"""A user's own model through the front door: the command, the summary and what it counts.

Each test stands for one way the ``ode-reg`` command misreported a run (issue 25, and issue
24's "the summary counts what ran"): a user module the console script could not import, a
``test_loss`` nobody saw, a "best" checkpoint beside results of the final weights, the copying
recipe's cross-entropy left out, "the logger takes no images" under a logger that takes them,
and a sample count of the whole split under ``limit_test_batches``.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from ode_reg.cli import run
from ode_reg.summary import (
    batch_counts,
    format_summary,
    held_out_adjoint_profile,
    held_out_adjoint_ratio,
    profile_ratio,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# W&B offline with its folders in each test's tmp_path (the newcomer tests' fixture).
from test_newcomer import offline_wandb  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("offline_wandb")


def readme_file_block(first_line: str) -> str:
    """The README code block whose first line is ``first_line`` (e.g. ``# mymodel.py: ...``)."""
    text = README.read_text()
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README must hold one block starting {first_line!r}"
    return found[0]


def _csv_args(tmp_path: Path) -> list[str]:
    return [
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
    ]


def _line_value(out: str, label: str) -> str:
    """The value printed beside ``label`` in the summary block (not Lightning's table)."""
    out = out[out.index("ode_reg run summary") :]
    m = re.search(rf"^\s+{re.escape(label)}\s+(\S+)", out, flags=re.M)
    assert m, f"no summary line {label!r} in:\n{out}"
    return m.group(1)


# --------------------------------------------------------------------------- the command


def test_readme_user_module_runs_through_the_console_script_from_its_folder(
    tmp_path: Path,
) -> None:
    """The README's mymodel.py + mymodel.yaml, run by ``.venv/bin/ode-reg`` from their folder.

    Before the fix the console script (unlike ``python -m ode_reg``) did not have the working
    folder on ``sys.path`` and stopped with "No module named 'mymodel'"; the summary printed a
    test line only for ``test/acc`` / ``test/mse`` and no validation line for a regression.
    """
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "mymodel.py").write_text(readme_file_block("# mymodel.py"))
    config = yaml.safe_load(readme_file_block("# mymodel.yaml"))
    assert config["model"]["init_args"]["regularizers"][0]["class_path"] == (
        "ode_reg.AdjointMagnitude"
    )
    (folder / "mymodel.yaml").write_text(readme_file_block("# mymodel.yaml"))
    env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),  # this checkout's ode_reg, not the one the venv points at
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    script = ROOT / ".venv" / "bin" / "ode-reg"
    res = subprocess.run(
        [str(script), "fit", "--config", "mymodel.yaml", "--trainer.enable_progress_bar", "false"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    summary = json.loads(next((folder / "runs").rglob("summary.json")).read_text())
    # Lightning's own test table is kept, and the summary names the test metric it shows.
    assert "Test metric" in out and "test_loss" in out
    test_loss = summary["test_metrics"]["test_loss"]
    assert float(_line_value(out, "test_loss")) == pytest.approx(test_loss, rel=5e-3)
    assert summary["val_metrics"].keys() == {"val_loss"}
    assert re.search(r"^\s+val_loss\s+\d", out, flags=re.M)
    # The counts are those of the user's own test split, found independently.
    sys.path.insert(0, str(folder))
    try:
        mymodel = importlib.import_module("mymodel")
        n_test = len(mymodel.SinesData().parts[2])
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mymodel", None)
    assert summary["test_count"] == {"samples": n_test, "labels": None}
    assert f"test (final weights, {n_test} samples)" in out
    assert summary["adjoint_held_out_n"] == n_test and summary["adjoint_ratio_held_out"] >= 1.0
    assert "best by val_loss = " in out


def test_summary_counts_what_ran_under_limit_test_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two test batches of 64: the summary counts 128 samples (it said the whole split)."""
    cli = run(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "two_moons.yaml"),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.limit_test_batches",
            "2",
            *_csv_args(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    n = 2 * cli.datamodule.batch_size
    assert len(cli.datamodule.test_set) > n  # the limit cut the split
    assert summary["test_count"] == {"samples": n, "labels": n} and summary["test_n"] == n
    correct = summary["test_acc"] * n
    assert abs(correct - round(correct)) < 1e-4  # an accuracy over exactly n labels
    assert f"({round(correct)} of {n})" in out
    # ("1" reaches Lightning as 1.0, the whole validation split, and the count says so.)
    assert summary["val_count"]["samples"] == len(cli.datamodule.val_set)


def _accuracy(model: nn.Module, dataset: torch.utils.data.TensorDataset) -> float:
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


@pytest.mark.parametrize("which", ["final", "best"])
def test_summary_names_the_weights_it_tested(
    which: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The test metrics belong to the weights the summary names: the final state, or with
    ``--test_weights best`` the monitored best checkpoint (each re-tested here by hand)."""
    from ode_reg.models import FlowClassifier

    config = yaml.safe_load((ROOT / "recipes" / "two_moons.yaml").read_text())
    config["trainer"]["callbacks"].append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/acc", "mode": "max"},
        }
    )
    path = tmp_path / "two_moons_ckpt.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path), "--trainer.max_epochs", "3", *_csv_args(tmp_path)]
    args += ["--model.init_args.lr", "0.05", "--test_weights", which]
    cli = run(args)
    out = capsys.readouterr().out
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    ckpt = cli.trainer.checkpoint_callback
    best = Path(ckpt.best_model_path)
    assert best.is_file()
    assert f"best by val/acc = {float(ckpt.best_model_score):.3f}"[:22] in out
    assert best.name in out
    test_set = cli.datamodule.test_set
    if which == "final":
        assert summary["test_weights"] == {"which": "final"}
        assert "test (final weights, " in out
        assert "--test_weights best tests the best checkpoint" in out
        expected = _accuracy(cli.model, test_set)
    else:
        assert summary["test_weights"] == {"which": "best", "path": str(best)}
        assert f"test (best checkpoint {best.name}, " in out
        expected = _accuracy(FlowClassifier.load_from_checkpoint(best), test_set)
    assert summary["test_metrics"]["test/acc"] == pytest.approx(expected, abs=1e-6)


def test_test_weights_best_without_a_monitored_checkpoint_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "two_moons.yaml"),
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--test_weights",
            "best",
            *_csv_args(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "--test_weights best: no ModelCheckpoint monitors a metric; tested the final" in out
    assert "test (final weights, " in out
    assert "newest: epoch=0-step=2.ckpt (no monitored metric, so no best)" in out


def test_copying_summary_shows_its_cross_entropy_and_why_no_plot_was_drawn(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The copying recipe targets a cross-entropy: the summary prints it (it printed only the
    accuracy), and with a logger that takes images it gives the true reason for no plot (its
    orthogonal cell solves no ODE; it said "the logger takes no images")."""
    cli = run(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "copying.yaml"),
            "--data.init_args.delay",
            "4",
            "--data.init_args.n_train",
            "80",
            "--data.init_args.n_val",
            "16",
            "--data.init_args.n_test",
            "32",
            "--data.init_args.batch_size",
            "8",
            "--model.init_args.hidden_dim",
            "16",
            "--trainer.max_steps",
            "10",
            "--trainer.log_every_n_steps",
            "1",
            *_csv_args(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    x, y = cli.datamodule.test_set.tensors
    model = cli.model.eval()
    with torch.no_grad():
        ce = float(nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    assert summary["test_metrics"]["test/loss"] == pytest.approx(ce, rel=1e-5)
    assert float(_line_value(out, "test/loss (cross-entropy)")) == pytest.approx(ce, rel=5e-3)
    assert summary["test_count"] == {"samples": 32, "labels": y.numel()}
    assert summary["steps"] >= summary["plot_cadence"] and summary["latest_plots"] == {}
    assert "takes no images" not in out
    assert "GradientNormMonitor drew none" in out and "recorded none" in out


# --------------------------------------------------------------------------- pieces


def test_summary_without_test_keys_says_what_the_test_logged() -> None:
    base = {"epochs": 1, "steps": 3, "run_dir": "r", "latest_plots": {}, "plot_cadence": None}
    text = format_summary({**base, "test_metrics": {}, "test_note": "none shown: logged ['mse']"})
    assert re.search(r"^  test\s+none shown: logged \['mse'\]$", text, flags=re.M)
    text = format_summary({**base, "test_metrics": {"test_mse": 0.25}, "loss_name": "MSE"})
    assert re.search(r"^    test_mse\s+0\.250$", text, flags=re.M)  # no "(k of n)" for an MSE


def test_batch_counts_samples_and_labels() -> None:
    assert batch_counts((torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))) == (5, 5)
    assert batch_counts({"x": torch.zeros(2, 4, 1), "y": torch.zeros(2, 4).long()}) == (2, 8)
    assert batch_counts((torch.zeros(6, 2), torch.zeros(6, 1))) == (6, None)
    assert batch_counts("text") is None


def test_held_out_ratio_is_one_for_a_norm_preserving_linear_flow() -> None:
    """Closed form: for ``z' = α(A − Aᵀ)z`` the adjoint is ``Q_tᵀ a(T)``, of constant norm per
    sample, so ``max_k p_k / min_k p_k = 1`` (up to rk4's damping, below 1e-4 here); the
    batch-wise figure equals the one on the concatenated first samples of the dataset."""
    from ode_reg.models import FlowClassifier

    torch.manual_seed(0)
    x, y = torch.randn(40, 2), torch.randint(0, 2, (40,))
    model = FlowClassifier(flow="skew_linear")
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]
    ratio, n = held_out_adjoint_ratio(model, batches, samples=24)
    assert n == 24 and ratio == pytest.approx(1.0, abs=1e-4)
    nonlinear = FlowClassifier(flow="antisymmetric", init_scale=3.0)
    ratio, _ = held_out_adjoint_ratio(nonlinear, batches, samples=24)
    assert ratio == pytest.approx(
        profile_ratio(held_out_adjoint_profile(nonlinear, x[:24], y[:24]))
    )
    assert ratio > 1.0 + 1e-3  # tanh's saturation makes the profile non-flat


def test_working_folder_is_put_on_the_module_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``ode-reg`` (a console script) lacked: ``python -m`` has the working folder."""
    from ode_reg.cli import add_working_folder_to_path

    (tmp_path / "mymod2.py").write_text("X = 41 + 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("mymod2")
    assert add_working_folder_to_path() == str(tmp_path) == sys.path[0]
    assert importlib.import_module("mymod2").X == 42
    sys.modules.pop("mymod2", None)


# --------------------------------------------------------------------------- logged key names

_PLACEHOLDERS = {
    "<name>": r"[a-z0-9_]+",
    "<param name>": r"[^,]+",
    "<child module>": r"[^/,]+",
    "<i>": r"\d+",
}


def readme_logged_keys() -> dict[str, list[str]]:
    """The "logged keys" column of the README's key table: ``{row: [key pattern, ...]}``."""
    text = README.read_text()
    table = text[text.index("| callback | logged keys | plots |") :]
    table = table[: table.index("\n\n")]
    keys: dict[str, list[str]] = {}
    for row in table.splitlines()[2:]:
        cells = row.split(" | ")
        name = re.findall(r"`([^`]+)`", cells[0])[0]
        spans = re.findall(r"`([^`]+)`", cells[1])
        keys[name] = [k for k in spans if re.fullmatch(r"[a-z]+/[\w<>./ ]+", k)]
    return keys


def _pattern(key: str) -> re.Pattern[str]:
    out = re.escape(key)
    for holder, rx in _PLACEHOLDERS.items():
        out = out.replace(re.escape(holder), rx)
    return re.compile(out)


class _Probe(__import__("ode_reg").RegularizedODEModule):
    """Every kind of key at once: an antisymmetric field (skew spectrum), an orthogonal
    parametrization (``orthogonality/<param name>``), two terms, sensitivities."""

    def __init__(self) -> None:
        import ode_reg

        super().__init__(
            regularizers=[ode_reg.AdjointMagnitude(0.1), ode_reg.SkewJacobianPenalty(0.01)]
        )
        self.field = ode_reg.AntisymmetricODEFunc(dim=4)
        self.head = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))

    def training_step(self, batch, batch_idx):
        import ode_reg

        (x,) = batch
        t = torch.tensor([0.0, 1.0])
        z = ode_reg.odeint(self.field, x, t, method="rk4", options={"step_size": 0.25})[-1]
        loss = self.head(z).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_readme_key_table_matches_the_header_of_a_csv_a_run_wrote(tmp_path: Path) -> None:
    """README -> CSV: every key this run can make is a column; CSV -> README: every column the
    library wrote is in the table (the issue: the README said ``reg/<name>``, the CSV held
    ``reg/<name>_step`` and ``reg/<name>_epoch``)."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from ode_reg.callbacks import (
        GradientNormMonitor,
        OrthogonalityMonitor,
        SolverStatsMonitor,
        SpectrumMonitor,
    )

    table = readme_logged_keys()
    assert {"RegularizedODEModule", "SolverStatsMonitor"} <= table.keys()
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        max_epochs=1,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[
            GradientNormMonitor(compute_sensitivities=True, plot_every_n_steps=1000),
            SpectrumMonitor(plot_every_n_steps=1000),
            OrthogonalityMonitor(),
            SolverStatsMonitor(plot_every_n_steps=1000),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = torch.utils.data.TensorDataset(torch.randn(12, 4))
    trainer.fit(_Probe(), torch.utils.data.DataLoader(data, batch_size=4))
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        header = next(csv.reader(fh))
    library = [c for c in header if "/" in c]  # the model's own train_loss, epoch, step aside
    assert set(header) - set(library) == {"epoch", "step", "train_loss"}
    patterns = {k: _pattern(k) for keys in table.values() for k in keys}
    unlisted = [c for c in library if not any(p.fullmatch(c) for p in patterns.values())]
    assert not unlisted, f"logged but not in the README's key table: {unlisted}"
    # Keys this run cannot make: an OrthogonalFlow's (no flow here), and the count of steps
    # dropped for a non-finite batch or loss (logged only at such a step).
    flow_only = {
        "orthogonality/flow_max",
        "spectrum/flow_q_min_real",
        "spectrum/flow_q_circle_dist",
        "reg/skipped_steps",
    }
    missing = [
        k
        for k, p in patterns.items()
        if k not in flow_only and not any(p.fullmatch(c) for c in library)
    ]
    assert not missing, f"in the README's key table but not in the CSV: {missing}"
    assert "reg/adjoint_magnitude_step" in header and "reg/skew_jacobian_epoch" in header
