"""Drop-in on code written the way public neural-ODE projects write it (issue 10).

Each model is first written as a plain LightningModule that imports torchdiffeq's ``odeint``
(shapes taken from torchdiffeq's examples — ``ode_demo``, ``odenet_mnist``'s ODEBlock,
``latent_ode``'s ODE-RNN encoder that solves backwards between observations — and from
Lightning latent-ODE code with tuple states and ``odeint_adjoint``). The converted model is
made from that *source* by changing exactly the import and the base class. Then:

- with no active term, the converted step's loss, gradient and field evaluations equal the
  plain model's (1e-6 relative);
- with a term, the returned loss is ``task + weight * R`` with ``R`` computed here by an
  independent reference: torchdiffeq's solve re-run with a hand-written step recorder, the
  checkpoints chosen as MATH.md says, and the penalty written out from its definition.
"""

from __future__ import annotations

import textwrap
import warnings
from typing import Any

import pytest
import torch
import torchdiffeq
from torch import nn

import ode_reg
import ode_reg._once
from ode_reg import (
    DEFAULT_CHECKPOINTS,
    AdjointMagnitude,
    DirectionalConstraint,
    SensitivityMagnitude,
    SkewJacobianPenalty,
)

F64 = torch.float64

# --------------------------------------------------------------------------- plain sources
HEADER = """
import torch
import lightning as L
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

class Field(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.l1 = nn.Linear(d, 8)
        self.l2 = nn.Linear(8, d)
        self.nfe = 0
    def forward(self, t, z):
        self.nfe += 1
        return torch.tanh(self.l2(torch.tanh(self.l1(z))))
"""

SOURCES = {
    # torchdiffeq's odenet_mnist: the solve lives in a submodule's forward.
    "ode_block": """
class ODEBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.odefunc = Field(d)
        self.register_buffer("integration_time", torch.tensor([0.0, 1.0]))
    def forward(self, x):
        out = odeint(self.odefunc, x, self.integration_time, rtol=1e-3, atol=1e-3)
        return out[1]

class Model(L.LightningModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.block = ODEBlock(3)
        self.head = nn.Linear(3, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.head(self.block(x)) - y).pow(2).mean()
""",
    # latent_ode: an ODE-RNN encoder runs backwards in time between observations (a closure over
    # the loop's observation), then a decoder solves forward from the latent state.
    "latent_ode": """
class Model(L.LightningModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.enc_field = Field(3)
        self.cell = nn.GRUCell(2, 3)
        self.dec_field = Field(3)
        self.out = nn.Linear(3, 2)
    def training_step(self, batch, batch_idx):
        x, ts = batch
        h = torch.zeros(x.shape[0], 3)
        for i in reversed(range(1, len(ts))):
            span = torch.stack([ts[i], ts[i - 1]])
            h = odeint(self.enc_field, h, span, method="rk4", options={"step_size": 0.05})[-1]
            h = self.cell(x[:, i - 1], h)
        zs = odeint(self.dec_field, h, ts, method="rk4", options={"step_size": 0.05})
        return (self.out(zs).transpose(0, 1) - x).pow(2).mean()
""",
    # A Lightning latent ODE with a tuple state (position, velocity) under odeint_adjoint.
    "tuple_adjoint": """
class TupleField(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.nfe = 0
    def forward(self, t, state):
        self.nfe += 1
        x, v = state
        return v, torch.tanh(self.lin(x)) - 0.1 * v

class Model(L.LightningModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.field = TupleField()
    def training_step(self, batch, batch_idx):
        x, v = batch
        xs, vs = odeint_adjoint(self.field, (x, v), torch.linspace(0, 1, 5), rtol=1e-5, atol=1e-6)
        return xs[-1].pow(2).mean() + 0.1 * vs.pow(2).mean()
""",
    # ode_demo: dopri5 with 100 output times and a loss that reads every output.
    "dopri5_100_all": """
class Model(L.LightningModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.func = Field(2)
    def training_step(self, batch, batch_idx):
        y0, target = batch
        pred = odeint(self.func, y0, torch.linspace(0, 1, 100))
        return (pred - target).abs().mean()
""",
    # A loss that does not read the last time: it reads z(0.5) of a solve over [0, 1].
    "not_last": """
class Model(L.LightningModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.func = Field(3)
    def training_step(self, batch, batch_idx):
        z0, y = batch
        zs = odeint(self.func, z0, torch.tensor([0.0, 0.5, 1.0]), method="rk4",
                    options={"step_size": 0.125})
        return (zs[1] - y).pow(2).mean()
""",
    # Two parallel branches from one encoder output (same shapes, independent solves).
    "branches": """
class Model(L.LightningModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.enc = nn.Linear(3, 3)
        self.fa = Field(3)
        self.fb = Field(3)
    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.enc(x)
        t = torch.tensor([0.0, 1.0])
        a = odeint(self.fa, h, t, method="rk4", options={"step_size": 0.25})[-1]
        b = odeint(self.fb, h, t, method="rk4", options={"step_size": 0.25})[-1]
        return (a - y).pow(2).mean() + (b + y).pow(2).mean()
""",
    # A no_grad rollout for visualisation inside training_step.
    "no_grad_rollout": """
class Model(L.LightningModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.func = Field(3)
    def training_step(self, batch, batch_idx):
        z0, y = batch
        with torch.no_grad():
            self.preview = odeint(self.func, z0, torch.linspace(0, 2, 50), method="rk4",
                                  options={"step_size": 0.1})
        zs = odeint(self.func, z0, torch.tensor([0.0, 1.0]), method="rk4",
                    options={"step_size": 0.125})
        return (zs[-1] - y).pow(2).mean()
""",
    # An ODE-RNN with a closure over the loop variable (the input of the current step).
    "closure_loop": """
class Model(L.LightningModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.W = nn.Linear(3, 3)
        self.U = nn.Linear(2, 3)
        self.head = nn.Linear(3, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.zeros(x.shape[0], 3)
        for s in range(x.shape[1]):
            u = x[:, s]
            h = odeint(lambda t, z: torch.tanh(self.W(z) + self.U(u)), h,
                       torch.tensor([0.0, 0.5]), method="rk4", options={"step_size": 0.25})[-1]
        return (self.head(h) - y).pow(2).mean()
""",
}


def _convert(src: str) -> str:
    """The user's two-line change: the import and the base class."""
    out = src.replace(
        "from torchdiffeq import odeint, odeint_adjoint",
        "from ode_reg import odeint, odeint_adjoint",
    )
    out = out.replace(
        "class Model(L.LightningModule):", "class Model(ode_reg.RegularizedODEModule):"
    )
    return "import ode_reg\n" + out


def _build(name: str, converted: bool) -> type:
    src = textwrap.dedent(HEADER + SOURCES[name])
    if converted:
        src = _convert(src)
    scope: dict[str, Any] = {}
    exec(compile(src, f"<{name}>", "exec"), scope)  # noqa: S102 - the test's own source
    return scope["Model"]


def _batch(name: str) -> Any:
    g = torch.Generator().manual_seed(1)
    if name == "latent_ode":
        return torch.randn(4, 5, 2, generator=g), torch.linspace(0.0, 1.0, 5)
    if name == "tuple_adjoint":
        return torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    if name == "dopri5_100_all":
        return torch.randn(6, 2, generator=g), torch.randn(100, 6, 2, generator=g)
    if name == "closure_loop":
        return torch.randn(4, 6, 2, generator=g), torch.randn(4, 1, generator=g)
    return torch.randn(5, 3, generator=g), torch.randn(
        5, 1 if name == "ode_block" else 3, generator=g
    )


def _fields(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "nfe")]


def _step(model: nn.Module, name: str) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    for f in _fields(model):
        f.nfe = 0
    model.zero_grad()
    loss = model.training_step(_batch(name), 0)
    loss.backward()
    grads = [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
    ]
    return loss.detach(), grads, sum(f.nfe for f in _fields(model))


def _pair(name: str, regularizers: list) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = _build(name, False)()
    conv = _build(name, True)(regularizers=regularizers)
    conv.load_state_dict(plain.state_dict(), strict=False)
    return plain, conv


def test_conversion_is_the_import_and_the_base_class():
    for name, body in SOURCES.items():
        src = textwrap.dedent(HEADER + body)
        changed = [
            (a, b) for a, b in zip(src.splitlines(), _convert(src).splitlines()[1:]) if a != b
        ]
        assert len(changed) == 2, name
        assert "ode_reg" in changed[0][1] and "RegularizedODEModule" in changed[1][1]


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("regs", ["none", "inactive"])
def test_no_active_term_is_torchdiffeq_exactly(name, regs):
    terms = [] if regs == "none" else [AdjointMagnitude(weight=0.0), SkewJacobianPenalty(0.0)]
    plain, conv = _pair(name, terms)
    l0, g0, n0 = _step(plain, name)
    l1, g1, n1 = _step(conv, name)
    assert n0 == n1 and (n0 > 0 or name == "closure_loop")
    assert torch.allclose(l0, l1, rtol=1e-6, atol=0)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- the reference
class _Steps(nn.Module):
    """An independent step recorder: torchdiffeq's step callback on a wrapped field."""

    def __init__(self, func, adaptive: bool):
        super().__init__()
        self.func = func
        self.t: list[float] = []
        self.z: list[torch.Tensor] = []
        name = "callback_accept_step" if adaptive else "callback_step"
        setattr(self, name, self._record)

    def _record(self, t0, y0, dt):
        self.t.append(float(t0))
        self.z.append(y0 if isinstance(y0, torch.Tensor) else y0[0]._base)

    def forward(self, t, z):
        return self.func(t, z)


def _ref_solve(func, y0, t, adaptive, **kw):
    rec = _Steps(func, adaptive)
    sol = torchdiffeq.odeint(rec, y0, t, **kw)
    n = len(rec.z)
    m = DEFAULT_CHECKPOINTS + 1
    keep = list(range(n)) if n <= m else sorted({round(i * (n - 1) / (m - 1)) for i in range(m)})
    times = [rec.t[i] for i in keep] + [float(t[-1])]
    return sol, [rec.z[i] for i in keep], times


def _logn(x):
    return 0.5 * torch.log(x.pow(2).sum(-1) + 1e-20)


def test_not_last_time_reference_and_explicit_checkpoint_equivalence():
    """R_adj of a loss reading only z(0.5): the last reached checkpoint is the reference, the
    zero adjoints after it are left out; with 0.5 an explicit checkpoint the value equals that
    of the solve over [0, 0.5]."""
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    z0 = torch.randn(5, 3, dtype=F64, requires_grad=True)
    y = torch.randn(5, 3, dtype=F64)

    def run(t, checkpoints):
        rec = ode_reg.recording.StepRecorder(adjoint_inputs=True)
        with rec.active():
            zs = ode_reg.odeint(
                lambda s, z: field(z),
                z0,
                t,
                method="rk4",
                options={"step_size": 0.0625},
                checkpoints=checkpoints,
            )
            loss = (zs[1] - y).pow(2).mean()
        res = ode_reg.step_terms(
            loss, rec.records, [AdjointMagnitude()], step=0, params=list(field.parameters())
        )
        return res.values["adjoint_magnitude"], res.chains[0]

    long, ctx = run(torch.tensor([0.0, 0.5, 1.0], dtype=F64), torch.tensor([0.25, 0.5], dtype=F64))
    short, _ = run(torch.tensor([0.0, 0.5], dtype=F64), torch.tensor([0.25], dtype=F64))
    assert ctx.kstar() == 2  # checkpoints 0, 0.25, 0.5 (reached), end 1.0 (not reached)
    assert torch.allclose(long, short, rtol=1e-10)
    assert float(long) > 1e-6


def test_adjoint_term_is_zero_for_the_identity_flow_with_ten_reads():
    z0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    w = torch.zeros(3, 3, dtype=F64, requires_grad=True)
    rec = ode_reg.recording.StepRecorder(adjoint_inputs=True)
    with rec.active():
        zs = ode_reg.odeint(lambda t, z: z @ w, z0, torch.linspace(0, 1, 10, dtype=F64))
        loss = zs.pow(2).sum(-1).mean()
    res = ode_reg.step_terms(loss, rec.records, [AdjointMagnitude()], step=0, params=[w])
    assert float(res.values["adjoint_magnitude"]) <= 1e-10
    # The total adjoints do grow backwards (the reads add up): the old definition was not 0.
    a = res.chains[0].adjoints()
    assert float((_logn(a[0]) - _logn(a[-1])).abs().max()) > 1.0


def test_skew_term_of_a_linear_field_is_T2_sym_M_over_d():
    torch.manual_seed(0)
    d, T = 6, 2.0
    m = torch.randn(d, d, dtype=F64, requires_grad=True)
    z0 = torch.randn(64, d, dtype=F64)
    reg = SkewJacobianPenalty(weight=1.0, probes=8, seed=0)
    rec = ode_reg.recording.StepRecorder(
        skew=ode_reg.recording.SkewPlan(8, None, torch.Generator().manual_seed(0))
    )
    with rec.active():
        zs = ode_reg.odeint(
            lambda t, z: z @ m.T,
            z0,
            torch.tensor([0.0, T], dtype=F64),
            method="rk4",
            options={"step_size": 0.25},
        )
        loss = zs[-1].pow(2).mean()
    value = ode_reg.step_terms(loss, rec.records, [reg], step=0, params=[m]).values["skew_jacobian"]
    sym = 0.5 * (m + m.T)
    exact = T**2 * sym.pow(2).sum() / d
    # Hutchinson with Rademacher probes over 64 samples x 8 probes x 9 checkpoints.
    assert abs(float(value) / float(exact) - 1) < 0.05
    # The same weight means the same at another size (normalised by d): d = 4 vs d = 64.
    for size in (4, 64):
        q = torch.linalg.qr(torch.randn(size, size, dtype=F64))[0]
        mm = (0.3 * torch.eye(size, dtype=F64) + q - q.T).requires_grad_(True)
        rec = ode_reg.recording.StepRecorder(
            skew=ode_reg.recording.SkewPlan(4, None, torch.Generator().manual_seed(1))
        )
        with rec.active():
            zs = ode_reg.odeint(
                lambda t, z, mm=mm: z @ mm.T,
                torch.randn(32, size, dtype=F64),
                torch.tensor([0.0, 1.0], dtype=F64),
                method="euler",
            )
        loss = zs[-1].sum()
        v = ode_reg.step_terms(loss, rec.records, [reg], step=0, params=[mm]).values[
            "skew_jacobian"
        ]
        assert abs(float(v) - 0.09) < 1e-9  # sym part 0.3 I: 0.09 d / d, exact (S v = 0.3 v)


@pytest.mark.parametrize(
    "name",
    [
        "ode_block",
        "dopri5_100_all",
        "not_last",
        "no_grad_rollout",
        "closure_loop",
        "latent_ode",
        "branches",
    ],
)
def test_terms_are_finite_and_train(name):
    regs = [
        AdjointMagnitude(weight=0.1),
        SensitivityMagnitude(weight=0.1),
        DirectionalConstraint(gamma=0.0, weight=0.1),
        SkewJacobianPenalty(weight=0.1, seed=0),
    ]
    plain, conv = _pair(name, regs)
    l0, _, _ = _step(plain, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l1, g1, _ = _step(conv, name)
    assert torch.isfinite(l1) and all(torch.isfinite(g).all() for g in g1)
    assert float(l1) >= float(l0) - 1e-7  # every term is >= 0


def _reference_step(plain: nn.Module, name: str, batch: Any, w: dict, gamma: float):
    """The plain model's step with torchdiffeq's odeint replaced by a hand-written recorder
    (``_Steps``), then the MATH.md terms written out for its one reached solve."""
    solves = []
    scope = type(plain).training_step.__globals__
    original = scope["odeint"]

    def recording_odeint(func, y0, t, **kw):
        if not torch.is_grad_enabled():
            return original(func, y0, t, **kw)
        adaptive = kw.get("method") in (None, "dopri5")
        y0 = y0.detach().requires_grad_(True) if not y0.requires_grad else y0
        y0 = y0.view_as(y0)
        sol, zs, times = _ref_solve(func, y0, t, adaptive, **kw)
        solves.append((func, sol, zs, times))
        return sol

    scope["odeint"] = recording_odeint
    try:
        loss = plain.training_step(batch, 0)
    finally:
        scope["odeint"] = original
    ((func, sol, zs, _),) = solves
    params = [p for p in plain.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*zs, sol], create_graph=True, allow_unused=True)
    a = [torch.zeros_like(z) if g is None else g for g, z in zip(grads[:-1], zs)]
    a.append(grads[-1][-1])
    states = [*zs, sol[-1]]
    reached = [bool((x != 0).any()) for x in a]
    ks = max(i for i, r in enumerate(reached) if r)
    reads = bool((grads[-1][:-1] != 0).any()) or ks < len(a) - 1
    if reads:  # the adjoint the flow carries back from z_{k*} (MATH.md, R_adj)
        target = states[ks]
        flow = list(torch.autograd.grad(target, zs[:ks], a[ks], create_graph=True))
        flow.append(a[ks])
    else:
        flow = a
    samples = (a[ks] != 0).any(-1)
    r_adj = torch.stack(
        [(_logn(flow[k][samples]) - _logn(a[ks][samples])).pow(2) for k in range(ks)]
    ).mean()
    ys = []
    for k in range(ks + 1):
        z = states[k]
        leaf = z.detach().requires_grad_(True)
        fk = func(None, leaf)
        gk = torch.autograd.grad(fk, params, a[k], create_graph=True, allow_unused=True)
        row = torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gk, params)]
        )
        # the full derivative through z_k: d/dz of (a . df/dtheta) applied to (z - z.detach())
        u = torch.zeros_like(row, requires_grad=True)
        (gz,) = torch.autograd.grad(row, leaf, u, create_graph=True)
        (jv,) = torch.autograd.grad(gz, u, z - z.detach(), create_graph=True)
        ys.append(row + jv)
    y = torch.stack(ys)
    ln = 0.5 * torch.log(y.pow(2).sum(-1) + 1e-20)
    r_sens = (ln[:-1] - ln[-1]).pow(2).mean()
    cos = (y @ y[-1]) / y[-1].pow(2).sum()
    r_dir = torch.relu(gamma - cos).pow(2).mean()
    total = loss + w["adj"] * r_adj + w["sens"] * r_sens + w["dir"] * r_dir
    return total, params, (float(r_adj), float(r_sens), float(r_dir))


@pytest.mark.parametrize("name", ["dopri5_100_all", "ode_block", "not_last", "no_grad_rollout"])
def test_single_chain_terms_equal_a_hand_written_reference(name):
    """The module's returned loss and gradient equal task + sum of weight * R, with every R
    written out here from MATH.md on an independently recorded solve (reached checkpoints,
    flow-only adjoint where the loss reads more than the end, full derivative of y_k)."""
    w = {"adj": 0.3, "sens": 0.2, "dir": 0.5}
    regs = [
        AdjointMagnitude(weight=w["adj"]),
        SensitivityMagnitude(weight=w["sens"]),
        DirectionalConstraint(gamma=0.9, weight=w["dir"]),
    ]
    plain, conv = _pair(name, regs)
    plain.double()
    conv.double()
    batch = tuple(x.double() for x in _batch(name))
    total, params, terms = _reference_step(plain, name, batch, w, 0.9)
    ref_grads = torch.autograd.grad(total, params)
    conv.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = conv.training_step(batch, 0)
    out.backward()
    assert torch.allclose(out.detach(), total.detach(), rtol=1e-9)
    for p, g in zip([p for p in conv.parameters() if p.requires_grad], ref_grads):
        assert float((p.grad - g).abs().max()) <= 1e-6 * float(g.abs().max())
    assert terms[0] > 1e-8 and terms[1] > 1e-8


def test_latent_ode_chains_follow_the_data_and_time_runs_backwards():
    plain, conv = _pair("latent_ode", [AdjointMagnitude(weight=0.1)])
    conv.training_step(_batch("latent_ode"), 0)
    rec = conv.ode_step
    assert len(rec.trajectories) == 5  # 4 encoder solves (backwards) + the decoder
    assert rec.trajectories[0].times[0] > rec.trajectories[0].times[-1]
    assert len(rec.groups) == 1  # encoder -> cell -> ... -> decoder: one chain by data


def test_branches_are_two_chains_and_unreached_solves_are_left_out():
    _, conv = _pair("branches", [AdjointMagnitude(weight=0.1)])
    conv.training_step(_batch("branches"), 0)
    assert len(conv.ode_step.groups) == 2
    _, conv = _pair("no_grad_rollout", [AdjointMagnitude(weight=0.1)])
    with pytest.warns(UserWarning, match="without grad"):
        ode_reg._once.SAID.discard("recording:no_grad")
        conv.training_step(_batch("no_grad_rollout"), 0)
    assert len(conv.ode_step.trajectories) == 1


def test_closure_over_a_loop_variable_equals_bound_values():
    """The terms of an ODE-RNN written with a closure over the loop's input equal those of the
    same model with the input bound into a field module (evaluated during each solve)."""

    class Bound(nn.Module):
        def __init__(self, W, U, u):
            super().__init__()
            self.W, self.U, self.u = W, U, u

        def forward(self, t, z):
            return torch.tanh(self.W(z) + self.U(self.u))

    regs = lambda: [SensitivityMagnitude(0.1), SkewJacobianPenalty(0.1, seed=3)]  # noqa: E731
    _, a = _pair("closure_loop", regs())
    x, y = _batch("closure_loop")
    out_a = a.training_step((x, y), 0)

    class BoundModel(_build("closure_loop", True)):
        def training_step(self, batch, batch_idx):
            x, y = batch
            h = torch.zeros(x.shape[0], 3)
            for s in range(x.shape[1]):
                h = ode_reg.odeint(
                    Bound(self.W, self.U, x[:, s]),
                    h,
                    torch.tensor([0.0, 0.5]),
                    method="rk4",
                    options={"step_size": 0.25},
                )[-1]
            return (self.head(h) - y).pow(2).mean()

    b = BoundModel(regularizers=regs())
    b.load_state_dict(a.state_dict())
    out_b = b.training_step((x, y), 0)
    assert torch.allclose(out_a, out_b, rtol=1e-6)


def test_errors_are_short():
    with pytest.raises(ValueError) as info:
        ode_reg.integrate(lambda t, z: z, torch.ones(2, 2), torch.tensor([0.0, 1.0, 0.5]))
    assert len(str(info.value)) < 200
    with pytest.raises(ValueError, match="not on the 'rk4' grid") as info:
        ode_reg.integrate(
            lambda t, z: z,
            torch.ones(2, 2),
            torch.tensor([0.0, 1.0]),
            method="rk4",
            options={"step_size": 0.1},
            checkpoints=torch.tensor([0.33]),
        )
    assert len(str(info.value)) < 200
    rec = ode_reg.recording.StepRecorder(refuse_adjoint=("adjoint_magnitude",))
    with rec.active(), pytest.raises(ValueError, match="odeint_adjoint cannot be used") as info:
        ode_reg.odeint_adjoint(nn.Linear(2, 2), torch.ones(3, 2), torch.tensor([0.0, 1.0]))
    assert len(str(info.value)) < 300


def _ode_rnn_terms(read_all: bool, force_vjp: bool, monkeypatch) -> tuple[float, Any]:
    torch.manual_seed(0)
    cell = nn.Linear(4, 4).double()
    xs = torch.randn(6, 3, 4, dtype=F64)
    if force_vjp:
        monkeypatch.setattr(ode_reg.terms.ChainContext, "_reads_only_the_end", lambda self: False)
    rec = ode_reg.recording.StepRecorder(adjoint_inputs=True)
    with rec.active():
        h = torch.zeros(3, 4, dtype=F64)
        hs = []
        for x in xs:  # the input enters through the field: each solve starts from the last result
            h = ode_reg.odeint(
                lambda t, z, x=x: torch.tanh(cell(z) + x),
                h,
                torch.tensor([0.0, 0.5], dtype=F64),
                method="euler",
                options={"step_size": 0.25},
            )[-1]
            hs.append(h)
        loss = torch.stack(hs).pow(2).mean() if read_all else hs[-1].pow(2).mean()
    res = ode_reg.step_terms(
        loss, rec.records, [AdjointMagnitude()], step=0, params=list(cell.parameters())
    )
    return float(res.values["adjoint_magnitude"]), res.chains


def test_ode_rnn_chain_read_only_at_the_end_needs_no_extra_vjp(monkeypatch):
    fast, chains = _ode_rnn_terms(False, False, monkeypatch)
    assert len(chains) == 1 and chains[0]._reads_only_the_end()
    slow, _ = _ode_rnn_terms(False, True, monkeypatch)
    assert fast == pytest.approx(slow, rel=1e-12)
    # reading every hidden state: the flow-only adjoint differs from the total one
    monkeypatch.undo()
    total_read, chains = _ode_rnn_terms(True, False, monkeypatch)
    assert not chains[0]._reads_only_the_end()
    a = chains[0].adjoints()
    total_def = float(
        ode_reg.functional.adjoint_magnitude_penalty(a[:, chains[0].reached_samples()])
    )
    assert abs(total_read - total_def) > 1e-3


@pytest.mark.parametrize("method", ["dopri5", "rk4", "adjoint"])
def test_solver_statistics_equal_an_independent_count(method):
    field = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    calls = {"n": 0}
    field.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    z0 = torch.randn(4, 3)
    t = torch.linspace(0, 2, 20)
    kw = {"method": "rk4", "options": {"step_size": 0.1}} if method == "rk4" else {}

    def f(s, z):
        return field(z)

    f_mod = type("F", (nn.Module,), {"forward": lambda self, s, z: field(z)})()
    f_mod.field = field
    traj = ode_reg.integrate(
        f_mod if method == "adjoint" else f, z0, t, adjoint=method == "adjoint", **kw
    )
    assert traj.stats.nfe == calls["n"] > 0
    if method == "rk4":
        assert traj.stats.accepted == 20 and traj.stats.rejected == 0
        assert traj.stats.dt_min == pytest.approx(0.1) and traj.stats.dt_max == pytest.approx(0.1)
    if method == "dopri5":  # 2 initial evaluations, then 6 per attempted step (FSAL)
        assert traj.stats.nfe == 2 + 6 * (traj.stats.accepted + traj.stats.rejected)
        assert sum(traj.stats.step_sizes) >= 2.0
    if method == "adjoint":
        before = calls["n"]
        traj.ys[-1].sum().backward()
        assert traj.stats.nfe_backward == calls["n"] - before > 0
    # with a term active the recorded solve costs no extra field evaluation (AdjointMagnitude)
    calls["n"] = 0
    torchdiffeq.odeint(f, z0, t, **kw)
    plain = calls["n"]
    calls["n"] = 0
    rec = ode_reg.recording.StepRecorder(adjoint_inputs=True)
    with rec.active():
        ode_reg.odeint(f, z0, t, **kw)
    assert calls["n"] == plain


def test_vectorized_field_evaluation_equals_the_per_checkpoint_one(monkeypatch):
    """An ODE-RNN whose field holds the step's input (set_input): y_k from one vmap call per
    solve (per-checkpoint parameter aliases, z_k attached) equals y_k from the per-checkpoint
    evaluation at a detached z_k plus the through-state term: values and gradients."""
    from ode_reg.models import SequenceModel

    x = torch.randn(8, 10, 1, dtype=F64)
    y = torch.randint(0, 10, (8,))
    out = {}
    for force_direct in (False, True):
        if force_direct:
            monkeypatch.setattr(ode_reg.recording.StepRecorder, "_batched", lambda self, traj: None)
        torch.manual_seed(0)
        m = SequenceModel(
            1,
            10,
            hidden_dim=16,
            regularizers=[SensitivityMagnitude(1.0), DirectionalConstraint(0.5, 1.0)],
        ).double()
        seen = []
        real = ode_reg.terms.ChainContext._batched_rows

        def spy(self, rec, js, raw, detach, real=real, seen=seen):
            seen.append(len(js))
            return real(self, rec, js, raw, detach)

        monkeypatch.setattr(ode_reg.terms.ChainContext, "_batched_rows", spy)
        loss = m.training_step((x, y), 0)
        grads = torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])
        out[force_direct] = (loss.detach(), grads)
        assert bool(seen) is not force_direct  # the vectorized path was (not) taken
    assert torch.allclose(out[False][0], out[True][0], rtol=1e-12)
    for a, b in zip(out[False][1], out[True][1]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-14)


def test_tuple_state_under_odeint_adjoint_with_the_skew_term():
    """Tuple states under odeint_adjoint: the adjoint-based terms are refused (short message);
    the skew term is finite, positive, and trains (its probes act on the concatenated state)."""
    plain, conv = _pair("tuple_adjoint", [AdjointMagnitude(0.1)])
    with pytest.raises(ValueError, match="odeint_adjoint cannot be used"):
        conv.training_step(_batch("tuple_adjoint"), 0)
    plain, conv = _pair("tuple_adjoint", [SkewJacobianPenalty(0.1, seed=0)])
    l0, _, n0 = _step(plain, "tuple_adjoint")
    l1, g1, n1 = _step(conv, "tuple_adjoint")
    traj = conv.ode_step.trajectories[0]
    # torchdiffeq's own forward and adjoint-backward evaluations, plus one vectorized
    # evaluation (one vmap call) at all checkpoints for the probes (made during the call)
    assert n1 == n0 + 1
    assert traj.stats.nfe + traj.stats.nfe_backward == n0
    assert float(l1) > float(l0) and all(torch.isfinite(g).all() for g in g1)
    assert traj.shapes is not None and traj.states[0].shape == (4 * 2 + 4 * 2,)
    assert traj.stats.nfe_backward > 0


def test_event_fn_is_passed_through_and_recorded():
    z0 = torch.tensor([[1.0, 0.0]], requires_grad=True)

    def field(t, z):
        return torch.stack([z[:, 1], -z[:, 0]], dim=1)

    def event(t, z):
        return z[..., 0].sum() + 0.5  # z_0 = cos t reaches -0.5 at t = 2 pi / 3

    t = torch.tensor([0.0, 5.0])
    ref_t, ref = torchdiffeq.odeint(field, z0, t, event_fn=event)
    rec = ode_reg.recording.StepRecorder(adjoint_inputs=True)
    with rec.active():
        ev_t, sol = ode_reg.odeint(field, z0, t, event_fn=event)
    assert torch.equal(ev_t, ref_t) and torch.equal(sol, ref)
    assert abs(float(ev_t) - 2.0943951) < 1e-4
    traj = rec.records[0].traj
    assert torch.equal(traj.event_t, ev_t) and float(traj.times[-1]) == pytest.approx(float(ev_t))
