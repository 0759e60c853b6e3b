"""Structured vector fields from the note: antisymmetric, skew-linear and orthogonal flows."""

from ode_reg.dynamics.antisymmetric import AntisymmetricODEFunc
from ode_reg.dynamics.orthogonal_flow import STEPS, OrthogonalFlow
from ode_reg.dynamics.skew_linear import SkewLinearODEFunc

__all__ = ["STEPS", "AntisymmetricODEFunc", "OrthogonalFlow", "SkewLinearODEFunc"]
