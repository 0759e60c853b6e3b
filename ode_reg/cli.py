"""The ``ode-reg`` command: LightningCLI over the recipe models and data modules.

``ode-reg fit --config recipes/digits.yaml`` trains a recipe; after ``fit`` it evaluates the
test split and prints a short summary (accuracy, adjoint ratio, orthogonality, where the run
and its plots are). W&B runs offline unless an account is configured.
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI


def wandb_account_configured() -> bool:
    """Whether W&B credentials exist (``WANDB_API_KEY`` or a ``~/.netrc`` entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_wandb_mode() -> str:
    """Set ``WANDB_MODE=offline`` unless the user chose a mode or has an account; returns it."""
    if "WANDB_MODE" not in os.environ and not wandb_account_configured():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def _fallback_logger(trainer: L.Trainer, reason: str) -> None:
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import rank_zero_warn

    save_dir = trainer.default_root_dir
    rank_zero_warn(
        f"W&B is unavailable ({reason}). Falling back to CSVLogger in {save_dir}: scalars go to "
        "metrics.csv, plots are saved as PNG files beside it. Set WANDB_MODE=offline to keep "
        "W&B without an account, or configure one with `wandb login`.",
        category=UserWarning,
    )
    trainer.loggers = [CSVLogger(save_dir)]


def ensure_logger_available(trainer: L.Trainer) -> None:
    """Replace an unusable WandbLogger by a CSVLogger, with a clear message, before training.

    W&B is unusable when it should run online without an account, or when ``wandb.init``
    fails. The run then goes on with local logging instead of stopping.

    Args:
        trainer: the trainer about to fit.
    """
    from lightning.pytorch.loggers import WandbLogger

    if not any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        return
    mode = os.environ.get("WANDB_MODE", "online")
    if mode not in ("offline", "disabled", "dryrun") and not wandb_account_configured():
        _fallback_logger(trainer, f"WANDB_MODE={mode} but no W&B account is configured")
        return
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            try:
                lg.experiment  # noqa: B018 - starts wandb.init
            except Exception as exc:  # wandb raises many error types on init failure
                _fallback_logger(trainer, f"wandb.init failed: {type(exc).__name__}: {exc}")
                return


def configure_threads() -> int:
    """One intra-op thread unless ``OMP_NUM_THREADS`` or ``ODE_REG_NUM_THREADS`` says otherwise.

    The recipes' recurrent matmuls are small (hidden 64-128, batch 32-64): a second thread
    gains little, and on a busy 2-core machine OpenMP's spinning threads made an epoch of the
    `digits` recipe about twice as slow (28 s against 54 s for two epochs, measured side by
    side). Returns the number of threads set.
    """
    import torch

    if "OMP_NUM_THREADS" in os.environ and "ODE_REG_NUM_THREADS" not in os.environ:
        return torch.get_num_threads()
    n = int(os.environ.get("ODE_REG_NUM_THREADS", "1"))
    torch.set_num_threads(n)
    return n


class ODERegCLI(LightningCLI):
    """LightningCLI that checks the logger before ``fit``, tests after it and prints a summary."""

    def before_fit(self) -> None:
        ensure_logger_available(self.trainer)

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.fast_dev_run or trainer.interrupted:
            return
        # trainer.test resets callback_metrics: keep what fit (and the monitors) left there.
        fit_metrics = {k: v for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        datamodule = self.datamodule
        results: list[dict[str, float]] = []
        if datamodule is not None and hasattr(datamodule, "test_dataloader"):
            results = trainer.test(model, datamodule=datamodule, ckpt_path=None, verbose=False)
        if trainer.is_global_zero:
            from ode_reg.summary import print_summary

            print_summary(trainer, model, results[0] if results else {}, fit_metrics)


def run(args: list[str] | None = None) -> ODERegCLI:
    """Run the CLI in-process (recipes, tests).

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The :class:`ODERegCLI` instance (its ``trainer`` and ``model`` hold the run).

    Example::

        >>> from ode_reg.cli import run  # doctest: +SKIP
        >>> cli = run(["fit", "--config", "recipes/digits.yaml", "--trainer.fast_dev_run", "2"])
    """
    configure_wandb_mode()
    configure_threads()
    os.environ.setdefault("ODE_REG_ROOT", str(Path.cwd()))
    return ODERegCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args if args is not None else sys.argv[1:],
        save_config_kwargs={"overwrite": True},
    )


def main() -> None:
    """Entry point of ``ode-reg`` and ``python -m ode_reg``."""
    run()
