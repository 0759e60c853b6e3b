"""What the monitors share: cadence, cross-rank reduction, and delivery to the trainer's loggers.

Scalars. Each value is logged with ``pl_module.log(..., on_step=True, logger=False)`` (so it is
in ``trainer.callback_metrics``, usable by ``ModelCheckpoint``/``EarlyStopping`` and the
progress bar, with or without a logger) and handed to every logger with
``logger.log_metrics(..., step=...)`` on rank zero, at the monitor's own cadence. Going
through Lightning's ``self.log(logger=True)`` instead would deliver the value only on
Lightning's ``log_every_n_steps`` grid and re-send a stale value at every later grid step
until the next update; Lightning's own monitors (``LearningRateMonitor``,
``DeviceStatsMonitor``) log to the loggers directly for the same reason. Rank-local values
are reduced first with ``trainer.strategy.reduce`` (one collective per reduction kind, run on
every rank at the same steps), so every rank logs the same number.

Images and histograms (rank zero only):

- ``WandbLogger``: ``log_image`` / a ``wandb.Histogram`` (at most 512 bins);
- ``TensorBoardLogger``: ``add_figure`` / ``add_histogram``, and the figure also as a PNG;
- any other logger with a ``log_dir`` (``CSVLogger``, ...): PNG files
  ``<log_dir>/plots/<key>/step_<step>.png`` (a histogram is drawn as a bar chart);
- no logger: skipped (scalars still reach ``callback_metrics``).

The step is Lightning's logger step (``trainer.fit_loop.epoch_loop._batches_that_stepped``),
the one Lightning itself passes to the loggers, so the monitors' points line up with the
model's own logged metrics.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import Metric
from typing_extensions import override

from ode_reg._once import say_once
from ode_reg.metrics import metric_state, restore_metric_state
from ode_reg.plan import Monitor, due
from ode_reg.plotting import histogram_figure, save_figure

#: W&B refuses histograms with more bins than this.
WANDB_MAX_BINS = 512

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]")


def resolve_every_n(trainer: pl.Trainer, every_n_steps: int | None) -> int:
    """``every_n_steps`` or, when ``None``, ``trainer.log_every_n_steps`` (0 means never)."""
    return int(trainer.log_every_n_steps) if every_n_steps is None else every_n_steps


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning passes to the loggers for the current training batch.

    Lightning has no public accessor for it: its own ``LearningRateMonitor`` reads the same
    ``fit_loop.epoch_loop._batches_that_stepped``. ``trainer.global_step`` is not it: it counts
    optimizer steps (several a batch with several optimizers) and has already advanced in
    ``on_train_batch_end``.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def accumulating(trainer: pl.Trainer) -> bool:
    """Whether the current training batch is a micro-batch of a gradient accumulation that
    does not step the optimizer (automatic optimization; Lightning steps at every
    ``accumulate_grad_batches``-th batch of the epoch and at its last batch).

    Read from public state: the epoch loop's ``batch_progress`` (batches fetched this epoch,
    the current one included), ``trainer.accumulate_grad_batches`` and
    ``trainer.num_training_batches``.
    """
    n = trainer.accumulate_grad_batches
    if n <= 1:
        return False
    module = trainer.lightning_module
    if module is None or not module.automatic_optimization:
        return False
    ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return ready % n != 0 and ready != trainer.num_training_batches


def is_due(trainer: pl.Trainer, every_n: int) -> bool:
    """Whether a cadence of ``every_n`` steps fires on the current training batch.

    The one cadence rule of terms and monitors (:func:`ode_reg.plan.due`, Lightning's
    ``should_update_logs`` convention): the batch with logger step ``s`` fires when
    ``(s + 1) % every_n == 0``. The counter only advances after ``on_train_batch_end``,
    so ``on_before_backward``, ``on_before_optimizer_step`` and ``on_train_batch_end`` of one
    batch agree. Under gradient accumulation only the micro-batch that steps the optimizer
    fires (as Lightning logs step metrics only then; :func:`accumulating`).
    """
    return due(logger_step(trainer), every_n) and not accumulating(trainer)


def reduce_values(
    trainer: pl.Trainer, values: Mapping[str, Tensor], ops: Mapping[str, str]
) -> dict[str, Tensor]:
    """Reduce rank-local scalars across ranks, one collective per reduction kind.

    Must be called on every rank with the same keys (it is a collective under DDP). Keys
    missing from ``ops`` are returned unchanged (values equal on all ranks already).

    Args:
        trainer: the trainer (its strategy reduces).
        values: scalar tensors.
        ops: key -> ``"mean"``, ``"sum"``, ``"max"`` or ``"min"``.

    Returns:
        The reduced values, same keys.
    """
    out = dict(values)
    if trainer.world_size <= 1:
        return out
    by_op: dict[str, list[str]] = {}
    for key in sorted(values):
        if key in ops:
            by_op.setdefault(ops[key], []).append(key)
    for op, keys in sorted(by_op.items()):
        dtype = torch.float64 if any(values[k].dtype == torch.float64 for k in keys) else None
        stacked = torch.stack(
            [values[k].detach().reshape(()).to(dtype or torch.float32) for k in keys]
        )
        # strategy.reduce works in place: hand it a fresh tensor, on the strategy's root
        # device (NCCL reduces device tensors only).
        device = trainer.strategy.root_device
        reduced = trainer.strategy.reduce(stacked.to(device).clone(), reduce_op=op).cpu()
        for k, v in zip(keys, reduced):
            out[k] = v
    return out


def log_scalars(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    metrics: Mapping[str, Tensor | float],
    *,
    prog_bar: Collection[str] = (),
    extra: Mapping[str, float] | None = None,
) -> None:
    """Log scalars (already reduced across ranks) to ``callback_metrics`` and to the loggers.

    See the module docstring for why the loggers are called directly. Keys in ``prog_bar``
    are also shown in the progress bar; ``extra`` keys go to the loggers only (in the same
    ``log_metrics`` call, cheaper than a ``pl_module.log`` per key).
    """
    if not metrics:
        return
    for key, value in metrics.items():
        pl_module.log(
            key,
            value,
            on_step=True,
            on_epoch=False,
            logger=False,
            prog_bar=key in prog_bar,
            batch_size=1,
        )
    if trainer.is_global_zero and trainer.loggers:
        step = logger_step(trainer)
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars.update(extra or {})
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)


def _file_dir(logger: Logger) -> str | None:
    """The logger's ``log_dir`` when it has one (a string), else ``None``."""
    log_dir = getattr(logger, "log_dir", None)
    return log_dir if isinstance(log_dir, str) else None


def plot_path(log_dir: str, key: str, step: int) -> str:
    """``<log_dir>/plots/<key>/step_<step:07d>.png`` with unsafe characters replaced."""
    safe = _UNSAFE.sub("_", key).replace("..", "_").strip("/") or "plot"
    return os.path.join(log_dir, "plots", *safe.split("/"), f"step_{step:07d}.png")


def has_plot_sink(trainer: pl.Trainer) -> bool:
    """Whether any of the trainer's loggers can take images (else plots are skipped)."""
    return any(
        isinstance(lg, (WandbLogger, TensorBoardLogger)) or _file_dir(lg) is not None
        for lg in trainer.loggers
    )


def log_figure(trainer: pl.Trainer, key: str, fig: Figure, step: int | None = None) -> list[str]:
    """Send a figure to every logger of the trainer (rank zero only).

    Args:
        trainer: the trainer.
        key: the image's key, e.g. ``"spectrum/eigenvalues"``.
        fig: a matplotlib figure (see :mod:`ode_reg.plotting`).
        step: logger step (default: the current one).

    Returns:
        The PNG files written (for file-based loggers).
    """
    if not trainer.is_global_zero:
        return []
    step = logger_step(trainer) if step is None else step
    written: list[str] = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[fig], step=step)  # wandb.Image takes a figure
            continue
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(key, fig, global_step=step, close=False)
        log_dir = _file_dir(logger)
        if log_dir is not None:
            written.append(save_figure(fig, plot_path(log_dir, key, step)))
        elif not isinstance(logger, TensorBoardLogger):
            say_once(
                f"ode_reg monitors: logger {type(logger).__name__} takes no images and has no "
                "`log_dir`; plots are not saved for it"
            )
    return written


def log_histogram(
    trainer: pl.Trainer,
    key: str,
    values: Tensor,
    step: int | None = None,
    bins: int = 64,
    xlabel: str = "value",
    *,
    title: str | None = None,
    native: bool = True,
    files: bool = True,
) -> list[str]:
    """Send a histogram of ``values`` to every logger of the trainer (rank zero only).

    W&B gets a ``wandb.Histogram`` (``min(bins, 512)`` bins), TensorBoard ``add_histogram``
    (both when ``native``), other loggers with a ``log_dir`` a PNG bar chart (when ``files``;
    ``title``, default ``"<key> (training step <step>)"``). Non-finite values are dropped.

    Returns:
        The PNG files written.
    """
    if not trainer.is_global_zero:
        return []
    step = logger_step(trainer) if step is None else step
    v = values.detach().reshape(-1).double().cpu()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return []
    written: list[str] = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            if native:
                import wandb

                hist = wandb.Histogram(v.numpy(), num_bins=min(bins, WANDB_MAX_BINS))
                logger.log_metrics({key: hist}, step=step)  # type: ignore[dict-item]
        elif isinstance(logger, TensorBoardLogger):
            if native:
                logger.experiment.add_histogram(key, v.numpy(), global_step=step)
        elif files and (log_dir := _file_dir(logger)) is not None:
            head = f"{key} (training step {step})" if title is None else title
            fig = histogram_figure(v, bins=bins, title=head, xlabel=xlabel)
            written.append(save_figure(fig, plot_path(log_dir, key, step)))
    return written


class PreStepMonitor(Monitor):
    """Base of the monitors: measure each due batch once, before ``optimizer.step``.

    Subclasses implement :meth:`measure_and_log`, which runs in ``on_before_optimizer_step``
    (gradients are final and the parameters are still those that produced the step's
    trajectories, so a Jacobian or sensitivity evaluated now is that of the field which was
    integrated), or in ``on_train_batch_end`` when no optimizer step happened in the batch
    (manual optimization that did not step, a skipped step). A closure optimizer that calls
    the closure several times (LBFGS) is measured at its first call. Every rank measures at the
    same batches, so collectives inside :meth:`measure_and_log` line up.

    The epoch aggregates (torchmetrics Metrics, reset by Lightning at each epoch end) are saved
    with the epoch they belong to and whether that epoch was still running; a checkpoint taken
    inside an epoch (``ModelCheckpoint(every_n_train_steps=...)``) gives them back when training
    resumes inside that epoch (``on_train_start``), so a run resumed mid-epoch logs the same
    epoch aggregate as an uninterrupted one; one taken at an epoch's end does not (the next
    epoch starts empty).
    """

    _measured = False
    _state_epoch = -1
    _in_epoch = False
    _pending_epoch_state: dict[str, Any] | None = None

    def measure_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure (if due) and log; called once per training batch."""
        raise NotImplementedError  # pragma: no cover

    def epoch_metrics(self) -> dict[str, Metric]:
        """The epoch-aggregate Metrics whose states travel in the checkpoint, by name."""
        return {}

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._measured = False
        self._state_epoch, self._in_epoch = int(trainer.current_epoch), True

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self._measured and trainer.training:
            self._measured = True
            self.measure_and_log(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._measured:
            self._measured = True
            self.measure_and_log(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending, self._pending_epoch_state = self._pending_epoch_state, None
        if pending is None or not pending.get("open", False):
            return  # no checkpoint, or one from an epoch's end: the aggregates start empty
        if int(pending["epoch"]) != trainer.current_epoch:
            return
        for name, metric in self.epoch_metrics().items():
            if name in pending["metrics"]:
                restore_metric_state(metric, pending["metrics"][name])

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_epoch = False

    def save_epoch_state(self) -> dict[str, Any]:
        """The epoch aggregates' states with their epoch (for ``state_dict``)."""
        return {
            "epoch": self._state_epoch,
            "open": self._in_epoch,
            "metrics": {name: metric_state(m) for name, m in self.epoch_metrics().items()},
        }

    def load_epoch_state(self, state: Mapping[str, Any] | None) -> None:
        """Keep saved epoch states until ``on_train_start`` decides whether they apply."""
        self._pending_epoch_state = None if state is None else dict(state)
