"""The end-of-run summary of the ``ode-reg`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ode_reg.cli import run

ROOT = Path(__file__).resolve().parents[1]


def test_summary_reports_fit_metrics_and_saves_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    cli = run(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "two_moons.yaml"),
            "--trainer.max_steps",
            "4",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "ode_reg run summary" in out
    files = list(tmp_path.rglob("summary.json"))
    assert len(files) == 1
    summary = json.loads(files[0].read_text())
    # test accuracy from trainer.test, monitor figures from fit (test resets callback_metrics)
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert summary["adjoint_ratio_max_min"] is not None and summary["adjoint_ratio_max_min"] >= 1.0
    assert summary["spectral_abscissa"] is not None
    assert summary["steps"] == 4 == cli.trainer.global_step
    assert f"{summary['test_acc']:.4g}" in out


def test_accuracy_counts_labels_per_step_for_sequence_targets() -> None:
    """Copying predicts a label at every step: the summary's "(k of n)" counts those labels."""
    from ode_reg.data import CopyingDataModule, TwoMoonsDataModule
    from ode_reg.summary import batch_counts

    dm = CopyingDataModule(delay=5, n_train=8, n_val=4, n_test=6, batch_size=2)
    dm.setup()
    assert batch_counts(next(iter(dm.test_dataloader()))) == (2, 2 * dm.seq_len)
    moons = TwoMoonsDataModule()
    moons.setup()
    x, y = next(iter(moons.test_dataloader()))
    assert batch_counts((x, y)) == (len(y), len(y))


def test_an_unmeasured_orthogonality_defect_is_not_called_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Copying's cell holds an orthogonal matrix; a run shorter than OrthogonalityMonitor's
    cadence (20 steps) measured none of it, and the summary says that, not "no orthogonal
    matrix"; the two-moons flow holds none, and its summary says so."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    common = [
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path),
        "--trainer.limit_test_batches",
        "1",
    ]
    run(
        ["fit", "--config", str(ROOT / "recipes" / "copying.yaml"), "--trainer.max_steps", "3"]
        + ["--data.init_args.delay", "5"]
        + common
    )
    out = capsys.readouterr().out
    assert "not measured: the model holds 1 orthogonal matrix," in out
    assert "holds no orthogonal matrix" not in out
    run(
        ["fit", "--config", str(ROOT / "recipes" / "two_moons.yaml"), "--trainer.max_steps", "2"]
        + common
    )
    out = capsys.readouterr().out
    assert "n/a (the model holds no orthogonal matrix)" in out
