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


class ODERegCLI(LightningCLI):
    """LightningCLI that tests after ``fit`` and prints the run's summary."""

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.fast_dev_run or trainer.interrupted:
            return
        datamodule = self.datamodule
        results: list[dict[str, float]] = []
        if datamodule is not None and hasattr(datamodule, "test_dataloader"):
            results = trainer.test(model, datamodule=datamodule, ckpt_path=None, verbose=False)
        if trainer.is_global_zero:
            from ode_reg.summary import print_summary

            print_summary(trainer, model, results[0] if results else {})


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
