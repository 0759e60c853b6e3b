"""Tests of the core: integrate / Trajectory / checkpoint_grid, adjoints and sensitivities.

The references are MATH.md's definitions: closed forms for linear fields, finite differences,
``torchdiffeq.odeint`` and autograd of the loss in the field's parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ode_reg import (
    DEFAULT_CHECKPOINTS,
    IntegrationError,
    Trajectory,
    adjoints,
    integrate,
    sensitivities,
)
from ode_reg.functional import (
    adjoint_magnitude_penalty,
    directional_penalty,
    sensitivity_magnitude_penalty,
    skew_jacobian_penalty,
    spectral_penalty,
)
from ode_reg.trajectory import checkpoint_grid

F64 = torch.float64


# --------------------------------------------------------------------------- fields and helpers


class LinearField(nn.Module):
    """``f(t, z) = z @ M.T`` (row-vector form of ``dz/dt = M z``)."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.m = nn.Parameter(m.clone())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.m.T


class MLPField(nn.Module):
    """A small non-autonomous tanh MLP field ``W2 tanh(W1 z + b1 + t u) + b2``."""

    def __init__(self, d: int, hidden: int, dtype: torch.dtype = F64, scale: float = 1.0) -> None:
        super().__init__()
        self.l1 = nn.Linear(d, hidden).to(dtype)
        self.l2 = nn.Linear(hidden, d).to(dtype)
        self.u = nn.Parameter(0.5 * torch.randn(hidden, dtype=dtype))
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(scale)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(z) + t * self.u))


def general_matrix(d: int, seed: int) -> torch.Tensor:
    """A general (non-skew, non-normal) matrix with eigenvalues of both signs of real part."""
    g = torch.Generator().manual_seed(seed)
    m = 0.6 * torch.randn(d, d, generator=g, dtype=F64)
    m[0, 0] += 0.5
    m[-1, -1] -= 0.5
    assert (m + m.T).abs().max() > 0.3  # really not skew
    return m


def rk4(step: float) -> dict:
    return {"method": "rk4", "options": {"step_size": step}}


def leaf(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random initial state that requires grad, so that ``a_0 = dL/dz_0`` exists whether or
    not ``integrate`` makes a ``y0`` that does not require grad such a leaf itself."""
    return torch.randn(*shape, generator=generator, dtype=F64).requires_grad_(True)


def counting(func):
    """``func`` and a list whose one entry counts its calls (torchdiffeq's NFE)."""
    calls = [0]

    def counted(t, z):
        calls[0] += 1
        return func(t, z)

    return counted, calls


def quad_loss(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A nonlinear loss (cubic in z) so that a_K depends on the state."""
    return (w * z.pow(2)).sum() + 0.1 * z.pow(3).sum()


def trapezoid(y: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    dt = (times[1:] - times[:-1]).unsqueeze(-1)
    return (0.5 * (y[1:] + y[:-1]) * dt).sum(0)


# --------------------------------------------------------------------------- checkpoint grid


def test_default_checkpoints_are_the_solvers_step_states():
    """MATH.md (Notation, revised): by default the checkpoints are the states at which the
    solver's steps start (at most DEFAULT_CHECKPOINTS + 1, spread evenly), plus the result at
    t[-1]; the solve itself is torchdiffeq's (same result, same field evaluations)."""
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.ones(2, 3, dtype=F64)
    assert DEFAULT_CHECKPOINTS == 8
    # A fixed grid of 8 rk4 steps: its 8 step starts and the end, 9 checkpoints on the grid.
    traj = integrate(lambda t, z: -z, y0, t, **rk4(1 / 8))
    assert traj.num_checkpoints == 9
    torch.testing.assert_close(traj.times, torch.linspace(0, 1, 9, dtype=F64), rtol=0, atol=1e-15)
    assert traj.stats.accepted == 8 and traj.stats.rejected == 0
    assert traj.stats.nfe == 4 * 8  # rk4: 4 evaluations per step
    assert traj.ys.shape == (2, 2, 3)
    assert traj.checkpoint_states.shape == (9, 2, 3)
    assert torch.equal(traj.ys, torchdiffeq.odeint(lambda t, z: -z, y0, t, **rk4(1 / 8)))
    assert torch.equal(traj.states[-1], traj.ys[-1])  # z_K is the last row of the solution
    # 32 steps: 9 step starts spread evenly (the first and the last among them), plus the end.
    traj = integrate(lambda t, z: -z, y0, t, **rk4(1 / 32))
    assert traj.num_checkpoints == DEFAULT_CHECKPOINTS + 2
    steps = (traj.times * 32).tolist()
    assert steps == [0, 4, 8, 12, 16, 19, 23, 27, 31, 32]
    # Adaptive: the recorded step count is torchdiffeq's own, derived from its NFE
    # (dopri5: 2 evaluations to choose the first step, then 6 per attempted step, FSAL).
    counted, calls = counting(lambda t, z: -z)
    ref = torchdiffeq.odeint(counted, y0, t)
    traj = integrate(lambda t, z: -z, y0, t)
    st = traj.stats
    assert st.nfe == calls[0] == 2 + 6 * (st.accepted + st.rejected)
    assert len(st.step_sizes) == st.accepted
    # The last accepted step reaches (or passes) t[-1]; torchdiffeq interpolates the result.
    assert sum(st.step_sizes[:-1]) < 1.0 <= sum(st.step_sizes) + 1e-12
    assert traj.num_checkpoints == min(st.accepted, DEFAULT_CHECKPOINTS + 1) + 1
    assert torch.equal(traj.ys, ref)
    # The checkpoint times are step starts: cumulative sums of the accepted step sizes.
    starts = torch.tensor([0.0, *st.step_sizes], dtype=F64).cumsum(0)[:-1]
    torch.testing.assert_close(traj.times[:-1], starts, rtol=0, atol=1e-12)
    assert traj.times[-1] == 1.0


def test_requested_times_are_not_forced_step_ends():
    """Requested output times are interpolated as torchdiffeq does: the steps (and so the
    default checkpoints) do not depend on them; explicit checkpoint times are hit exactly."""
    torch.manual_seed(0)
    f = MLPField(3, 8, scale=2.0)
    y0 = torch.randn(5, 3, dtype=F64)
    tol = {"rtol": 1e-9, "atol": 1e-9}
    t2 = torch.tensor([0.0, 1.0], dtype=F64)
    t3 = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    a = integrate(f, y0, t2, **tol)
    b = integrate(f, y0, t3, **tol)
    assert a.stats.nfe == b.stats.nfe and a.stats.step_sizes == b.stats.step_sizes
    torch.testing.assert_close(b.times, a.times, rtol=0, atol=0)
    assert not bool(((b.times - 0.3).abs() < 1e-9).any())  # 0.3 is not a step end
    counted, calls = counting(f)
    ref = torchdiffeq.odeint(counted, y0, t3, **tol)
    assert torch.equal(b.ys, ref) and b.stats.nfe == calls[0]
    # Explicit checkpoint times become step ends (torchdiffeq's step_t): hit exactly.
    c = integrate(f, y0, t3, checkpoints=torch.tensor([0.3, 0.55], dtype=F64), **tol)
    assert c.times.tolist() == [0.0, 0.3, 0.55, 1.0]
    torch.testing.assert_close(c.ys, ref, rtol=0, atol=1e-7)


def test_requested_times_are_merged_into_the_grid():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    grid = checkpoint_grid(t, None)
    # 9 equal checkpoints plus 0.3, which is not one of them.
    assert grid.numel() == 10
    assert bool((grid[1:] > grid[:-1]).all())
    for v in t:
        assert (grid == v).any()
    # Checkpoint tensors are merged with t; a duplicate of a requested time appears once.
    grid = checkpoint_grid(t, torch.tensor([0.1, 0.3, 0.65], dtype=F64))
    torch.testing.assert_close(grid, torch.tensor([0.0, 0.1, 0.3, 0.65, 1.0], dtype=F64))
    # An int gives equal intervals, union with t.
    grid = checkpoint_grid(torch.tensor([0.0, 2.0], dtype=F64), 4)
    torch.testing.assert_close(grid, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=F64))
    # An empty tensor of checkpoints: the grid is t itself.
    assert torch.equal(checkpoint_grid(t, torch.tensor([], dtype=F64)), t)


def test_near_duplicate_checkpoints_merge_and_requested_time_wins():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    for near in (0.5 - 1e-14, 0.5 + 1e-14):
        grid = checkpoint_grid(t, torch.tensor([0.25, near], dtype=F64))
        assert grid.tolist() == [0.0, 0.25, 0.5, 1.0]
    grid = checkpoint_grid(t, torch.tensor([1e-15, 1.0 - 1e-15], dtype=F64))
    assert grid.tolist() == [0.0, 0.5, 1.0]
    y0 = torch.randn(3, 2, dtype=F64)
    # integrate: a requested time is not a step end, so nothing merges with it; an explicit
    # checkpoint time is hit exactly (adaptive: torchdiffeq's step_t) ...
    near = torch.tensor([0.25, 0.5 + 1e-14], dtype=F64)
    traj = integrate(lambda t, z: -z, y0, t, checkpoints=near)
    assert traj.times.tolist() == [0.0, 0.25, 0.5 + 1e-14, 1.0]
    # ... checkpoint times within rounding of t[0] or t[-1] are those ends ...
    ends = torch.tensor([1e-15, 1.0 - 1e-15], dtype=F64)
    assert integrate(lambda t, z: -z, y0, t, checkpoints=ends).times.tolist() == [0.0, 1.0]
    # ... and on a fixed grid a time within rounding of a grid time is that grid time, an int
    # is snapped to the nearest grid times, and a time off the grid is an error.
    traj = integrate(lambda t, z: -z, y0, t, checkpoints=torch.tensor([0.5 + 1e-14]), **rk4(1 / 8))
    assert traj.times.tolist() == [0.0, 0.5, 1.0]
    traj = integrate(lambda t, z: -z, y0, t, checkpoints=3, **rk4(1 / 8))
    assert traj.times.tolist() == [0.0, 0.375, 0.625, 1.0]
    with pytest.raises(ValueError, match=r"`checkpoints` time 0\.3 is not on the 'rk4' grid"):
        integrate(lambda t, z: -z, y0, t, checkpoints=torch.tensor([0.3]), **rk4(1 / 8))


# --------------------------------------------------------------------------- integrate


def test_integrate_matches_odeint_dopri5():
    torch.manual_seed(0)
    f = MLPField(3, 8)
    y0 = torch.randn(5, 3, dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.7, 1.5], dtype=F64)
    tol = {"rtol": 1e-9, "atol": 1e-9}
    traj = integrate(f, y0, t, method="dopri5", **tol)
    ref = torchdiffeq.odeint(f, y0, t, method="dopri5", **tol)
    assert traj.ys.shape == ref.shape
    torch.testing.assert_close(traj.ys, ref, rtol=0, atol=1e-7)
    # And against the exact solution of a linear field.
    m = general_matrix(3, 1)
    traj = integrate(LinearField(m), y0, t, method="dopri5", **tol)
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(m * s).T for s in t])
    torch.testing.assert_close(traj.ys, exact, rtol=0, atol=1e-7)


def test_integrate_matches_odeint_rk4_on_aligned_grid():
    torch.manual_seed(1)
    f = MLPField(3, 8)
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    # Step 1/32 divides every checkpoint interval (1/4): the checkpoints are grid times, and
    # the solve is torchdiffeq's (one call on its own grid).
    traj = integrate(f, y0, t, checkpoints=4, **rk4(1 / 32))
    ref = torchdiffeq.odeint(f, y0, t, **rk4(1 / 32))
    torch.testing.assert_close(traj.ys, ref, rtol=0, atol=1e-12)
    assert traj.times.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert traj.stats.accepted == 32 and traj.stats.nfe == 4 * 32
    # Without a step size torchdiffeq's fixed-grid solver steps on t itself (3 steps): the
    # default checkpoints are t's first three times (the step starts) and the end.
    traj = integrate(f, y0, t, method="rk4")
    ref = torchdiffeq.odeint(f, y0, t, method="rk4")
    assert traj.num_checkpoints == 4
    assert traj.times.tolist() == t.tolist()
    assert traj.stats.accepted == 3 and traj.stats.nfe == 4 * 3
    torch.testing.assert_close(traj.ys, ref, rtol=0, atol=1e-12)
    # No interior checkpoint asked for: the start and the end only, the same solve.
    traj = integrate(f, y0, t, checkpoints=[], method="rk4")
    assert traj.times.tolist() == [0.0, 1.0]
    assert traj.stats.nfe == 4 * 3
    torch.testing.assert_close(traj.ys, ref, rtol=0, atol=1e-12)
    # A checkpoint off the grid (t itself here) is an error, not a changed grid.
    with pytest.raises(ValueError, match="not on the 'rk4' grid"):
        integrate(f, y0, t, checkpoints=torch.tensor([0.3], dtype=F64), method="rk4")


def test_decreasing_t_solves_backwards_like_odeint():
    torch.manual_seed(13)
    f = MLPField(3, 8)
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    traj = integrate(f, y0, t, rtol=1e-9, atol=1e-9)
    ref = torchdiffeq.odeint(f, y0, t, rtol=1e-9, atol=1e-9)
    assert torch.equal(traj.ys, ref)
    assert traj.times[0] == 1.0 and traj.times[-1] == 0.0
    assert bool((traj.times[1:] < traj.times[:-1]).all())  # the caller's (decreasing) time
    # Fixed grid backwards, with explicit grid checkpoints.
    traj = integrate(f, y0, t, checkpoints=4, **rk4(1 / 16))
    assert traj.times.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    ref = torchdiffeq.odeint(f, y0, t, **rk4(1 / 16))
    torch.testing.assert_close(traj.ys, ref, rtol=0, atol=1e-12)


def test_every_state_is_on_the_autograd_path():
    torch.manual_seed(2)
    f = MLPField(3, 8)
    y0 = leaf(4, 3)
    traj = integrate(f, y0, torch.tensor([0.0, 1.0], dtype=F64), **rk4(1 / 32))
    # the solve starts from an alias of the caller's y0 (its adjoint is this solve's alone)
    assert traj.states[0].requires_grad and traj.states[0]._base is y0
    assert torch.equal(traj.states[0], y0)
    loss = traj.ys[-1].pow(2).sum()
    # 32 steps: 9 step states spread evenly plus the end (MATH.md, Notation, revised).
    assert traj.num_checkpoints == DEFAULT_CHECKPOINTS + 2
    # z_K is the last row of the solution torchdiffeq returned: a_K is the gradient there.
    inputs = traj.autograd_inputs()
    assert len(inputs) == traj.num_checkpoints and inputs[-1] is traj.ys
    assert torch.equal(traj.states[-1], traj.ys[-1])
    grads = list(torch.autograd.grad(loss, inputs, allow_unused=True))
    grads[-1] = grads[-1][-1]
    for g in grads:
        assert g is not None
        assert g.abs().sum() > 1e-3
    # The states chain: restarting from z_k reproduces z_K.
    k = 3
    rest = integrate(f, traj.states[k].detach(), traj.times[k:], **rk4(1 / 32))
    torch.testing.assert_close(rest.ys[-1], traj.states[-1].detach(), rtol=0, atol=1e-12)


def test_trajectory_accessors():
    lin = nn.Linear(2, 2).double()
    traj = integrate(
        lambda t, z: lin(z), torch.randn(3, 2, dtype=F64), torch.tensor([0.0, 1.0]), checkpoints=2
    )
    assert isinstance(traj, Trajectory)
    assert traj.parameters() == []  # a lambda exposes no parameters
    assert traj.weights is None and traj.weight_matrices is None
    torch.testing.assert_close(traj.field_at(1, traj.states[1]), lin(traj.states[1]))
    traj = integrate(MLPField(2, 4), traj.states[0].detach(), [0.0, 1.0])
    assert len(traj.parameters()) == 5


def test_integration_error_is_raised_and_explained():
    torch.manual_seed(12)
    f = MLPField(2, 4, scale=3.0)
    with pytest.raises(IntegrationError, match="dopri5"):
        integrate(
            f,
            torch.randn(2, 2, dtype=F64),
            torch.tensor([0.0, 5.0], dtype=F64),
            method="dopri5",
            options={"max_num_steps": 2},
            rtol=1e-12,
            atol=1e-12,
        )


def test_adjoint_true_same_values_and_no_create_graph():
    torch.manual_seed(3)
    f = MLPField(3, 6)
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    a = integrate(f, y0, t, checkpoints=4, **rk4(1 / 16))
    b = integrate(f, y0, t, checkpoints=4, adjoint=True, **rk4(1 / 16))
    assert b.adjoint_method and not a.adjoint_method
    torch.testing.assert_close(b.ys, a.ys, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.times, a.times, rtol=0, atol=0)
    la, lb = a.ys[-1].pow(2).sum(), b.ys[-1].pow(2).sum()
    # odeint_adjoint's forward runs under no-grad (MATH.md): its step states are not on the
    # autograd path, and only a_K (the gradient at the solution's last row) is an adjoint.
    assert not any(s.requires_grad for s in b.states[1:-1])
    assert all(s.requires_grad for s in a.states[1:])
    a_adj, b_adj = adjoints(la, a), adjoints(lb, b)
    torch.testing.assert_close(b_adj[-1], a_adj[-1], rtol=1e-12, atol=0)
    assert (b_adj[1:-1] == 0).all() and (a_adj[1:-1] != 0).any(-1).all()
    # The parameter gradient of its backward (the adjoint ODE) agrees to solver accuracy.
    params = list(f.parameters())
    ga = torch.autograd.grad(la, params, retain_graph=True)
    gb = torch.autograd.grad(lb, params, retain_graph=True)
    for u, v in zip(gb, ga):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="create_graph.*odeint_adjoint"):
        adjoints(lb, b, create_graph=True)


# --------------------------------------------------------------------------- adjoints


def test_adjoints_linear_closed_form():
    """a_k = a_K @ expm(M (t_K - t_k)) for dz/dt = M z with general (non-skew) M."""
    m = general_matrix(3, 0)
    f = LinearField(m)
    g = torch.Generator().manual_seed(4)
    y0 = leaf(4, 3, generator=g)
    w = torch.rand(4, 3, generator=g, dtype=F64) + 0.5
    t = torch.tensor([0.0, 1.5], dtype=F64)
    traj = integrate(f, y0, t, checkpoints=12, **rk4(1 / 64))
    zK = traj.ys[-1]
    loss = quad_loss(zK, w)
    a = adjoints(loss, traj)
    assert a.shape == (13, 4, 3)
    (aK,) = torch.autograd.grad(loss, zK, retain_graph=True)
    torch.testing.assert_close(a[-1], aK)
    expected = torch.stack([aK @ torch.linalg.matrix_exp(m * (t[-1] - tk)) for tk in traj.times])
    rel = ((a - expected).norm(dim=-1) / expected.norm(dim=-1)).max()
    assert rel < 1e-4, rel
    # Not skew: the adjoint norms really change along the trajectory.
    norms = a.norm(dim=-1)
    assert (norms.max(0).values / norms.min(0).values).min() > 1.2


def test_adjoints_jump_at_an_intermediate_requested_time():
    """With L = L1(z(s)) + L2(z(t_K)), a_k is the total derivative: it jumps at s."""
    m = general_matrix(3, 5)
    f = LinearField(m)
    g = torch.Generator().manual_seed(6)
    y0 = leaf(3, 3, generator=g)
    w1 = torch.rand(3, 3, generator=g, dtype=F64) + 0.5
    w2 = torch.rand(3, 3, generator=g, dtype=F64) + 0.5
    # A requested time is not a step end (torchdiffeq interpolates there): s is a time of the
    # fixed grid (40 / 128) and one of the 16 explicit checkpoints, so z(s) is the step state.
    s = 0.3125
    t = torch.tensor([0.0, s, 1.0], dtype=F64)
    traj = integrate(f, y0, t, checkpoints=16, **rk4(1 / 128))
    assert traj.num_checkpoints == 17
    assert (traj.times == s).sum() == 1
    zs, zK = traj.ys[1], traj.ys[2]
    l1, l2 = quad_loss(zs, w1), quad_loss(zK, w2)
    a = adjoints(l1 + l2, traj)
    (g1,) = torch.autograd.grad(l1, zs, retain_graph=True)
    (g2,) = torch.autograd.grad(l2, zK, retain_graph=True)
    expm = torch.linalg.matrix_exp
    expected = []
    for tk in traj.times.tolist():
        ak = g2 @ expm(m * (1.0 - tk))
        if tk <= s:
            ak = ak + g1 @ expm(m * (s - tk))
        expected.append(ak)
    expected = torch.stack(expected)
    rel = ((a - expected).norm(dim=-1) / expected.norm(dim=-1)).max()
    assert rel < 1e-4, rel
    # The jump at s is the direct contribution g1.
    ks = int(torch.nonzero(traj.times == s))
    torch.testing.assert_close(a[ks] - g2 @ expm(m * (1.0 - s)), g1, rtol=1e-4, atol=1e-8)
    # A loss that reads only z(s): states after s get zero adjoints, earlier ones do not.
    a1 = adjoints(l1, traj)
    assert (a1[ks + 1 :] == 0).all()
    assert (a1[: ks + 1].norm(dim=-1) > 1e-3).all()


def test_adjoints_match_finite_differences_of_restarted_flow():
    """a_k vs central differences of the loss of the flow restarted from z_k + delta at t_k."""
    torch.manual_seed(7)
    f = MLPField(3, 6)
    y0 = leaf(2, 3)
    w = torch.rand(2, 3, dtype=F64) + 0.5
    K, step = 4, 1 / 32
    t = torch.tensor([0.0, 1.0], dtype=F64)
    traj = integrate(f, y0, t, checkpoints=K, **rk4(step))
    a = adjoints(quad_loss(traj.ys[-1], w), traj)

    def loss_from(k: int, z: torch.Tensor) -> float:
        with torch.no_grad():
            if k == K:
                return quad_loss(z, w).item()
            rest = integrate(f, z, traj.times[k:], **rk4(step))
            return quad_loss(rest.ys[-1], w).item()

    eps = 1e-6
    for k in (0, 1, 3, K):
        zk = traj.states[k].detach()
        fd = torch.zeros_like(zk)
        for idx in range(zk.numel()):
            e = torch.zeros_like(zk).view(-1)
            e[idx] = eps
            e = e.view_as(zk)
            fd.view(-1)[idx] = (loss_from(k, zk + e) - loss_from(k, zk - e)) / (2 * eps)
        torch.testing.assert_close(a[k], fd, rtol=1e-6, atol=1e-8)


def test_adjoints_bad_inputs():
    f = MLPField(2, 4)
    traj = integrate(f, torch.randn(3, 2, dtype=F64), torch.tensor([0.0, 1.0]), checkpoints=2)
    with pytest.raises(ValueError, match="`loss` must be a scalar"):
        adjoints(traj.ys[-1].pow(2).sum(-1), traj)
    with pytest.raises(ValueError, match="`loss` must be a scalar"):
        adjoints(1.0, traj)
    # Depends on the parameters but not on the trajectory.
    with pytest.raises(ValueError, match="does not depend on the trajectory"):
        adjoints(sum(p.sum() for p in f.parameters()), traj)
    with pytest.raises(ValueError, match="does not depend on the trajectory"):
        adjoints(torch.tensor(1.0, dtype=F64), traj)
    with torch.no_grad():
        traj_ng = integrate(f, torch.randn(3, 2, dtype=F64), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="does not depend on the trajectory"):
        adjoints(traj_ng.ys[-1].sum(), traj_ng)


# --------------------------------------------------------------------------- sensitivities


def _mlp_problem(K: int, seed: int = 8, step: float = 1 / 256):
    torch.manual_seed(seed)
    f = MLPField(3, 8)
    y0 = leaf(5, 3)
    target = torch.randn(5, 3, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    traj = integrate(f, y0, t, checkpoints=K, **rk4(step))
    loss = (traj.ys[-1] - target).pow(2).sum(-1).mean()
    return f, traj, loss


def test_sensitivity_quadrature_reproduces_parameter_gradient():
    errs = []
    for K in (32, 64, 128):
        f, traj, loss = _mlp_problem(K)
        params = list(f.parameters())
        grad = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]
        )
        a = adjoints(loss, traj)
        y = sensitivities(traj, a)
        assert y.shape == (K + 1, sum(p.numel() for p in params))
        quad = trapezoid(y, traj.times)
        if K == 32:
            # The differentiable version has the same values (the partial df/dtheta at fixed
            # z_k, not the total derivative through the trajectory).
            y_graph = sensitivities(
                traj, adjoints(loss, traj, create_graph=True), create_graph=True
            )
            assert y_graph.requires_grad
            torch.testing.assert_close(y_graph, y, rtol=1e-12, atol=1e-14)
        errs.append((quad - grad).norm() / grad.norm())
        if K == 128:
            # Eq. 30: |dL/dtheta| <= (t_K - t_0) max_k |y_k|, not tight for varying y.
            bound = (traj.times[-1] - traj.times[0]) * y.norm(dim=1).max()
            assert grad.norm() <= bound
            assert grad.norm() < 0.99 * bound
    assert errs[-1] < 1e-4, errs
    # Trapezoid is O(h^2): halving h divides the error by ~4.
    for coarse, fine in zip(errs[:-1], errs[1:]):
        assert 3.5 < coarse / fine < 4.5, errs


def test_sensitivity_bound_is_tight_for_constant_density():
    """f = b (no z dependence), L linear in z_K: y_k constant, dL/db = (t_K - t_0) y."""
    b = nn.Parameter(torch.randn(3, dtype=F64))

    class Drift(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = b

        def forward(self, t, z):
            return self.b.expand_as(z) + 0 * z

    f = Drift()
    c = torch.randn(4, 3, dtype=F64)
    traj = integrate(f, leaf(4, 3), torch.tensor([0.5, 2.0]), checkpoints=5)
    loss = (c * traj.ys[-1]).sum()
    (grad,) = torch.autograd.grad(loss, b, retain_graph=True)
    y = sensitivities(traj, adjoints(loss, traj))
    torch.testing.assert_close(y, c.sum(0).expand(6, 3))
    bound = 1.5 * y.norm(dim=1).max()
    torch.testing.assert_close(grad.norm(), bound)


def test_detach_states_same_values_different_gradient():
    f, traj, loss = _mlp_problem(8, seed=9, step=1 / 32)
    params = list(f.parameters())
    a = adjoints(loss, traj, create_graph=True)
    y_full = sensitivities(traj, a, create_graph=True)
    y_det = sensitivities(traj, a, create_graph=True, detach_states=True)
    torch.testing.assert_close(y_det, y_full, rtol=1e-14, atol=0)
    g_full = torch.autograd.grad(sensitivity_magnitude_penalty(y_full), params, retain_graph=True)
    g_det = torch.autograd.grad(sensitivity_magnitude_penalty(y_det), params)
    g_full = torch.cat([g.reshape(-1) for g in g_full])
    g_det = torch.cat([g.reshape(-1) for g in g_det])
    assert torch.isfinite(g_full).all() and torch.isfinite(g_det).all()
    assert (g_full - g_det).norm() > 1e-3 * g_full.norm()


def test_full_sensitivities_match_an_aliased_parameter_reference():
    """Independent reference: evaluate f with fresh aliases of the parameters (so that the
    derivative is the partial at fixed z_k) while z_k keeps its graph; values and the gradient
    of a penalty of y must agree with ``sensitivities(create_graph=True)``."""
    f, traj, loss = _mlp_problem(6, seed=10, step=1 / 32)
    names, params = zip(*f.named_parameters())
    a = adjoints(loss, traj, create_graph=True)
    rows = []
    for k, z in enumerate(traj.states):
        alias = [p.view_as(p) for p in params]
        fk = torch.func.functional_call(f, dict(zip(names, alias)), (traj.times[k], z))
        grads = torch.autograd.grad(fk, alias, a[k], create_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    y_ref = torch.stack(rows)
    y = sensitivities(traj, a, create_graph=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-14)
    g = torch.autograd.grad(sensitivity_magnitude_penalty(y), params, retain_graph=True)
    g_ref = torch.autograd.grad(sensitivity_magnitude_penalty(y_ref), params)
    for u, v in zip(g, g_ref):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)


def test_sensitivities_keep_the_callers_graph():
    f, traj, loss = _mlp_problem(4, seed=11, step=1 / 16)
    sensitivities(traj, adjoints(loss, traj))
    loss.backward()  # the trajectory's graph was not freed
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())


def test_sensitivities_explicit_params_and_bad_inputs():
    lin = nn.Linear(2, 2).double()
    traj = integrate(lambda t, z: lin(z), leaf(3, 2), torch.tensor([0.0, 1.0]))
    n = traj.num_checkpoints  # dopri5's step starts (MATH.md, Notation) and the end
    assert 2 < n <= DEFAULT_CHECKPOINTS + 2
    a = adjoints(traj.ys[-1].sum(), traj)
    assert (a.norm(dim=-1) > 0).all()
    with pytest.raises(ValueError, match="`params` is empty"):
        sensitivities(traj, a)
    with pytest.raises(ValueError, match=rf"`adjoints` must have shape \({n}, 3, 2\)"):
        sensitivities(traj, a[:-1], params=list(lin.parameters()))
    # Only the bias: y_k = sum_i a_{k,i}.
    y = sensitivities(traj, a, params=[lin.bias])
    torch.testing.assert_close(y, a.sum(1))
    # Only the weight: y_k = sum_i a_{k,i}^T z_{k,i} (the partial at fixed z_k).
    y = sensitivities(traj, a, params=[lin.weight])
    expected = torch.einsum("kbi,kbj->kij", a, traj.checkpoint_states.detach()).flatten(1)
    torch.testing.assert_close(y, expected)
    # Parameters the field does not use give zero rows.
    other = nn.Parameter(torch.ones(4, dtype=F64))
    y = sensitivities(traj, a, params=[other])
    assert y.shape == (n, 4) and (y == 0).all()
    traj2 = integrate(lambda t, z: -z, leaf(3, 2), torch.tensor([0.0, 1.0]))
    y = sensitivities(traj2, adjoints(traj2.ys[-1].sum(), traj2), params=[other])
    assert (y == 0).all()


# --------------------------------------------------------------------------- integrate: bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"t": [0.0, 1.0, 0.5]}, r"`t` must be strictly increasing or strictly decreasing"),
        ({"t": [0.0, 0.0]}, r"`t` must be strictly increasing or strictly decreasing"),
        ({"t": [1.0]}, r"`t` must be a 1-D tensor of at least 2 times"),
        ({"t": [0.0, float("nan")]}, r"`t` must be finite"),
        ({"checkpoints": 0}, r"`checkpoints` must be an integer >= 1, got 0"),
        ({"checkpoints": -3}, r"`checkpoints` must be an integer >= 1"),
        (
            {"checkpoints": [0.5, 1.5]},
            r"`checkpoints` times must lie between t\[0\] = 0 and t\[-1\] = 1, got values in "
            r"\[0\.5, 1\.5\]",
        ),
        ({"checkpoints": [-0.1]}, r"`checkpoints` times must lie between"),
        ({"checkpoints": [[0.5]]}, r"`checkpoints` must be None, an int >= 1 or a finite 1-D"),
        ({"method": "rk5"}, r"`method` must be one of .*'dopri5'.*'rk4'.*got 'rk5'"),
        ({"y0": torch.ones(2, 2, dtype=torch.long)}, r"`y0` must be a floating-point tensor"),
    ],
)
def test_integrate_bad_input(kwargs, match):
    args = {"y0": torch.ones(2, 2, dtype=F64), "t": [0.0, 1.0]}
    args.update(kwargs)
    y0, t = args.pop("y0"), args.pop("t")
    with pytest.raises(ValueError, match=match):
        integrate(MLPField(2, 3), y0, torch.as_tensor(t, dtype=F64), **args)


def test_integrate_adjoint_needs_module():
    with pytest.raises(ValueError, match="odeint_adjoint needs `func` to be an nn.Module"):
        integrate(lambda t, z: -z, torch.ones(2, 2), torch.tensor([0.0, 1.0]), adjoint=True)


# --------------------------------------------------------------------------- properties


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 4),
    d=st.integers(1, 4),
    K=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_shapes_dtypes_and_finiteness(B, d, K, dtype, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(d, d).to(dtype)

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, t, z):
            return torch.tanh(self.lin(z))

    f = Field()
    y0 = torch.randn(B, d, dtype=dtype, requires_grad=True)
    traj = integrate(f, y0, torch.tensor([0.0, 1.0], dtype=dtype), checkpoints=K)
    assert traj.num_checkpoints == K + 1
    assert traj.ys.shape == (2, B, d) and traj.ys.dtype == dtype
    loss = traj.ys[-1].pow(2).mean()
    a = adjoints(loss, traj, create_graph=True)
    assert a.shape == (K + 1, B, d) and a.dtype == dtype
    y = sensitivities(traj, a, create_graph=True)
    assert y.shape == (K + 1, d * d + d) and y.dtype == dtype
    penalties = [
        adjoint_magnitude_penalty(a),
        sensitivity_magnitude_penalty(y),
        directional_penalty(y, gamma=0.5),
        skew_jacobian_penalty(f, traj.times, traj.checkpoint_states),
    ]
    for r in penalties:
        assert r.shape == () and r.dtype == dtype
        assert torch.isfinite(r) and r >= 0
    grads = torch.autograd.grad(sum(penalties), list(f.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4),
    d=st.integers(1, 4),
    K=st.integers(1, 5),
    gamma=st.floats(-1.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_zero_adjoints_give_finite_penalties(B, d, K, gamma, dtype):
    a = torch.zeros(K + 1, B, d, dtype=dtype, requires_grad=True)
    y = torch.zeros(K + 1, d * B, dtype=dtype, requires_grad=True)
    w = torch.zeros(K + 1, d, d, dtype=dtype, requires_grad=True)
    r_adj = adjoint_magnitude_penalty(a)
    r_sens = sensitivity_magnitude_penalty(y)
    r_dir = directional_penalty(y, gamma=gamma)
    r_spec = spectral_penalty(w, gamma=gamma)
    assert r_adj.item() == 0.0 and r_sens.item() == 0.0
    # proj = 0 / (0 + eps) = 0; Q_k = 0 has d zero eigenvalues.
    assert math.isclose(r_dir.item(), max(gamma, 0.0) ** 2, rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(r_spec.item(), d * max(gamma, 0.0) ** 2, rel_tol=1e-5, abs_tol=1e-7)
    ga, gy = torch.autograd.grad(r_adj + r_sens + r_dir, [a, y])
    assert torch.isfinite(ga).all() and torch.isfinite(gy).all()


@settings(max_examples=30, deadline=None)
@given(
    times=st.lists(st.floats(-5.0, 5.0), min_size=2, max_size=6, unique=True),
    n=st.integers(1, 12),
)
def test_checkpoint_grid_property(times, n):
    t = torch.tensor(sorted(times), dtype=F64)
    if bool(((t[1:] - t[:-1]) <= 1e-9 * (t[-1] - t[0])).any()):
        return  # requested times closer than the merge tolerance are out of scope
    grid = checkpoint_grid(t, n)
    assert bool((grid[1:] > grid[:-1]).all())
    assert grid[0] == t[0] and grid[-1] == t[-1]
    for v in t:
        assert (grid == v).sum() == 1
    assert grid.numel() <= t.numel() + n + 1
    assert grid.numel() >= n + 1
