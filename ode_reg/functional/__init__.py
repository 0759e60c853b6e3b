"""Pure functions of tensors: penalties, orthogonal maps and spectra (no Lightning)."""

from ode_reg.functional.orthogonal import (
    cayley,
    expm_orthogonal,
    orthogonality_defect,
    scaled_cayley,
    skew,
)
from ode_reg.functional.penalties import (
    adjoint_magnitude_penalty,
    directional_penalty,
    jacobian_frobenius_penalty,
    kinetic_energy_penalty,
    sensitivity_magnitude_penalty,
    skew_jacobian_penalty,
    spectral_penalty,
)
from ode_reg.functional.spectra import (
    jacobian,
    jacobian_eigvals,
    spectral_abscissa,
    spectral_radius,
)

__all__ = [
    "adjoint_magnitude_penalty",
    "cayley",
    "directional_penalty",
    "expm_orthogonal",
    "jacobian",
    "jacobian_eigvals",
    "jacobian_frobenius_penalty",
    "kinetic_energy_penalty",
    "orthogonality_defect",
    "scaled_cayley",
    "sensitivity_magnitude_penalty",
    "skew",
    "skew_jacobian_penalty",
    "spectral_abscissa",
    "spectral_penalty",
    "spectral_radius",
]
