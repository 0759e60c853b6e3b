"""torchcde calls torchdiffeq itself (``torchdiffeq.odeint`` / ``odeint_adjoint`` through the
module attribute): with ``capture_torchdiffeq=True`` a neural CDE written with the library's
``cdeint`` gets the terms, and they equal those of the same CDE written out by hand with
``ode_reg.odeint`` (the field ``g(z) dX/dt`` of the library's own spline)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torchdiffeq
from torch import nn

import ode_reg
from ode_reg import AdjointMagnitude, RegularizedODEModule, SkewJacobianPenalty

torchcde = pytest.importorskip("torchcde")

B, C, H, L = 6, 2, 4, 9  # batch, input channels, hidden, observations
RK4 = {"method": "rk4", "options": {"step_size": 0.25}}


class CDEFunc(nn.Module):
    """``g(z)``: a (B, H, C) matrix per sample (torchcde's convention)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(H, H * C)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z)).view(z.shape[0], H, C)


class NeuralCDE(RegularizedODEModule):
    """Kidger's neural CDE: z0 from the first observation, the CDE over the spline, a readout;
    ``written=True`` solves the same CDE with ``ode_reg.odeint`` instead of ``cdeint``."""

    def __init__(self, regularizers, written: bool = False, adjoint: bool = False, **kw: Any):
        super().__init__(regularizers=regularizers, **kw)
        self.func = CDEFunc()
        self.initial = nn.Linear(C, H)
        self.readout = nn.Linear(H, 1)
        self.written, self.adjoint = written, adjoint

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        x = torchcde.CubicSpline(coeffs)
        z0 = self.initial(x.evaluate(x.interval[0]))
        t = x.interval
        if not self.written:
            zt = torchcde.cdeint(X=x, func=self.func, z0=z0, t=t, adjoint=self.adjoint, **RK4)
        else:

            def field(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
                return (self.func(s, z) @ x.derivative(s).unsqueeze(-1)).squeeze(-1)

            if self.adjoint:  # a closure: its parameters named, as cdeint names them
                params = tuple(self.func.parameters())
                zt = ode_reg.odeint_adjoint(field, z0, t, adjoint_params=params, **RK4)
            else:
                zt = ode_reg.odeint(field, z0, t, **RK4)
        return self.readout(zt[:, -1] if not self.written else zt[-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        coeffs, y = batch
        return nn.functional.mse_loss(self(coeffs), y)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    times = torch.linspace(0, 2, L)
    path = torch.stack([times.expand(B, L), torch.randn(B, L, generator=g).cumsum(1) * 0.3], dim=-1)
    coeffs = torchcde.natural_cubic_coeffs(path)
    return coeffs, path[:, -1, 1:].sin()


def _step(model: NeuralCDE, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        loss = model.training_step(batch, 0)
    return loss.detach(), list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize(
    ("adjoint", "term"),
    [(False, lambda: AdjointMagnitude(0.5)), (True, lambda: SkewJacobianPenalty(0.5, seed=0))],
    ids=["cdeint_adjoint_magnitude", "cdeint_adjoint_skew"],
)
def test_torchcde_gets_the_terms_of_the_hand_written_cde_when_captured(adjoint, term):
    batch = _batch()
    original = (torchdiffeq.odeint, torchdiffeq.odeint_adjoint)
    captured = NeuralCDE([term()], adjoint=adjoint, capture_torchdiffeq=True)
    written = NeuralCDE([term()], written=True, adjoint=adjoint)
    l1, g1 = _step(captured, batch)
    l0, g0 = _step(written, batch)
    task = nn.functional.mse_loss(written(batch[0]), batch[1]).detach()
    assert float(l1 - task) > 1e-6  # a term was added ...
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)  # ... the hand-written CDE's
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert captured.ode_step.trajectories  # the library's solve was recorded
    assert (torchdiffeq.odeint, torchdiffeq.odeint_adjoint) == original  # and released


def test_torchcde_without_capture_is_said_and_adds_nothing():
    batch = _batch()
    model = NeuralCDE([AdjointMagnitude(0.5)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model.training_step(batch, 0)
    said = [w for w in caught if "made no ode_reg solve" in str(w.message)]
    assert len(said) == 1 and "capture_torchdiffeq" in str(said[0].message)
    task = nn.functional.mse_loss(model(batch[0]), batch[1])
    assert float(loss) == float(task)  # nothing added
