"""RNODE's terms (KineticEnergy, JacobianFrobenius) against closed forms (MATH.md, RNODE)."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch
from torch import nn

from ode_reg import JacobianFrobenius, KineticEnergy, RegularizedODEModule, odeint, odeint_adjoint
from ode_reg.functional import jacobian_frobenius_penalty, kinetic_energy_penalty
from ode_reg.recording import StepRecorder
from ode_reg.terms import step_terms

D, B, T = 3, 6, 1.5


def _matrix(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.6 * torch.randn(D, D, generator=g, dtype=torch.float64)


def _terms(f, z0, terms, *, t=T, steps=150, solve=odeint, step=0):
    """The terms of one recorded rk4 solve of ``f`` over ``[0, t]`` (the shells' path)."""
    rec = StepRecorder(field_norms=tuple(r.plan(step, torch.device("cpu")) for r in terms))
    span = torch.tensor([0.0, t], dtype=torch.float64)
    with rec.active():
        zs = solve(f, z0, span, method="rk4", options={"step_size": t / steps}, checkpoints=steps)
        loss = zs[-1].pow(2).sum()
    params = [p for r in rec.records for p in r.traj.parameters()]
    res = step_terms(loss, rec.records, terms, step=step, params=params)
    return res.values, rec


def _linear(m: torch.Tensor) -> nn.Module:
    lin = nn.Linear(D, D, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(m)
    return lin


class Field(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, t, z):
        return self.lin(z)


def _gram_integral(a: torch.Tensor, q: torch.Tensor, t: float) -> torch.Tensor:
    """``int_0^t exp(a^T s) q exp(a s) ds`` in closed form (Van Loan's block exponential)."""
    n = a.shape[0]
    blk = torch.zeros(2 * n, 2 * n, dtype=a.dtype)
    blk[:n, :n], blk[:n, n:], blk[n:, n:] = -a.T, q, a
    e = torch.linalg.matrix_exp(blk * t)
    return e[n:, n:].T @ e[:n, n:]


def test_kinetic_energy_of_a_linear_field_equals_the_closed_form_integral() -> None:
    """f = M z: z(t) = exp(M t) z0, so per sample int |M z(t)|^2 dt = z0^T G z0 with
    G = int exp(M^T t) M^T M exp(M t) dt (closed form); the term is the batch mean. The
    trapezoid rule over the 150 recorded rk4 steps is second order: relative error ~1e-5."""
    m = _matrix()
    z0 = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = _gram_integral(m, m.T @ m, T)
    exact = float(torch.einsum("bi,ij,bj->b", z0, g, z0).mean())
    values, _ = _terms(Field(_linear(m)), z0, [KineticEnergy(1.0)])
    assert float(values["kinetic_energy"].detach()) == pytest.approx(exact, rel=1e-4)
    # 10x coarser checkpoints: the trapezoid error grows ~100x (second order), still small
    coarse, _ = _terms(Field(_linear(m)), z0, [KineticEnergy(1.0)], steps=15)
    err_fine = abs(float(values["kinetic_energy"]) - exact)
    err_coarse = abs(float(coarse["kinetic_energy"]) - exact)
    assert 30 < err_coarse / err_fine < 300


def test_kinetic_energy_is_the_same_with_odeint_adjoint() -> None:
    """The terms need no adjoint: an odeint_adjoint solve records the same states (values)."""
    m = _matrix(2)
    z0 = torch.randn(B, D, dtype=torch.float64)
    f = Field(_linear(m))
    plain, _ = _terms(f, z0, [KineticEnergy(1.0)], steps=40)
    adj, rec = _terms(f, z0, [KineticEnergy(1.0)], steps=40, solve=odeint_adjoint)
    assert rec.records[0].traj.adjoint_method
    torch.testing.assert_close(adj["kinetic_energy"], plain["kinetic_energy"])
    adj["kinetic_energy"].backward()  # differentiable in the parameters at the recorded states
    assert f.lin.weight.grad is not None and float(f.lin.weight.grad.abs().sum()) > 0


def _all_signs(n_states: int, batch: int) -> torch.Tensor:
    """Every Rademacher vector of dimension D, as probes ``(n_states, 2^D, batch, D)``."""
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=D)), dtype=torch.float64)
    return signs[None, :, None, :].expand(n_states, -1, batch, -1)


def test_frobenius_of_a_linear_field_is_exact_in_expectation() -> None:
    """f = M z on [0, T]: R_F = T |M|_F^2. The expectation over Rademacher probes is the mean
    over all 2^d sign vectors; with those as probes the estimate is exact (any states, any
    checkpoint times: the trapezoid rule integrates a constant exactly)."""
    m = _matrix()
    times = torch.tensor([0.0, 0.1, 0.45, 0.9, T], dtype=torch.float64)
    states = torch.randn(len(times), B, D, dtype=torch.float64)
    value = jacobian_frobenius_penalty(
        lambda t, z: z @ m.T, times, states, probe_vectors=_all_signs(len(times), B)
    )
    assert float(value) == pytest.approx(T * float(m.pow(2).sum()), rel=1e-12)


def _hutchinson_se(m: torch.Tensor, weights: torch.Tensor, batch: int, probes: int) -> float:
    """Standard error of sum_k w_k mean_{i,p} |M^T v|^2 with independent Rademacher v:
    Var(v^T A v) = 2 (|A|_F^2 - sum_j A_jj^2) for A = M M^T (symmetric)."""
    a = m @ m.T
    var = 2.0 * (float(a.pow(2).sum()) - float(a.diagonal().pow(2).sum()))
    return math.sqrt(var * float(weights.pow(2).sum()) / (batch * probes))


def test_frobenius_of_a_linear_field_is_within_hutchinson_standard_error() -> None:
    """Through the shell (recorded solve, default probes = 1): per step within 4 standard
    errors of T |M|_F^2, and the mean of 40 steps (independent probes: the step seeds the
    generator) within 4 standard errors of the mean."""
    m = _matrix()
    exact = T * float(m.pow(2).sum())
    z0 = torch.randn(B, D, dtype=torch.float64)
    term = JacobianFrobenius(1.0, seed=3)
    assert term.probes == 1  # the default probe count
    estimates = []
    for step in range(40):
        values, rec = _terms(Field(_linear(m)), z0, [term], steps=20, step=step)
        estimates.append(float(values["jacobian_frobenius"]))
    times = rec.records[0].traj.times
    h = times.diff()
    weights = torch.zeros_like(times)
    weights[:-1] += h / 2
    weights[1:] += h / 2  # the trapezoid weights, summing to T
    se = _hutchinson_se(m, weights, B, 1)
    est = torch.tensor(estimates)
    assert float((est - exact).abs().max()) < 4.5 * se
    assert abs(float(est.mean()) - exact) < 4 * se / math.sqrt(len(est))
    assert float(est.std()) == pytest.approx(se, rel=0.35)  # the spread is Hutchinson's
    assert len(set(estimates)) == len(estimates)  # each step drew its own probes


def test_both_terms_are_zero_for_a_zero_field() -> None:
    """f = 0 (a function of nothing, and a zero linear layer): both terms exactly 0."""
    z0 = torch.randn(B, D, dtype=torch.float64)
    terms = [KineticEnergy(1.0), JacobianFrobenius(1.0, probes=3)]
    for f in (lambda t, z: torch.zeros_like(z), Field(_linear(torch.zeros(D, D)))):
        values, _ = _terms(f, z0, terms, steps=10)
        assert float(values["kinetic_energy"]) == 0.0
        assert float(values["jacobian_frobenius"]) == 0.0


def test_functional_forms_pass_gradcheck_in_float64() -> None:
    """Finite differences in the parameters and the states (fixed probes: deterministic)."""
    g = torch.Generator().manual_seed(0)
    times = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    states = torch.randn(4, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    probes = torch.randint(0, 2, (4, 2, 3, 2), generator=g).double() * 2 - 1

    def frob(w, states):
        return jacobian_frobenius_penalty(
            lambda t, z: torch.tanh(z @ w.T) * (1 + t), times, states, probe_vectors=probes
        )

    assert torch.autograd.gradcheck(frob, (w, states))
    vel = torch.randn(4, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: kinetic_energy_penalty(times, v), (vel,))


class TupleField(nn.Module):
    """``(dz, dlogp) = (M z, |z|^2)`` on the tuple state ``(z, logp)``."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.lin = _linear(m)

    def forward(self, t, state):
        z = state[0]
        return self.lin(z), z.pow(2).sum(-1, keepdim=True)


def test_dims_keeps_a_cnf_state_to_z() -> None:
    """On a tuple state (z, logp), ``dims=d`` reads z only: the kinetic term equals the plain
    solve's, and with M = c Q (Q orthogonal: |M^T v|^2 = c^2 d for every sign vector) the
    Frobenius term is exactly T c^2 d; without ``dims`` the log p row adds to both."""
    q, _ = torch.linalg.qr(_matrix(4))
    m = 0.7 * q
    z0 = torch.randn(B, D, dtype=torch.float64)
    state = (z0, torch.zeros(B, 1, dtype=torch.float64))
    plain, _ = _terms(Field(_linear(m)), z0, [KineticEnergy(1.0)], steps=30)
    on_z, _ = _terms(
        TupleField(m), state, [KineticEnergy(1.0, dims=D), JacobianFrobenius(1.0, dims=D)], steps=30
    )
    torch.testing.assert_close(on_z["kinetic_energy"], plain["kinetic_energy"])
    assert float(on_z["jacobian_frobenius"]) == pytest.approx(T * 0.49 * D, rel=1e-10)
    whole, _ = _terms(TupleField(m), state, [KineticEnergy(1.0), JacobianFrobenius(1.0)], steps=30)
    assert float(whole["kinetic_energy"]) > 1.01 * float(plain["kinetic_energy"])
    assert float(whole["jacobian_frobenius"]) > 1.01 * T * 0.49 * D


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: KineticEnergy(weight=-1.0), "weight"),
        (lambda: KineticEnergy(dims=0), "dims"),
        (lambda: KineticEnergy(every_n_steps=0), "every_n_steps"),
        (lambda: JacobianFrobenius(probes=0), "probes"),
        (lambda: JacobianFrobenius(seed=-1), "seed"),
        (lambda: JacobianFrobenius(dims=1.5), "dims"),
        (lambda: JacobianFrobenius(warmup_steps=-1), "warmup_steps"),
        (lambda: kinetic_energy_penalty(torch.zeros(3), torch.zeros(2, 4, 2)), "times"),
        (lambda: kinetic_energy_penalty(torch.zeros(1), torch.zeros(1, 4, 2)), "velocities"),
        (
            lambda: jacobian_frobenius_penalty(
                lambda t, z: z, torch.zeros(2), torch.zeros(2, 4, 2), probes=0
            ),
            "probes",
        ),
        (
            lambda: jacobian_frobenius_penalty(
                lambda t, z: z,
                torch.zeros(2),
                torch.zeros(2, 4, 2),
                probe_vectors=torch.ones(2, 1, 4),
            ),
            "probe_vectors",
        ),
    ],
)
def test_bad_arguments_are_refused_naming_them(build, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        build()


class Model(RegularizedODEModule):
    def __init__(self, regs) -> None:
        super().__init__(regularizers=regs)
        self.field = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        self.logged: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        z = odeint(
            lambda t, z: self.field(z),
            x,
            torch.tensor([0.0, 1.0]),
            method="rk4",
            options={"step_size": 0.25},
        )
        return z[-1].pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.logged.append({k: float(v) for k, v in self.trainer.callback_metrics.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_kinetic_energy_in_training_lowers_the_field_norm_and_logs() -> None:
    """In a module (lr > 0): reg/kinetic_energy is logged every step, and a large weight
    drives it down against the same model without the term (rk4 on a fixed grid)."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 2))
    finals = {}
    for weight in (0.0, 2.0):
        L.seed_everything(0, verbose=False)
        # weight 1e-12 instead of 0: an inactive term (weight 0) is neither applied nor logged
        model = Model([KineticEnergy(weight if weight else 1e-12), JacobianFrobenius(0.01)])
        trainer = L.Trainer(
            max_epochs=3,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
        assert all(
            "reg/kinetic_energy" in row and "reg/jacobian_frobenius" in row for row in model.logged
        )
        finals[weight] = model.logged[-1]["reg/kinetic_energy_step"]
    assert finals[2.0] < 0.5 * finals[0.0]


def test_cnf_log_prob_of_a_linear_field_equals_the_change_of_variables() -> None:
    """CNF2D with the field's network replaced by a linear map of ``[z, t]`` (``f = A z``):
    ``z(T) = exp(A T) x`` and ``log p(x) = log N(exp(A T) x) + T tr(A)``. Evaluation uses the
    exact trace; training mode Hutchinson's, exact here for a diagonal A (|eps_i| = 1)."""
    from ode_reg.models import CNF2D

    torch.manual_seed(0)
    x = torch.randn(5, 2, dtype=torch.float64)
    for a, modes in (
        (torch.tensor([[0.3, -0.5], [0.8, -0.2]]), ("eval",)),
        (torch.tensor([[0.4, 0.0], [0.0, -0.7]]), ("eval", "train")),
    ):
        a = a.double()
        model = CNF2D(hidden_dim=4, horizon=0.8, rtol=1e-10, atol=1e-10).double()
        lin = nn.Linear(3, 2, bias=False).double()
        with torch.no_grad():
            lin.weight.zero_()
            lin.weight[:, :2] = a
        model.field.net = lin
        z1 = x @ torch.linalg.matrix_exp(a * 0.8).T
        want = -0.5 * (z1.pow(2).sum(-1) + 2 * math.log(2 * math.pi)) + 0.8 * float(a.trace())
        for mode in modes:
            model.train(mode == "train")
            with torch.no_grad():
                got = model.log_prob(x)
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def test_terms_travel_in_the_checkpoint_and_redraw_the_same_probes() -> None:
    """Rebuilt from their checkpoint spec and state dict (as RegularizersInCheckpoint does),
    the terms keep their arguments, and JacobianFrobenius its probe seed: the same step draws
    the same probes, so a resumed run's estimate equals the uninterrupted one."""
    from ode_reg.models._checkpoint import build_regularizer, regularizer_spec

    jf = JacobianFrobenius(0.02, probes=3, dims=2, every_n_steps=2)
    ke = KineticEnergy(0.03, dims=2, warmup_steps=5)
    new_jf = build_regularizer(regularizer_spec(jf))
    new_jf.load_state_dict(jf.state_dict())
    new_ke = build_regularizer(regularizer_spec(ke))
    assert (new_jf.weight, new_jf.probes, new_jf.dims, new_jf.every_n_steps) == (0.02, 3, 2, 2)
    assert (new_ke.weight, new_ke.dims, new_ke.warmup_steps) == (0.03, 2, 5)
    z0 = torch.randn(B, D, dtype=torch.float64)
    f = Field(_linear(_matrix()))
    a, _ = _terms(f, z0, [jf], steps=10, step=7)
    b, _ = _terms(f, z0, [new_jf], steps=10, step=7)
    c, _ = _terms(f, z0, [new_jf], steps=10, step=8)
    assert float(a["jacobian_frobenius"]) == float(b["jacobian_frobenius"])
    assert float(c["jacobian_frobenius"]) != float(a["jacobian_frobenius"])


def test_functional_kinetic_energy_is_per_sample_then_batch_mean() -> None:
    """Against a hand loop: per sample the trapezoid of |f_i|^2 over non-uniform times, then
    the mean over the batch (dim 1); a (K + 1, B) stack is B scalar samples."""
    g = torch.Generator().manual_seed(5)
    times = torch.tensor([0.0, 0.2, 0.9, 1.0, 1.7], dtype=torch.float64)
    vel = torch.randn(5, 4, 2, 3, dtype=torch.float64, generator=g)
    per_sample = []
    for i in range(4):
        sq = [float(vel[k, i].pow(2).sum()) for k in range(5)]
        per_sample.append(
            sum(0.5 * (sq[k] + sq[k + 1]) * float(times[k + 1] - times[k]) for k in range(4))
        )
    assert float(kinetic_energy_penalty(times, vel)) == pytest.approx(sum(per_sample) / 4)
    flat = vel[..., 0, 0]
    want = torch.trapezoid(flat.pow(2), times, dim=0).mean()
    assert float(kinetic_energy_penalty(times, flat)) == pytest.approx(float(want))
    # backwards in time: the same non-negative value
    assert float(kinetic_energy_penalty(times.flip(0), vel.flip(0))) == pytest.approx(
        sum(per_sample) / 4
    )
