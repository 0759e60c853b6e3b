"""Every way people write a LightningModule gets the terms once, with the right gradient.

Mixins, a training_step defined in a grandparent, ``super().training_step``, manual
optimization with one and two optimizers, the ``pytorch_lightning`` namespace, gradient
accumulation, bf16 autocast on CPU, a parameter hook, and the step's graph being freed. Each
compares a gradient or a logged value with a hand-written reference (the task loss plus the
weighted term from the functional core on an independently recorded solve).
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ode_reg
from ode_reg import AdjointMagnitude, RegularizedODEMixin, RegularizedODEModule, odeint
from ode_reg.functional import adjoint_magnitude_penalty
from ode_reg.recording import StepRecorder

W = 0.5
T = torch.tensor([0.0, 1.0])
OPTS = {"method": "rk4", "options": {"step_size": 0.125}}


def data(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z))


def reference(field: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``task + W * R_adj`` (loss reads only the end: ā = a, MATH.md), independently recorded."""
    rec = StepRecorder(adjoint_inputs=True)
    with rec.active():
        zs = odeint(field, x, T, **OPTS)
    loss = (zs[-1] - y).pow(2).mean()
    traj = rec.records[0].traj
    a = ode_reg.adjoints(loss, traj, create_graph=True)
    return loss + W * adjoint_magnitude_penalty(a)


def ref_grads(field: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(reference(field, x, y), list(field.parameters())))


class StepMixin:
    """A training_step in a mixin that knows nothing of ode_reg."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (odeint(self.field, x, T, **OPTS)[-1] - y).pow(2).mean()


class MixinModel(StepMixin, RegularizedODEModule):
    def __init__(self, **kw: Any) -> None:
        super().__init__(regularizers=[AdjointMagnitude(W)], **kw)
        self.field = Field()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Parent(RegularizedODEModule):
    def __init__(self, **kw: Any) -> None:
        super().__init__(regularizers=[AdjointMagnitude(W)], **kw)
        self.field = Field()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (odeint(self.field, x, T, **OPTS)[-1] - y).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Child(Parent):
    pass


class Grandchild(Child):
    pass


class SuperCaller(Child):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 1.0


def _grads_of_step(model: nn.Module, batch: Any) -> list[torch.Tensor]:
    model.log = lambda *a, **k: None
    loss = model.training_step(batch, 0)
    return list(torch.autograd.grad(loss, list(model.field.parameters())))


@pytest.mark.parametrize("cls", [MixinModel, Grandchild, SuperCaller])
def test_training_step_anywhere_in_the_mro_gets_the_terms_once(cls):
    torch.manual_seed(0)
    model = cls()
    x, y = data()
    got = _grads_of_step(model, (x, y))
    for a, b in zip(got, ref_grads(model.field, x, y)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


class ManualOne(Parent):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.seen: list[list[torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        loss = (odeint(self.field, x, T, **OPTS)[-1] - y).pow(2).mean()
        self.manual_backward(loss)
        self.seen.append([p.grad.clone() for p in self.field.parameters()])
        opt.step()


def _fit(model: L.LightningModule, batches: int = 1, **kw: Any) -> L.Trainer:
    x, y = data(8 * batches)
    tr = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    tr.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    return tr


def test_manual_optimization_one_optimizer():
    torch.manual_seed(0)
    model = ManualOne()
    before = Field()
    before.load_state_dict(model.field.state_dict())
    _fit(model, batches=2)
    x, y = data(16)
    for a, b in zip(model.seen[0], ref_grads(before, x[:8], y[:8])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert not torch.equal(before.lin.weight, model.field.lin.weight)  # lr > 0: it trained


class ManualTwo(RegularizedODEModule):
    """Two optimizers, two solves, two backward passes: each pass gets its own solve's term."""

    def __init__(self) -> None:
        super().__init__(regularizers=[AdjointMagnitude(W)])
        self.automatic_optimization = False
        self.fa, self.fb = Field(), Field()
        self.seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        oa, ob = self.optimizers()
        x, y = batch
        oa.zero_grad()
        ob.zero_grad()
        la = (odeint(self.fa, x, T, **OPTS)[-1] - y).pow(2).mean()
        self.manual_backward(la)
        lb = (odeint(self.fb, x, T, **OPTS)[-1] + y).pow(2).mean()
        self.manual_backward(lb)
        self.seen.append(
            (
                [p.grad.clone() for p in self.fa.parameters()],
                [p.grad.clone() for p in self.fb.parameters()],
            )
        )
        oa.step()
        ob.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.fa.parameters(), lr=0.1), torch.optim.SGD(
            self.fb.parameters(), lr=0.1
        )


def test_manual_optimization_two_optimizers_each_backward_its_own_solves():
    torch.manual_seed(0)
    model = ManualTwo()
    fa, fb = Field(), Field()
    fa.load_state_dict(model.fa.state_dict())
    fb.load_state_dict(model.fb.state_dict())
    _fit(model)
    x, y = data()
    ga, gb = model.seen[0]
    for a, b in zip(ga, ref_grads(fa, x, y)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    for a, b in zip(gb, ref_grads(fb, x, -y)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_pytorch_lightning_namespace():
    pl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning is not installed")

    class PLModel(RegularizedODEMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__(regularizers=[AdjointMagnitude(W)])
            self.field = Field()
            self.grads: list[list[torch.Tensor]] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return (odeint(self.field, x, T, **OPTS)[-1] - y).pow(2).mean()

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            self.grads.append([p.grad.clone() for p in self.field.parameters()])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    model = PLModel()
    before = Field()
    before.load_state_dict(model.field.state_dict())
    x, y = data()
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    for a, b in zip(model.grads[0], ref_grads(before, x, y)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert "reg/adjoint_magnitude" in trainer.callback_metrics


class GradsAtStep(Callback):
    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads.append([p.grad.clone() for p in pl_module.field.parameters()])


def test_gradient_accumulation_sums_each_micro_batch_terms():
    torch.manual_seed(0)
    model = Parent()
    before = Field()
    before.load_state_dict(model.field.state_dict())
    cb = GradsAtStep()
    _fit(model, batches=4, accumulate_grad_batches=4, callbacks=[cb])
    x, y = data(32)
    ref = None
    for i in range(4):
        g = ref_grads(before, x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
        ref = g if ref is None else [a + b for a, b in zip(ref, g)]
    for a, b in zip(cb.grads[0], ref):
        torch.testing.assert_close(a, b / 4, rtol=1e-5, atol=1e-7)


def test_skew_probes_are_drawn_per_micro_batch():
    reg = ode_reg.SkewJacobianPenalty(1.0, seed=5)
    g0 = reg.generator(3, torch.device("cpu"), micro=0)
    g1 = reg.generator(3, torch.device("cpu"), micro=1)
    a = torch.randint(0, 2, (1000,), generator=g0)
    b = torch.randint(0, 2, (1000,), generator=g1)
    assert not torch.equal(a, b)
    again = torch.randint(0, 2, (1000,), generator=reg.generator(3, torch.device("cpu"), micro=0))
    assert torch.equal(a, again)  # the same step and micro-batch (a resumed run) draws the same


def test_bf16_mixed_on_cpu_matches_float32_to_bf16_precision():
    torch.manual_seed(0)
    model = Parent()
    before = Field()
    before.load_state_dict(model.field.state_dict())
    cb = GradsAtStep()
    _fit(model, callbacks=[cb], precision="bf16-mixed")
    x, y = data()
    for a, b in zip(cb.grads[0], ref_grads(before, x, y)):
        assert torch.isfinite(a).all()
        assert float((a - b).norm() / b.norm()) < 5e-2  # bf16 has 8 bits of mantissa


def test_a_parameter_hook_sees_the_gradient_once():
    torch.manual_seed(0)
    model = Parent()
    before = Field()
    before.load_state_dict(model.field.state_dict())
    model.field.lin.weight.register_hook(lambda g: 0.5 * g)
    model.log = lambda *a, **k: None
    x, y = data()
    loss = model.training_step((x, y), 0)
    loss.backward()
    ref = ref_grads(before, x, y)[0]
    torch.testing.assert_close(model.field.lin.weight.grad, 0.5 * ref, rtol=1e-6, atol=1e-8)


class Keep(Callback):
    """Holds a weak reference to a forward state of each step, and reports at the next step
    whether it is still alive (referenced by a graph or a record)."""

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.alive: list[bool] = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        gc.collect()
        if self.ref is not None:
            self.alive.append(self.ref() is not None)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        sol = pl_module.ode_step.trajectories[0].solution
        self.ref = weakref.ref(sol)


@pytest.mark.parametrize("shared", [False, True])
def test_the_step_graph_is_freed_before_the_next_step(shared):
    """What peak memory across steps depends on: the forward graph (here: the solution
    tensor, which every recorded state keeps alive) of step n is gone when step n + 1 starts,
    with the shared backward on (whose backward does not walk the forward graph) and off."""
    torch.manual_seed(0)
    regs = [ode_reg.SensitivityMagnitude(0.1, detach_states=True, detach_adjoints=True)]

    class M(Parent):
        def __init__(self) -> None:
            RegularizedODEModule.__init__(self, regularizers=regs, shared_backward=shared)
            self.field = Field()

    keep = Keep()
    _fit(M(), batches=3, callbacks=[keep])
    assert keep.alive == [False, False]
