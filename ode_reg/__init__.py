"""ode_reg: keep neural ODEs and ODE-RNNs trainable over long horizons."""

from ode_reg.adjoint import adjoints, sensitivities
from ode_reg.module import RegularizedODEModule, StepRecord
from ode_reg.regularizers import (
    AdjointMagnitude,
    DirectionalConstraint,
    Regularizer,
    SensitivityMagnitude,
    SkewJacobianPenalty,
    SpectralConstraint,
)
from ode_reg.trajectory import DEFAULT_CHECKPOINTS, IntegrationError, Trajectory, integrate

__version__ = "0.1.0"

__all__ = [
    "AdjointMagnitude",
    "DirectionalConstraint",
    "Regularizer",
    "RegularizedODEModule",
    "SensitivityMagnitude",
    "SkewJacobianPenalty",
    "SpectralConstraint",
    "StepRecord",
    "DEFAULT_CHECKPOINTS",
    "IntegrationError",
    "Trajectory",
    "adjoints",
    "integrate",
    "sensitivities",
]
