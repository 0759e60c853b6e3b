"""Lightning callbacks that monitor what the note cares about: orthogonality, spectra, gradients.

Each monitor logs scalars at its own cadence (``every_n_steps``, default
``Trainer(log_every_n_steps)``) and, where it has them, images and histograms at a slower
``plot_every_n_steps`` (default ten times the scalar cadence); see
:mod:`ode_reg.callbacks._logging` for where each goes with each logger.
"""

from ode_reg.callbacks.gradients import GradientNormMonitor, sensitivity_ratios
from ode_reg.callbacks.orthogonality import (
    HasOrthogonalWeights,
    OrthogonalityMonitor,
    find_orthogonal_matrices,
)
from ode_reg.callbacks.solver_stats import SolverStatsMonitor
from ode_reg.callbacks.spectrum import SpectrumMonitor
from ode_reg.plan import Monitor

__all__ = [
    "GradientNormMonitor",
    "HasOrthogonalWeights",
    "Monitor",
    "OrthogonalityMonitor",
    "SolverStatsMonitor",
    "SpectrumMonitor",
    "find_orthogonal_matrices",
    "sensitivity_ratios",
]
