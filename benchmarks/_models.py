"""The benchmark model: a RegularizedODEModule with a ``tanh(W z + b)`` field, RK4 over [0, 1]."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ode_reg import (
    AdjointMagnitude,
    DirectionalConstraint,
    RegularizedODEModule,
    SensitivityMagnitude,
    SkewJacobianPenalty,
)
from ode_reg.regularizers import Regularizer

#: RK4 step of every benchmark solve: 40 steps over [0, 1].
STEP_SIZE = 0.025


class TanhField(nn.Module):
    """``f(t, z) = tanh(z W^T + b)``, ``W`` of size ``d x d`` (the plain benchmark field)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) * (1.0 / math.sqrt(d)))
        self.bias = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return torch.tanh(nn.functional.linear(z, self.weight, self.bias))


#: gamma of the directional constraint: 0.9 is violated at the first checkpoints of the
#: benchmark model (an active hinge), 0.0 holds everywhere (value 0, no gradient).
ACTIVE_GAMMA = 0.9

#: name -> factory of the regularizer list of one benchmark variant.
VARIANTS: dict[str, Callable[[], list[Regularizer]]] = {
    "plain": lambda: [],
    "adjoint": lambda: [AdjointMagnitude(0.1)],
    "sensitivity": lambda: [SensitivityMagnitude(0.1)],
    "directional": lambda: [DirectionalConstraint(gamma=ACTIVE_GAMMA, weight=0.1)],
    "directional(satisfied)": lambda: [DirectionalConstraint(gamma=0.0, weight=0.1)],
    "skew": lambda: [SkewJacobianPenalty(0.01, seed=0)],
    "sens+dir(detached)": lambda: [
        SensitivityMagnitude(0.1, detach_states=True),
        DirectionalConstraint(gamma=ACTIVE_GAMMA, weight=0.1, detach_states=True),
    ],
    "sens+dir(stop-grad)": lambda: [
        SensitivityMagnitude(0.1, detach_states=True, detach_adjoints=True),
        DirectionalConstraint(
            gamma=ACTIVE_GAMMA, weight=0.1, detach_states=True, detach_adjoints=True
        ),
    ],
    "exact(adj+sens+dir)": lambda: [
        AdjointMagnitude(0.1),
        SensitivityMagnitude(0.1),
        DirectionalConstraint(gamma=ACTIVE_GAMMA, weight=0.1),
    ],
    "all(+skew)": lambda: [
        AdjointMagnitude(0.1),
        SensitivityMagnitude(0.1),
        DirectionalConstraint(gamma=ACTIVE_GAMMA, weight=0.1),
        SkewJacobianPenalty(0.01, seed=0),
    ],
}


class BenchModel(RegularizedODEModule):
    """``z(1)`` of ``dz/dt = tanh(W z + b)`` from ``z(0) = x``, MSE of a linear readout."""

    def __init__(
        self, d: int, checkpoints: int, regularizers: list[Regularizer], out: int = 10
    ) -> None:
        super().__init__(regularizers=regularizers)
        self.field = TanhField(d)
        self.readout = nn.Linear(d, out)
        self.checkpoints = checkpoints
        self.register_buffer("span", torch.tensor([0.0, 1.0]), persistent=False)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        z = self.odeint(
            self.field,
            x,
            self.span,
            checkpoints=self.checkpoints,
            method="rk4",
            options={"step_size": STEP_SIZE},
        )[-1]
        return nn.functional.mse_loss(self.readout(z), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def make_model(variant: str, d: int, checkpoints: int, seed: int = 0) -> BenchModel:
    """A fresh :class:`BenchModel` with the regularizers of ``variant`` (same weights per seed)."""
    torch.manual_seed(seed)
    return BenchModel(d, checkpoints, VARIANTS[variant]())


def make_batch(d: int, batch: int, out: int = 10, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d, generator=g), torch.randn(batch, out, generator=g)
