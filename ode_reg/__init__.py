"""ode_reg: keep neural ODEs and ODE-RNNs trainable over long horizons.

The functional core (``integrate``, ``adjoints``, ``sensitivities``, ``ode_reg.functional``)
works without Lightning; ``RegularizedODEModule``, the regularizer classes and the callbacks
in ``ode_reg.callbacks`` are thin Lightning shells over it.
"""

from ode_reg.adjoint import adjoints, sensitivities
from ode_reg.callbacks import (
    GradientNormMonitor,
    OrthogonalityMonitor,
    SolverStatsMonitor,
    SpectrumMonitor,
)
from ode_reg.dynamics import AntisymmetricODEFunc, OrthogonalFlow, SkewLinearODEFunc
from ode_reg.functional import cayley, orthogonality_defect, scaled_cayley
from ode_reg.metrics import MaxOrthogonalityDefect, MeanAdjointRatio, MeanSpectralAbscissa
from ode_reg.module import RegularizedODEMixin, RegularizedODEModule, StepRecord
from ode_reg.plan import Monitor, Need, StepPlan, capture_torchdiffeq, due
from ode_reg.protocol import SelfIntegratingField
from ode_reg.regularizers import (
    AdjointMagnitude,
    DirectionalConstraint,
    JacobianFrobenius,
    KineticEnergy,
    Regularizer,
    SensitivityMagnitude,
    SkewJacobianPenalty,
    SpectralConstraint,
)
from ode_reg.solve import odeint, odeint_adjoint
from ode_reg.terms import step_terms
from ode_reg.trajectory import (
    DEFAULT_CHECKPOINTS,
    IntegrationError,
    SolverStats,
    Trajectory,
    chain,
    integrate,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHECKPOINTS",
    "AdjointMagnitude",
    "AntisymmetricODEFunc",
    "DirectionalConstraint",
    "GradientNormMonitor",
    "MaxOrthogonalityDefect",
    "MeanAdjointRatio",
    "MeanSpectralAbscissa",
    "Monitor",
    "Need",
    "OrthogonalityMonitor",
    "SolverStatsMonitor",
    "SpectrumMonitor",
    "IntegrationError",
    "JacobianFrobenius",
    "KineticEnergy",
    "OrthogonalFlow",
    "Regularizer",
    "RegularizedODEMixin",
    "RegularizedODEModule",
    "SelfIntegratingField",
    "SensitivityMagnitude",
    "SkewJacobianPenalty",
    "SkewLinearODEFunc",
    "SolverStats",
    "SpectralConstraint",
    "StepPlan",
    "StepRecord",
    "Trajectory",
    "adjoints",
    "capture_torchdiffeq",
    "cayley",
    "chain",
    "due",
    "integrate",
    "odeint",
    "odeint_adjoint",
    "orthogonality_defect",
    "scaled_cayley",
    "sensitivities",
    "step_terms",
]
