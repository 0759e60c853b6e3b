"""Encoder -> flow -> decoder classifiers (two moons; the note's linearity claim)."""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn

from ode_reg._checks import check_choice, check_int, check_range
from ode_reg.dynamics.antisymmetric import AntisymmetricODEFunc
from ode_reg.dynamics.orthogonal_flow import OrthogonalFlow
from ode_reg.dynamics.skew_linear import SkewLinearODEFunc
from ode_reg.models._checkpoint import RegularizersInCheckpoint
from ode_reg.models._steps import SupervisedSteps
from ode_reg.models.fields import UnstructuredODEFunc
from ode_reg.module import RegularizedODEModule
from ode_reg.regularizers import Regularizer

FLOWS = ("skew_linear", "antisymmetric", "orthogonal_flow", "unstructured")


class FlowClassifier(SupervisedSteps, RegularizersInCheckpoint, RegularizedODEModule):
    """``logits = D z(T)``, ``z(0) = init_scale * E x``: linear encoder and decoder around a flow.

    With linear ``E`` and ``D`` the flow carries all the nonlinearity. The skew-linear flow is
    ``z(T) = Q_T z(0)``, linear in ``x``: it classifies no better than a linear classifier
    (MATH.md), whereas the antisymmetric field is nonlinear.

    Checkpoints carry the regularizers (class, arguments, counters, probe seeds):
    ``FlowClassifier.load_from_checkpoint(path)`` rebuilds them and loads strictly (see
    :class:`~ode_reg.models._checkpoint.RegularizersInCheckpoint`).

    Args:
        input_dim: input features, ``>= 1``.
        num_classes: classes, ``>= 2``.
        flow: ``"skew_linear"``, ``"antisymmetric"``, ``"orthogonal_flow"`` or ``"unstructured"``.
        hidden_dim: flow dimension, ``>= 1``.
        horizon: integration time ``T > 0``.
        alpha: scale of the skew-linear field (the note's eq. 18), any real.
        init_scale: scale of the initial state ``z(0)``, ``> 0``.
        gamma: diffusion of the antisymmetric field, ``>= 0``.
        step_size: solver step, ``> 0``.
        checkpoints: checkpoint intervals over ``[0, T]``, ``>= 1``.
        lr: Adam learning rate, ``> 0``.
        regularizers: ode_reg regularizers.

    Raises:
        ValueError: on any argument out of its range.

    Example::

        >>> from ode_reg.models import FlowClassifier
        >>> FlowClassifier(2, 2, flow="skew_linear", hidden_dim=4)(torch.randn(3, 2)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        input_dim: int = 2,
        num_classes: int = 2,
        flow: str = "antisymmetric",
        hidden_dim: int = 16,
        horizon: float = 2.0,
        alpha: float = 1.0,
        init_scale: float = 1.0,
        gamma: float = 0.0,
        step_size: float = 0.1,
        checkpoints: int = 8,
        lr: float = 1e-2,
        regularizers: list[Regularizer] | None = None,
    ) -> None:
        check_int("input_dim", input_dim, 1)
        check_int("num_classes", num_classes, 2)
        check_choice("flow", flow, FLOWS)
        check_int("hidden_dim", hidden_dim, 1)
        check_range("horizon", horizon, 0.0, low_open=True)
        check_range("alpha", alpha)
        check_range("init_scale", init_scale, 0.0, low_open=True)
        check_range("gamma", gamma, 0.0)
        check_range("step_size", step_size, 0.0, low_open=True)
        check_int("checkpoints", checkpoints, 1)
        check_range("lr", lr, 0.0, low_open=True)
        super().__init__(regularizers=regularizers or [])
        self.save_hyperparameters(ignore=["regularizers"])
        self.encoder = nn.Linear(input_dim, hidden_dim)
        if flow == "skew_linear":
            self.field: nn.Module = SkewLinearODEFunc(hidden_dim, alpha=alpha)
        elif flow == "antisymmetric":
            self.field = AntisymmetricODEFunc(hidden_dim, gamma=gamma)
        elif flow == "orthogonal_flow":
            self.field = OrthogonalFlow(hidden_dim, step_size=step_size)
        else:
            self.field = UnstructuredODEFunc(hidden_dim)
        self.decoder = nn.Linear(hidden_dim, num_classes)
        self.register_buffer("span", torch.tensor([0.0, horizon]), persistent=False)
        self.val_metric = torchmetrics.Accuracy("multiclass", num_classes=num_classes)
        self.test_metric = torchmetrics.Accuracy("multiclass", num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z0 = self.hparams.init_scale * self.encoder(x)
        zs = self.odeint(
            self.field,
            z0,
            self.span.to(x.dtype),
            method="rk4",
            options={"step_size": self.hparams.step_size},
            checkpoints=self.hparams.checkpoints,
        )
        return self.decoder(zs[-1])

    #: What ``train/loss``, ``val/loss`` and ``test/loss`` are (the run summary names it).
    loss_name = "cross-entropy"

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
