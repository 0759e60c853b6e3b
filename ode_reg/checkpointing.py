"""``LastStateCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is the last state.

Lightning 2.6's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only on
the epochs where it saves a top-k checkpoint, so after an epoch that did not improve the
monitored value, ``last.ckpt`` is an older epoch and a resume from it rolls back.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

__all__ = ["LastStateCheckpoint"]


class LastStateCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` at every epoch end where it saved none.

    The top-k checkpoints (``monitor``, ``mode``, ``save_top_k``) are Lightning's; ``last.ckpt``
    is the state at the end of the latest epoch (and, with ``save_on_exception=True``, at an
    exception or Ctrl-C), so ``--ckpt_path .../last.ckpt`` continues from where the run stopped.
    Resuming from an epoch end reproduces the uninterrupted run with the ode_reg data modules
    (each epoch's order depends on the seed and the epoch only); see
    :mod:`ode_reg.data._base` for what a checkpoint from the middle of an epoch gives.

    Args:
        *args: as ``lightning.pytorch.callbacks.ModelCheckpoint``.
        **kwargs: as ``lightning.pytorch.callbacks.ModelCheckpoint`` (``save_last`` defaults to
            ``True`` here).

    Raises:
        lightning.fabric.utilities.exceptions.MisconfigurationException: as ``ModelCheckpoint``.

    Example::

        >>> ckpt = LastStateCheckpoint(monitor="val/acc", mode="max", save_on_exception=True)
        >>> ckpt.save_last
        True
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_last", True)
        super().__init__(*args, **kwargs)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Lightning's epoch-end saving, then ``last.ckpt`` if nothing was saved at this step."""
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
