"""Issue 19: one explicit step plan, monitors that never read nothing, checkpoints that survive
the conversion.

References: the same model written with ``ode_reg.odeint`` (for a library captured through
``torchdiffeq.odeint``), hand computations of the adjoint profile with ``ode_reg.integrate`` and
``ode_reg.adjoints`` on the batch of the step, the built-in monitor itself (for a subclass), the
cadence rule written out, and the saved models (weights, classes, arguments, run state).
"""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import _standin_lib
import lightning as L
import pytest
import torch
import torchdiffeq
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ode_reg
from ode_reg import (
    AdjointMagnitude,
    DirectionalConstraint,
    Monitor,
    Need,
    RegularizedODEModule,
    SensitivityMagnitude,
    SkewJacobianPenalty,
    SpectralConstraint,
    adjoints,
    capture_torchdiffeq,
    due,
    integrate,
    odeint,
)
from ode_reg.callbacks import GradientNormMonitor, SolverStatsMonitor
from ode_reg.module import RUN_STATE_KEY

D, N, BATCH = 3, 32, 8
SPAN = torch.tensor([0.0, 1.0])
RK4 = {"method": "rk4", "options": {"step_size": 0.25}}


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(D, D, generator=g))
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.w.T + self.b)


class Plain(L.LightningModule):
    """The unconverted project: torchdiffeq and a LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        self.field = Field()
        self.head = nn.Linear(D, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.5, -0.3, 0.2]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torchdiffeq.odeint(self.field, x, SPAN, **RK4)[-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Net(RegularizedODEModule):
    """The converted project; ``solver`` picks how the solve is reached."""

    def __init__(self, regularizers=(), solver: str = "ode_reg", **kw: Any) -> None:
        super().__init__(regularizers=regularizers, **kw)
        self.field = Field()
        self.head = nn.Linear(D, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.5, -0.3, 0.2]]))
            self.head.bias.zero_()
        self.solver = solver

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.solver == "ode_reg":  # a closure field
            z = odeint(lambda t, z: self.field(t, z), x, SPAN, **RK4)
        elif self.solver == "torchdiffeq":  # an import left unconverted
            z = torchdiffeq.odeint(self.field, x, SPAN, **RK4)
        elif self.solver == "standin":  # a library that calls torchdiffeq itself
            z = _standin_lib.integrate(self.field, x, SPAN)
        elif self.solver == "standin_adjoint":
            z = _standin_lib.integrate(self.field, x, SPAN, adjoint=True)
        else:
            z = ode_reg.odeint_adjoint(self.field, x, SPAN, **RK4)
        return self.head(z[-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def batches(n: int = N) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g)
    return DataLoader(TensorDataset(x, x[:, :1].sin()), batch_size=BATCH)


def trainer(callbacks=(), max_steps: int = 2, **kw: Any) -> L.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("log_every_n_steps", 1)
    return L.Trainer(
        max_steps=max_steps,
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


class Spy(Callback):
    """Per step (before the module releases the record): what the step recorded, whether a term
    computed adjoints, and whether the watched monitor measured."""

    def __init__(self, monitor: GradientNormMonitor | None = None) -> None:
        self.monitor = monitor
        self.rows: list[dict[str, Any]] = []
        self._last = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = getattr(self.monitor, "last_profiles", None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rec = pl_module.ode_step
        measured = False
        source = None
        if self.monitor is not None and self.monitor.last_profiles is not self._last:
            self._last = self.monitor.last_profiles
            measured = True
            source = self._last[0]["source"] if self._last else None
        self.rows.append(
            {
                "step": trainer.global_step - 1,
                "solves": len(rec.solves),
                "trajectories": len(rec.trajectories),
                "regularized": any(a is not None for a in rec.adjoints),
                "measured": measured,
                "source": source,
            }
        )


# --------------------------------------------------------------------------- (a) the monitor base


class MyMonitor(GradientNormMonitor):
    """A user's monitor: a subclass defined outside ``ode_reg.callbacks``."""


def test_a_monitor_subclass_logs_the_same_keys_and_values():
    logged = []
    for cls in (GradientNormMonitor, MyMonitor):
        torch.manual_seed(0)
        tr = trainer([cls(every_n_steps=1)], max_steps=2)
        tr.fit(Net(), batches())
        logged.append({k: float(v) for k, v in tr.callback_metrics.items() if "/" in k})
    assert any(k.startswith("adjoint/ratio_max_min") for k in logged[0])
    assert logged[1].keys() == logged[0].keys()
    for k in logged[0]:
        assert logged[1][k] == pytest.approx(logged[0][k], rel=1e-6), k


def test_a_third_party_monitor_gets_its_need_on_its_due_steps_only():
    class NfeReader(Monitor):
        needs = Need(stats=True)

        def __init__(self) -> None:
            self.every_n_steps = 3
            self.seen: list[tuple[int, int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seen.append((trainer.global_step - 1, len(pl_module.ode_step.solves)))

    mon = NfeReader()
    trainer([mon], max_steps=7).fit(Net(), batches())
    # one solve recorded on the 3rd and 6th steps ((s + 1) % 3 == 0), nothing on the others
    assert mon.seen == [(s, 1 if due(s, 3) else 0) for s in range(7)]


def test_the_main_jobs_cadences_put_monitored_steps_on_regularized_ones():
    """recipes/digits.yaml: AdjointMagnitude every 4th step, the monitors at log_every_n_steps
    = 10. The one rule ((s + 1) % n == 0) makes steps 19 and 39 both; the monitor there reads the
    adjoints the term computed; steps where nothing is due record nothing."""
    mon = GradientNormMonitor()
    spy = Spy(mon)
    model = Net([AdjointMagnitude(0.01, every_n_steps=4)])
    trainer([mon, spy], max_steps=40, log_every_n_steps=10).fit(model, batches())
    rows = spy.rows
    assert [r["step"] for r in rows] == list(range(40))
    regularized = {r["step"] for r in rows if r["regularized"]}
    measured = {r["step"] for r in rows if r["measured"]}
    assert regularized == {s for s in range(40) if (s + 1) % 4 == 0}
    assert measured == {s for s in range(40) if (s + 1) % 10 == 0}
    assert regularized & measured == {19, 39}
    assert {r["source"] for r in rows if r["step"] in (19, 39)} == {"regularizer"}
    for r in rows:
        if r["step"] not in regularized | measured:
            assert r["solves"] == r["trajectories"] == 0, r


# --------------------------------------------------------------------------- (c) user's tensors


class Distill(Net):
    """A student trained towards a frozen teacher's rollout."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.teacher = Field().requires_grad_(False)
        self.seen: list[tuple[bool, bool, bool]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        before = x.requires_grad
        target = odeint(self.teacher, x, SPAN, **RK4)[-1]
        with torch.no_grad():
            target2 = odeint(self.teacher, x, SPAN, **RK4)[-1]
        target.numpy(), target2.numpy()  # raises on a tensor that requires grad
        self.seen.append((before == x.requires_grad, target.requires_grad, target2.requires_grad))
        return nn.functional.mse_loss(odeint(self.field, x, SPAN, **RK4)[-1], target)


def test_a_frozen_teachers_rollout_keeps_no_grad_and_is_no_chain():
    model = Distill(regularizers=[AdjointMagnitude(0.1)])
    spy = Spy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([spy], max_steps=2).fit(model, batches())
    assert model.seen == [(True, False, False)] * 2
    assert [r["trajectories"] for r in spy.rows] == [1, 1]  # the student's solve only
    plain = torchdiffeq.odeint(model.teacher, torch.randn(4, D), SPAN, **RK4)
    assert not plain.requires_grad  # what torchdiffeq's own call gives


# --------------------------------------------------------------------------- (d) release


def _tensors(x: Any, seen: set[int]) -> list[torch.Tensor]:
    if id(x) in seen:
        return []
    seen.add(id(x))
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v, seen)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v, seen)]
    if hasattr(x, "__dict__") and not isinstance(x, (nn.Module, type)):
        return [t for v in vars(x).values() for t in _tensors(v, seen)]
    return []


class NoSuperHook(Net):
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.hook_ran = True  # no super(): the module must release the record anyway


def test_the_record_is_released_whatever_the_users_hooks_do():
    model = NoSuperHook([AdjointMagnitude(0.1)])
    mon = GradientNormMonitor(every_n_steps=1)
    trainer([mon], max_steps=2).fit(model, batches())
    rec = model.ode_step
    assert model.hook_ran and rec.trajectories and rec.groups and rec.adjoints[0] is not None
    found = _tensors(rec, set())
    assert len(found) > 10
    assert all(t.grad_fn is None and not t.requires_grad for t in found)
    assert all(tr.func is None for tr in rec.trajectories + rec.groups)


class Manual(Net):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss.detach()


class Snapshot(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.state = copy.deepcopy(pl_module.state_dict())
        self.batch = [b.clone() for b in batch]


@pytest.mark.parametrize(
    "regs",
    [lambda: [], lambda: [AdjointMagnitude(0.1)]],
    ids=["monitor_only", "adjoint_term"],
)
def test_manual_optimization_profiles_the_current_batch(regs):
    mon = GradientNormMonitor(every_n_steps=1)
    snap = Snapshot()
    model = Manual(regularizers=regs())
    trainer([snap, mon], max_steps=3).fit(model, batches())
    ref = Net()
    ref.load_state_dict(snap.state)
    x, y = snap.batch
    traj = integrate(ref.field, x, SPAN, **RK4)
    a = adjoints(nn.functional.mse_loss(ref.head(traj.ys[-1]), y), traj)
    want = a.norm(dim=-1).mean(dim=1)
    got = mon.last_profiles[0]["adjoint"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- (e) say it or do it


def _said(caught, text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


@pytest.mark.parametrize("with_term", [False, True], ids=["monitor", "term_and_monitor"])
def test_a_missing_import_is_said_once_and_no_solver_zeros_are_logged(with_term):
    regs = [AdjointMagnitude(0.1)] if with_term else []
    mon = SolverStatsMonitor(every_n_steps=1)
    model = Net(regs, solver="torchdiffeq")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = trainer([mon], max_steps=3)
        tr.fit(model, batches())
    said = _said(caught, "made no ode_reg solve")
    assert len(said) == 1
    assert "training step 0" in said[0] and "ode_reg.odeint" in said[0]
    assert "capture_torchdiffeq=True" in said[0]
    assert not [k for k in tr.callback_metrics if k.startswith(("solver/", "reg/"))]
    assert mon.last_metrics == {} and mon.history == []


def test_an_unreadable_adjoint_profile_is_said_not_logged_as_one(tmp_path):
    mon = GradientNormMonitor(every_n_steps=1, plot_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = trainer([mon], max_steps=2, logger=CSVLogger(tmp_path, name="run"))
        tr.fit(Net(solver="adjoint"), batches())
    profile = mon.last_profiles[0]["adjoint"]
    assert int(torch.isfinite(profile).sum()) == 1  # odeint_adjoint: only the result is read
    assert not [k for k in tr.callback_metrics if k.startswith("adjoint/")]
    assert len(_said(caught, "readable checkpoint")) == 1
    assert "grad/total_norm" in tr.callback_metrics  # the rest of the monitor still logs
    assert not list(tmp_path.rglob("*adjoint*"))  # and no one-point profile is drawn


# --------------------------------------------------------------------------- (f) capture


def _step_of(model: Net, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = model.training_step(batch, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize(
    ("standin", "mine", "term"),
    [
        ("standin", "ode_reg", lambda: AdjointMagnitude(0.5)),
        ("standin_adjoint", "adjoint", lambda: SkewJacobianPenalty(0.5, seed=0)),
    ],
    ids=["odeint_adjoint_magnitude", "odeint_adjoint_skew"],
)
def test_a_library_calling_torchdiffeq_gets_the_terms_when_captured(standin, mine, term):
    batch = next(iter(batches()))
    original = (torchdiffeq.odeint, torchdiffeq.odeint_adjoint)
    captured = Net([term()], solver=standin, capture_torchdiffeq=True)
    written = Net([term()], solver=mine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        l1, g1 = _step_of(captured, batch)
        l0, g0 = _step_of(written, batch)
    task = nn.functional.mse_loss(written(batch[0]), batch[1]).detach()
    assert float(l1 - task) > 1e-6  # the term is there
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert captured.ode_step.trajectories  # recorded
    assert (torchdiffeq.odeint, torchdiffeq.odeint_adjoint) == original  # restored


def test_capture_restores_torchdiffeq_on_an_exception_and_is_off_by_default():
    original = torchdiffeq.odeint

    class Boom(Net):
        def training_step(self, batch, batch_idx):
            assert torchdiffeq.odeint is not original  # patched for the step
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Boom([AdjointMagnitude(0.1)], capture_torchdiffeq=True).training_step(
            next(iter(batches())), 0
        )
    assert torchdiffeq.odeint is original
    with capture_torchdiffeq():
        assert torchdiffeq.odeint is not original
    assert torchdiffeq.odeint is original
    model = Net([AdjointMagnitude(0.1)], solver="standin")  # not captured: said, not added
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model.training_step(next(iter(batches())), 0)
    assert len(_said(caught, "made no ode_reg solve")) == 1
    x, y = next(iter(batches()))
    assert float(loss) == pytest.approx(float(nn.functional.mse_loss(model(x), y)), rel=1e-6)
    with pytest.raises(ValueError, match="`capture_torchdiffeq`"):
        Net(capture_torchdiffeq=1)


# --------------------------------------------------------------------------- (b) configuration


def test_the_regularizers_are_not_model_state():
    model = Net([AdjointMagnitude(0.1), SkewJacobianPenalty(0.01)])
    assert model.state_dict().keys() == Plain().state_dict().keys()
    assert not any(isinstance(m, ode_reg.Regularizer) for m in model.modules())


def _fit_and_save(model, path, steps: int = 2):
    tr = trainer(max_steps=steps)
    tr.fit(model, batches())
    tr.save_checkpoint(path)
    return tr


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_pre_conversion_checkpoint_resumes_in_the_converted_class(tmp_path):
    plain = Plain()
    _fit_and_save(plain, tmp_path / "plain.ckpt")
    regs = [AdjointMagnitude(0.1), SkewJacobianPenalty(0.01, seed=3)]
    loaded = Net.load_from_checkpoint(tmp_path / "plain.ckpt", strict=True, regularizers=regs)
    _same_weights(loaded, plain)
    resumed = Net(regs)
    tr = trainer(max_steps=4)
    tr.fit(resumed, batches(), ckpt_path=tmp_path / "plain.ckpt")  # strict resume
    assert tr.global_step == 4 and resumed.regularizers[1].base_seed == 3


def test_a_converted_checkpoint_loads_into_the_original_class(tmp_path):
    model = Net([AdjointMagnitude(0.1), SkewJacobianPenalty(0.01)])
    _fit_and_save(model, tmp_path / "conv.ckpt")
    plain = Plain.load_from_checkpoint(tmp_path / "conv.ckpt", strict=True)
    _same_weights(plain, model)
    tr = trainer(max_steps=3)
    tr.fit(Plain(), batches(), ckpt_path=tmp_path / "conv.ckpt")
    assert tr.global_step == 3


class WithHparams(Net):
    def __init__(self, regularizers=(), width: int = 3) -> None:
        super().__init__(regularizers=regularizers)
        self.save_hyperparameters()


def test_save_hyperparameters_with_regularizers_loads_with_weights_only(tmp_path):
    regs = [DirectionalConstraint(0.25, weight=0.2, every_n_steps=2), SkewJacobianPenalty(0.01)]
    model = WithHparams(regs, width=3)
    _fit_and_save(model, tmp_path / "hp.ckpt")
    model.regularizers[0].skipped = 2  # after the save: the loaded one has the saved 0
    saved = torch.load(tmp_path / "hp.ckpt", weights_only=True)
    assert [e["name"] for e in saved[RUN_STATE_KEY]["terms"]] == ["directional", "skew_jacobian"]
    loaded = WithHparams.load_from_checkpoint(tmp_path / "hp.ckpt", weights_only=True)
    _same_weights(loaded, model)
    got, want = loaded.regularizers, model.regularizers
    assert [type(r) for r in got] == [type(r) for r in want]
    assert (got[0].gamma, got[0].weight, got[0].every_n_steps) == (0.25, 0.2, 2)
    assert got[1].base_seed == want[1].base_seed and got[0].skipped == 0
    assert loaded.hparams.width == 3


def test_a_fitted_module_with_a_closure_field_pickles_and_deep_copies():
    model = Net([AdjointMagnitude(0.1)])  # odeint(lambda t, z: self.field(t, z), ...)
    trainer([GradientNormMonitor(every_n_steps=1)], max_steps=2).fit(model, batches())
    assert model.ode_step is not None
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        _same_weights(clone, model)
        assert [type(r) for r in clone.regularizers] == [AdjointMagnitude]
        assert clone.ode_step is None


def test_a_changed_term_list_on_resume_is_said_in_one_line(tmp_path):
    old = Net([AdjointMagnitude(0.1), SkewJacobianPenalty(0.01, seed=5)])
    old.regularizers[0].skipped = 4
    _fit_and_save(old, tmp_path / "old.ckpt")
    new = Net([AdjointMagnitude(0.1), SensitivityMagnitude(0.1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = torch.load(tmp_path / "old.ckpt", weights_only=True)
        new.on_load_checkpoint(ckpt)
    said = _said(caught, "differ from the module's")
    assert len(said) == 1
    assert "sensitivity_magnitude" in said[0] and "skew_jacobian" in said[0]
    assert new.regularizers[0].skipped == 4 and new.regularizers[1].skipped == 0


def test_a_checkpoint_with_the_old_counter_buffers_loads_strictly(tmp_path):
    model = Net([AdjointMagnitude(0.1), SkewJacobianPenalty(0.01, seed=1)])
    _fit_and_save(model, tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    del ckpt[RUN_STATE_KEY]
    ckpt["state_dict"]["regularizers.0.skipped"] = torch.tensor(7)
    ckpt["state_dict"]["regularizers.1.skipped"] = torch.tensor(0)
    ckpt["state_dict"]["regularizers.1.base_seed"] = torch.tensor(11)
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    regs = [AdjointMagnitude(0.1), SkewJacobianPenalty(0.01, seed=1)]
    loaded = Net.load_from_checkpoint(tmp_path / "legacy.ckpt", strict=True, regularizers=regs)
    _same_weights(loaded, model)
    assert regs[0].skipped == 7 and regs[1].base_seed == 11


@pytest.mark.parametrize(
    "build",
    [
        lambda: AdjointMagnitude(reference=100),
        lambda: SensitivityMagnitude(reference=-10),
        lambda: DirectionalConstraint(0.5, reference=9),
        lambda: SpectralConstraint(0.0, reference=True),
        lambda: AdjointMagnitude(reference=1.0),
    ],
)
def test_a_bad_reference_is_refused_at_construction(build):
    with pytest.raises(ValueError, match=r"`reference` must be an integer in \[-9, 8\]"):
        build()
    assert AdjointMagnitude(reference=8).reference == 8
    assert AdjointMagnitude(reference=-9).reference == -9


def test_the_cadence_rule():
    assert [s for s in range(12) if due(s, 4)] == [3, 7, 11]
    assert not any(due(s, 0) for s in range(5))
    assert [s for s in range(40) if due(s, 4) and due(s, 10)] == [19, 39]
    term = AdjointMagnitude(0.1, every_n_steps=4)
    assert [s for s in range(12) if term.need(s)] == [3, 7, 11]
    assert term.need(3) == Need(stats=True, chains=True, adjoints=True)
    assert AdjointMagnitude(0.0).need(0) is None  # weight 0: never due


# --------------------------------------------------------------------------- (g) shared backward


def test_shared_backward_with_a_parameter_hook_equals_the_plain_backward():
    """A linear hook (halving the gradient) must give the gradient of the option off."""
    batch = next(iter(batches()))
    grads = []
    for shared in (True, False):
        regs = [SensitivityMagnitude(0.5, detach_states=True, detach_adjoints=True)]
        model = Net(regs, shared_backward=shared)
        model.field.w.register_hook(lambda g: 0.5 * g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.training_step(batch, 0).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


class CountingTerm(AdjointMagnitude):
    """A subclass written against the older API: a counter kept as a buffer."""

    def __init__(self, weight: float = 0.1, **kw: Any) -> None:
        super().__init__(weight, **kw)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def compute(self, ctx):
        self.calls += 1
        return super().compute(ctx)


def test_a_subclass_buffer_travels_as_run_state_not_as_model_weights(tmp_path):
    model = Net([CountingTerm(0.1)])
    _fit_and_save(model, tmp_path / "c.ckpt", steps=3)
    assert int(model.regularizers[0].calls) == 3
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert not [k for k in saved["state_dict"] if "calls" in k]
    assert saved[RUN_STATE_KEY]["terms"][0]["state"]["buffer.calls"] == 3
    fresh = CountingTerm(0.1)
    Net.load_from_checkpoint(tmp_path / "c.ckpt", strict=True, regularizers=[fresh])
    assert int(fresh.calls) == 3


def test_a_monitor_can_observe_exactly_the_regularized_steps():
    class OnTerms(Monitor):
        needs = Need(stats=True, chains=True)

        def __init__(self) -> None:
            self.seen: list[tuple[int, bool]] = []

        def need(self, trainer):
            return self.needs if self.terms_due(trainer) else None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.need(trainer) is not None:
                adj = pl_module.ode_step.adjoints
                self.seen.append((trainer.global_step - 1, bool(adj) and adj[0] is not None))

    mon = OnTerms()
    trainer([mon], max_steps=9).fit(Net([AdjointMagnitude(0.1, every_n_steps=3)]), batches())
    assert mon.seen == [(2, True), (5, True), (8, True)]


def test_a_monitor_asking_for_a_terms_need_is_refused_by_name():
    class Greedy(Monitor):
        needs = Need(field_evaluations=True)
        every_n_steps = 1

    with pytest.raises(ValueError, match="Greedy.need.. asks for field_evaluations/probes"):
        trainer([Greedy()], max_steps=1).fit(Net(), batches())
