"""The end-of-run summary printed by the ``ode-reg`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger


def run_dir(trainer: L.Trainer) -> Path:
    """Folder of the run: the W&B run folder, the logger's ``log_dir``, or ``default_root_dir``.

    Args:
        trainer: the trainer of the run.

    Returns:
        An existing folder.
    """
    path: str | None = None
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        path = str(Path(logger.experiment.dir).parent)
    elif logger is not None:
        path = getattr(logger, "log_dir", None) or logger.save_dir
    path = path or trainer.default_root_dir
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _scalar(metrics: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        if key in metrics:
            return float(metrics[key])
    return None


def print_summary(
    trainer: L.Trainer,
    model: L.LightningModule,
    test: dict[str, float],
    fit_metrics: dict[str, Any] | None = None,
) -> dict:
    """Print and save (``summary.json`` beside the run) the run's key figures.

    Args:
        trainer: the trainer after ``fit`` (and ``test``).
        model: the trained module.
        test: the metrics ``trainer.test`` returned.
        fit_metrics: ``trainer.callback_metrics`` as ``fit`` left them (``test`` resets them).

    Returns:
        The summary as a dict.
    """
    metrics = {k: float(v) for k, v in (fit_metrics or {}).items()}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    metrics.update(test)
    folder = run_dir(trainer)
    plots = sorted(str(p) for p in folder.rglob("*.png"))
    summary = {
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "test_acc": _scalar(metrics, "test/acc"),
        "test_mse": _scalar(metrics, "test/mse"),
        "val_acc": _scalar(metrics, "val/acc"),
        "adjoint_ratio_max_min": _scalar(metrics, "adjoint/ratio_max_min"),
        "adjoint_ratio_epoch_geomean": _scalar(metrics, "adjoint/ratio_epoch_geomean"),
        "orthogonality_max": _scalar(metrics, "orthogonality/max", "orthogonality/running_max"),
        "spectral_abscissa": _scalar(metrics, "spectrum/abscissa"),
        "skew_real_max": _scalar(metrics, "spectrum/skew_real_max"),
        "reg_total": _scalar(metrics, "reg/total_epoch", "reg/total"),
        "run_dir": str(folder),
        "plots": plots,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["", "=" * 72, "ode_reg run summary"]
    for key, label in [
        ("test_acc", "test accuracy"),
        ("test_mse", "test MSE"),
        ("val_acc", "validation accuracy"),
        ("adjoint_ratio_max_min", "adjoint norm max/min over the sequence"),
        ("adjoint_ratio_epoch_geomean", "  (geometric mean over the last epoch)"),
        ("orthogonality_max", "max orthogonality defect |W^T W - I|_F"),
        ("spectral_abscissa", "Jacobian spectral abscissa (max Re lambda)"),
        ("skew_real_max", "max |Re lambda(W - W^T)| (0 for a skew matrix)"),
        ("reg_total", "regularizer total"),
    ]:
        if summary[key] is not None:
            lines.append(f"  {label:<44} {summary[key]:.4g}")
    if summary["orthogonality_max"] is None:
        lines.append(f"  {'orthogonality defect':<44} n/a (the model holds no orthogonal matrix)")
    lines.append(f"  {'epochs / steps':<44} {summary['epochs']} / {summary['steps']}")
    lines.append(f"  {'run folder':<44} {folder}")
    lines.append(f"  {'plots':<44} {len(plots)} PNG files under the run folder")
    for p in plots[-6:]:
        lines.append(f"    {p}")
    lines.append("=" * 72)
    print("\n".join(lines))
    return summary
