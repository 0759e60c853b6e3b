"""Activations accepted by the structured fields, by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from ode_reg._checks import check_choice


def _identity(x: Tensor) -> Tensor:
    return x


#: Monotone non-decreasing activations (``sigma' >= 0``), so that ``diag(sigma') M`` keeps the
#: eigenvalue bound of an antisymmetric-minus-diffusion ``M`` (MATH.md, antisymmetric field).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "softplus": F.softplus,
    "identity": _identity,
}


def get_activation(name: str, argname: str = "activation") -> Callable[[Tensor], Tensor]:
    """Look up an activation by name; ``ValueError`` naming ``argname`` when unknown."""
    check_choice(argname, name, sorted(ACTIVATIONS))
    return ACTIVATIONS[name]
