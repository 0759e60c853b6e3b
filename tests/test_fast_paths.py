"""The fast paths against the direct implementations they replace (float64, 1e-10).

- ``integrate`` is one ``torchdiffeq.odeint`` call (the checkpoints are its step states);
- the training step evaluates the field at all checkpoints of a solve in one ``vmap`` call
  during the solve (``StepRecorder._batched``) instead of one checkpoint at a time;
- the functional ``sensitivities`` takes the partial derivative by substituted parameters, all checkpoints
  of a group in one ``vmap`` call (``_sensitivities_vmap``), or one checkpoint at a time with
  ``p.view_as(p)`` aliases (``_sensitivities_aliased``), instead of one VJP per checkpoint at
  a detached state plus the zero-valued ``_through_state`` term (``_sensitivities_direct``);
- the recorder's skew-Jacobian probes use plain-autograd double-VJPs at the live states
  (``recording._skew``), checked against ``skew_sum_loop`` (``torch.func.jvp``).

Values and gradients (of the penalties, in the field's parameters and in the initial state)
must agree, for a time-dependent MLP field, an ODE-RNN whose steps hold different inputs
(``ode_reg.trajectory.chain``) and an orthogonal flow (parameters reached through the
recorded ``W_k``).
"""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from torch import nn

import ode_reg._once
import ode_reg.adjoint as adj_mod
import ode_reg.recording
from ode_reg import (
    AdjointMagnitude,
    DirectionalConstraint,
    RegularizedODEModule,
    SensitivityMagnitude,
    SkewJacobianPenalty,
    adjoints,
    integrate,
    sensitivities,
)
from ode_reg._batched import group_points
from ode_reg.dynamics import AntisymmetricODEFunc, OrthogonalFlow
from ode_reg.functional import directional_penalty, sensitivity_magnitude_penalty
from ode_reg.functional.penalties import rademacher_probes
from ode_reg.models.fields import UnstructuredODEFunc
from ode_reg.recording import SkewPlan, _skew
from ode_reg.trajectory import chain

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class MLPField(nn.Module):
    """Non-autonomous ``W2 tanh(W1 z + b1 + t u) + b2``."""

    def __init__(self, d: int = 3, hidden: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(d, hidden).double()
        self.l2 = nn.Linear(hidden, d).double()
        self.u = nn.Parameter(0.7 * torch.randn(hidden, dtype=F64))

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(z) + t * self.u))


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def assert_grads_close(a, b):
    for u, v in zip(a, b):
        if u is None or v is None:
            assert (u is None or u.abs().max() == 0) and (v is None or v.abs().max() == 0)
        else:
            torch.testing.assert_close(u, v, **TOL)


# --------------------------------------------------------------------------- integrate


def odeint_per_interval(func, y0, grid, method, step_size):
    """The former path: one torchdiffeq.odeint call per checkpoint interval, chained."""
    opts = None if step_size is None else {"step_size": step_size}
    states, y = [y0], y0
    for k in range(1, grid.numel()):
        y = torchdiffeq.odeint(func, y, grid[k - 1 : k + 1], method=method, options=opts)[-1]
        states.append(y)
    return states


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("checkpoints, step", [(8, 1 / 40), (4, 0.05), ([0.1, 0.55, 0.6], 0.05)])
def test_integrate_is_torchdiffeqs_solve(method, checkpoints, step):
    """One torchdiffeq solve: the result equals odeint's to the bit, and the checkpoints are
    grid states, the explicit checkpoint times among them (MATH.md, Notation)."""
    f = MLPField(seed=1)
    y0 = rand(4, 3, seed=2).requires_grad_(True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    options = {"step_size": step}
    traj = integrate(f, y0, t, checkpoints=checkpoints, method=method, options=options)
    ref = torchdiffeq.odeint(f, y0, t, method=method, options=options)
    assert torch.equal(traj.ys, ref)
    wanted = (
        [j / checkpoints for j in range(checkpoints + 1)]
        if isinstance(checkpoints, int)
        else [0.0, *checkpoints, 1.0]
    )
    assert traj.times.tolist() == pytest.approx(wanted, abs=1e-12)
    # each checkpoint is the solver's state there: restarting odeint from it reproduces the end
    k = 1
    rest = torchdiffeq.odeint(
        f, traj.states[k], torch.stack([traj.times[k], t[-1]]), method=method, options=options
    )
    torch.testing.assert_close(rest[-1], ref[-1], rtol=1e-10, atol=1e-10)


def test_integrate_float32_rk4_matches_odeint_to_rounding():
    torch.manual_seed(3)
    f = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    y0 = torch.randn(16, 8)
    traj = integrate(
        lambda t, z: f(z), y0, torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 0.025}
    )
    ref = torchdiffeq.odeint(
        lambda t, z: f(z), y0, torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 0.025}
    )
    torch.testing.assert_close(traj.ys[-1], ref[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_integrate_rounding_onto_the_checkpoint(method):
    """ceil(0.14 / 0.01 + 1) = 16 step times whose 15th is already 0.14: torchdiffeq returns
    the solution there (its last step has length 0); the direct stepper ends the interval on
    the checkpoint instead of taking that step."""
    f = MLPField(seed=4)
    y0 = rand(2, 3, seed=5)
    grid = torch.tensor([0.0, 0.14], dtype=F64)
    opts = {"method": method, "options": {"step_size": 0.01}}
    traj = integrate(f, y0, grid, checkpoints=[], **opts)
    ref = torchdiffeq.odeint(f, y0, grid, **opts)
    if method == "euler":
        assert torch.equal(traj.ys[-1], ref[-1])
    else:
        torch.testing.assert_close(traj.ys[-1], ref[-1], rtol=1e-13, atol=1e-13)


def test_integrate_falls_back_to_odeint_for_other_options_and_callbacks():
    f = MLPField(seed=6)
    y0 = rand(2, 3, seed=7)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    a = integrate(f, y0, t, checkpoints=2, method="rk4", options={"step_size": 0.1})
    b = integrate(
        f, y0, t, checkpoints=2, method="rk4", options={"step_size": 0.1, "perturb": False}
    )
    torch.testing.assert_close(a.ys, b.ys, rtol=1e-13, atol=1e-13)

    class WithCallback(MLPField):
        def __init__(self):
            super().__init__(seed=6)
            self.calls = 0

        def callback_step(self, t0, y0, dt):
            self.calls += 1

    g = WithCallback()
    integrate(g, y0, t, checkpoints=2, method="rk4", options={"step_size": 0.1})
    assert g.calls == 10  # torchdiffeq ran the solve and called back at every step


# --------------------------------------------------------------------------- trajectories


def mlp_problem(k: int = 6, seed: int = 10):
    f = MLPField(seed=seed)
    y0 = rand(5, 3, seed=seed + 1).requires_grad_(True)
    target = rand(5, 3, seed=seed + 2)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    traj = integrate(f, y0, t, checkpoints=k, method="rk4", options={"step_size": 1 / 24})
    loss = (traj.ys[-1] - target).pow(2).sum(-1).mean()
    return [y0, *f.parameters()], list(f.parameters()), traj, loss


def ode_rnn_problem(cell: str = "antisymmetric", steps: int = 5, seed: int = 20):
    """An ODE-RNN: each sequence step holds its own input while the hidden state is solved
    over [0, 0.2]; the per-step trajectories are chained."""
    torch.manual_seed(seed)
    if cell == "antisymmetric":
        f = AntisymmetricODEFunc(4, gamma=0.1, input_dim=2, gated=True).double()
    else:
        f = UnstructuredODEFunc(4, input_dim=2).double()
    with torch.no_grad():
        f.bias.normal_()
    xs = rand(steps, 3, 2, seed=seed + 1)
    h0 = rand(3, 4, seed=seed + 2).requires_grad_(True)
    h, trajs = h0, []
    for x in xs:
        f.set_input(x)
        tr = integrate(
            f,
            h,
            torch.tensor([0.0, 0.2], dtype=F64),
            checkpoints=2,
            method="midpoint",
            options={"step_size": 0.05},
        )
        trajs.append(tr)
        h = tr.ys[-1]
    f.set_input(None)
    traj = chain(trajs)
    loss = (h - 0.3).pow(2).sum(-1).mean() + 0.1 * traj.states[4].pow(2).mean()
    return [h0, *f.parameters()], list(f.parameters()), traj, loss


def flow_problem(seed: int = 30):
    torch.manual_seed(seed)
    f = OrthogonalFlow(3, step="exp", step_size=0.1, b_std=1.0, learn_initial=True).double()
    y0 = rand(4, 3, seed=seed + 1).requires_grad_(True)
    traj = integrate(f, y0, torch.tensor([0.0, 1.0], dtype=F64), checkpoints=4, method="rk4")
    loss = (traj.ys[-1] - 0.5).pow(2).sum(-1).mean()
    return [y0, *f.parameters()], list(f.parameters()), traj, loss


PROBLEMS = {"mlp": mlp_problem, "ode_rnn": ode_rnn_problem, "flow": flow_problem}


def test_chained_ode_rnn_groups_its_held_inputs():
    _, _, traj, _ = ode_rnn_problem()
    groups = group_points(traj.points)
    assert len(groups) == 1 and groups[0].index == list(range(traj.num_checkpoints))
    assert groups[0].stacked == ["_input"]  # the inputs differ from step to step
    # ... and evaluating a group point reproduces field_at (its own held input).
    for k in (0, 3, 7):
        g = groups[0]
        z = traj.states[k]
        torch.testing.assert_close(
            g.evaluate(g.times[k], z, [v[k] for v in g.values]), traj.field_at(k, z)
        )


# --------------------------------------------------------------------------- sensitivities


def penalties_of(y):
    return sensitivity_magnitude_penalty(y) + directional_penalty(y, gamma=0.7, reference=0)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("path", ["vmap", "aliased"])
def test_full_sensitivities_equal_the_direct_implementation(problem, path):
    wrt, params, traj, loss = PROBLEMS[problem]()
    a = adjoints(loss, traj, create_graph=True)
    sub = adj_mod._Substitution.of(traj, params)
    assert sub is not None and sub.reaches_only_through(traj, params)
    if path == "vmap":
        y = adj_mod._sensitivities_vmap(
            traj, a, params, adj_mod.stacked_evaluations(traj, params, sub), True
        )
    else:
        y = adj_mod._sensitivities_aliased(traj, a, params, sub)
    y_ref = adj_mod._sensitivities_direct(traj, a, params, True, False)
    torch.testing.assert_close(y, y_ref, **TOL)
    # The public function takes the vmap path and agrees too.
    torch.testing.assert_close(sensitivities(traj, a, create_graph=True), y_ref, **TOL)
    g = torch.autograd.grad(penalties_of(y) + loss, wrt, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(penalties_of(y_ref) + loss, wrt, allow_unused=True)
    assert_grads_close(g, g_ref)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_detached_and_first_order_sensitivities_equal_the_direct_implementation(problem):
    wrt, params, traj, loss = PROBLEMS[problem]()
    a = adjoints(loss, traj, create_graph=True)
    y = sensitivities(traj, a, create_graph=True, detach_states=True)
    y_ref = adj_mod._sensitivities_direct(traj, a, params, True, True)
    torch.testing.assert_close(y, y_ref, **TOL)
    g = torch.autograd.grad(penalties_of(y), wrt, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(penalties_of(y_ref), wrt, retain_graph=True, allow_unused=True)
    assert_grads_close(g, g_ref)
    # First order (no graph): the monitors' use.
    a0 = adjoints(loss, traj)
    y0 = sensitivities(traj, a0)
    assert not y0.requires_grad
    torch.testing.assert_close(y0, adj_mod._sensitivities_direct(traj, a0, params, False, False))


def test_field_that_vmap_cannot_trace_falls_back_to_aliases(monkeypatch):
    monkeypatch.setattr(ode_reg._once, "SAID", ode_reg._once.SayOnce())  # said once per process

    class Branchy(MLPField):
        def forward(self, t, z):
            scale = 2.0 if float(t) > 0.5 else 1.0  # data-dependent Python control flow
            return scale * super().forward(t, z)

    f = Branchy(seed=40)
    y0 = rand(3, 3, seed=41).requires_grad_(True)
    traj = integrate(f, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4", checkpoints=4)
    loss = traj.ys[-1].pow(2).sum()
    a = adjoints(loss, traj, create_graph=True)
    params = list(f.parameters())
    sub = adj_mod._Substitution.of(traj, params)
    with pytest.raises(RuntimeError):  # what vmap raises on float(t): caught by name
        adj_mod.stacked_evaluations(traj, params, sub)
    with pytest.warns(UserWarning, match="cannot trace the field Branchy"):
        y = sensitivities(traj, a, create_graph=True)
    y_ref = adj_mod._sensitivities_direct(traj, a, params, True, False)
    torch.testing.assert_close(y, y_ref, **TOL)
    g = torch.autograd.grad(penalties_of(y), params, retain_graph=True)
    g_ref = torch.autograd.grad(penalties_of(y_ref), params)
    assert_grads_close(g, g_ref)


def test_field_with_cached_parameter_tensor_takes_the_direct_path():
    """A field that reads a tensor computed from its parameters before the solve: substituting
    the parameters would miss that path, so the check sends it to the direct implementation."""

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(rand(3, 3, seed=50))
            self.cache = None

        def forward(self, t, z):
            return torch.tanh(z @ self.cache)

    f = Cached()
    f.cache = f.w - f.w.T
    y0 = rand(2, 3, seed=51).requires_grad_(True)
    traj = integrate(f, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4", checkpoints=3)
    a = adjoints(traj.ys[-1].pow(2).sum(), traj, create_graph=True)
    params = [f.w]
    sub = adj_mod._Substitution.of(traj, params)
    assert sub is not None and not sub.reaches_only_through(traj, params)
    y = sensitivities(traj, a, create_graph=True)
    torch.testing.assert_close(y, adj_mod._sensitivities_direct(traj, a, params, True, False))
    assert y.abs().max() > 1e-3


def test_closure_field_parameters_take_the_direct_path():
    lin = nn.Linear(3, 3).double()
    y0 = rand(2, 3, seed=60).requires_grad_(True)
    traj = integrate(lambda t, z: torch.tanh(lin(z)), y0, [0.0, 1.0], method="rk4")
    params = list(lin.parameters())
    assert adj_mod._Substitution.of(traj, params) is None
    a = adjoints(traj.ys[-1].sum(), traj, create_graph=True)
    torch.testing.assert_close(
        sensitivities(traj, a, create_graph=True, params=params),
        adj_mod._sensitivities_direct(traj, a, params, True, False),
    )


# --------------------------------------------------------------------------- skew Jacobian


def skew_sum_loop(fields, states, vs):
    """Hand-written reference of ``sum_{k,p} mean_i |1/2 (J + J^T) v_{k,p,i}|^2``: one
    checkpoint and one probe at a time, ``J v`` by forward mode (``torch.func.jvp``) and
    ``J^T v`` by ``autograd.grad`` (the estimator computes both by a double VJP on one stacked
    evaluation)."""
    total = states.new_zeros(())
    for k, f in enumerate(fields):
        z = states[k]
        if not z.requires_grad:
            z = z.detach().requires_grad_(True)
        for v in vs[k]:
            out, jv = torch.func.jvp(f, (z,), (v,))
            (jtv,) = torch.autograd.grad(out, z, v, create_graph=True)
            sv = 0.5 * (jv + jtv)
            total = total + sv.pow(2).flatten(1).sum(1).mean()
    return total


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("probes", [1, 2])
def test_recorded_skew_probes_equal_the_loop(problem, probes):
    """The skew-Jacobian value the recorder computes during the solve (one stacked ``vmap``
    evaluation, double VJP) equals the hand-written ``skew_sum_loop`` (torch.func jvp, one
    checkpoint at a time) with the same probes: value and gradient."""
    wrt, _, traj, _ = PROBLEMS[problem]()
    ks = list(range(traj.num_checkpoints))
    total, count = _skew(traj, SkewPlan(probes, None, torch.Generator().manual_seed(3)))
    per_sample = traj.states[0].numel() / traj.states[0].shape[0]
    r = total / count * per_sample  # undo the 1/d normalisation: the batch mean of |S v|^2
    vs = rademacher_probes([traj.states[k] for k in ks], probes, torch.Generator().manual_seed(3))
    fields = [lambda x, _k=k: traj.field_at(_k, x) for k in ks]
    states = torch.stack([traj.states[k] for k in ks])
    r_ref = skew_sum_loop(fields, states, vs) / (len(ks) * probes)
    torch.testing.assert_close(r, r_ref, **TOL)
    assert r > 1e-6
    g = torch.autograd.grad(r, wrt, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(r_ref, wrt, allow_unused=True)
    assert_grads_close(g, g_ref)


# --------------------------------------------------------------------------- a whole step


class StepModel(RegularizedODEModule):
    def __init__(self, regularizers):
        super().__init__(regularizers=regularizers)
        self.field = MLPField(seed=70)
        self.head = nn.Linear(3, 2).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        zs = self.odeint(
            self.field,
            x,
            torch.tensor([0.0, 1.0], dtype=F64),
            checkpoints=5,
            method="rk4",
            options={"step_size": 1 / 20},
        )
        return (self.head(zs[-1]) - y).pow(2).mean()


def all_regularizers():
    return [
        AdjointMagnitude(0.3),
        SensitivityMagnitude(0.2),
        DirectionalConstraint(gamma=0.9, weight=0.5),
        SkewJacobianPenalty(0.7, probes=2, seed=5),
    ]


def test_training_step_with_all_terms_equals_the_direct_implementations(monkeypatch):
    x, y = rand(6, 3, seed=71), rand(6, 2, seed=72)

    def step():
        model = StepModel(all_regularizers())
        loss = model.training_step((x, y), 0)
        params = [p for p in model.parameters() if p.requires_grad]
        return loss, torch.autograd.grad(loss, params)

    loss, grads = step()
    # the direct implementation: the field evaluated checkpoint by checkpoint at a detached
    # state (plus the through-state term), not in one vmap call per solve
    monkeypatch.setattr(ode_reg.recording.StepRecorder, "_batched", lambda *a: None)
    loss_ref, grads_ref = step()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert_grads_close(grads, grads_ref)


def test_a_satisfied_hinge_adds_its_value_without_its_graph():
    """A term of value exactly 0 (sum of squares: zero gradient) is added without its graph,
    so the backward does not walk the adjoints' double-backward graph; the gradient is
    unchanged (the task loss's)."""
    x, y = rand(6, 3, seed=73), rand(6, 2, seed=74)
    model = StepModel([DirectionalConstraint(gamma=-1.0, weight=0.5)])
    out = model.training_step((x, y), 0)
    task = (model.head(model.ode_step.trajectories[0].ys[-1]) - y).pow(2).mean()
    assert float(out) == pytest.approx(float(task), rel=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    assert_grads_close(
        torch.autograd.grad(out, params, retain_graph=True), torch.autograd.grad(task, params)
    )
    # The returned loss is task + (weighted value, a constant): one branch of its graph.
    branches = [nxt for nxt, _ in out.grad_fn.next_functions if nxt is not None]
    assert len(branches) == 1 and "Mean" in type(branches[0]).__name__

    class Linear(DirectionalConstraint):  # a term that is 0 with a nonzero gradient
        zero_value_has_zero_gradient = False

        def compute(self, ctx):
            return super().compute(ctx) + (
                ctx.sensitivities()[0].sum() - ctx.sensitivities()[0].sum().detach()
            )

    model = StepModel([Linear(gamma=-1.0, weight=0.5)])
    out = model.training_step((x, y), 0)
    task = (model.head(model.ode_step.trajectories[0].ys[-1]) - y).pow(2).mean()
    g = torch.autograd.grad(out - task, [model.field.l1.weight], allow_unused=True)[0]
    assert g is not None and g.abs().max() > 1e-6  # kept: its gradient is not zero
