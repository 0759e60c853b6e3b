"""Issue 23 (structure of the solve path): the declared protocol of a field that integrates
itself, the drop-in contract on such fields, and the declared ``Trajectory.owners``.

Each test here fails on the code before the change: ``SkewLinearODEFunc`` (with ``g``) ignored
``rtol``, returned a tensor for a call with ``event_fn`` and made one solve per checkpoint
interval outside training; ``odeint_adjoint`` on an ``OrthogonalFlow`` ran torchdiffeq's
solver on ``forward`` (``W_t`` integrated again at every evaluation) in evaluation but the
flow's own Lie steps in training; ``owners`` was an undeclared attribute.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import ode_reg
import ode_reg._once
from ode_reg import OrthogonalFlow, SkewLinearODEFunc, Trajectory, chain, integrate
from ode_reg.protocol import SelfIntegratingField
from ode_reg.recording import StepRecorder
from ode_reg.trajectory import median_value

F64 = torch.float64


class _Counted(SkewLinearODEFunc):
    """A skew-linear field that counts its evaluations."""

    calls = 0

    def forward(self, t, z):
        type(self).calls += 1
        return super().forward(t, z)


def _skew(seed: int = 0) -> SkewLinearODEFunc:
    torch.manual_seed(seed)
    lin = nn.Linear(4, 4).double()
    f = _Counted(4, g=lambda a: torch.tanh(lin(a))).double()
    f.lin = lin
    return f


def test_skew_linear_honours_rtol_as_torchdiffeq_does():
    f = _skew()
    z0 = torch.randn(3, 4, dtype=F64)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    with torch.no_grad():
        outs = {}
        for tol in (1e-7, 1e-1):
            ours = ode_reg.odeint(f, z0, t, rtol=tol, atol=tol)
            ref = torchdiffeq.odeint(f, (z0, f.A), t, rtol=tol, atol=tol)[0]
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
            outs[tol] = ours[-1]
    # The tolerance matters here (the old code returned the same result for both).
    assert float((outs[1e-7] - outs[1e-1]).abs().max()) > 1e-2


def test_skew_linear_unrecorded_call_is_one_solve():
    f = _skew(1)
    z0 = torch.randn(3, 4, dtype=F64)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    with torch.no_grad():
        _Counted.calls = 0
        ode_reg.odeint(f, z0, t)
        ours = _Counted.calls
        _Counted.calls = 0
        torchdiffeq.odeint(f, (z0, f.A), t)
        ref = _Counted.calls
    assert ours == ref  # one solve (the old code: one per checkpoint interval, 568 vs 494)


def test_skew_linear_refuses_event_fn_by_name():
    f = _skew(2)
    z0 = torch.randn(3, 4, dtype=F64)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    with pytest.raises(ValueError, match="`event_fn`"):
        ode_reg.odeint(f, z0, t, event_fn=lambda s, z: z[0, 0] - 10.0)
    with pytest.raises(ValueError, match="`event_fn`"):
        integrate(f, z0, t, event_fn=lambda s, z: z[0, 0] - 10.0)


def test_skew_linear_adjoint_call_is_the_same_solver_as_odeint():
    """odeint_adjoint on a field that integrates itself runs that integrator (the old code ran
    torchdiffeq's adjoint on ``forward``, which integrates A again at every evaluation)."""
    f = _skew(4)
    z0 = torch.randn(3, 4, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    with torch.no_grad():
        plain = ode_reg.odeint(f, z0, t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adjoint = ode_reg.odeint_adjoint(f, z0, t)
    torch.testing.assert_close(adjoint, plain, rtol=0, atol=1e-14)


def test_skew_linear_recorded_solve_is_the_same_solver():
    """In a recorded step the solve restarts at each checkpoint (so each z_k is on the
    autograd path): the same method and tolerances, so the same result to the tolerance."""
    f = _skew(3)
    z0 = torch.randn(3, 4, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    kw = {"rtol": 1e-10, "atol": 1e-12}
    with torch.no_grad():
        plain = ode_reg.odeint(f, z0, t, **kw)
    rec = StepRecorder(adjoint_inputs=True)
    with rec.active():
        recorded = ode_reg.odeint(f, z0, t, **kw)
    assert len(rec.records) == 1 and rec.records[0].traj.num_checkpoints == 9
    torch.testing.assert_close(recorded.detach(), plain, rtol=0, atol=1e-8)


def _flow() -> tuple[OrthogonalFlow, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return (
        OrthogonalFlow(4, step_size=0.1).double(),
        torch.randn(3, 4, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
    )


def test_orthogonal_flow_adjoint_is_the_same_solver_in_training_and_evaluation():
    flow, z0, t = _flow()
    calls = []
    flow.register_forward_pre_hook(lambda *a: calls.append(1))
    ode_reg._once.SAID.discard("self-integrating adjoint:OrthogonalFlow")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        evaluated = ode_reg.odeint_adjoint(flow, z0, t)
        rec = StepRecorder()
        with rec.active():
            trained = ode_reg.odeint_adjoint(flow, z0, t)
    plain = ode_reg.odeint(flow, z0, t)
    # One integrator (the Lie steps), never torchdiffeq's solver on forward (the old eval path,
    # 6e-4 away and 44x slower).
    assert calls == []
    torch.testing.assert_close(evaluated, trained, rtol=0, atol=1e-13)
    torch.testing.assert_close(evaluated, plain, rtol=0, atol=1e-13)
    # Said once: the backward is through the steps, not an adjoint solve.
    mine = [w for w in said if "odeint_adjoint on OrthogonalFlow runs its own" in str(w.message)]
    assert len(mine) == 1
    # Its gradient is that of the same steps.
    g1 = torch.autograd.grad(evaluated.pow(2).sum(), flow.b0)[0]
    g2 = torch.autograd.grad(plain.pow(2).sum(), flow.b0)[0]
    torch.testing.assert_close(g1, g2)
    # W_t stays orthogonal on the way (MATH.md): |z| is not kept (sigma), but W_K is.
    w = integrate(flow, z0, t).weight_matrices
    eye = torch.eye(4, dtype=F64)
    assert float((w.mT @ w - eye).abs().max().detach()) < 1e-12


def test_orthogonal_flow_refuses_what_it_cannot_honour_by_name():
    flow, z0, t = _flow()
    for kw, name in (
        ({"rtol": 1e-3}, "`rtol`"),
        ({"atol": 1e-3}, "`atol`"),
        ({"event_fn": lambda s, z: z[0, 0]}, "`event_fn`"),
        ({"method": "dopri5"}, "`method`"),
    ):
        with pytest.raises(ValueError, match=name):
            ode_reg.odeint(flow, z0, t, **kw)
    with pytest.raises(ValueError, match="adjoint_rtol"):
        ode_reg.odeint_adjoint(flow, z0, t, adjoint_rtol=1e-3)


class _Decay(SelfIntegratingField, nn.Module):
    """dz/dt = -rate z, integrated exactly (a third-party field on the declared protocol)."""

    def __init__(self) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(0.5, dtype=F64))

    def forward(self, t, z):
        return -self.rate * z

    def ode_reg_integrate(self, y0, grid, call):
        return [y0 * torch.exp(-self.rate * (s - grid[0])) for s in grid], None

    def ode_reg_field_at(self, t, z, weight):
        return -self.rate * z


def test_declared_protocol_serves_a_third_party_field_on_every_call():
    f = _Decay()
    z0 = torch.ones(2, 1, dtype=F64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    exact = torch.exp(-0.5 * t).reshape(3, 1, 1) * z0
    torch.testing.assert_close(ode_reg.odeint(f, z0, t), exact, rtol=0, atol=1e-15)
    with pytest.warns(UserWarning):
        out = ode_reg.odeint_adjoint(f, z0, t)
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-15)
    traj = integrate(f, z0, t, checkpoints=4)
    assert traj.times.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    # The field at a checkpoint is the protocol's ode_reg_field_at.
    torch.testing.assert_close(traj.field_at(1, z0), -0.5 * z0)


def test_trajectory_owners_is_a_declared_field():
    names = {f.name for f in dataclasses.fields(Trajectory)}
    assert "owners" in names
    t = torch.tensor([0.0, 1.0])
    a = integrate(lambda s, z: -z, torch.ones(2, 3), t, method="euler")
    b = integrate(lambda s, z: -z, a.ys[-1], t, method="euler")
    joined = chain([a, b])
    # a's end is b's start: one checkpoint, owned by a (its solution row).
    assert [(id(tr), k) for tr, k in joined.owners] == [(id(a), 0), (id(a), 1), (id(b), 1)]
    assert list(joined.checkpoint_owners()) == list(joined.owners)
    assert a.owners == () and list(a.checkpoint_owners()) == [(a, 0), (a, 1)]


@pytest.mark.parametrize("values", [[3.0], [3.0, 1.0], [0.5, 4.0, 1.0, 2.0], [2, 9, 4]])
def test_median_value_is_statistics_median(values):
    s = sorted(values)
    n = len(s)
    by_hand = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    assert median_value(values) == by_hand == statistics.median(values)
    assert isinstance(median_value(values), float)
    with pytest.raises(ValueError):
        median_value([])
    assert not math.isnan(median_value(values))
