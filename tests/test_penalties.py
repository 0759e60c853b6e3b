"""Tests of the five penalties of MATH.md: gradients, zero sets, scale invariance, bad input,
and the full derivative of adjoint/sensitivity penalties in the field's parameters."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck

from ode_reg import adjoints, integrate, sensitivities
from ode_reg import odeint as ode_reg_odeint
from ode_reg.functional import (
    adjoint_magnitude_penalty,
    directional_penalty,
    sensitivity_magnitude_penalty,
    skew_jacobian_penalty,
    spectral_penalty,
)

F64 = torch.float64


def rand(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(requires_grad)


def random_orthogonal(n, seed, batch=()):
    q, r = torch.linalg.qr(rand(*batch, n, n, seed=seed))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def rotation(theta, n=3):
    """Rotation by theta in the (0, 1) plane of R^n."""
    r = torch.eye(n, dtype=F64)
    c, s = math.cos(theta), math.sin(theta)
    r[0, 0], r[0, 1], r[1, 0], r[1, 1] = c, -s, s, c
    return r


class TanhField(nn.Module):
    """``f(t, z) = tanh(z W^T + b)``: a small non-skew field (d * d + d parameters)."""

    def __init__(self, d=2, seed=0, scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(scale * torch.randn(d, d, generator=g, dtype=F64))
        self.b = nn.Parameter(0.3 * torch.randn(d, generator=g, dtype=F64))

    def forward(self, t, z):
        return torch.tanh(z @ self.w.T + self.b)


# --------------------------------------------------------------------------- gradcheck


def test_gradcheck_adjoint_magnitude():
    a = rand(4, 3, 2, seed=1, requires_grad=True)
    assert gradcheck(adjoint_magnitude_penalty, (a,))
    assert gradcheck(lambda x: adjoint_magnitude_penalty(x, reference=0), (a,))
    b = rand(5, 3, seed=2, requires_grad=True)  # (K + 1, B): scalar state per sample
    assert gradcheck(adjoint_magnitude_penalty, (b,))
    c = rand(3, 2, 2, 2, seed=3, requires_grad=True)  # (K + 1, B, h, w)
    assert gradcheck(adjoint_magnitude_penalty, (c,))


def test_gradcheck_sensitivity_magnitude():
    y = rand(5, 7, seed=4, requires_grad=True)
    assert gradcheck(sensitivity_magnitude_penalty, (y,))
    assert gradcheck(lambda x: sensitivity_magnitude_penalty(x, reference=2), (y,))


def test_gradcheck_directional():
    y = rand(6, 4, seed=5)
    y[1] = -2.0 * y[-1] + 0.1 * y[1]  # opposes y_*: violates every gamma > -2
    y.requires_grad_(True)
    for gamma in (-0.2, 0.3, 1.0):
        assert directional_penalty(y, gamma=gamma) > 0  # the active branch is exercised
        assert gradcheck(lambda x, g=gamma: directional_penalty(x, gamma=g), (y,))
    assert gradcheck(lambda x: directional_penalty(x, gamma=0.5, reference=1), (y,))


def test_gradcheck_spectral():
    w = rand(4, 3, 3, seed=6, requires_grad=True)
    assert spectral_penalty(w, gamma=0.2) > 0
    assert gradcheck(lambda x: spectral_penalty(x, gamma=0.2), (w,))
    # Through orthogonal W_k = expm(A_k - A_k^T).
    a = rand(4, 3, 3, seed=7, requires_grad=True)

    def spec_of_skew(x):
        return spectral_penalty(torch.linalg.matrix_exp(x - x.mT), gamma=0.5)

    assert spec_of_skew(a) > 0
    assert gradcheck(spec_of_skew, (a,))


def test_gradcheck_skew_jacobian_in_field_parameters():
    w0, b0 = rand(3, 3, seed=8, requires_grad=True), rand(3, seed=9, requires_grad=True)
    states = rand(3, 4, 3, seed=10)
    times = torch.linspace(0, 1, 3, dtype=F64)

    def penalty(w, b, s):
        gen = torch.Generator().manual_seed(0)  # same probes at every call
        return skew_jacobian_penalty(
            lambda t, z: torch.tanh(z @ w.T + b + t), times, s, probes=2, generator=gen
        )

    assert penalty(w0, b0, states) > 0
    assert gradcheck(penalty, (w0, b0, states))
    assert gradcheck(penalty, (w0, b0, states.clone().requires_grad_(True)))


# --------------------------------------------------------------------------- zero sets


def test_adjoint_magnitude_zero_iff_norms_constant():
    aK = rand(5, 3, seed=11)
    rot = random_orthogonal(3, seed=12, batch=(4, 5))  # a different rotation per (k, i)
    a = torch.cat([(aK.unsqueeze(-2) @ rot).squeeze(-2), aK[None]])
    assert adjoint_magnitude_penalty(a) < 1e-24
    assert adjoint_magnitude_penalty(a, reference=0) < 1e-24
    # Scaling each checkpoint differently: log-ratios log(1 + k) for every sample.
    scaled = a * torch.arange(1.0, 6.0, dtype=F64)[:, None, None]
    expected = torch.log(torch.arange(1.0, 5.0, dtype=F64) / 5.0).pow(2).mean()
    torch.testing.assert_close(adjoint_magnitude_penalty(scaled), expected)
    # Per sample: one sample growing is enough to make it positive.
    b = a.clone()
    b[0, 2] *= 3.0
    assert adjoint_magnitude_penalty(b) > 0.05


def test_adjoint_magnitude_of_linear_flows():
    """Skew M: a_k = a_K expm(M tau) are rotations of a_K, R_adj = 0; general M: R_adj > 0."""
    a_m = rand(3, 3, seed=13)
    # y0 requires grad, so that a_0 exists (not left to integrate).
    y0 = rand(4, 3, seed=14, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    for m, zero in ((a_m - a_m.T, True), (a_m, False)):
        traj = integrate(
            lambda t, z, m=m: z @ m.T, y0, t, method="rk4", options={"step_size": 1 / 32}
        )
        a = adjoints(traj.ys[-1].pow(3).sum(), traj)
        assert (a.norm(dim=-1) > 0).all()  # every checkpoint, a_0 included, is reached
        r = adjoint_magnitude_penalty(a)
        assert (r < 1e-12) if zero else (r > 1e-2), r


def test_sensitivity_magnitude_zero_iff_norm_constant():
    y = rand(6, 5, seed=15)
    y = 3.0 * y / y.norm(dim=1, keepdim=True)
    assert sensitivity_magnitude_penalty(y) < 1e-24
    y2 = y.clone()
    y2[2] *= 2.0
    expected = math.log(2.0) ** 2 / 5
    assert math.isclose(sensitivity_magnitude_penalty(y2).item(), expected, rel_tol=1e-10)
    # Reference at the scaled row: every other row differs by log 2.
    expected = math.log(2.0) ** 2
    assert math.isclose(
        sensitivity_magnitude_penalty(y2, reference=2).item(), expected, rel_tol=1e-10
    )


def test_directional_zero_iff_constraint_holds():
    star = rand(5, seed=16)
    noise = rand(6, 5, seed=17)
    noise = noise - (noise @ star / star.dot(star))[:, None] * star  # orthogonal to y_*
    for gamma in (-0.5, 0.0, 0.4, 1.0):
        c = torch.tensor([gamma, gamma + 0.1, 2.0, gamma + 1e-3, 5.0, 1.0], dtype=F64)
        y = c[:, None] * star + 3.0 * noise
        y[-1] = star
        assert directional_penalty(y, gamma=gamma) < 1e-20
        # Violations: the penalty is mean_k relu(gamma - c_k)^2, c_k = y_k.y_* / |y_*|^2.
        c_bad = c.clone()
        c_bad[1], c_bad[2] = gamma - 0.3, gamma - 1.1
        y_bad = c_bad[:, None] * star + 3.0 * noise
        y_bad[-1] = star
        expected = (0.3**2 + 1.1**2) / 6
        assert math.isclose(directional_penalty(y_bad, gamma=gamma).item(), expected, rel_tol=1e-9)


def test_spectral_zero_iff_real_parts_reach_gamma():
    w_star = random_orthogonal(3, seed=18)
    # All W_k equal: Q_k = I, eigenvalues 1 >= gamma for every gamma.
    same = w_star.expand(5, 3, 3)
    for gamma in (-1.0, 0.0, 1.0):
        assert spectral_penalty(same, gamma=gamma) < 1e-20
    # W_k = W_* R(theta_k): Q_k = R(theta_k)^T, eigenvalues cos(theta) +- i sin(theta) and 1.
    thetas = [0.3, -0.9, 1.2, 2.5, 0.0]
    w = torch.stack([w_star @ rotation(th) for th in thetas])
    gamma = 0.3  # cos(1.2) = 0.36 >= 0.3, cos(2.5) = -0.80 < 0.3
    expected = 2 * max(gamma - math.cos(2.5), 0) ** 2 / 5
    assert math.isclose(spectral_penalty(w, gamma=gamma).item(), expected, rel_tol=1e-9)
    ok = torch.stack([w_star @ rotation(th) for th in (0.3, -0.9, 1.2, 0.0)])
    assert spectral_penalty(ok, gamma=gamma) < 1e-20
    # Orthogonal but not a rotation about a shared axis: compare with eigvals of Q_k directly.
    wr = random_orthogonal(4, seed=19, batch=(3,))
    for g in (-0.5, 0.0, 0.5):
        q = wr.mT @ wr[-1]
        re = torch.linalg.eigvals(q).real
        expected = torch.relu(g - re).pow(2).sum(-1).mean()
        torch.testing.assert_close(spectral_penalty(wr, gamma=g), expected)


def test_skew_jacobian_zero_for_skew_field_positive_otherwise():
    a = rand(4, 4, seed=20)
    skew = a - a.T
    states = rand(3, 6, 4, seed=21)
    times = torch.linspace(0, 1, 3, dtype=F64)
    r = skew_jacobian_penalty(lambda t, z: z @ skew.T, times, states, probes=3)
    assert r < 1e-24
    # Non-skew linear field: unbiased for T^2 ||(M + M^T)/2||_F^2 / d (here T = 1, d = 4).
    gen = torch.Generator().manual_seed(0)
    big = rand(1, 4000, 4, seed=22)
    r = skew_jacobian_penalty(lambda t, z: z @ a.T, times[:1], big, generator=gen, span=1.0)
    exact = (0.5 * (a + a.T)).pow(2).sum() / 4
    assert abs(r.item() - exact.item()) < 0.05 * exact.item()
    # Elementwise field: S = J = diag(f'), so |S v|^2 = |f'|^2 for every Rademacher v;
    # times[:2] span T = 0.5.
    z = rand(2, 5, 4, seed=23)
    r = skew_jacobian_penalty(lambda t, x: torch.tanh(x), times[:2], z, probes=2)
    exact = 0.5**2 * (1 - torch.tanh(z).pow(2)).pow(2).sum(-1).mean() / 4
    torch.testing.assert_close(r, exact)


def test_functional_and_module_skew_agree_and_equal_the_closed_form_on_a_linear_field():
    """One R_skew (MATH.md's normalised one): ``functional.skew_jacobian_penalty`` equals the
    value ``SkewJacobianPenalty`` adds (same probes), and both equal
    ``(t_K - t_0)^2 |sym M|_F^2 / d`` on ``f = M z``. ``M = D + (A - A^T)`` with D diagonal:
    ``sym M = D``, so ``|D v|^2 = |D|_F^2`` for every Rademacher v and the estimate is exact."""
    from ode_reg import SkewJacobianPenalty
    from ode_reg.recording import SkewPlan, StepRecorder
    from ode_reg.terms import step_terms

    d, span = 5, 2.5
    a = rand(d, d, seed=30)
    diag = torch.diag(torch.linspace(-1.0, 2.0, d, dtype=F64))
    m = (diag + a - a.T).requires_grad_(True)
    field = lambda t, z: z @ m.T  # noqa: E731
    z0 = rand(6, d, seed=31)
    t = torch.tensor([0.0, span], dtype=F64)
    term = SkewJacobianPenalty(weight=1.0, probes=3, seed=7)
    rec = StepRecorder(skew=SkewPlan(3, None, term.generator(0, torch.device("cpu"))))
    with rec.active():
        ys = ode_reg_odeint(field, z0, t, method="rk4", options={"step_size": 0.25})
    loss = ys[-1].pow(2).mean()
    module_value = step_terms(loss, rec.records, [term], step=0, params=[m]).values[term.name]
    traj = rec.records[0].traj
    functional = skew_jacobian_penalty(
        field, traj.times, traj.checkpoint_states, 3, generator=term.generator(0, z0.device)
    )
    closed = span**2 * diag.pow(2).sum() / d
    torch.testing.assert_close(module_value, functional, rtol=1e-12, atol=0)
    torch.testing.assert_close(functional, closed, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- dimensionless


def test_penalties_unchanged_when_loss_scaled():
    torch.manual_seed(0)
    f = TanhField(d=3, seed=24, scale=1.5)
    y0 = rand(5, 3, seed=25, requires_grad=True)  # so that a_0 exists
    traj = integrate(
        f, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4", options={"step_size": 1 / 16}
    )
    loss = (traj.ys[-1] - 0.5).pow(2).sum(-1).mean()
    values = []
    for scale in (1.0, 1e3):
        a = adjoints(scale * loss, traj)
        y = sensitivities(traj, a)
        values.append(
            torch.stack(
                [
                    adjoint_magnitude_penalty(a),
                    sensitivity_magnitude_penalty(y),
                    directional_penalty(y, gamma=0.5),
                    directional_penalty(y, gamma=0.9, reference=3),
                ]
            )
        )
    assert (values[0] > 1e-6).all(), values[0]  # not trivially zero
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=0)


@settings(max_examples=30, deadline=None)
@given(
    c=st.floats(1e-3, 1e3),
    gamma=st.floats(-1.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_scale_and_rotation_invariance(c, gamma, seed):
    a = rand(4, 3, 5, seed=seed)
    y = rand(5, 6, seed=seed + 1)
    q = random_orthogonal(5, seed=seed + 2)
    r_adj = adjoint_magnitude_penalty(a)
    torch.testing.assert_close(adjoint_magnitude_penalty(c * a), r_adj, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(adjoint_magnitude_penalty(a @ q), r_adj, rtol=1e-6, atol=1e-12)
    r_sens = sensitivity_magnitude_penalty(y)
    torch.testing.assert_close(sensitivity_magnitude_penalty(c * y), r_sens, rtol=1e-6, atol=1e-12)
    r_dir = directional_penalty(y, gamma=gamma)
    torch.testing.assert_close(
        directional_penalty(c * y, gamma=gamma), r_dir, rtol=1e-6, atol=1e-12
    )
    qp = random_orthogonal(6, seed=seed + 3)
    torch.testing.assert_close(
        directional_penalty(y @ qp, gamma=gamma), r_dir, rtol=1e-6, atol=1e-12
    )
    w = random_orthogonal(3, seed=seed + 4, batch=(4,))
    r_spec = spectral_penalty(w, gamma=gamma)
    # Q_k = W_k^T W_* is unchanged when every W_k is multiplied on the left by one orthogonal U.
    u = random_orthogonal(3, seed=seed + 5)
    torch.testing.assert_close(spectral_penalty(u @ w, gamma=gamma), r_spec, rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- full gradient


def _penalty_of_field(f: TanhField, which: str) -> torch.Tensor:
    y0 = rand(3, 2, seed=26, requires_grad=True)  # so that a_0 (and y_0, the reference) exists
    target = rand(3, 2, seed=27)
    traj = integrate(
        f,
        y0,
        torch.tensor([0.0, 1.0], dtype=F64),
        checkpoints=4,
        method="rk4",
        options={"step_size": 1 / 16},
    )
    loss = (traj.ys[-1] - target).pow(2).sum(-1).mean()
    a = adjoints(loss, traj, create_graph=True)
    if which == "adj":
        return adjoint_magnitude_penalty(a)
    y = sensitivities(traj, a, create_graph=True)
    if which == "sens":
        return sensitivity_magnitude_penalty(y)
    return directional_penalty(y, gamma=0.6, reference=0)


def _fd_grad(f: nn.Module, fn, eps=1e-6) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for p in f.parameters():
            for i in range(p.numel()):
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + eps
                with torch.enable_grad():
                    hi = fn().item()
                p.view(-1)[i] = old - eps
                with torch.enable_grad():
                    lo = fn().item()
                p.view(-1)[i] = old
                out.append((hi - lo) / (2 * eps))
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("which", ["adj", "sens", "dir"])
def test_full_gradient_matches_finite_differences(which):
    """d R / d theta by double backward through create_graph adjoints == central differences."""
    f = TanhField(d=2, seed=28, scale=1.5)
    r = _penalty_of_field(f, which)
    assert r > 1e-6
    grads = torch.autograd.grad(r, list(f.parameters()))
    analytic = torch.cat([g.reshape(-1) for g in grads])
    fd = _fd_grad(f, lambda: _penalty_of_field(f, which))
    assert analytic.norm() > 1e-4
    torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-7 * fd.norm().item())


# --------------------------------------------------------------------------- bad input


def test_bad_gamma():
    y = rand(3, 4, seed=29)
    w = random_orthogonal(3, seed=30, batch=(3,))
    for gamma in (-1.5, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"`gamma` must lie in \[-1\.0, 1\.0\]"):
            directional_penalty(y, gamma=gamma)
        with pytest.raises(ValueError, match=r"`gamma` must lie in \[-1\.0, 1\.0\]"):
            spectral_penalty(w, gamma=gamma)
    with pytest.raises(ValueError, match="`gamma` must be a real number"):
        directional_penalty(y, gamma=torch.tensor(0.5))


def test_bad_reference():
    a, y = rand(3, 2, 4, seed=31), rand(3, 4, seed=32)
    w = random_orthogonal(3, seed=33, batch=(3,))
    calls = [
        lambda r: adjoint_magnitude_penalty(a, reference=r),
        lambda r: sensitivity_magnitude_penalty(y, reference=r),
        lambda r: directional_penalty(y, reference=r),
        lambda r: spectral_penalty(w, reference=r),
    ]
    for call in calls:
        for r in (3, -4, 1.0, True):
            with pytest.raises(ValueError, match=r"`reference` must be an integer in \[-3, 2\]"):
                call(r)
        call(-3)  # in range
        call(2)


def test_bad_eps():
    a, y = rand(3, 2, 4, seed=34), rand(3, 4, seed=35)
    for eps in (0.0, -1e-8, float("nan")):
        for call in (
            lambda e: adjoint_magnitude_penalty(a, eps=e),
            lambda e: sensitivity_magnitude_penalty(y, eps=e),
            lambda e: directional_penalty(y, eps=e),
        ):
            with pytest.raises(ValueError, match=r"`eps` must lie in \(0\.0, inf\)"):
                call(eps)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"`weights` must be a \(batch of\) square matrices"):
        spectral_penalty(rand(3, 3, 4, seed=36))
    with pytest.raises(ValueError, match=r"`weights` must be a tensor of at least 3 dims"):
        spectral_penalty(rand(3, 3, seed=37))
    with pytest.raises(ValueError, match=r"K \+ 1 >= 2 checkpoints"):
        adjoint_magnitude_penalty(rand(1, 3, 2, seed=38))
    with pytest.raises(ValueError, match=r"`sens` must be a tensor of at least 2 dims"):
        sensitivity_magnitude_penalty(rand(5, seed=39))
    with pytest.raises(ValueError, match=r"`sens` must be a tensor"):
        directional_penalty([[1.0, 2.0], [3.0, 4.0]])


def test_bad_probes_and_states():
    states = rand(2, 3, 2, seed=40)
    times = torch.zeros(2, dtype=F64)
    for probes in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"`probes` must be an integer >= 1"):
            skew_jacobian_penalty(lambda t, z: -z, times, states, probes=probes)
    with pytest.raises(ValueError, match=r"`times` must have one entry per checkpoint state \(2\)"):
        skew_jacobian_penalty(lambda t, z: -z, torch.zeros(3), states)
    with pytest.raises(ValueError, match=r"`states` must be a tensor"):
        skew_jacobian_penalty(lambda t, z: -z, times, tuple(states))
