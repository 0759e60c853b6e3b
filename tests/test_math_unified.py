"""The one implementation of each piece of mathematics (issue 23), against hand-written
references.

- ``functional.sensitivity.sensitivity_density`` (``y_k = sum_i a_{k,i} df/dtheta``) against
  per-sample Jacobians from ``torch.autograd.functional.jacobian``; the full derivative of a
  penalty of ``y_k`` through the solve by ``gradcheck`` in float64, on both evaluation paths
  (stacked per-checkpoint aliases for a module field, detached leaves for a closure).
- ``functional.penalties.skew_hutchinson`` with all ``2^d`` sign vectors as probes (exact, since
  ``mean_v v v^T = I`` over them) against ``|sym J_i|_F^2 / d`` from dense per-sample Jacobians,
  with and without a coordinate mask; a field ``vmap`` cannot trace gives the same value one
  checkpoint at a time and says so once.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import ode_reg._once
import ode_reg.functional.penalties as penalties_mod
from ode_reg import adjoints, integrate, sensitivities
from ode_reg.functional import sensitivity_magnitude_penalty, skew_jacobian_penalty
from ode_reg.functional.penalties import evaluate_stacked, skew_hutchinson
from ode_reg.functional.sensitivity import sensitivity_at_leaf, sensitivity_density

F64 = torch.float64


class Tanh(nn.Module):
    def __init__(self, d: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, d, generator=g, dtype=F64) * 0.7)
        self.b = nn.Parameter(torch.randn(d, generator=g, dtype=F64) * 0.3)

    def forward(self, t, z):
        return torch.tanh(z @ self.w.T + self.b) * (1 + 0.5 * t)


def _reference_density(f: Tanh, times, zs, adj) -> torch.Tensor:
    """Hand-written ``y_k``: per sample the Jacobian of ``f`` in the flat parameters at fixed
    ``z_{k,i}``, contracted with ``a_{k,i}``, summed over samples."""
    flat0 = torch.cat([f.w.detach().reshape(-1), f.b.detach()])
    d = f.b.numel()
    rows = []
    for t, z, a in zip(times, zs, adj):
        y = torch.zeros_like(flat0)
        for zi, ai in zip(z.detach(), a.detach()):

            def of_params(flat, zi=zi, t=t):
                w, b = flat[: d * d].reshape(d, d), flat[d * d :]
                return torch.tanh(zi @ w.T + b) * (1 + 0.5 * t)

            jac = torch.autograd.functional.jacobian(of_params, flat0)  # (d, P)
            y = y + ai @ jac
        rows.append(y)
    return torch.stack(rows)


def test_sensitivity_density_equals_per_sample_jacobians_on_both_paths():
    f = Tanh()
    g = torch.Generator().manual_seed(1)
    times = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    zs = torch.randn(3, 4, 3, generator=g, dtype=F64)
    adj = torch.randn(3, 4, 3, generator=g, dtype=F64)
    ref = _reference_density(f, times, zs, adj)
    # Stacked: per-checkpoint aliases substituted into one vmap call.
    aliases = [p.unsqueeze(0).expand(3, *p.shape) for p in (f.w, f.b)]

    def one(t, z, w, b):
        return torch.func.functional_call(f, {"w": w, "b": b}, (t, z))

    out = torch.func.vmap(one)(times, zs, *aliases)
    y = sensitivity_density(out, aliases, adj, per_checkpoint=True)
    torch.testing.assert_close(y, ref)
    # One checkpoint at a time, at a detached leaf, in the real parameters.
    for k in range(3):
        leaf = zs[k].detach().requires_grad_(True)
        row = sensitivity_at_leaf(f(times[k], leaf), leaf, zs[k], adj[k], list(f.parameters()))
        torch.testing.assert_close(row, ref[k])


def _solve_penalty(func, params):
    y0 = torch.tensor([[0.3, -0.5], [0.8, 0.1]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    traj = integrate(func, y0, t, method="rk4", options={"step_size": 0.25}, checkpoints=4)
    loss = traj.ys[-1].pow(2).sum()
    a = adjoints(loss, traj, create_graph=True)
    return sensitivity_magnitude_penalty(sensitivities(traj, a, create_graph=True, params=params))


def test_gradcheck_of_a_sensitivity_penalty_through_the_solve_on_both_paths():
    """``R_sens`` of ``y_k`` as a function of the parameters, through the solve, the
    differentiable adjoints and ``y_k``: the full derivative. A closure takes the detached-leaf
    path with ``through_state`` (``gradcheck``, float64); the module field takes the
    stacked-alias path (one ``vmap`` call), whose value and gradient equal it."""
    f = Tanh(d=2, seed=3)

    def value(w, b):
        return _solve_penalty(lambda tt, z: torch.tanh(z @ w.T + b) * (1 + 0.5 * tt), [w, b])

    w = f.w.detach().clone().requires_grad_(True)
    b = f.b.detach().clone().requires_grad_(True)
    r = value(w, b)
    assert float(r) > 1e-6
    assert gradcheck(value, (w, b), eps=1e-6, atol=1e-5)
    g_ref = torch.autograd.grad(value(w, b), (w, b))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stacked path runs: no fallback announced
        r_mod = _solve_penalty(f, list(f.parameters()))
    torch.testing.assert_close(r_mod, r)
    g = torch.autograd.grad(r_mod, (f.w, f.b))
    for a, b_ in zip(g, g_ref):
        torch.testing.assert_close(a, b_)


def _sym_frobenius(func, t, z) -> torch.Tensor:
    """``mean_i |1/2 (J_i + J_i^T)|_F^2 / d`` from dense per-sample Jacobians."""
    d = z.shape[1]
    vals = []
    for zi in z:
        jac = torch.autograd.functional.jacobian(lambda x: func(t, x[None])[0], zi)
        vals.append((0.5 * (jac + jac.T)).pow(2).sum() / d)
    return torch.stack(vals).mean()


def _all_signs(n_states: int, shape) -> torch.Tensor:
    """Every sign vector of one sample, the same for all samples: ``(n, 2^d, B, d)``."""
    b, d = shape
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=F64)
    return signs[None, :, None, :].expand(n_states, len(signs), b, d).contiguous()


def test_skew_hutchinson_with_all_sign_vectors_is_the_exact_symmetric_frobenius_norm():
    f = Tanh(d=3, seed=5)
    g = torch.Generator().manual_seed(6)
    times = torch.tensor([0.0, 0.5], dtype=F64)
    zs = torch.randn(2, 4, 3, generator=g, dtype=F64).requires_grad_(True)
    vs = _all_signs(2, (4, 3))
    out = evaluate_stacked(
        lambda t, z, _v: f(t, z), times, zs, fallback=lambda k, z: f(times[k], z), name="Tanh"
    )
    est = skew_hutchinson(out, zs, vs)
    ref = torch.stack([_sym_frobenius(f, times[k], zs[k].detach()) for k in range(2)])
    torch.testing.assert_close(est, ref)
    # A mask keeping the first two coordinates: the block sym(J)_{:2,:2}, over 2 coordinates.
    mask = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    est_m = skew_hutchinson(out, zs, vs * mask, mask)
    ref_m = []
    for k in range(2):
        vals = []
        for zi in zs[k].detach():
            jac = torch.autograd.functional.jacobian(lambda x, k=k: f(times[k], x[None])[0], zi)
            blk = 0.5 * (jac + jac.T)[:2, :2]
            vals.append(blk.pow(2).sum() / 2)
        ref_m.append(torch.stack(vals).mean())
    torch.testing.assert_close(est_m, torch.stack(ref_m))


def test_gradcheck_skew_hutchinson_in_parameters_and_states():
    f = Tanh(d=2, seed=7)
    times = torch.tensor([0.0, 1.0], dtype=F64)
    zs = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    vs = _all_signs(2, (3, 2))

    def value(w, z):
        def func(t, x):
            return torch.tanh(x @ w.T + f.b) * (1 + 0.5 * t)

        out = evaluate_stacked(
            lambda t, x, _v: func(t, x), times, z, fallback=lambda k, x: func(times[k], x), name="g"
        )
        return skew_hutchinson(out, z, vs).sum()

    w = f.w.detach().clone().requires_grad_(True)
    assert gradcheck(value, (w, zs.clone().requires_grad_(True)))


def test_untraceable_field_gives_the_same_skew_one_checkpoint_at_a_time_and_says_so_once(
    monkeypatch,
):
    monkeypatch.setattr(ode_reg._once, "SAID", ode_reg._once.SayOnce())  # said once per process
    f = Tanh(d=3, seed=9)

    class Branchy(nn.Module):
        def forward(self, t, z):
            scale = 2.0 if float(t) > 0.5 else 1.0  # data-dependent control flow
            return scale * f(t, z)

    g = torch.Generator().manual_seed(10)
    times = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    states = torch.randn(3, 4, 3, generator=g, dtype=F64)
    branchy = Branchy()
    with pytest.warns(UserWarning, match="cannot trace the field Branchy") as rec:
        r = skew_jacobian_penalty(branchy, times, states, probes=2, generator=g.manual_seed(11))
    assert sum("cannot trace the field" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        r2 = skew_jacobian_penalty(branchy, times, states, probes=2, generator=g.manual_seed(11))
    torch.testing.assert_close(r, r2)
    ref = 0.0
    for k in range(3):
        scale = 2.0 if float(times[k]) > 0.5 else 1.0
        ref = ref + scale**2 * _sym_frobenius(f, times[k], states[k])
    # 2 random probes are an estimate: check against the exact value loosely, and exactly
    # against the traceable twin evaluated with the same probes.

    class Twin(nn.Module):
        def forward(self, t, z):
            return (1.0 + (t > 0.5).to(z.dtype)) * f(t, z)

    r_twin = skew_jacobian_penalty(Twin(), times, states, probes=2, generator=g.manual_seed(11))
    torch.testing.assert_close(r, r_twin)
    assert 0.2 * ref / 3 < r < 5 * ref / 3


def test_a_field_that_failed_in_vmap_is_not_tried_again(monkeypatch):
    """The recorder keys the stacked evaluation on the user's field: after one failure the
    field goes straight to the per-checkpoint evaluation (no second vmap attempt, no second
    message), with the same values."""
    monkeypatch.setattr(ode_reg._once, "SAID", ode_reg._once.SayOnce())
    f = Tanh(d=3, seed=12)

    class Itemy(nn.Module):
        def forward(self, t, z):
            return f(t, z) * (1.0 + float(z.sum()) * 0.0)  # .item()-like host read

    field = Itemy()
    times = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    zs = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(13), dtype=F64)
    zs.requires_grad_(True)

    def run():
        return evaluate_stacked(
            lambda t, z, _v: field(t, z),
            times,
            zs,
            fallback=lambda k, z: field(times[k], z),
            name="Itemy",
            key=field,
        )

    with pytest.warns(UserWarning, match="cannot trace the field Itemy"):
        first = run()
    assert penalties_mod._UNSTACKABLE.get(field) is True

    def no_vmap(*args, **kwargs):
        raise AssertionError("vmap tried again")

    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = run()
    torch.testing.assert_close(second, first)
    torch.testing.assert_close(first, torch.stack([f(times[k], zs[k]) for k in range(3)]))


def test_sensitivities_of_an_untraceable_field_do_not_retry_vmap(monkeypatch):
    """``ode_reg.sensitivities`` remembers a field whose stacked evaluation failed, as the skew
    term does: the next call goes straight to the per-checkpoint aliases (no second vmap trace
    at every step), with the same values and one message."""
    monkeypatch.setattr(ode_reg._once, "SAID", ode_reg._once.SayOnce())
    f = Tanh(d=2, seed=14)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = f

        def forward(self, t, z):
            return (2.0 if float(t) > 0.5 else 1.0) * self.inner(t, z)  # data-dependent

    field = Branchy()

    def run():
        y0 = torch.tensor([[0.3, -0.5], [0.8, 0.1]], dtype=F64)
        t = torch.tensor([0.0, 1.0], dtype=F64)
        traj = integrate(field, y0, t, method="rk4", options={"step_size": 0.25}, checkpoints=4)
        a = adjoints(traj.ys[-1].pow(2).sum(), traj, create_graph=True)
        return sensitivities(traj, a, create_graph=True)

    with pytest.warns(UserWarning, match="cannot trace the field Branchy"):
        first = run()
    assert penalties_mod.known_unstackable(field)

    def no_vmap(*args, **kwargs):
        raise AssertionError("vmap tried again")

    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        again = run()
    torch.testing.assert_close(again, first, rtol=0, atol=0)
