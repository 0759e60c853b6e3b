"""Pure functions of tensors: penalties, orthogonal maps and spectra (no Lightning)."""

from ode_reg.functional.penalties import (
    adjoint_magnitude_penalty,
    directional_penalty,
    sensitivity_magnitude_penalty,
    skew_jacobian_penalty,
    spectral_penalty,
)

__all__ = [
    "adjoint_magnitude_penalty",
    "directional_penalty",
    "sensitivity_magnitude_penalty",
    "skew_jacobian_penalty",
    "spectral_penalty",
]
