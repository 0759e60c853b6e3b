"""Per-sample terms are scale-free (MATH.md, Reached samples, scale-free) and see the batch
components of tuple states (MATH.md, Tuple states).

References are hand-written: a 3/8-rule RK4 loop (torchdiffeq's ``rk4`` step, written out
here) with ``torch.autograd`` for the adjoints.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ode_reg import AdjointMagnitude, odeint
from ode_reg.recording import StepRecorder
from ode_reg.terms import REACHED_FRACTION, step_terms

F64 = torch.float64
STEP = 0.25


def rk4_states(f, z0: torch.Tensor, steps: int, dt: float) -> list[torch.Tensor]:
    """States at the grid points of a fixed-step 3/8-rule RK4 solve (torchdiffeq's ``rk4``)."""
    zs = [z0]
    z, t = z0, 0.0
    for _ in range(steps):
        k1 = f(t, z)
        k2 = f(t + dt / 3, z + dt * k1 / 3)
        k3 = f(t + 2 * dt / 3, z + dt * (k2 - k1 / 3))
        k4 = f(t + dt, z + dt * (k1 - k2 + k3))
        z = z + dt * (k1 + 3 * (k2 + k3) + k4) / 8
        t += dt
        zs.append(z)
    return zs


def module_value(field: nn.Module, loss_of, z0: torch.Tensor, y0=None) -> torch.Tensor:
    term = AdjointMagnitude(weight=1.0)
    rec = StepRecorder(adjoint_inputs=True)
    with rec.active():
        out = odeint(
            field,
            z0 if y0 is None else y0,
            torch.tensor([0.0, 1.0], dtype=F64),
            method="rk4",
            options={"step_size": STEP},
        )
    loss = loss_of(out[-1] if y0 is None else out)
    res = step_terms(loss, rec.records, [term], step=0, params=list(field.parameters()))
    return res.values[term.name]


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 3).double()

    def forward(self, t, z):
        return torch.tanh(self.lin(z))


def test_logsumexp_batch_loss_gives_the_value_of_the_samples_that_carry_the_gradient() -> None:
    """A ``logsumexp`` over the batch: two samples carry the gradient (softmax weights ~0.95 and
    ~0.05), two have weights ~1e-39 and ~1e-44. ``AdjointMagnitude`` equals the hand
    computation ``mean_{k<K, i reached} (log|a_k,i| - log|a_K,i|)^2`` over the reached samples
    (``|a_K,i| > 1e-6 max_j |a_K,j|``) with no ``eps`` at all; counting the underflowed samples
    with an absolute ``eps`` floor (the earlier rule) reads a log-ratio of tens per checkpoint."""
    field = Field()
    head = torch.tensor([0.7, -0.4, 0.2], dtype=F64)
    offsets = torch.tensor([0.0, -3.0, -90.0, -100.0], dtype=F64)
    z0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))

    def loss_of(z_end: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(z_end @ head + offsets, dim=0)

    got = module_value(field, loss_of, z0)

    # Hand computation: an independent solve, autograd adjoints, plain logs.
    zs = rk4_states(lambda t, z: torch.tanh(field.lin(z)), z0.requires_grad_(True), 4, STEP)
    loss = loss_of(zs[-1])
    adj = torch.stack(torch.autograd.grad(loss, zs))  # (K + 1, B, d)
    norms = adj.norm(dim=-1)
    reached = norms[-1] > REACHED_FRACTION * norms[-1].max()
    assert reached.tolist() == [True, True, False, False]
    assert float(norms[-1, 2:].max()) < 1e-35  # underflowed weights, still non-zero
    logs = norms[:, reached].log()
    want = (logs[:-1] - logs[-1]).pow(2).mean()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    assert float(want) < 1.0
    # Scale-free: the value does not depend on how much the loss weighs the samples (here, a
    # loss scaled by 1e-30 underflows nothing: the reached samples and their ratios are the same).
    scaled = module_value(field, lambda z: 1e-30 * loss_of(z), z0.detach())
    torch.testing.assert_close(scaled, want, rtol=1e-9, atol=0)


class CNF(nn.Module):
    """A toy CNF: ``dz/dt = tanh(W z + b)``, ``d log p/dt = -tr(df/dz)`` (exact), and
    optionally a 0-dim accumulator ``d acc/dt = mean_i |f(z_i)|^2`` (RNODE-style)."""

    def __init__(self, accumulator: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.lin = nn.Linear(2, 2).double()
        self.accumulator = accumulator

    def parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.lin(z))
        div = ((1 - h.pow(2)) * torch.diagonal(self.lin.weight)).sum(-1, keepdim=True)
        return h, -div

    def forward(self, t, state):
        dz, dlogp = self.parts(state[0])
        if not self.accumulator:
            return dz, dlogp
        return dz, dlogp, dz.pow(2).sum(-1).mean()


def cnf_loss(out) -> torch.Tensor:
    z, logp = out[0][-1], out[1][-1]
    loss = (0.5 * z.pow(2).sum(-1) - logp.squeeze(-1)).mean()
    if len(out) == 3:
        loss = loss + 0.0 * out[2][-1]  # the accumulator, with coefficient 0
    return loss


def test_zero_dim_accumulator_leaves_the_tuple_state_term_unchanged() -> None:
    """FFJORD's ``(z, log p)`` plus a 0-dim accumulator (coefficient 0, the task loss
    unchanged): the per-sample rows come from the components with the batch dimension, so the
    accumulator is left out and ``AdjointMagnitude`` is the same (it was the whole batch as one
    sample before)."""
    z0 = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    logp0 = torch.zeros(5, 1, dtype=F64)
    plain = CNF(accumulator=False)
    with_acc = CNF(accumulator=True)
    with_acc.load_state_dict(plain.state_dict())
    v2 = module_value(plain, cnf_loss, z0, y0=(z0, logp0))
    v3 = module_value(with_acc, cnf_loss, z0, y0=(z0, logp0, torch.zeros((), dtype=F64)))
    assert float(v2) > 1e-4
    torch.testing.assert_close(v3, v2, rtol=1e-12, atol=0)


def test_named_components_give_the_hand_computed_value_over_z_only() -> None:
    """``components=(0,)`` (a CNF's ``z``, not ``log p``): the term equals the hand computation
    from ``a_z`` alone, on an independent RK4 solve of the concatenated state."""
    field = CNF(accumulator=False)
    z0 = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    logp0 = torch.zeros(5, 1, dtype=F64)
    term = AdjointMagnitude(weight=1.0)
    rec = StepRecorder(adjoint_inputs=True)
    with rec.active():
        out = odeint(
            field,
            (z0, logp0),
            torch.tensor([0.0, 1.0], dtype=F64),
            method="rk4",
            options={"step_size": STEP},
            components=(0,),
        )
    res = step_terms(cnf_loss(out), rec.records, [term], step=0, params=list(field.parameters()))

    def flat(t, y):
        dz, dlogp = field.parts(y[:, :2])
        return torch.cat([dz, dlogp], dim=-1)

    ys = rk4_states(flat, torch.cat([z0, logp0], -1).requires_grad_(True), 4, STEP)
    loss = (0.5 * ys[-1][:, :2].pow(2).sum(-1) - ys[-1][:, 2]).mean()
    adj = torch.stack(torch.autograd.grad(loss, ys))[..., :2]  # a_z only
    logs = adj.norm(dim=-1).log()
    want = (logs[:-1] - logs[-1]).pow(2).mean()
    torch.testing.assert_close(res.values[term.name], want, rtol=1e-9, atol=0)
    # with log p as well (the default), the value is another one
    both = module_value(field, cnf_loss, z0, y0=(z0, logp0))
    assert abs(float(both) - float(want)) > 1e-3 * float(want)


def test_components_are_checked_before_solving() -> None:

    z0, logp0 = torch.zeros(3, 2), torch.zeros(3, 1)
    with pytest.raises(ValueError, match="`components`"):
        odeint(
            lambda t, y: y, (z0, logp0, torch.zeros(())), torch.tensor([0.0, 1.0]), components=(2,)
        )
    with pytest.raises(ValueError, match="`components`"):
        odeint(lambda t, y: y, z0, torch.tensor([0.0, 1.0]), components=(0,))


def test_skew_term_on_a_cnf_sees_the_named_components_only() -> None:
    """A linear CNF ``dz/dt = M z``, ``d log p/dt = -tr M`` with ``M = D + (A - A^T)``:
    with ``components=(0,)`` the term is ``T^2 |sym M|_F^2 / d_z = T^2 |D|_F^2 / 2`` exactly
    (every Rademacher probe gives ``|D v|^2 = |D|_F^2``), and a 0-dim accumulator changes
    nothing; the default (``z`` and ``log p``, d = 3) averages over the ``log p`` coordinate
    too."""
    from ode_reg import SkewJacobianPenalty
    from ode_reg.recording import SkewPlan

    a = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    diag = torch.diag(torch.tensor([0.5, -1.5], dtype=F64))
    m = (diag + a - a.T).requires_grad_(True)

    def field(t, y):
        dz = y[0] @ m.T
        dlogp = -torch.trace(m) * torch.ones_like(y[1])
        if len(y) == 2:
            return dz, dlogp
        return dz, dlogp, dz.pow(2).sum(-1).mean()

    z0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    logp0 = torch.zeros(4, 1, dtype=F64)

    def value(y0, components=None) -> float:
        term = SkewJacobianPenalty(weight=1.0, probes=2, seed=3)
        rec = StepRecorder(skew=SkewPlan(2, None, term.generator(0, torch.device("cpu"))))
        with rec.active():
            out = odeint(
                field,
                y0,
                torch.tensor([0.0, 2.0], dtype=F64),
                method="rk4",
                options={"step_size": 0.5},
                components=components,
            )
        loss = out[0][-1].pow(2).sum() + out[1][-1].sum()
        return float(step_terms(loss, rec.records, [term], step=0, params=[m]).values[term.name])

    closed = 2.0**2 * float(diag.pow(2).sum())
    assert value((z0, logp0), (0,)) == pytest.approx(closed / 2, rel=1e-12)
    acc = torch.zeros((), dtype=F64)
    assert value((z0, logp0, acc), (0,)) == pytest.approx(closed / 2, rel=1e-12)
    assert value((z0, logp0, acc)) == pytest.approx(closed / 3, rel=1e-12)
    assert value((z0, logp0)) == pytest.approx(closed / 3, rel=1e-12)


def test_adaptive_coupling_does_not_carry_the_weights_into_a_light_sample() -> None:
    """dopri5 picks one step size per batch, so a heavy sample's adjoint leaks into a light
    one's. With reached weights spread over more than ``UNEQUAL_SPREAD`` the flow-only adjoint
    uses unit cotangents: the term is the same for weights (1, 1e-4, 1e-5) and (1, 1e-2, 1e-5)
    (the forward solve is the same; only the weights differ). With ``a_k`` itself (the
    shortcut), the light samples' values would follow the heavy one's weight."""
    from ode_reg.terms import UNEQUAL_SPREAD

    field = Field()
    z0 = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    target = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(8))

    def value(weights) -> float:
        term = AdjointMagnitude(weight=1.0)
        rec = StepRecorder(adjoint_inputs=True)
        with rec.active():
            out = odeint(field, z0, torch.tensor([0.0, 2.0], dtype=F64), rtol=1e-5, atol=1e-7)
        per_sample = (out[-1] - target).pow(2).sum(-1)
        loss = (torch.tensor(weights, dtype=F64) * per_sample).sum()
        res = step_terms(loss, rec.records, [term], step=0, params=list(field.parameters()))
        assert int(res.chains[0].reached_samples().sum()) == 3
        return float(res.values[term.name])

    assert 1e-4 / 1e-5 < UNEQUAL_SPREAD < 1 / 1e-5
    a, b = value([1.0, 1e-4, 1e-5]), value([1.0, 1e-2, 1e-5])
    assert a == pytest.approx(b, rel=1e-9)
    assert a > 1e-4
