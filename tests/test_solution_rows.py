"""The recorded solve builds its solution from its rows without in-place copies (issue 21).

torchdiffeq's ``integrate`` fills a preallocated ``torch.empty(len(t), ...)`` row by row: a
chain of ``CopySlices`` autograd nodes, each cloning the whole gradient buffer on the way
back. ``ode_reg.integrate`` runs the same solver with the rows stacked once
(``ode_reg._probe.odeint_rows``). Asserted here against torchdiffeq's own call on the same
field: the solution, the gradients (first and second order) and the field evaluations are
bit-identical, and the recorded graph holds no ``CopySlices`` node.
"""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from torch import nn

from ode_reg import integrate
from ode_reg.trajectory import _last_row_edge

F64 = torch.float64


class Field(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, d)).to(dtype)
        self.calls = 0

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(z) * torch.cos(t)


def _graph_kinds(root: torch.Tensor) -> set[str]:
    """The class names of every node of ``root``'s backward graph."""
    seen, stack = {root.grad_fn}, [root.grad_fn]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return {type(n).__name__ for n in seen}


CASES = {
    # dopri5 with a loss over 100 output times (the many-outputs case of the issue table)
    "dopri5_100": (torch.linspace(0.0, 1.0, 100), {"method": "dopri5", "rtol": 1e-5}),
    # rk4, output times off the grid (linear interpolation) and on it
    "rk4": (torch.linspace(0.0, 1.0, 13), {"method": "rk4", "options": {"step_size": 1 / 16}}),
    "rk4_cubic": (
        torch.linspace(0.0, 1.0, 7),
        {"method": "rk4", "options": {"step_size": 0.1, "interp": "cubic"}},
    ),
    # a fixed-grid solver with its own step function (torchdiffeq's ``integrate`` loop)
    "implicit_adams": (
        torch.linspace(0.0, 1.0, 5),
        {"method": "implicit_adams", "options": {"step_size": 0.125}},
    ),
    # a decreasing time grid (torchdiffeq's reversed field)
    "dopri5_reversed": (torch.linspace(1.0, 0.0, 9), {"method": "dopri5", "rtol": 1e-6}),
}


def _solve(name: str, dtype: torch.dtype, recorded: bool) -> tuple:
    t, kw = CASES[name]
    t = t.to(dtype)
    f = Field(5, dtype)
    torch.manual_seed(1)
    y0 = torch.randn(4, 5, dtype=dtype, requires_grad=True)
    w = torch.randn(len(t), 4, 5, dtype=dtype)
    if recorded:
        traj = integrate(f, y0, t, **kw)
        ys, nfe = traj.ys, traj.stats.nfe
    else:
        ys = torchdiffeq.odeint(f, y0, t, **kw)
        nfe = f.calls
    loss = (w * ys).sum() + ys.pow(2).sum()
    params = [y0, *f.parameters()]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    # a second-order quantity through the solve, as the exact terms' double backward
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), params)
    return ys, grads, second, nfe


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_recorded_solution_and_gradients_equal_torchdiffeqs_bit_for_bit(name, dtype):
    ys, grads, second, nfe = _solve(name, dtype, recorded=True)
    ref_ys, ref_grads, ref_second, ref_nfe = _solve(name, dtype, recorded=False)
    assert nfe == ref_nfe
    assert ys.dtype == ref_ys.dtype and ys.shape == ref_ys.shape
    assert torch.equal(ys, ref_ys)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.equal(g, r)
    for g, r in zip(second, ref_second, strict=True):
        assert torch.equal(g, r)


def test_tuple_state_solution_and_gradients_equal_torchdiffeqs():
    """A tuple state: the stacked flat solution split back into components as torchdiffeq's."""
    t = torch.linspace(0.0, 1.0, 20, dtype=F64)

    def run(recorded: bool) -> list[torch.Tensor]:
        f = Field(5, F64)
        torch.manual_seed(2)
        z0 = torch.randn(4, 5, dtype=F64, requires_grad=True)
        a0 = torch.randn(4, 1, dtype=F64, requires_grad=True)

        def field(s, y):
            return f(s, y[0]), (y[0] ** 2).sum(1, keepdim=True) * y[1]

        solve = integrate if recorded else torchdiffeq.odeint
        out = solve(field, (z0, a0), t, method="dopri5", rtol=1e-6)
        zs, acc = out.solution if recorded else out
        loss = zs.pow(2).sum() + acc.sin().sum()
        return [zs, acc, *torch.autograd.grad(loss, [z0, a0, *f.parameters()])]

    for got, ref in zip(run(True), run(False), strict=True):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("name", ["dopri5_100", "rk4"])
def test_recorded_graph_has_no_copyslices_and_torchdiffeqs_has(name):
    t, kw = CASES[name]
    y0 = torch.randn(4, 5, dtype=F64, requires_grad=True)
    ys = integrate(Field(5, F64), y0, t.to(F64), **kw).ys
    ref = torchdiffeq.odeint(Field(5, F64), y0, t.to(F64), **kw)
    assert "CopySlices" not in _graph_kinds(ys)
    assert "CopySlices" in _graph_kinds(ref)  # what the recorded path avoids


def test_end_edge_is_the_last_rows_own_edge():
    """``Trajectory.end_edge`` (the flow-only adjoints' start) is the edge into the last row:
    a gradient seeded there equals one seeded on ``ys[-1]``."""
    t, kw = CASES["dopri5_100"]
    y0 = torch.randn(4, 5, dtype=F64, requires_grad=True)
    traj = integrate(Field(5, F64), y0, t.to(F64), **kw)
    assert traj.end_edge is not None
    seed = torch.randn(4, 5, dtype=F64)
    (via_edge,) = torch.autograd.grad(traj.end_edge, y0, seed, retain_graph=True)
    (via_row,) = torch.autograd.grad(traj.ys[-1], y0, seed, retain_graph=True)
    (via_all,) = torch.autograd.grad(traj.ys, y0, torch.zeros_like(traj.ys), retain_graph=True)
    assert torch.allclose(via_edge, via_row, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(via_edge, via_all)  # the seed matters: not a trivial zero
    assert _last_row_edge(torch.zeros(3, 2)) is None


def test_another_torchdiffeq_version_runs_its_own_loop_and_says_so_once(monkeypatch):
    """The mirrored loops are torchdiffeq 0.2.5's: with any other version the recorded solve is
    torchdiffeq's own call (CopySlices back, same values), said once with the fix."""
    import ode_reg._once

    monkeypatch.setattr(torchdiffeq, "__version__", "9.9.9")
    monkeypatch.setattr(ode_reg._once, "SAID", ode_reg._once.SayOnce())
    t, kw = CASES["dopri5_100"]
    y0 = torch.randn(4, 5, dtype=F64, requires_grad=True)
    with pytest.warns(UserWarning, match="torchdiffeq 9.9.9 is not a version") as caught:
        ys = integrate(Field(5, F64), y0, t.to(F64), **kw).ys
        integrate(Field(5, F64), y0, t.to(F64), **kw)
    assert sum("is not a version" in str(w.message) for w in caught) == 1
    assert "CopySlices" in _graph_kinds(ys)
    assert torch.equal(ys, torchdiffeq.odeint(Field(5, F64), y0, t.to(F64), **kw))
