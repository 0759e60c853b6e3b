"""The training, validation and test steps shared by the recipe models.

A model that mixes in :class:`SupervisedSteps` gives ``_loss(out, y)``, a ``metric_name`` and
two torchmetrics metrics ``val_metric`` / ``test_metric``; the steps log ``train/loss``
(step and epoch), ``val/loss``, ``test/loss`` and ``val/<metric_name>``,
``test/<metric_name>``.
"""

from __future__ import annotations

import torchmetrics
from torch import Tensor
from typing_extensions import override

__all__ = ["SupervisedSteps"]


class SupervisedSteps:
    """``training_step`` / ``validation_step`` / ``test_step`` of a supervised ``(x, y)`` model.

    The class using it defines ``_loss(out, y) -> Tensor``, ``metric_name`` (``"acc"`` or
    ``"mse"``) and the metrics ``val_metric`` and ``test_metric``; :meth:`_update` feeds a metric
    the class predictions ``out.argmax(-1)`` unless the class overrides it. Put it before the
    ``LightningModule`` base, so its steps are the ones Lightning finds (and
    :class:`~ode_reg.RegularizedODEModule` wraps ``training_step`` as usual).

    Example::

        >>> from ode_reg.models import FlowClassifier
        >>> issubclass(FlowClassifier, SupervisedSteps)
        True
    """

    metric_name: str = "acc"
    val_metric: torchmetrics.Metric
    test_metric: torchmetrics.Metric

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, metric: torchmetrics.Metric, out: Tensor, y: Tensor) -> None:
        metric.update(out.argmax(-1), y)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val/loss", self._loss(out, y), prog_bar=True, sync_dist=True)
        self._update(self.val_metric, out, y)
        self.log(f"val/{self.metric_name}", self.val_metric, prog_bar=True)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("test/loss", self._loss(out, y), sync_dist=True)
        self._update(self.test_metric, out, y)
        self.log(f"test/{self.metric_name}", self.test_metric)
