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
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from typing_extensions import override

__all__ = [
    "HELD_OUT_SAMPLES",
    "SUMMARY_VERSION",
    "SampleCounter",
    "batch_counts",
    "format_summary",
    "held_out_adjoint_profile",
    "held_out_adjoint_ratio",
    "latest_plots",
    "near_zero",
    "plot_cadence",
    "print_summary",
    "process_age",
    "profile_ratio",
    "run_dir",
]

#: Bumped when the keys of ``summary.json`` change meaning.
SUMMARY_VERSION = 3

#: Test samples the held-out adjoint max/min is computed on (the first ones of the test split).
HELD_OUT_SAMPLES = 256

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


def _orthogonal_count(model: L.LightningModule) -> int:
    """How many matrices the model declares orthogonal (what OrthogonalityMonitor reads: the
    parametrized and declared matrices, and each OrthogonalFlow's weight flow)."""
    from ode_reg.callbacks.orthogonality import find_orthogonal_matrices
    from ode_reg.dynamics import OrthogonalFlow

    with torch.no_grad():
        found = len(find_orthogonal_matrices(model))
    return found + sum(isinstance(m, OrthogonalFlow) for m in model.modules())


def _scalar(metrics: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        if key in metrics:
            return float(metrics[key])
    return None


def batch_counts(batch: Any) -> tuple[int, int | None] | None:
    """Samples and predicted labels in one batch: ``(samples, labels)``.

    A batch is a tensor, or a tuple/list/dict whose first tensor holds the samples along its
    first dimension; its last tensor is the target. An integer target counts its elements as
    labels (a label per step for a ``(B, T)`` target, so that ``accuracy x labels`` counts
    correct labels); a float target counts no labels (``None``).

    Args:
        batch: what the data loader gave the step.

    Returns:
        ``(samples, labels)``, or ``None`` when the batch holds no tensor.

    Example::

        >>> import torch
        >>> batch_counts((torch.zeros(4, 7, 1), torch.zeros(4, 7, dtype=torch.long)))
        (4, 28)
        >>> batch_counts([torch.zeros(3, 2), torch.zeros(3, 1)])
        (3, None)
    """
    if isinstance(batch, Tensor):
        tensors = [batch]
    elif isinstance(batch, dict):
        tensors = [v for v in batch.values() if isinstance(v, Tensor)]
    elif isinstance(batch, (tuple, list)):
        tensors = [v for v in batch if isinstance(v, Tensor)]
    else:
        return None
    if not tensors or tensors[0].dim() == 0:
        return None
    samples = int(tensors[0].shape[0])
    target = tensors[-1]
    if len(tensors) < 2 or target.is_floating_point() or target.is_complex():
        return samples, None
    return samples, int(target.numel())


class SampleCounter(Callback):
    """Counts the samples (and labels) that the last validation and the test actually ran on.

    The ``ode-reg`` command attaches one, so that the summary's ``(k of n)`` and sample counts
    say what ran: under ``--trainer.limit_test_batches 2`` the test saw two batches, not the
    whole split. Counts are summed over DDP ranks (a ``DistributedSampler``'s padding
    included, as in the metrics); the sanity check is not counted.

    Attributes:
        counts: ``{"val": {"samples": n, "labels": m or None}, "test": {...}}`` once a split
            ran.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SampleCounter()], logger=False)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int | None]] = {}
        self._running: dict[str, list[int | None]] = {}

    def _start(self, split: str) -> None:
        self._running[split] = [0, 0]

    def _add(self, split: str, batch: Any) -> None:
        run = self._running.get(split)
        got = batch_counts(batch)
        if run is None:
            return
        if got is None:
            run[0] = run[1] = None
            return
        samples, labels = got
        run[0] = None if run[0] is None else run[0] + samples
        run[1] = None if run[1] is None or labels is None else run[1] + labels

    def _end(self, trainer: L.Trainer, split: str) -> None:
        run = self._running.pop(split, None)
        if run is None:
            return
        known = torch.tensor([-1.0 if v is None else float(v) for v in run])
        if trainer.world_size > 1:
            # A rank that could not count (-1) makes the sum meaningless: take the minimum too.
            known = known.to(trainer.strategy.root_device)
            low = trainer.strategy.reduce(known.clone(), reduce_op="min").cpu()
            known = trainer.strategy.reduce(known.clone(), reduce_op="sum").cpu()
            known = torch.where(low < 0, torch.full_like(known, -1.0), known)
        samples, labels = (None if v < 0 else int(v) for v in known.tolist())
        self.counts[split] = {"samples": samples, "labels": labels}

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start("val")

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._add("val", batch)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._end(trainer, "val")

    @override
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("test")

    @override
    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._add("test", batch)

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, "test")


def task_loss_of(model: Any) -> Any:
    """The model's task loss ``(out, y) -> loss``: its ``task_loss`` or (recipe models)
    ``_loss`` method, or ``None``.

    Example::

        >>> from ode_reg.models import FlowClassifier
        >>> task_loss_of(FlowClassifier()) is not None, task_loss_of(object())
        (True, None)
    """
    for name in ("task_loss", "_loss"):
        fn = getattr(model, name, None)
        if callable(fn):
            return fn
    return None


def held_out_adjoint_profile(
    model: L.LightningModule, x: Tensor, y: Tensor, loss_fn: Any = None
) -> Tensor | None:
    """``p_k = mean_i ‖a_{k,i}‖`` of the task loss on a held-out batch, after training.

    Runs the model's forward pass on ``x`` with a recorder current (as in a training step, the
    model in eval mode), chains the solves it makes (MATH.md: by data dependency) and takes
    ``a_k = dL/dz_k`` at the chained checkpoints with :func:`ode_reg.adjoints`, ``L`` the task
    loss of ``(model(x), y)``. This is the results table's and the summary's "held-out adjoint
    max/min" (:func:`profile_ratio` of it).

    Args:
        model: a module whose forward pass solves with ``self.odeint`` / ``ode_reg.odeint``.
        x: inputs.
        y: targets.
        loss_fn: ``loss_fn(out, y)``; default the model's :func:`task_loss_of`.

    Returns:
        ``(K + 1,)`` profile along the chained checkpoints, or ``None`` when the forward pass
        made no solve (a GRU or an orthogonal cell).

    Raises:
        ValueError: if no ``loss_fn`` is given and the model has no ``task_loss``/``_loss``.

    Example::

        >>> import torch
        >>> from ode_reg.models import FlowClassifier
        >>> model = FlowClassifier()
        >>> p = held_out_adjoint_profile(model, torch.randn(8, 2), torch.randint(0, 2, (8,)))
        >>> p.shape  # checkpoints=8: K = 8 intervals, K + 1 states
        torch.Size([9])
    """
    from ode_reg import adjoints
    from ode_reg.recording import StepRecorder
    from ode_reg.trajectory import chain

    loss_fn = loss_fn if loss_fn is not None else task_loss_of(model)
    if loss_fn is None:
        raise ValueError(
            f"`loss_fn` must be given for {type(model).__name__}, which has no "
            "`task_loss(out, y)` (or `_loss`)"
        )
    was_training = model.training
    model.eval()
    rec = StepRecorder(adjoint_inputs=True)
    try:
        with torch.enable_grad(), rec.active():
            out = model(x)
            loss = loss_fn(out, y)
        trajectories = [r.traj for r in rec.records]
        if not trajectories:
            return None
        a = adjoints(loss, chain(trajectories))
    finally:
        model.train(was_training)
    return a.flatten(2).norm(dim=-1).mean(dim=1).detach()


def profile_ratio(profile: Tensor) -> float:
    """``max_k p_k / min_k p_k`` of an adjoint profile (1 for a constant adjoint norm).

    Example::

        >>> import torch
        >>> profile_ratio(torch.tensor([2.0, 1.0, 4.0]))
        4.0
    """
    return float(profile.max() / profile.min().clamp_min(1e-30))


def held_out_adjoint_ratio(
    model: L.LightningModule, batches: Any, samples: int = HELD_OUT_SAMPLES
) -> tuple[float, int] | None:
    """The held-out adjoint max/min on the first ``samples`` samples of ``(x, y)`` batches.

    Args:
        model: the trained module (with ``task_loss(out, y)`` or ``_loss``).
        batches: an iterable of ``(x, y)`` batches (the test data loader).
        samples: how many samples to take.

    Returns:
        ``(ratio, samples used)``, or ``None`` when the model has no task loss, the batches
        are not ``(x, y)`` tensor pairs, or the forward pass makes no solve.

    Example::

        >>> import torch
        >>> from ode_reg.models import FlowClassifier
        >>> data = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))] * 3
        >>> ratio, n = held_out_adjoint_ratio(FlowClassifier(), data, samples=10)
        >>> ratio >= 1.0, n
        (True, 10)
    """
    if task_loss_of(model) is None or batches is None:
        return None
    xs, ys, n = [], [], 0
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return None
        x, y = batch
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
            return None
        xs.append(x[: samples - n])
        ys.append(y[: samples - n])
        n += len(xs[-1])
        if n >= samples:
            break
    if not xs:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    profile = held_out_adjoint_profile(model, torch.cat(xs).to(device), torch.cat(ys).to(device))
    return None if profile is None else (profile_ratio(profile), n)


def _checkpoints(trainer: L.Trainer, folder: Path) -> dict[str, Any] | None:
    cb = trainer.checkpoint_callback
    if cb is None or not getattr(cb, "dirpath", None):
        return None
    score = getattr(cb, "best_model_score", None)
    return {
        "dir": str(cb.dirpath),
        "best": getattr(cb, "best_model_path", None) or None,
        "last": getattr(cb, "last_model_path", None) or None,
        # None: the checkpoint callback monitors nothing, so its "best" is the newest save.
        "monitor": getattr(cb, "monitor", None),
        "best_score": None if score is None else float(score),
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


_SPLIT_KEY = {"test": re.compile(r"^test[/_]"), "val": re.compile(r"^val(idation)?[/_]")}


def split_metrics(metrics: dict[str, Any], split: str) -> dict[str, float]:
    """The scalars of a split (``test/*`` and ``test_*``; ``val/*`` and ``val_*``), by key.

    Example::

        >>> split_metrics({"test_loss": 0.5, "test/acc": 0.9, "train/loss": 1.0}, "test")
        {'test/acc': 0.9, 'test_loss': 0.5}
    """
    pattern = _SPLIT_KEY[split]
    return {k: float(metrics[k]) for k in sorted(metrics) if pattern.match(k)}


def _is_accuracy(key: str) -> bool:
    return re.split(r"[/_]", key)[-1] in ("acc", "accuracy")


def _is_loss(key: str) -> bool:
    return re.split(r"[/_]", key)[-1] == "loss"


def _legacy_split(s: dict[str, Any], split: str) -> dict[str, float]:
    """A split's metrics from a ``summary.json`` before version 3 (accuracy / MSE only)."""
    pairs = (("acc", s.get(f"{split}_acc")), ("mse", s.get(f"{split}_mse")))
    return {f"{split}/{name}": float(v) for name, v in pairs if v is not None}


def _split_block(
    s: dict[str, Any], split: str, title: str, add: Any, lines: list[str], w: int
) -> None:
    values = s.get(f"{split}_metrics")
    if values is None:
        values = _legacy_split(s, split)
    count = s.get(f"{split}_count")
    if count is None and s.get(f"{split}_n"):
        count = {"samples": s[f"{split}_n"], "labels": s[f"{split}_n"]}
    note = s.get(f"{split}_note")
    if not values:
        if note:
            add(title, note)
        return
    n_samples = (count or {}).get("samples")
    n_labels = (count or {}).get("labels") or n_samples
    detail = [x for x in (s.get(f"{split}_weights_text"),) if x]
    if n_samples:
        detail.append(f"{n_samples} samples")
    lines.append(f"  {title}" + (f" ({', '.join(detail)})" if detail else ""))
    weights_note = (s.get(f"{split}_weights") or {}).get("note")
    if weights_note:
        lines.append(f"    {weights_note}")
    loss_name = s.get("loss_name")
    for key, value in values.items():
        label = f"{key} ({loss_name})" if loss_name and _is_loss(key) else key
        text = _fraction(value, n_labels) if _is_accuracy(key) else _g3(value)
        lines.append(f"    {label:<{w - 2}} {text}")


def _weights_text(weights: dict[str, Any] | None) -> str:
    if not weights or weights.get("which", "final") == "final":
        return "final weights"
    path = weights.get("path")
    return f"best checkpoint {Path(path).name}" if path else "best checkpoint"


def format_summary(summary: dict[str, Any]) -> str:
    """The printed summary block of a run, from its ``summary.json`` dict alone.

    Every ``test/*`` / ``test_*`` metric the test logged is printed (and the weights it ran
    on and the number of samples it saw), then every ``val/*`` / ``val_*`` metric of the last
    validation; a loss is named by the model's ``loss_name`` (``cross-entropy``, ``MSE``).
    Figures are rounded to what they can mean: accuracies to 4 decimals with the count of
    correct labels, ratios and losses to 3 significant digits, values that are 0 up to float
    rounding (:func:`near_zero`) as 0. Plots are listed as the newest file of each key, or the
    reason why there are none.

    Args:
        summary: the dict :func:`print_summary` returns (or a loaded ``summary.json``; older
            versions print their accuracy and MSE).

    Returns:
        The block, lines joined by newlines, without the surrounding rules.

    Raises:
        KeyError: if ``summary`` lacks ``epochs``, ``steps`` or ``run_dir``.

    Example::

        >>> print(format_summary({"epochs": 2, "steps": 10, "run_dir": "runs/x",
        ...     "test_metrics": {"test/acc": 0.5, "test_loss": 0.7}, "loss_name": "cross-entropy",
        ...     "test_count": {"samples": 360, "labels": 360}}).splitlines()[1:4])
        ['  test (final weights, 360 samples)', '    test/acc                                     0.5000 (180 of 360)', '    test_loss (cross-entropy)                    0.700']
    """
    s = dict(summary)
    eps = float(s.get("float_eps") or torch.finfo(torch.float32).eps)
    w = _LABEL_WIDTH
    lines = ["ode_reg run summary"]

    def add(label: str, text: str) -> None:
        lines.append(f"  {label:<{w}} {text}")

    s["test_weights_text"] = _weights_text(s.get("test_weights"))
    s["val_weights_text"] = "last epoch"
    _split_block(s, "test", "test", add, lines, w)
    _split_block(s, "val", "validation", add, lines, w)
    held = s.get("adjoint_ratio_held_out")
    if held is not None:
        n = s.get("adjoint_held_out_n")
        add(f"held-out adjoint max/min ({n} test samples)", _g3(held))
    elif s.get("adjoint_held_out_note"):
        add("held-out adjoint max/min", s["adjoint_held_out_note"])
    if s.get("adjoint_ratio_max_min") is not None:
        add("adjoint max/min (last logged training step)", _g3(s["adjoint_ratio_max_min"]))
    if s.get("adjoint_ratio_epoch_geomean") is not None:
        add("  (geometric mean over the last epoch)", _g3(s["adjoint_ratio_epoch_geomean"]))
    if s.get("orthogonality_max") is not None:
        add("max orthogonality defect |W^T W - I|_F", _zero_or(s["orthogonality_max"], 1.0, eps))
    elif s.get("orthogonal_matrices"):  # there are some, and nothing measured them
        n = s["orthogonal_matrices"]
        add(
            "orthogonality defect",
            f"not measured: the model holds {n} orthogonal matri{'x' if n == 1 else 'ces'}, but "
            "no orthogonality/* value was logged (no OrthogonalityMonitor, or fewer steps "
            "than its cadence)",
        )
    else:
        add("orthogonality defect", "n/a (the model holds no orthogonal matrix)")
    radius = s.get("spectral_radius")
    if s.get("spectral_abscissa") is not None:
        add(
            "Jacobian spectral abscissa (max Re lambda)",
            _zero_or(s["spectral_abscissa"], radius, eps),
        )
    if s.get("skew_real_max") is not None:  # runs recorded before the key was dropped
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
    _checkpoint_lines(s, add, lines)
    _plot_lines(s, add, lines)
    return "\n".join(lines)


def _checkpoint_lines(s: dict[str, Any], add: Any, lines: list[str]) -> None:
    ckpt = s.get("checkpoints")
    if not ckpt:
        return
    best = Path(ckpt["best"]).name if ckpt.get("best") else None
    last = Path(ckpt["last"]).name if ckpt.get("last") else None
    add("checkpoints", str(ckpt["dir"]))
    if "monitor" not in ckpt:  # a summary.json before version 3
        label = best and f"best: {best}"
    elif ckpt["monitor"] is None:  # ModelCheckpoint without a monitor: its "best" is the newest
        label = best and f"newest: {best} (no monitored metric, so no best)"
    else:
        score = ckpt.get("best_score")
        by = ckpt["monitor"] + ("" if score is None else f" = {_g3(score)}")
        label = best and f"best by {by}: {best}"
    names = ", ".join(n for n in (label, last and f"last: {last}") if n)
    if names:
        lines.append(f"    {names}")
    weights = s.get("test_weights")
    if weights and ckpt.get("monitor") and best:
        if weights.get("which") == "best":
            lines.append(f"    the test ran on the best checkpoint ({best})")
        elif s.get("test_metrics"):
            lines.append(
                "    the test ran on the final weights; --test_weights best tests the best "
                "checkpoint"
            )


def _plot_lines(s: dict[str, Any], add: Any, lines: list[str]) -> None:
    latest = s.get("latest_plots")
    if latest is None:  # a summary.json from before SUMMARY_VERSION 2
        add("plots", f"{len(s.get('plots', []))} PNG files under the run folder")
        return
    if latest:
        total = sum(int(v["count"]) for v in latest.values())
        add("plots", f"{total} PNG files; the newest of each key, under the run folder:")
        for key, v in latest.items():
            lines.append(f"    {key} (newest of {v['count']}): {v['path']}")
        return
    cadence = s.get("plot_cadence")
    if cadence is None:
        add("plots", "none (no callback of this run draws plots)")
    elif s["steps"] < cadence:
        add("plots", f"none yet: the monitors plot every {cadence} steps and this run")
        lines.append(
            f"    took {s['steps']}; pass --trainer.log_every_n_steps (plots every 10x it) "
            "or the callbacks' plot_every_n_steps"
        )
    elif s.get("plot_sink") is False or "plot_sink" not in s:
        add("plots", "none (the logger takes no images: use W&B, TensorBoard or CSVLogger)")
    else:
        names = ", ".join(s.get("plotting_callbacks") or []) or "the monitors"
        add("plots", f"none: the logger takes images, but {names} drew none;")
        lines.append(
            "    they plot solves recorded from ode_reg.odeint in training steps (adjoint "
            "profiles, Jacobian spectra, step sizes), and this run recorded none"
        )


def _counter(trainer: L.Trainer) -> SampleCounter | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, SampleCounter)), None)


def print_summary(
    trainer: L.Trainer,
    model: L.LightningModule,
    test: dict[str, float],
    fit_metrics: dict[str, Any] | None = None,
    wall_s: float | None = None,
    test_weights: dict[str, Any] | None = None,
    test_note: str | None = None,
) -> dict:
    """Print and save (``summary.json`` beside the run) the run's key figures.

    Args:
        trainer: the trainer after ``fit`` (and ``test``).
        model: the trained module.
        test: the metrics ``trainer.test`` returned.
        fit_metrics: ``trainer.callback_metrics`` as ``fit`` left them (``test`` resets them).
        wall_s: seconds the run took (fit and test), or ``None``.
        test_weights: which weights the test ran on: ``{"which": "final"}`` or
            ``{"which": "best", "path": ...}`` (default final).
        test_note: why no test metric is shown, when none is (the summary finds its own
            reason when ``None``).

    Returns:
        The summary as a dict (what ``summary.json`` holds).

    Example::

        >>> from ode_reg.cli import run  # doctest: +SKIP
        >>> cli = run(["fit", "--config", "recipes/two_moons.yaml"])  # doctest: +SKIP
    """
    from ode_reg.callbacks._logging import has_plot_sink

    metrics = {k: float(v) for k, v in (fit_metrics or {}).items()}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    metrics.update(test)
    folder = run_dir(trainer)
    plots = sorted(str(p) for p in folder.rglob("*.png"))
    tests = split_metrics(test, "test")
    if not tests and test_note is None:
        test_note = (
            f"none shown: the test logged {sorted(test)}, no key named test/* or test_*"
            if test
            else "none: the test step logged no metric"
        )
    vals = split_metrics({k: float(v) for k, v in (fit_metrics or {}).items()}, "val")
    counter = _counter(trainer)
    counts = counter.counts if counter is not None else {}
    held = held_out_adjoint_ratio(model, trainer.test_dataloaders) if tests else None
    held_note = None
    if held is None and tests and task_loss_of(model) is None:
        held_note = "n/a (the model has no task_loss(out, y) to take adjoints of)"

    def n_of(split: str) -> int | None:
        c = counts.get(split) or {}
        return c.get("labels") or c.get("samples")

    summary = {
        "version": SUMMARY_VERSION,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "test_metrics": tests,
        "test_note": None if tests else test_note,
        "test_weights": test_weights or {"which": "final"},
        "test_count": counts.get("test"),
        "val_metrics": vals,
        "val_count": counts.get("val"),
        "loss_name": getattr(model, "loss_name", None),
        "test_acc": _scalar(metrics, "test/acc"),
        "test_mse": _scalar(metrics, "test/mse"),
        "val_acc": _scalar(metrics, "val/acc"),
        "test_n": n_of("test"),
        "val_n": n_of("val"),
        "adjoint_ratio_held_out": None if held is None else held[0],
        "adjoint_held_out_n": None if held is None else held[1],
        "adjoint_held_out_note": held_note,
        "adjoint_ratio_max_min": _scalar(metrics, "adjoint/ratio_max_min"),
        "adjoint_ratio_epoch_geomean": _scalar(metrics, "adjoint/ratio_epoch_geomean"),
        "adjoint_norm_first": _scalar(metrics, "adjoint/norm_first"),
        "adjoint_norm_last": _scalar(metrics, "adjoint/norm_last"),
        "orthogonality_max": _scalar(metrics, "orthogonality/max", "orthogonality/running_max"),
        "orthogonal_matrices": _orthogonal_count(model),
        "spectral_abscissa": _scalar(metrics, "spectrum/abscissa"),
        "spectral_radius": _scalar(metrics, "spectrum/radius"),
        "reg_total": _scalar(metrics, "reg/total_epoch", "reg/total"),
        "solver_nfe": _solver_nfe(trainer),
        "float_eps": _model_eps(model),
        "wall_s": wall_s,
        "process_s": process_age(),
        "run_dir": str(folder),
        "checkpoints": _checkpoints(trainer, folder),
        "plot_cadence": plot_cadence(trainer),
        "plot_sink": has_plot_sink(trainer),
        "plotting_callbacks": [
            type(cb).__name__ for cb in trainer.callbacks if hasattr(cb, "plot_every_n_steps")
        ],
        "latest_plots": latest_plots(folder),
        "plots": plots,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(["", "=" * 72, format_summary(summary), "=" * 72]))
    return summary
