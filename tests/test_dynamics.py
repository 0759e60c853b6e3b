"""Tests of ode_reg.dynamics: the skew-linear, antisymmetric and orthogonal-flow fields."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from torch import nn

from ode_reg import adjoints, integrate, sensitivities
from ode_reg.dynamics import AntisymmetricODEFunc, OrthogonalFlow, SkewLinearODEFunc
from ode_reg.functional.orthogonal import orthogonality_defect
from ode_reg.functional.penalties import (
    adjoint_magnitude_penalty,
    skew_jacobian_penalty,
    spectral_penalty,
)
from ode_reg.functional.spectra import jacobian, jacobian_eigvals, spectral_abscissa

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Loops of small matrix products: one intra-op thread avoids OpenMP oversubscription
    when other processes share the cores (timing only; results are unchanged)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rk4(step: float) -> dict:
    return {"method": "rk4", "options": {"step_size": step}}


def flat_grad(loss, params, **kw):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, **kw)])


def bounded_g(seed: int, dim: int):
    """A matrix rate with bounded growth: g(A) = 0.2 sin(A) C / sqrt(d) (any g keeps |z| constant)."""
    c = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    c = c * (0.2 / math.sqrt(dim))

    def g(a):
        return torch.sin(a) @ c.to(a.dtype)

    return g


# --------------------------------------------------------------------------- skew-linear


@pytest.mark.parametrize("with_g", [False, True])
def test_skew_linear_conserves_norm_on_long_horizon(with_g):
    torch.manual_seed(0)
    f = SkewLinearODEFunc(5, alpha=1.5, g=bounded_g(1, 5) if with_g else None).double()
    z0 = torch.randn(7, 5, dtype=F64)
    traj = integrate(f, z0, torch.tensor([0.0, 10.0], dtype=F64), **rk4(0.01))
    norms = traj.checkpoint_states.norm(dim=-1)  # (K + 1, B)
    rel = ((norms - z0.norm(dim=-1)) / z0.norm(dim=-1)).abs().max()
    assert rel <= 1e-5, rel
    assert (traj.ys[-1] - z0).norm() > 0.1 * z0.norm()  # it did move
    if with_g:
        assert traj.weights is not None and f.weights_orthogonal is False
        assert (traj.weights[-1] - traj.weights[0]).abs().max() > 1e-2  # A(t) varies
        assert traj.weights[0] is f.A
    else:
        assert traj.weights is None


def test_skew_linear_dopri5_tight_tolerance_conserves_norm():
    torch.manual_seed(1)
    f = SkewLinearODEFunc(4, alpha=2.0).double()
    z0 = torch.randn(3, 4, dtype=F64)
    traj = integrate(
        f, z0, torch.tensor([0.0, 10.0], dtype=F64), method="dopri5", rtol=1e-10, atol=1e-12
    )
    rel = (traj.checkpoint_states.norm(dim=-1) / z0.norm(dim=-1) - 1).abs().max()
    assert rel <= 1e-5


@pytest.mark.parametrize("with_g", [False, True])
def test_skew_linear_transition_matrix_is_orthogonal_and_propagates(with_g):
    torch.manual_seed(2)
    f = SkewLinearODEFunc(4, alpha=0.7, g=bounded_g(3, 4) if with_g else None, step_size=0.005)
    f = f.double()
    z0 = torch.randn(6, 4, dtype=F64)
    times = torch.tensor([0.0, 1.0, 2.5, 4.0], dtype=F64)
    traj = integrate(f, z0, times, **rk4(0.005))
    q = f.transition_matrix(times)
    assert q.shape == (4, 4, 4)
    assert orthogonality_defect(q).max() <= 1e-5
    torch.testing.assert_close(q[0], torch.eye(4, dtype=F64))
    # z(t) = Q_t z(0), i.e. Z(t) = Z(0) Q_t^T in rows.
    pred = z0 @ q.mT
    torch.testing.assert_close(traj.ys, pred, rtol=0, atol=1e-8)
    if not with_g:
        # Closed form against an independent float64 reference.
        ref = torch.linalg.matrix_exp(2.5 * 0.7 * (f.A - f.A.T))
        torch.testing.assert_close(q[2], ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("with_g", [False, True])
def test_skew_linear_flow_is_linear_in_initial_state(with_g):
    torch.manual_seed(4)
    f = SkewLinearODEFunc(3, g=bounded_g(5, 3) if with_g else None).double()
    x, y = torch.randn(2, 5, 3, dtype=F64)
    a, b = 1.7, -0.4
    t = torch.tensor([0.0, 3.0], dtype=F64)

    def end(z0):
        return integrate(f, z0, t, **rk4(0.05)).ys[-1]

    torch.testing.assert_close(end(a * x + b * y), a * end(x) + b * end(y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_g", [False, True])
def test_skew_linear_adjoint_and_skew_jacobian_penalties_vanish(with_g):
    torch.manual_seed(6)
    f = SkewLinearODEFunc(4, alpha=1.3, g=bounded_g(7, 4) if with_g else None).double()
    # z0 requires grad, so that a_0 exists (not left to integrate).
    z0 = torch.randn(5, 4, dtype=F64, requires_grad=True)
    target = torch.randn(5, 4, dtype=F64)
    traj = integrate(f, z0, torch.tensor([0.0, 5.0], dtype=F64), checkpoints=10, **rk4(0.01))
    loss = (traj.ys[-1] - target).pow(2).sum(-1).mean()  # read at the final time only
    a = adjoints(loss, traj)
    assert traj.num_checkpoints == 11  # 10 explicit intervals on the 0.01 grid
    assert a.abs().min() >= 0 and a[0].norm() > 1e-3
    assert adjoint_magnitude_penalty(a) <= 1e-8
    if not with_g:
        r = skew_jacobian_penalty(f, traj.times, traj.checkpoint_states, probes=3)
        assert r <= 1e-8
        # The penalty is not trivially zero: a field with a symmetric part is penalized.
        sym = lambda t, z: z @ (f.A + f.A.T).T  # noqa: E731
        assert skew_jacobian_penalty(sym, traj.times, traj.checkpoint_states) > 1e-2


def test_skew_linear_forward_with_plain_odeint_matches_closed_form():
    torch.manual_seed(8)
    f = SkewLinearODEFunc(3, alpha=-0.5).double()
    z0 = torch.randn(4, 3, dtype=F64)
    zs = torchdiffeq.odeint(f, z0, torch.tensor([0.0, 2.0], dtype=F64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(zs[-1], z0 @ f.transition_matrix(2.0).mT, rtol=0, atol=1e-8)


def test_skew_linear_with_g_weights_carry_the_sensitivity():
    """Trapezoid of y_k over times = dL/dtheta, with theta reaching f only through A_k."""
    torch.manual_seed(9)
    g_mod = nn.Linear(3, 3).double()  # a learnable g: its parameters enter through A(t)
    f = SkewLinearODEFunc(3, g=lambda a: torch.tanh(g_mod(a))).double()
    f.g_mod = g_mod  # register so the trajectory sees its parameters
    z0 = torch.randn(4, 3, dtype=F64)
    target = torch.randn(4, 3, dtype=F64)
    errs = []
    for k in (8, 16):
        traj = integrate(f, z0, torch.tensor([0.0, 1.0], dtype=F64), checkpoints=k, **rk4(1 / 16))
        loss = (traj.ys[-1] - target).pow(2).sum()
        params = traj.parameters()
        assert len(params) == 3  # A, g_mod.weight, g_mod.bias
        grad = flat_grad(loss, params, retain_graph=True)
        a = adjoints(loss, traj)
        y = sensitivities(traj, a)
        if k == 8:  # the differentiable version has the same values
            torch.testing.assert_close(sensitivities(traj, a, create_graph=True), y)
        quad = torch.trapezoid(y, traj.times, dim=0)
        assert quad[9:].abs().max() > 1e-3  # g's parameters get a nonzero density
        errs.append(((quad - grad).norm() / grad.norm()).item())
    assert errs[-1] < 2e-3, errs
    assert 3.0 < errs[0] / errs[1] < 5.0, errs  # trapezoid O(h^2)


def test_skew_linear_forward_with_g_matches_recorded_weights():
    torch.manual_seed(10)
    f = SkewLinearODEFunc(3, g=bounded_g(11, 3), step_size=0.01).double()
    z = torch.randn(2, 3, dtype=F64)
    traj = integrate(
        f, torch.randn(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), **rk4(0.01)
    )
    k = 5
    torch.testing.assert_close(f(traj.times[k], z), traj.field_at(k, z), rtol=0, atol=1e-9)
    fx, da = f(traj.times[k], (z, traj.weights[k]))
    torch.testing.assert_close(fx, traj.field_at(k, z))
    torch.testing.assert_close(da, f.g(traj.weights[k]))


def test_skew_linear_argument_errors():
    with pytest.raises(ValueError, match="`dim`"):
        SkewLinearODEFunc(0)
    with pytest.raises(ValueError, match="`alpha`"):
        SkewLinearODEFunc(3, alpha=float("nan"))
    with pytest.raises(ValueError, match="`g`"):
        SkewLinearODEFunc(3, g=3.0)
    with pytest.raises(ValueError, match="`step_size`"):
        SkewLinearODEFunc(3, step_size=0.0)
    with pytest.raises(ValueError, match="`init_std`"):
        SkewLinearODEFunc(3, init_std=-1.0)
    with pytest.raises(ValueError, match="`t`"):
        SkewLinearODEFunc(3).transition_matrix(torch.zeros(2, 2))


# --------------------------------------------------------------------------- antisymmetric


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "softplus"])
@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.5])
def test_antisymmetric_jacobian_spectrum(gamma, activation):
    torch.manual_seed(12)
    f = AntisymmetricODEFunc(
        8, gamma=gamma, activation=activation, input_dim=3, recurrent_std=4.0
    ).double()
    f.set_input(torch.randn(16, 3, dtype=F64))
    z = torch.randn(16, 8, dtype=F64)
    t = torch.tensor(0.3, dtype=F64)
    jac = jacobian(f, t, z)
    ref = torch.autograd.functional.jacobian(lambda x: f(t, x), z)
    torch.testing.assert_close(jac, torch.stack([ref[i, :, i] for i in range(16)]))
    eig = jacobian_eigvals(f, t, z)
    assert spectral_abscissa(eig).max() <= 1e-6
    if gamma == 0.0:
        assert eig.real.abs().max() <= 1e-5
    else:
        assert eig.imag.abs().max() > 1e-2  # oscillatory, not just a damped diagonal
    # The antisymmetric part alone: M + M^T = -2 gamma I.
    m = f.antisymmetric_matrix()
    torch.testing.assert_close(m + m.T, -2 * gamma * torch.eye(8, dtype=F64))


def _recurrence(f: AntisymmetricODEFunc, h, x, eps):
    """AntisymmetricRNN written from the raw parameters, independently of forward()."""
    w = f.weight
    m = w - w.T - f.gamma * torch.eye(f.dim, dtype=w.dtype)
    upd = torch.tanh(h @ m.T + x @ f.input_weight.T + f.bias)
    if f.gated:
        upd = torch.sigmoid(h @ m.T + x @ f.gate_input_weight.T + f.gate_bias) * upd
    return h + eps * upd


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_antisymmetric_euler_is_antisymmetric_rnn(gated, dtype):
    torch.manual_seed(13)
    eps = 0.1
    f = AntisymmetricODEFunc(6, gamma=0.01, input_dim=4, gated=gated).to(dtype)
    with torch.no_grad():  # nonzero biases so that they are checked too
        f.bias.normal_()
        if gated:
            f.gate_bias.normal_()
    xs = torch.randn(5, 3, 4, dtype=dtype)  # T = 5 steps of a batch of 3
    h_ode = h_rnn = torch.randn(3, 6, dtype=dtype)
    for k, x in enumerate(xs):
        f.set_input(x)  # zero-order hold over [k eps, (k + 1) eps]
        t = torch.tensor([k * eps, (k + 1) * eps], dtype=dtype)
        traj = integrate(f, h_ode, t, checkpoints=1, method="euler", options={"step_size": eps})
        assert traj.num_checkpoints == 2
        h_ode = traj.ys[-1]
        h_rnn = _recurrence(f, h_rnn, x, (t[1] - t[0]).item())
        atol = 1e-7 if dtype == torch.float32 else 1e-14
        torch.testing.assert_close(h_ode, h_rnn, rtol=0, atol=atol)


def test_antisymmetric_input_signal_protocol():
    torch.manual_seed(14)
    f = AntisymmetricODEFunc(3, input_dim=2).double()
    z = torch.randn(4, 3, dtype=F64)
    u = torch.randn(4, 2, dtype=F64)
    f.set_input(u)
    held = f(torch.tensor(0.0, dtype=F64), z)
    f.set_input(lambda t: u * (1 + t))  # callable u(t)
    torch.testing.assert_close(f(torch.tensor(0.0, dtype=F64), z), held)
    assert not torch.allclose(f(torch.tensor(1.0, dtype=F64), z), held)
    f.set_input(u[0])  # one input for the whole batch
    torch.testing.assert_close(f(torch.tensor(0.0, dtype=F64), z[:1]), held[:1])
    f.set_input(None)
    with pytest.raises(RuntimeError, match="set_input"):
        f(torch.tensor(0.0), z)
    with pytest.raises(ValueError, match="`u`"):
        f.set_input(torch.randn(4, 3))
    with pytest.raises(ValueError, match="`u`"):
        AntisymmetricODEFunc(3).set_input(u)
    # No input: the field is sigma(M z + b).
    g = AntisymmetricODEFunc(3, gamma=0.2).double()
    torch.testing.assert_close(g(0.0, z), torch.tanh(z @ g.antisymmetric_matrix().T + g.bias))


def test_antisymmetric_trajectory_keeps_the_input_it_was_integrated_with():
    torch.manual_seed(21)
    f = AntisymmetricODEFunc(3, input_dim=2).double()
    u1, u2 = torch.randn(2, 4, 2, dtype=F64)
    z = torch.randn(4, 3, dtype=F64)
    f.set_input(u1)
    traj = integrate(f, z, torch.tensor([0.0, 0.5], dtype=F64), checkpoints=2, **rk4(0.1))
    ref = f(traj.times[1], z)
    f.set_input(u2)  # the next ODE-RNN step
    assert not torch.allclose(f(traj.times[1], z), ref)
    torch.testing.assert_close(traj.field_at(1, z), ref)
    assert f.input_at(0.0) is u2  # restored after the evaluation


def test_antisymmetric_initialization_statistics():
    torch.manual_seed(15)
    f = AntisymmetricODEFunc(256, input_dim=64, recurrent_std=4.0, gated=True)
    assert abs(f.weight.std().item() - 4.0 / math.sqrt(256)) < 0.02 * 4.0 / math.sqrt(256)
    assert abs(f.input_weight.std().item() - 1 / 8) < 0.03 / 8
    assert abs(f.gate_input_weight.std().item() - 1 / 8) < 0.03 / 8
    assert torch.equal(f.bias, torch.zeros(256))
    assert AntisymmetricODEFunc(4, bias=False).bias is None


def test_antisymmetric_argument_errors():
    with pytest.raises(ValueError, match="`dim`"):
        AntisymmetricODEFunc(0)
    with pytest.raises(ValueError, match="`gamma`"):
        AntisymmetricODEFunc(3, gamma=-0.1)
    with pytest.raises(ValueError, match="`activation` must be one of"):
        AntisymmetricODEFunc(3, activation="gelu")
    with pytest.raises(ValueError, match="`input_dim`"):
        AntisymmetricODEFunc(3, input_dim=0)
    with pytest.raises(ValueError, match="`recurrent_std`"):
        AntisymmetricODEFunc(3, recurrent_std=-1.0)
    with pytest.raises(ValueError, match="`gated`"):
        AntisymmetricODEFunc(3, gated="yes")


# --------------------------------------------------------------------------- orthogonal flow


def test_orthogonal_flow_lie_steps_stay_on_group_and_rk4_drifts():
    """d = 64, float32 state, 1000 steps of h = 0.01 over [0, 10]."""
    defects = {}
    for step in ("exp", "cayley", "rk4"):
        torch.manual_seed(16)  # same B0, B1, W_0 for all three
        f = OrthogonalFlow(64, step=step, step_size=0.01, b_std=1.0)
        with torch.no_grad():
            traj = integrate(f, torch.randn(4, 64), torch.tensor([0.0, 10.0]), checkpoints=4)
        assert traj.weights[-1].dtype == torch.float32
        defects[step] = orthogonality_defect(traj.weight_matrices.double()).max().item()
    print(
        f"\northogonality defect after 1000 steps (d=64, h=0.01, float32 W_k): "
        f"exp {defects['exp']:.3g}, cayley {defects['cayley']:.3g}, rk4 {defects['rk4']:.3g}"
    )
    lie = max(defects["exp"], defects["cayley"])
    assert lie <= 1e-5
    assert defects["rk4"] > 1e-5 and defects["rk4"] > 10 * lie


def test_orthogonal_flow_weights_are_isometries_and_states_start_at_y0():
    torch.manual_seed(17)
    f = OrthogonalFlow(6, step="cayley", step_size=0.05).double()
    y0 = torch.randn(5, 6, dtype=F64, requires_grad=True)
    traj = integrate(f, y0, torch.tensor([0.0, 2.0], dtype=F64), checkpoints=6)
    assert traj.states[0] is y0
    assert len(traj.weights) == traj.num_checkpoints == 7
    z = torch.randn(7, 10, 6, dtype=F64)
    wz = z @ traj.weight_matrices.mT
    torch.testing.assert_close(wz.norm(dim=-1), z.norm(dim=-1), rtol=1e-12, atol=0)
    assert orthogonality_defect(traj.weight_matrices).max() < 1e-12
    assert (traj.weights[-1] - traj.weights[0]).abs().max() > 0.1
    # Q_k = W_k^T W_* orthogonal: the spectral penalty is 0 at gamma = -1, positive at 1.
    assert spectral_penalty(traj.weight_matrices, gamma=-1.0) == 0
    assert spectral_penalty(traj.weight_matrices, gamma=1.0) > 0


def test_orthogonal_flow_exp_step_exact_for_constant_generator():
    """b constant: W_t = W_0 exp(t b) exactly; with identity activation and b = 0, z = exp(t W_0) z_0."""
    torch.manual_seed(18)
    s = torch.randn(5, 5, dtype=F64)
    bconst = s - s.T
    f = OrthogonalFlow(5, activation="identity", step="exp", step_size=0.1, b=lambda w, t: bconst)
    traj = integrate(f, torch.randn(2, 5, dtype=F64), torch.tensor([0.0, 3.0], dtype=F64))
    w0 = f.initial_weight()
    torch.testing.assert_close(
        traj.weights[-1], w0 @ torch.linalg.matrix_exp(3.0 * bconst), rtol=0, atol=1e-12
    )
    # Cayley and RK4 approximate the same W_t (second order / fourth order in h).
    for step, tol in (("cayley", 1e-2), ("rk4", 1e-3)):
        g = OrthogonalFlow(5, step=step, step_size=0.01, b=lambda w, t: bconst)
        g.initial_generator = f.initial_generator
        torch.testing.assert_close(g.weight_at(3.0), traj.weights[-1], rtol=0, atol=tol)
    # z-RK4 against the closed form of a linear field.
    zero = OrthogonalFlow(5, activation="identity", step_size=0.01, b=lambda w, t: 0 * w)
    z0 = torch.randn(3, 5, dtype=F64)
    tr = integrate(zero, z0, torch.tensor([0.0, 1.0], dtype=F64), checkpoints=2)
    ref = z0 @ torch.linalg.matrix_exp(zero.initial_weight()).T
    torch.testing.assert_close(tr.ys[-1], ref, rtol=0, atol=1e-9)


def test_orthogonal_flow_sensitivity_quadrature_matches_autograd_gradient():
    """y_k = a_k df(t_k, z_k)/dtheta through W_k: the trapezoid of y_k gives dL/dtheta."""
    errs = []
    for k in (16, 32):
        torch.manual_seed(19)
        f = OrthogonalFlow(4, step="exp", step_size=1 / k, b_std=1.0, learn_initial=True).double()
        z0 = torch.randn(3, 4, dtype=F64)
        target = torch.randn(3, 4, dtype=F64)
        traj = integrate(f, z0, torch.tensor([0.0, 1.0], dtype=F64), checkpoints=k)
        loss = (traj.ys[-1] - target).pow(2).sum()
        params = traj.parameters()
        assert [p.shape for p in params] == [(4, 4)] * 3  # B0, B1, C (W_0)
        grad = flat_grad(loss, params, retain_graph=True)
        a = adjoints(loss, traj)
        y = sensitivities(traj, a)
        if k == 16:  # the differentiable version has the same values
            torch.testing.assert_close(sensitivities(traj, a, create_graph=True), y)
        quad = torch.trapezoid(y, traj.times, dim=0)
        assert y[:, :16].abs().max() > 1e-3  # B0 reaches f only through W_k
        errs.append(((quad - grad).norm() / grad.norm()).item())
    assert errs[-1] < 1e-3, errs
    assert 3.0 < errs[0] / errs[1] < 5.0, errs  # trapezoid O(h^2)


def test_orthogonal_flow_forward_matches_field_at_and_sub_steps():
    torch.manual_seed(20)
    f = OrthogonalFlow(4, step_size=0.01).double()
    traj = integrate(f, torch.randn(2, 4, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    z = torch.randn(3, 4, dtype=F64)
    for k in (0, 3, 8):
        torch.testing.assert_close(f(traj.times[k], z), traj.field_at(k, z), rtol=0, atol=1e-6)
    # options["step_size"] overrides; one sub-step per interval when it exceeds the interval.
    coarse = integrate(f, traj.states[0], traj.t, method="rk4", options={"step_size": 10.0}).ys[-1]
    assert (coarse - traj.ys[-1]).abs().max() > 1e-8


def test_orthogonal_flow_argument_errors():
    with pytest.raises(ValueError, match="`dim`"):
        OrthogonalFlow(0)
    with pytest.raises(ValueError, match="`step` must be one of"):
        OrthogonalFlow(3, step="euler")
    with pytest.raises(ValueError, match="`step_size`"):
        OrthogonalFlow(3, step_size=0.0)
    with pytest.raises(ValueError, match="`activation`"):
        OrthogonalFlow(3, activation="gelu")
    with pytest.raises(ValueError, match="`weight_dtype`"):
        OrthogonalFlow(3, weight_dtype=torch.int32)
    with pytest.raises(ValueError, match="`b`"):
        OrthogonalFlow(3, b="skew")
    f = OrthogonalFlow(3)
    z0, t = torch.randn(2, 3), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="`method`"):
        integrate(f, z0, t, method="dopri5")
    with pytest.raises(ValueError, match="`options`"):
        integrate(f, z0, t, method="rk4", options={"step_size": 0.1, "rtol": 1e-3})
    with pytest.raises(ValueError, match="step_size"):
        integrate(f, z0, t, method="rk4", options={"step_size": -0.1})
    assert OrthogonalFlow(3, step="rk4").weights_orthogonal is False
    w0 = OrthogonalFlow(5).orthogonal_weights()["initial_weight"]
    assert w0.dtype == F64 and orthogonality_defect(w0) < 1e-13
    assert OrthogonalFlow.weights_orthogonal is True
