"""A stand-in for a library that calls torchdiffeq itself (as torchcde does): it reaches the
solver through the module attribute ``torchdiffeq.odeint`` / ``torchdiffeq.odeint_adjoint``,
so ``ode_reg.capture_torchdiffeq`` can record it without editing it."""

from __future__ import annotations

import torch
import torchdiffeq


def integrate(field, z0: torch.Tensor, t: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
    """The library's solve: rk4, step 0.25, through torchdiffeq's module attribute."""
    solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    return solve(func=field, y0=z0, t=t, method="rk4", options={"step_size": 0.25})
