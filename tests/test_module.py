"""The plug-in contract of ``RegularizedODEModule``.

A model is first written as a plain ``lightning.LightningModule`` that calls
``torchdiffeq.odeint``; the regularized model is derived from its *source* by changing exactly
two lines (the base class and the odeint call), and must then train, log ``reg/*``, and
produce the gradient of ``task loss + sum_r weight_r * penalty_r`` computed by hand from the
functional core (``integrate``, ``adjoints``, ``sensitivities``, ``ode_reg.functional``).
"""

from __future__ import annotations

import difflib
import inspect
import sys
import textwrap
from typing import Any

import lightning as L
import pytest
import torch
import torchdiffeq
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F

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
from ode_reg.functional import (
    adjoint_magnitude_penalty,
    directional_penalty,
    sensitivity_magnitude_penalty,
    skew_jacobian_penalty,
)
from ode_reg.recording import current_recorder
from ode_reg.trajectory import chain

F64 = torch.float64


# --------------------------------------------------------------------------- the plain models


class TanhField(nn.Module):
    """``f(t, z) = tanh(W2 tanh(W1 z + b1) + b2)``."""

    def __init__(self, dim: int, width: int = 8) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, width)
        self.l2 = nn.Linear(width, dim)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.l2(torch.tanh(self.l1(z))))


class PlainLatentODE(L.LightningModule):
    def __init__(self, n_in: int = 3, latent: int = 4, lr: float = 0.02, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder = nn.Linear(n_in, latent)
        self.field = TanhField(latent)
        self.readout = nn.Linear(latent, 1)
        self.lr = lr
        self.register_buffer("span", torch.tensor([0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z0 = self.encoder(x)
        zs = torchdiffeq.odeint(
            self.field, z0, self.span, method="rk4", options={"step_size": 0.125}
        )
        return self.readout(zs[-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class PlainODERNN(L.LightningModule):
    """ODE-RNN: per sequence step, ``h`` follows ``dh/dt = tanh(R h + U x_s + c)`` over
    ``[0, 1]`` with the step's input held; a linear readout of the last ``h``."""

    def __init__(self, n_in: int = 2, hidden: int = 5, lr: float = 0.02, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inp = nn.Linear(n_in, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.readout = nn.Linear(hidden, 1)
        self.hidden = hidden
        self.lr = lr
        self.register_buffer("span", torch.tensor([0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        for s in range(x.shape[1]):
            u = self.inp(x[:, s])
            h = torchdiffeq.odeint(
                lambda t, h, u=u: torch.tanh(self.rec(h) + u),
                h,
                self.span,
                method="rk4",
                options={"step_size": 0.125},
            )[-1]
        return self.readout(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# --------------------------------------------------------------------------- the conversion

BASE_OLD, BASE_NEW = "(L.LightningModule):", "(RegularizedODEModule):"
ODEINT_OLD, ODEINT_NEW = "torchdiffeq.odeint(", "self.odeint("


def convert(cls: type, name: str) -> tuple[type, list[str]]:
    """The regularized class built from ``cls``'s source with the two-line change, and the diff.

    The new class is named ``name`` (the module attribute it is bound to, so that it pickles).
    """
    lines, first = inspect.getsourcelines(cls)
    src = textwrap.dedent("".join(lines))
    new = src.replace(BASE_OLD, BASE_NEW).replace(ODEINT_OLD, ODEINT_NEW)
    diff = [
        line
        for line in difflib.unified_diff(src.splitlines(), new.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    namespace = dict(vars(sys.modules[__name__]))
    # padded so that tracebacks point at the plain class's lines in this file
    code = compile("\n" * (first - 1) + new, inspect.getsourcefile(cls) or "<converted>", "exec")
    exec(code, namespace)
    converted = namespace[cls.__name__]
    converted.__name__ = converted.__qualname__ = name
    return converted, diff


RegLatentODE, LATENT_DIFF = convert(PlainLatentODE, "RegLatentODE")
RegODERNN, ODERNN_DIFF = convert(PlainODERNN, "RegODERNN")


# --------------------------------------------------------------------------- helpers


class EpochLoss(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def latent_data(n: int = 64, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    y = torch.tanh(x[:, :1] - 0.5 * x[:, 1:2] * x[:, 2:3])
    return x, y


def sequence_data(n: int = 32, steps: int = 4, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, steps, 2, generator=g, dtype=dtype)
    y = 0.5 * x[:, :, :1].sum(1)
    return x, y


def loader(data: tuple[torch.Tensor, ...], batch_size: int = 16) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*data), batch_size=batch_size, shuffle=False
    )


def grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, gs)}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


W_ADJ, W_SENS, W_DIR, GAMMA, W_SKEW, PROBES = 0.3, 0.2, 0.5, 0.9, 0.7, 2


def all_regularizers() -> list:
    return [
        AdjointMagnitude(W_ADJ),
        SensitivityMagnitude(W_SENS),
        DirectionalConstraint(gamma=GAMMA, weight=W_DIR),
        SkewJacobianPenalty(W_SKEW, probes=PROBES),
    ]


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("diff", [LATENT_DIFF, ODERNN_DIFF], ids=["latent_ode", "ode_rnn"])
def test_conversion_is_a_two_line_diff(diff: list[str]) -> None:
    removed = [line for line in diff if line.startswith("-")]
    added = [line for line in diff if line.startswith("+")]
    assert len(removed) == len(added) == 2, diff
    assert BASE_OLD in removed[0] and BASE_NEW in added[0]
    assert ODEINT_OLD in removed[1] and ODEINT_NEW in added[1]
    assert issubclass(RegLatentODE, RegularizedODEModule)
    assert not issubclass(PlainLatentODE, RegularizedODEModule)


@pytest.mark.parametrize(
    ("plain", "reg", "data"),
    [
        (PlainLatentODE, RegLatentODE, latent_data(16, F64)),
        (PlainODERNN, RegODERNN, sequence_data(8, 3, F64)),
    ],
    ids=["latent_ode", "ode_rnn"],
)
def test_converted_model_without_regularizers_is_the_plain_model(plain, reg, data) -> None:
    torch.manual_seed(0)
    a = plain().double()
    torch.manual_seed(0)
    b = reg().double()
    x, y = data
    la = a.training_step((x, y), 0)
    lb = b.training_step((x, y), 0)
    assert float((la - lb).abs()) < 1e-12
    assert max_diff(grads(a, la), grads(b, lb)) < 1e-12


def test_converted_latent_ode_trains_and_logs_reg_terms() -> None:
    torch.manual_seed(0)
    model = RegLatentODE(regularizers=all_regularizers())
    losses = EpochLoss()
    tr = trainer(max_epochs=6, callbacks=[losses])
    tr.fit(model, loader(latent_data()))
    assert losses.losses[-1] < 0.7 * losses.losses[0], losses.losses
    keys = set(tr.callback_metrics)
    for name in ("adjoint_magnitude", "sensitivity_magnitude", "directional", "skew_jacobian"):
        assert f"reg/{name}" in keys
        assert torch.isfinite(tr.callback_metrics[f"reg/{name}"])
    assert "reg/total" in keys and "reg/skipped" in keys
    assert float(tr.callback_metrics["reg/skipped"]) == 0.0
    # The record the monitoring callbacks read: one trajectory, one chained group with
    # adjoints and sensitivities of the last step.
    rec = model.ode_step
    assert rec is not None and len(rec.trajectories) == 1 and len(rec.groups) == 1
    assert rec.adjoints[0] is not None and rec.sensitivities[0] is not None


def test_converted_ode_rnn_trains_and_logs_reg_terms() -> None:
    torch.manual_seed(0)
    model = RegODERNN(regularizers=all_regularizers())
    losses = EpochLoss()
    tr = trainer(max_epochs=5, callbacks=[losses])
    tr.fit(model, loader(sequence_data()))
    assert losses.losses[-1] < 0.8 * losses.losses[0], losses.losses
    for name in ("adjoint_magnitude", "sensitivity_magnitude", "directional", "skew_jacobian"):
        assert torch.isfinite(tr.callback_metrics[f"reg/{name}"])
    assert "reg/total" in tr.callback_metrics
    rec = model.ode_step
    assert len(rec.trajectories) == 4 and len(rec.groups) == 1  # four solves, one chain
    # each next solve starts from the previous result: the shared state is one checkpoint
    assert rec.groups[0].num_checkpoints == 4 * rec.trajectories[0].num_checkpoints - 3


def latent_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Task loss + sum of weighted penalties, from the functional core only."""
    traj = integrate(
        model.field, model.encoder(x), model.span, method="rk4", options={"step_size": 0.125}
    )
    loss = F.mse_loss(model.readout(traj.ys[-1]), y)
    a = adjoints(loss, traj, create_graph=True)
    ys = sensitivities(traj, a, create_graph=True)
    gen = model.regularizers[-1].generator(0, traj.times.device)  # the step-0 probes
    skew = skew_jacobian_penalty(  # R_skew, normalised (MATH.md): the module's value
        model.field, traj.times, traj.checkpoint_states, probes=PROBES, generator=gen
    )
    return (
        loss
        + W_ADJ * adjoint_magnitude_penalty(a)
        + W_SENS * sensitivity_magnitude_penalty(ys)
        + W_DIR * directional_penalty(ys, gamma=GAMMA)
        + W_SKEW * skew
    )


def ode_rnn_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same for the ODE-RNN, on ``chain`` of the per-step trajectories.

    The field is a closure (not an ``nn.Module``), so ``y_k`` is taken over all the model's
    parameters (those the field does not use contribute zeros).
    """
    h = x.new_zeros(x.shape[0], model.hidden).requires_grad_(True)  # a_0 exists (as in the module)
    steps = []
    for s in range(x.shape[1]):
        u = model.inp(x[:, s])
        tr = integrate(
            lambda t, h, u=u: torch.tanh(model.rec(h) + u),
            h,
            model.span,
            method="rk4",
            options={"step_size": 0.125},
        )
        steps.append(tr)
        h = tr.ys[-1]
    loss = F.mse_loss(model.readout(h), y)
    traj = chain(steps)
    a = adjoints(loss, traj, create_graph=True)
    ys = sensitivities(traj, a, create_graph=True, params=list(model.parameters()))
    gen = model.regularizers[-1].generator(0, traj.times.device)  # the step-0 probes
    # The probes are drawn solve by solve, during each solve; R_skew is the chain's length
    # squared times the mean over its checkpoints of E|S v|^2 / d (MATH.md); each solve's
    # functional value is its own span squared times its mean.
    total, count = 0.0, 0
    for tr in steps:
        s = skew_jacobian_penalty(tr.func, tr.times, tr.checkpoint_states, PROBES, generator=gen)
        total, count = total + s / tr.span**2 * tr.num_checkpoints, count + tr.num_checkpoints
    skew = sum(tr.span for tr in steps) ** 2 * total / count
    return (
        loss
        + W_ADJ * adjoint_magnitude_penalty(a)
        + W_SENS * sensitivity_magnitude_penalty(ys)
        + W_DIR * directional_penalty(ys, gamma=GAMMA)
        + W_SKEW * skew
    )


@pytest.mark.parametrize(
    ("cls", "data", "reference"),
    [
        (RegLatentODE, latent_data(16, F64), latent_reference),
        (RegODERNN, sequence_data(8, 3, F64), ode_rnn_reference),
    ],
    ids=["latent_ode", "ode_rnn"],
)
@pytest.mark.parametrize("shared", [True, False], ids=["shared_backward", "two_backwards"])
def test_gradient_equals_hand_written_reference(cls, data, reference, shared) -> None:
    torch.manual_seed(0)
    model = cls(regularizers=all_regularizers(), shared_backward=shared).double()
    x, y = data
    returned = model.training_step((x, y), 0)
    expected = reference(model, x, y)
    # the same value (the shared backward's linear term adds exactly 0) and the same gradient
    assert float(returned) == pytest.approx(float(expected), rel=1e-12)
    got = grads(model, returned)
    want = grads(model, expected)
    assert max_diff(got, want) < 1e-6
    # and the regularizers matter: the task gradient alone is far from it
    task = grads(model, F.mse_loss(model(x), y))
    assert max_diff(task, want) > 1e-3


def stop_gradient_regularizers() -> list:
    return [
        SensitivityMagnitude(W_SENS, detach_states=True, detach_adjoints=True),
        DirectionalConstraint(gamma=GAMMA, weight=W_DIR, detach_states=True, detach_adjoints=True),
    ]


@pytest.mark.parametrize("shared", [True, False], ids=["shared_backward", "two_backwards"])
def test_stop_gradient_terms_equal_their_reference(shared) -> None:
    """``detach_states`` + ``detach_adjoints``: y_k = a_k df/dtheta (z_k) with a_k and z_k
    constants. With the shared backward the task gradient comes from the adjoints' backward."""
    torch.manual_seed(0)
    model = RegLatentODE(regularizers=stop_gradient_regularizers(), shared_backward=shared)
    model = model.double()
    x, y = latent_data(16, F64)
    returned = model.training_step((x, y), 0)

    traj = integrate(
        model.field, model.encoder(x), model.span, method="rk4", options={"step_size": 0.125}
    )
    loss = F.mse_loss(model.readout(traj.ys[-1]), y)
    a = adjoints(loss, traj).detach()  # a plain backward: no graph
    ys = sensitivities(traj, a, create_graph=True, detach_states=True)
    expected = (
        loss
        + W_SENS * sensitivity_magnitude_penalty(ys)
        + W_DIR * directional_penalty(ys, gamma=GAMMA)
    )
    assert float(returned) == pytest.approx(float(expected), rel=1e-12)
    got, want = grads(model, returned), grads(model, expected)
    assert max_diff(got, want) < 1e-10
    # an approximation: it differs from the exact terms' gradient
    exact = RegLatentODE(
        regularizers=[
            SensitivityMagnitude(W_SENS),
            DirectionalConstraint(gamma=GAMMA, weight=W_DIR),
        ]
    ).double()
    exact.load_state_dict(model.state_dict())
    assert max_diff(grads(exact, exact.training_step((x, y), 0)), want) > 1e-4
    # no term differentiates the adjoints, so odeint_adjoint is allowed with them
    assert not any(r.needs_differentiable_adjoints for r in model.regularizers)


# --------------------------------------------------------------------------- schedule


class RecordingLatentODE(RegLatentODE):
    """A subclass that calls ``super().training_step``: the outer call adds the terms once.

    It also records every ``self.log`` call, per training step.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task_losses: list[float] = []
        self.returned: list[float] = []
        self.logged: list[dict[str, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.logged.append({})
        loss = super().training_step(batch, batch_idx)
        self.task_losses.append(float(loss))
        return loss

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if self.trainer.training and self.logged:
            self.logged[-1][name] = float(value)
        super().log(name, value, *args, **kwargs)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.returned.append(float(outputs["loss"]))


def test_every_n_steps_warmup_and_subclass_super_call() -> None:
    torch.manual_seed(0)
    sens = SensitivityMagnitude(0.4, every_n_steps=2, warmup_steps=5)
    adj = AdjointMagnitude(0.3, every_n_steps=3)
    model = RecordingLatentODE(regularizers=[sens, adj]).double()
    tr = trainer(max_epochs=2)
    tr.fit(model, loader(latent_data(64, F64)))
    steps = tr.global_step
    assert steps == 8 and len(model.task_losses) == len(model.logged) == steps
    for step, logged in enumerate(model.logged):
        added = model.returned[step] - model.task_losses[step]
        # the one cadence rule (ode_reg.due): the n-th, 2n-th, ... step, (step + 1) % n == 0
        on = [r for r in (sens, adj) if (step + 1) % r.every_n_steps == 0]
        reg_keys = {k for k in logged if k.startswith("reg/")}
        if not on:  # steps 0, 4 and 6: no term computed, added or logged
            assert added == 0.0 and reg_keys == set()
            continue
        assert reg_keys == {f"reg/{r.name}" for r in on} | {"reg/total", "reg/skipped"}
        expected = 0.0
        for r in on:
            scale = r.weight * (min(1.0, (step + 1) / 5) if r is sens else 1.0)
            assert r.scheduled_weight(step) == pytest.approx(scale, rel=1e-15)
            expected += scale * logged[f"reg/{r.name}"]
        # added exactly once (a double-counting subclass would add 2x)
        assert added == pytest.approx(expected, rel=1e-9, abs=1e-14)
        assert logged["reg/total"] == pytest.approx(expected, rel=1e-9, abs=1e-14)
    # warm-up: the scheduled weight ramps 0.4 * (1/5, 3/5, 1, 1) on steps 0, 2, 4, 6
    assert [sens.scheduled_weight(s) for s in (0, 2, 4, 6)] == pytest.approx([0.08, 0.24, 0.4, 0.4])


def test_validation_and_test_steps_are_untouched() -> None:
    torch.manual_seed(0)
    model = RegLatentODE(regularizers=all_regularizers())
    torch.manual_seed(0)
    plain = PlainLatentODE()
    data = loader(latent_data(32))
    tr = trainer(max_epochs=1, limit_train_batches=1)
    tr.fit(model, data, data)
    record = model.ode_step
    assert record is not None
    plain.load_state_dict(model.state_dict(), strict=False)
    for run, key in ((L.Trainer.validate, "val_loss"), (L.Trainer.test, "test_loss")):
        t1, t2 = trainer(), trainer()
        run(t1, model, data)
        run(t2, plain, data)
        assert not [k for k in t1.callback_metrics if k.startswith("reg/")]
        assert float(t1.callback_metrics[key]) == pytest.approx(
            float(t2.callback_metrics[key]), rel=1e-6
        )
        assert model.ode_step is record  # nothing recorded in evaluation
        assert model._recorder is None and current_recorder() is None


def test_direct_call_outside_training_step_records_nothing() -> None:
    torch.manual_seed(0)
    model = RegLatentODE(regularizers=all_regularizers())
    x, _ = latent_data(8)
    model(x)
    assert model._recorder is None and current_recorder() is None and model.ode_step is None


# --------------------------------------------------------------------------- odeint_adjoint


class CountingField(TanhField):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.calls = 0

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(t, z)


class AdjointSolveModel(RegularizedODEModule):
    def __init__(self, adjoint: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.field = CountingField(3)
        self.adjoint = adjoint

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        zs = self.odeint(
            self.field,
            x,
            torch.tensor([0.0, 1.0], dtype=x.dtype),
            method="rk4",
            options={"step_size": 0.125},
            adjoint=self.adjoint,
        )
        return F.mse_loss(zs[-1], y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("reg_cls", [AdjointMagnitude, SensitivityMagnitude, DirectionalConstraint])
def test_adjoint_solver_refused_before_integrating(reg_cls) -> None:
    model = AdjointSolveModel(adjoint=True, regularizers=[reg_cls(weight=0.1)])
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="odeint_adjoint cannot be used") as info:
        model.training_step((x, x), 0)
    assert reg_cls.default_name in str(info.value)
    assert model.field.calls == 0
    assert model._recorder is None  # the wrapper cleaned up


def test_stop_gradient_terms_are_refused_with_adjoint_solver() -> None:
    """One ``odeint_adjoint`` solve runs its forward under no-grad: its step states are not on
    the autograd path, so no ``a_k`` exists, not even for the stop-gradient terms (before the
    drop-in issue each checkpoint interval was its own odeint_adjoint call)."""
    model = AdjointSolveModel(True, regularizers=stop_gradient_regularizers()).double()
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="odeint_adjoint cannot be used"):
        model.training_step((x, x), 0)
    assert model.field.calls == 0


def test_skew_jacobian_penalty_works_with_adjoint_solver() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    out = {}
    for adjoint in (False, True):
        torch.manual_seed(0)
        model = AdjointSolveModel(adjoint, regularizers=[SkewJacobianPenalty(0.5)]).double()
        torch.manual_seed(7)
        loss = model.training_step((x, y), 0)
        assert model.ode_step.trajectories[0].adjoint_method is adjoint
        out[adjoint] = (float(loss), grads(model, loss))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-12)
    # odeint_adjoint's gradient is the discretized adjoint ODE, and its step states are not on
    # the autograd path (the skew term's gradient has no part through z_k there): close, not
    # equal (measured 1.5e-3 on these parameters, whose gradients are O(1))
    assert max_diff(out[True][1], out[False][1]) < 1e-2
    # and it trains in a Trainer
    torch.manual_seed(0)
    model = AdjointSolveModel(True, regularizers=[SkewJacobianPenalty(0.5)])
    before = [p.detach().clone() for p in model.parameters()]
    tr = trainer(max_epochs=1)
    tr.fit(model, loader((x.float(), y.float()), batch_size=3))
    assert torch.isfinite(tr.callback_metrics["reg/skew_jacobian"])
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
