"""``AdjointMagnitude(subsample=m)``: the sub-batch estimator of the per-sample adjoint term
(MATH.md, Sub-batch estimator), against the exact term (``subsample=None``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ode_reg import AdjointMagnitude, odeint
from ode_reg.functional import adjoint_magnitude_penalty
from ode_reg.recording import StepRecorder
from ode_reg.terms import step_terms

B, D = 10, 3
RK4 = {"method": "rk4", "options": {"step_size": 0.1}}
TIGHT = {"rtol": 1e-10, "atol": 1e-12}  # dopri5 with steps fine enough that its re-solves agree


def _step(kw: dict, t: torch.Tensor | None = None, read: int = -1):
    """A float64 step: an MLP field and a linear head after the solve (so the reference
    cotangent depends on parameters), recorded; returns (loss, records, params)."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        field = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, D)).double()
        head = nn.Linear(D, D).double()
    y0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64) if t is None else t
    rec = StepRecorder(adjoint_inputs=True)
    with rec.active():
        zs = odeint(lambda s, z: field(z), y0, t, **kw)
        loss = (head(zs[read]) - target).pow(2).mean()
    return loss, rec.records, [*field.parameters(), *head.parameters()]


def _value(loss, records, params, term, step=0):
    out = step_terms(loss, records, [term], step=step, params=params)
    return out.values[term.name], out


@pytest.mark.parametrize("kw", [RK4], ids=["rk4"])
def test_mean_over_all_single_draws_is_the_exact_term_and_gradient(kw):
    """Fixed grid: the re-solve of one sample takes the batch's steps, so the mean over the B
    possible single-sample draws is the exact term, value and gradient (through the
    re-solve and through the reference cotangent of the head)."""
    loss, records, params = _step(kw)
    exact, _ = _value(loss, records, params, AdjointMagnitude())
    g_exact = torch.autograd.grad(exact, params, retain_graph=True)
    _, out = _value(loss, records, params, AdjointMagnitude(subsample=1, seed=0))
    ctx = out.chains[0]
    vals, grads = [], []
    for i in range(B):
        v = adjoint_magnitude_penalty(ctx.subsampled_flow_adjoints(1, draw=torch.tensor([i])))
        vals.append(v.detach())
        grads.append(torch.autograd.grad(v, params, retain_graph=True, allow_unused=True))
    assert float(exact.detach()) > 1e-4
    torch.testing.assert_close(torch.stack(vals).mean(), exact.detach(), rtol=1e-8, atol=0)
    for j, ge in enumerate(g_exact):
        mean_g = torch.stack([gs[j] for gs in grads]).mean(0)
        torch.testing.assert_close(mean_g, ge, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("kw", [RK4, TIGHT], ids=["rk4", "dopri5_tight"])
def test_mean_over_seeded_draws_within_its_standard_error(kw):
    """The mean over many steps' draws (m = 3 of 10) equals the exact term within 4 standard
    errors of that mean (the SE from the draws); the batch's adjoints are not computed."""
    loss, records, params = _step(kw)
    exact, _ = _value(loss, records, params, AdjointMagnitude())
    term = AdjointMagnitude(subsample=3, seed=1)
    draws = []
    for step in range(120):
        v, out = _value(loss, records, params, term, step)
        assert out.adjoints is None  # no batch backward with graph for the estimator
        draws.append(v.detach())
    x = torch.stack(draws)
    se = x.std() / len(draws) ** 0.5
    assert float(se) > 0  # the draws do differ
    gap = float(x.mean() - exact.detach())
    assert abs(gap) < 4 * float(se), (float(x.mean()), float(exact.detach()), float(se))


@pytest.mark.parametrize("kw", [{}, RK4], ids=["dopri5", "rk4"])
@pytest.mark.parametrize("m", [B, B + 5])
def test_m_at_least_batch_is_the_exact_term(kw, m):
    loss, records, params = _step(kw)
    exact, _ = _value(loss, records, params, AdjointMagnitude())
    full, out = _value(loss, records, params, AdjointMagnitude(subsample=m, seed=0))
    assert out.adjoints is not None  # the exact path
    assert abs(float((full - exact).detach())) <= 1e-10
    for a, b in zip(
        torch.autograd.grad(full, params, retain_graph=True),
        torch.autograd.grad(exact, params, retain_graph=True),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_bad_subsample_refused_by_name(bad):
    with pytest.raises(ValueError, match="`subsample` must be an integer >= 1"):
        AdjointMagnitude(subsample=bad)


def test_bad_seed_refused_by_name():
    with pytest.raises(ValueError, match="`seed` must be an integer >= 0"):
        AdjointMagnitude(subsample=2, seed=-1)


def test_draws_are_seeded_by_step_and_restored_from_run_state():
    loss, records, params = _step(RK4)
    a = AdjointMagnitude(subsample=2)  # base seed drawn from torch's generator
    b = AdjointMagnitude(subsample=2)
    b.load_run_state(a.run_state())
    values = [float(_value(loss, records, params, a, s)[0].detach()) for s in range(6)]
    assert values == [float(_value(loss, records, params, b, s)[0].detach()) for s in range(6)]
    assert len(set(values)) > 1  # other steps, other draws
    assert "base_seed" not in AdjointMagnitude().run_state()  # the exact term: unchanged


def test_a_chain_it_cannot_resolve_is_refused_with_the_fix():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    loss, records, params = _step(RK4, t=t, read=1)  # reads z(0.5), not the last output
    with pytest.raises(ValueError, match=r"subsample=2.*last output.*subsample=None"):
        _value(loss, records, params, AdjointMagnitude(subsample=2, seed=0))


def test_module_step_adds_the_estimate_and_trains_on_it():
    """Through :class:`~ode_reg.RegularizedODEModule`: the returned loss is the task loss plus
    ``weight * R̂`` (the step's draw, as ``step_terms`` computes it), and its backward reaches
    the field's parameters through the re-solve."""
    import warnings

    import ode_reg

    term = AdjointMagnitude(0.5, subsample=3, seed=2)
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    class Model(ode_reg.RegularizedODEModule):
        def __init__(self) -> None:
            super().__init__(regularizers=[term])
            torch.manual_seed(0)
            self.field = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, D)).double()
            self.head = nn.Linear(D, D).double()  # as in _step
            self.task = None

        def training_step(self, batch, batch_idx):
            zs = odeint(lambda s, z: self.field(z), batch, t, **RK4)
            self.task = (self.head(zs[-1]) - target).pow(2).mean()
            return self.task

    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total = model.training_step(y0, 0)
    estimate = (total - model.task).detach() / 0.5
    params = list(model.field.parameters())
    grads = torch.autograd.grad(total - model.task, params, retain_graph=True)
    assert all(torch.isfinite(gr).all() for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)
    loss, records, ps = _step(RK4)
    expected, _ = _value(loss, records, ps, term, step=0)
    torch.testing.assert_close(estimate, expected.detach(), rtol=1e-9, atol=0)
