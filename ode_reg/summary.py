"""The end-of-run summary printed by the ``ode-reg`` command.

:func:`print_summary` collects the run's figures into a dict (saved as ``summary.json`` beside
the run) and prints :func:`format_summary` of it. ``format_summary`` depends on the dict alone,
so the block the README shows is rebuilt from a recorded ``summary.json``
(``scripts/readme_figures.py``) exactly as the command printed it.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

__all__ = [
    "SUMMARY_VERSION",
    "format_summary",
    "latest_plots",
    "near_zero",
    "plot_cadence",
    "print_summary",
    "process_age",
    "run_dir",
]

#: Bumped when the keys of ``summary.json`` change meaning.
SUMMARY_VERSION = 2

#: A value is printed as 0 when ``|x| <= ZERO_ULPS * eps * scale`` (see :func:`near_zero`).
ZERO_ULPS = 16

_LABEL_WIDTH = 46

# W&B: files/media/images/<key>_<step>_<hash>.png; CSV/file loggers: plots/<key>/step_<step>.png
_WANDB_IMAGE = re.compile(r"^(?P<key>.+)_(?P<step>\d+)_[0-9a-f]+$")
_FILE_PLOT = re.compile(r"^step_(?P<step>\d+)$")


def run_dir(trainer: L.Trainer) -> Path:
    """Folder of the run: the W&B run folder, the logger's ``log_dir``, or ``default_root_dir``.

    Args:
        trainer: the trainer of the run.

    Returns:
        An existing folder.

    Example::

        >>> import lightning as L
        >>> run_dir(L.Trainer(logger=False, default_root_dir="/tmp/x")).name  # doctest: +SKIP
        'x'
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


def latest_plots(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The newest PNG of each plot key under a run folder, with the number of files per key.

    W&B images (``files/media/images/<key>_<step>_<hash>.png``) and the monitors' PNG files
    (``plots/<key>/step_<step>.png``) are grouped by key and ordered by their training step
    (not by file name, which puts step 990 after step 1230); other PNG files are grouped by
    their folder and ordered by modification time.

    Args:
        folder: the run folder.

    Returns:
        ``{key: {"path": newest file relative to folder, "step": its step or None,
        "count": files of that key}}``, keys sorted. The step is the training step for the
        monitors' files and W&B's own history step for W&B images.

    Example::

        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for s in (990, 1230):
        ...     p = d / "plots" / "adjoint" / "profile" / f"step_{s:07d}.png"
        ...     p.parent.mkdir(parents=True, exist_ok=True)
        ...     _ = p.write_bytes(b"")
        >>> latest_plots(d)["adjoint/profile"]["step"]
        1230
    """
    root = Path(folder)
    groups: dict[str, list[tuple[float, int | None, Path]]] = {}
    for path in root.rglob("*.png"):
        rel = path.relative_to(root)
        parts = rel.parts
        key: str
        step: int | None = None
        if "images" in parts and (m := _WANDB_IMAGE.match(path.stem)):
            below = parts[parts.index("images") + 1 : -1]
            key = "/".join([*below, m["key"]])
            step = int(m["step"])
        elif "plots" in parts and (m := _FILE_PLOT.match(path.stem)):
            key = "/".join(parts[parts.index("plots") + 1 : -1])
            step = int(m["step"])
        else:
            key = "/".join(parts[:-1]) or path.stem
        order = float(step) if step is not None else path.stat().st_mtime
        groups.setdefault(key, []).append((order, step, rel))
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(groups):
        entries = sorted(groups[key], key=lambda e: (e[0], str(e[2])))
        _, step, rel = entries[-1]
        out[key] = {"path": str(rel), "step": step, "count": len(entries)}
    return out


def plot_cadence(trainer: L.Trainer) -> int | None:
    """The smallest plot cadence (in training steps) of the trainer's ode_reg monitors.

    A monitor with ``plot_every_n_steps=None`` plots every ``10 ×`` its scalar cadence, which
    defaults to ``Trainer(log_every_n_steps=...)``.

    Args:
        trainer: the trainer.

    Returns:
        The cadence, or ``None`` when no callback plots.

    Example::

        >>> import lightning as L
        >>> from ode_reg.callbacks import GradientNormMonitor
        >>> t = L.Trainer(callbacks=[GradientNormMonitor()], log_every_n_steps=10, logger=False)
        >>> plot_cadence(t)
        100
    """
    cadences = []
    for cb in trainer.callbacks:
        if not hasattr(cb, "plot_every_n_steps"):
            continue
        if cb.plot_every_n_steps is not None:
            cadences.append(int(cb.plot_every_n_steps))
            continue
        every = getattr(cb, "every_n_steps", None)
        every = int(trainer.log_every_n_steps) if every is None else int(every)
        if every > 0:
            cadences.append(10 * every)
    return min(cadences) if cadences else None


def near_zero(value: float, scale: float | None, eps: float) -> bool:
    """Whether ``value`` is 0 up to float rounding: ``|value| <= 16 * eps * scale``.

    A spectral abscissa of an antisymmetric field is 0 in exact arithmetic; computed from
    float32 Jacobians it comes out as ±1e-7 times the spectral radius. Such values are printed
    as 0.

    Args:
        value: the computed value.
        scale: the size of the numbers it was computed from (e.g. the spectral radius);
            ``None`` or non-positive means 1.
        eps: machine epsilon of the dtype it was computed in.

    Returns:
        ``True`` when the value is indistinguishable from 0.

    Example::

        >>> near_zero(1.49e-07, 1.0, 1.1920929e-07), near_zero(-1.8e-05, 1.0, 1.1920929e-07)
        (True, False)
    """
    if not math.isfinite(value):
        return False
    s = scale if scale is not None and math.isfinite(scale) and scale > 0 else 1.0
    return abs(value) <= ZERO_ULPS * eps * s


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or ``None`` elsewhere.

    The summary's ``process_s``: start-up (imports) included, unlike ``wall_s``.

    Example::

        >>> age = process_age()
        >>> age is None or age > 0
        True
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # Field 22 (starttime, in clock ticks since boot); the command name (field 2) may
        # hold spaces, so count from its closing parenthesis.
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _scalar(metrics: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        if key in metrics:
            return float(metrics[key])
    return None


def _split_size(datamodule: Any, split: str) -> int | None:
    """The number of predicted labels of a split: samples, or samples x steps when the target
    is a label per step (``task="sequence"``), so that ``acc x n`` counts correct labels."""
    try:
        dataset = getattr(datamodule, f"{split}_set", None)
        if dataset is None:
            return None
        tensors = getattr(dataset, "tensors", None)
        if tensors and not tensors[-1].is_floating_point():
            return int(tensors[-1].numel())
        return len(dataset)
    except TypeError:
        return None


def _checkpoints(trainer: L.Trainer, folder: Path) -> dict[str, str | None] | None:
    cb = trainer.checkpoint_callback
    if cb is None or not getattr(cb, "dirpath", None):
        return None
    return {
        "dir": str(cb.dirpath),
        "best": getattr(cb, "best_model_path", None) or None,
        "last": getattr(cb, "last_model_path", None) or None,
    }


def _solver_nfe(trainer: L.Trainer) -> dict[str, Any] | None:
    """Forward and backward field evaluations per training step in the first and last epoch,
    and the number of early warnings, from a :class:`~ode_reg.callbacks.SolverStatsMonitor`
    (``None`` when none ran)."""
    from ode_reg.callbacks.solver_stats import SolverStatsMonitor

    for cb in trainer.callbacks:
        if isinstance(cb, SolverStatsMonitor) and cb.history:
            pick = {"first": cb.history[0], "last": cb.history[-1]}
            out: dict[str, Any] = {
                k: {
                    "epoch": e["epoch"],
                    "nfe": e["nfe_per_step"],
                    "nfe_backward": e["nfe_backward_per_step"],
                }
                for k, e in pick.items()
            }
            out["warnings"] = len(cb.warnings)
            return out
    return None


def _model_eps(model: L.LightningModule) -> float:
    for p in model.parameters():
        if p.is_floating_point():
            return float(torch.finfo(p.dtype).eps)
    return float(torch.finfo(torch.float32).eps)


def _fraction(value: float, n: int | None) -> str:
    text = f"{value:.4f}"
    if n:
        text += f" ({round(value * n)} of {n})"
    return text


def _g3(value: float) -> str:
    """Three significant digits, no exponent for moderate values."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if 1e-3 <= abs(value) < 1e5:
        digits = max(0, 2 - math.floor(math.log10(abs(value))))
        return f"{value:.{digits}f}"
    return f"{value:.3g}"


def _zero_or(value: float, scale: float | None, eps: float) -> str:
    return "0 (to float rounding)" if near_zero(value, scale, eps) else _g3(value)


def format_summary(summary: dict[str, Any]) -> str:
    """The printed summary block of a run, from its ``summary.json`` dict alone.

    Figures are rounded to what they can mean: accuracies to 4 decimals with the count of
    correct samples, ratios and losses to 3 significant digits, values that are 0 up to float
    rounding (:func:`near_zero`) as 0. Plots are listed as the newest file of each key.

    Args:
        summary: the dict :func:`print_summary` returns (or a loaded ``summary.json``).

    Returns:
        The block, lines joined by newlines, without the surrounding rules.

    Raises:
        KeyError: if ``summary`` lacks ``epochs``, ``steps`` or ``run_dir``.

    Example::

        >>> print(format_summary({"epochs": 2, "steps": 10, "run_dir": "runs/x",
        ...     "test_acc": 0.5, "test_n": 360}).splitlines()[1])
          test accuracy                                  0.5000 (180 of 360)
    """
    s = summary
    eps = float(s.get("float_eps") or torch.finfo(torch.float32).eps)
    w = _LABEL_WIDTH
    lines = ["ode_reg run summary"]

    def add(label: str, text: str) -> None:
        lines.append(f"  {label:<{w}} {text}")

    if s.get("test_acc") is not None:
        add("test accuracy", _fraction(s["test_acc"], s.get("test_n")))
    if s.get("test_mse") is not None:
        add("test MSE", _g3(s["test_mse"]))
    if s.get("val_acc") is not None:
        add("validation accuracy", _fraction(s["val_acc"], s.get("val_n")))
    if s.get("adjoint_ratio_max_min") is not None:
        add("adjoint norm max/min over the sequence", _g3(s["adjoint_ratio_max_min"]))
    if s.get("adjoint_ratio_epoch_geomean") is not None:
        add("  (geometric mean over the last epoch)", _g3(s["adjoint_ratio_epoch_geomean"]))
    if s.get("orthogonality_max") is not None:
        add("max orthogonality defect |W^T W - I|_F", _zero_or(s["orthogonality_max"], 1.0, eps))
    else:
        add("orthogonality defect", "n/a (the model holds no orthogonal matrix)")
    radius = s.get("spectral_radius")
    if s.get("spectral_abscissa") is not None:
        add(
            "Jacobian spectral abscissa (max Re lambda)",
            _zero_or(s["spectral_abscissa"], radius, eps),
        )
    if s.get("skew_real_max") is not None:
        add("max |Re lambda(W - W^T)| (0 for a skew W)", _zero_or(s["skew_real_max"], radius, eps))
    if s.get("reg_total") is not None:
        add("regularizer total (last epoch)", _g3(s["reg_total"]))
    nfe = s.get("solver_nfe")
    if nfe:  # SolverStatsMonitor ran: field evaluations per training step
        first, last = nfe["first"], nfe["last"]
        text = f"{first['nfe']:.0f} / {last['nfe']:.0f} (epochs {first['epoch']} / {last['epoch']})"
        if first["nfe_backward"] or last["nfe_backward"]:
            text += f"; adjoint backward {first['nfe_backward']:.0f} / {last['nfe_backward']:.0f}"
        add("solver NFE per step (first / last epoch)", text)
        if nfe.get("warnings") is not None:
            add("solver early warnings", str(nfe["warnings"]))
    add("epochs / steps", f"{s['epochs']} / {s['steps']}")
    if s.get("wall_s") is not None:
        text = f"{s['wall_s']:.0f} s"
        if s.get("process_s") is not None:
            text += f" ({s['process_s']:.0f} s since the command started)"
        add("wall time (fit + test)", text)
    add("run folder", str(s["run_dir"]))
    ckpt = s.get("checkpoints")
    if ckpt:
        best = Path(ckpt["best"]).name if ckpt.get("best") else None
        last = Path(ckpt["last"]).name if ckpt.get("last") else None
        add("checkpoints", str(ckpt["dir"]))
        names = ", ".join(n for n in (best and f"best: {best}", last and f"last: {last}") if n)
        if names:
            lines.append(f"    {names}")
    latest = s.get("latest_plots")
    if latest is None:  # a summary.json from before SUMMARY_VERSION 2
        add("plots", f"{len(s.get('plots', []))} PNG files under the run folder")
    elif latest:
        total = sum(int(v["count"]) for v in latest.values())
        add("plots", f"{total} PNG files; the newest of each key, under the run folder:")
        for key, v in latest.items():
            lines.append(f"    {key} (newest of {v['count']}): {v['path']}")
    else:
        cadence = s.get("plot_cadence")
        if cadence is None:
            add("plots", "none (no callback of this run draws plots)")
        elif s["steps"] < cadence:
            add("plots", f"none yet: the monitors plot every {cadence} steps and this run")
            lines.append(
                f"    took {s['steps']}; pass --trainer.log_every_n_steps (plots every 10x it) "
                "or the callbacks' plot_every_n_steps"
            )
        else:
            add("plots", "none (the logger takes no images: use W&B, TensorBoard or CSVLogger)")
    return "\n".join(lines)


def print_summary(
    trainer: L.Trainer,
    model: L.LightningModule,
    test: dict[str, float],
    fit_metrics: dict[str, Any] | None = None,
    wall_s: float | None = None,
) -> dict:
    """Print and save (``summary.json`` beside the run) the run's key figures.

    Args:
        trainer: the trainer after ``fit`` (and ``test``).
        model: the trained module.
        test: the metrics ``trainer.test`` returned.
        fit_metrics: ``trainer.callback_metrics`` as ``fit`` left them (``test`` resets them).
        wall_s: seconds the run took (fit and test), or ``None``.

    Returns:
        The summary as a dict (what ``summary.json`` holds).

    Example::

        >>> from ode_reg.cli import run  # doctest: +SKIP
        >>> cli = run(["fit", "--config", "recipes/two_moons.yaml"])  # doctest: +SKIP
    """
    metrics = {k: float(v) for k, v in (fit_metrics or {}).items()}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    metrics.update(test)
    folder = run_dir(trainer)
    plots = sorted(str(p) for p in folder.rglob("*.png"))
    datamodule = getattr(trainer, "datamodule", None)
    summary = {
        "version": SUMMARY_VERSION,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "test_acc": _scalar(metrics, "test/acc"),
        "test_mse": _scalar(metrics, "test/mse"),
        "val_acc": _scalar(metrics, "val/acc"),
        "test_n": _split_size(datamodule, "test"),
        "val_n": _split_size(datamodule, "val"),
        "adjoint_ratio_max_min": _scalar(metrics, "adjoint/ratio_max_min"),
        "adjoint_ratio_epoch_geomean": _scalar(metrics, "adjoint/ratio_epoch_geomean"),
        "adjoint_norm_first": _scalar(metrics, "adjoint/norm_first"),
        "adjoint_norm_last": _scalar(metrics, "adjoint/norm_last"),
        "orthogonality_max": _scalar(metrics, "orthogonality/max", "orthogonality/running_max"),
        "spectral_abscissa": _scalar(metrics, "spectrum/abscissa"),
        "spectral_radius": _scalar(metrics, "spectrum/radius"),
        "skew_real_max": _scalar(metrics, "spectrum/skew_real_max"),
        "reg_total": _scalar(metrics, "reg/total_epoch", "reg/total"),
        "solver_nfe": _solver_nfe(trainer),
        "float_eps": _model_eps(model),
        "wall_s": wall_s,
        "process_s": process_age(),
        "run_dir": str(folder),
        "checkpoints": _checkpoints(trainer, folder),
        "plot_cadence": plot_cadence(trainer),
        "latest_plots": latest_plots(folder),
        "plots": plots,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(["", "=" * 72, format_summary(summary), "=" * 72]))
    return summary
