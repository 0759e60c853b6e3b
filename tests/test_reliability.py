"""Reliability: the non-finite guard, argument validation, resuming, solver failures, DDP skips."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torchdiffeq
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_newcomer import offline_wandb  # noqa: F401 - the fixture: W&B offline, in tmp_path
from torch import nn
from torch.nn import functional as F

from ode_reg import (
    AdjointMagnitude,
    DirectionalConstraint,
    IntegrationError,
    RegularizedODEModule,
    SensitivityMagnitude,
    SkewJacobianPenalty,
    SpectralConstraint,
    integrate,
)
from ode_reg.functional import (
    adjoint_magnitude_penalty,
    directional_penalty,
    sensitivity_magnitude_penalty,
    skew_jacobian_penalty,
    spectral_penalty,
)
from ode_reg.terms import ChainContext as StepContext

WORKER = Path(__file__).with_name("_ddp_worker.py")


# --------------------------------------------------------------------------- models


class TanhField(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z))


class LinearField(nn.Module):
    """``f(t, z) = W z`` with ``W ~ 50 I``: growth ~1e33 over [0, 2] with rk4, h = 1/8."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(50.0 * torch.eye(dim) + 0.1 * torch.randn(dim, dim))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.lin(z)


class FlakyAdjointMagnitude(AdjointMagnitude):
    """``AdjointMagnitude`` whose value is NaN on the global steps in ``bad_steps``."""

    def __init__(self, weight: float, bad_steps: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        self.bad_steps = bad_steps
        self.current_step = -1

    def compute(self, ctx: StepContext) -> torch.Tensor:
        value = super().compute(ctx)
        return value * math.nan if self.current_step in self.bad_steps else value


class ODEModel(RegularizedODEModule):
    """``z0 = scale * x``, solved over ``[0, span]`` (rk4, h = 1/8), loss ``mse(z_T, y)``."""

    def __init__(
        self,
        field: str = "tanh",
        scale: float = 1.0,
        span: float = 1.0,
        lr: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.field = LinearField(3) if field == "linear" else TanhField(3)
        self.scale, self.span, self.lr = scale, span, lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        for r in self.regularizers:
            if isinstance(r, FlakyAdjointMagnitude):
                r.current_step = self.global_step
        x, y = batch
        t = torch.tensor([0.0, self.span], dtype=x.dtype)
        zs = self.odeint(self.field, x * self.scale, t, method="rk4", options={"step_size": 0.125})
        loss = F.mse_loss(zs[-1], y)
        self.log("task", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


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


def data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 8) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False
    )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --------------------------------------------------------------------------- non-finite guard


def all_regularizers() -> list:
    return [
        AdjointMagnitude(0.1),
        SensitivityMagnitude(0.1),
        DirectionalConstraint(gamma=0.5, weight=0.1),
        SkewJacobianPenalty(0.1),
    ]


def test_nan_batch_skips_the_step_without_blaming_the_terms() -> None:
    """A NaN in the batch: no term is evaluated (``reg/skipped`` stays 0, the terms' count),
    the optimizer step is dropped (parameters unchanged) and counted in reg/skipped_steps."""
    model = ODEModel(regularizers=all_regularizers())
    before = snapshot(model)
    x, y = data(8)
    x[3, 1] = math.nan
    tr = trainer(max_steps=1)
    with pytest.warns(UserWarning, match=r"step 0 skipped, the batch is not finite: batch\[0\]"):
        tr.fit(model, loader(x, y))
    assert [int(r.skipped) for r in model.regularizers] == [0, 0, 0, 0]
    metrics = tr.callback_metrics
    assert float(metrics["reg/skipped_steps"]) == 1.0
    assert "reg/skipped" not in metrics and "reg/total" not in metrics
    for r in model.regularizers:
        assert f"reg/{r.name}" not in metrics  # not evaluated, not logged
    assert max_diff(before, snapshot(model)) == 0.0


def test_the_skipped_step_count_travels_in_the_checkpoint(tmp_path) -> None:
    """reg/skipped_steps is run state: a run resumed after a dropped step counts on from the
    saved count (1 -> 2 at the next dropped step), not from 0."""
    x, y = data(16)
    x[3, 1] = math.nan  # the first batch of every epoch is not finite
    model = ODEModel(regularizers=[AdjointMagnitude(0.1)])
    tr = trainer(max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=True)
    with pytest.warns(UserWarning, match="skipped"):
        tr.fit(model, loader(x, y))
    assert float(tr.callback_metrics["reg/skipped_steps"]) == 1.0
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert torch.load(ckpt, weights_only=True)["ode_reg_run_state"]["skipped_steps"] == 1
    resumed = ODEModel(regularizers=[AdjointMagnitude(0.1)])
    tr2 = trainer(max_epochs=2, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="skipped"):
        tr2.fit(resumed, loader(x, y), ckpt_path=str(ckpt))
    assert float(tr2.callback_metrics["reg/skipped_steps"]) == 2.0


def test_nan_batch_raises_under_raise_policy_naming_the_batch() -> None:
    model = ODEModel(regularizers=all_regularizers(), nonfinite="raise")
    x, y = data(8)
    x[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match=r"the batch is not finite: batch\[0\] \(1 of"):
        trainer(max_steps=1).fit(model, loader(x, y))
    assert int(model.regularizers[0].skipped) == 0


class NaNLossAt(ODEModel):
    """The task loss is NaN at global step ``bad_step`` (the batch is finite)."""

    def __init__(self, bad_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad_step = bad_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step == self.bad_step else loss


class ParamsEachStep(Callback):
    """The parameters at the start of every training batch, and after the last."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(snapshot(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        self.seen.append(snapshot(pl_module))


def test_nan_task_loss_at_step_3_skips_that_step_only(tmp_path: Path) -> None:
    """NaN task loss at step 3 (lr > 0): step 3 leaves the parameters (and Adam's state) as
    they were, every other step changes them, all stay finite; the skip is logged under
    reg/skipped_steps (not reg/skipped), and no term value is logged for step 3."""
    from lightning.pytorch.loggers import CSVLogger

    model = NaNLossAt(3, regularizers=[AdjointMagnitude(0.1), SkewJacobianPenalty(0.05, seed=1)])
    params = ParamsEachStep()
    tr = trainer(max_steps=6, logger=CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[params])
    with pytest.warns(UserWarning, match=r"step 3 skipped, the task loss is not finite"):
        tr.fit(model, loader(*data(48)))
    seen = params.seen
    assert len(seen) == 7
    for k, (a, b) in enumerate(zip(seen, seen[1:])):
        assert all(torch.isfinite(p).all() for p in b.values())
        if k == 3:
            assert max_diff(a, b) == 0.0  # the skipped step
        else:
            assert max_diff(a, b) > 1e-5  # it trains
    adam = tr.optimizers[0]
    assert all(int(st["step"]) == 5 for st in adam.state.values())  # 6 steps, one skipped
    assert [int(r.skipped) for r in model.regularizers] == [0, 0]
    logged = _logged(tmp_path)
    assert [logged[s].get("reg/skipped_steps") for s in range(6)] == [
        None,
        None,
        None,
        1,
        None,
        None,
    ]
    assert all(logged[s]["reg/skipped"] == 0 for s in range(6) if s != 3)
    for key in ("reg/adjoint_magnitude_step", "reg/skew_jacobian_step", "reg/total_step"):
        assert key not in logged[3] and all(key in logged[s] for s in (2, 4)), key


def test_nan_task_loss_raises_under_raise_policy_naming_the_task_loss() -> None:
    model = NaNLossAt(3, regularizers=[AdjointMagnitude(0.1)], nonfinite="raise")
    with pytest.raises(
        FloatingPointError, match=r"^the task loss is not finite \(value nan\) at step 3$"
    ):
        trainer(max_steps=6).fit(model, loader(*data(48)))
    assert model.global_step == 3 and int(model.regularizers[0].skipped) == 0


class NaNGradient(ODEModel):
    """A finite task loss whose gradient is NaN at step 1: ``sqrt(|w - w|)`` has value 0 and
    derivative ``inf * 0``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 1:
            w = self.field.lin.weight
            loss = loss + (w - w.detach()).abs().sqrt().sum()
        return loss


def test_nan_gradient_of_a_finite_loss_skips_the_step_or_raises_naming_the_parameter() -> None:
    model = NaNGradient(regularizers=[AdjointMagnitude(0.1)])
    params = ParamsEachStep()
    tr = trainer(max_steps=3, callbacks=[params])
    with pytest.warns(UserWarning, match=r"step 1 skipped, the gradient of field.lin.weight"):
        tr.fit(model, loader(*data(24)))
    assert max_diff(params.seen[1], params.seen[2]) == 0.0
    assert max_diff(params.seen[2], params.seen[3]) > 1e-5
    assert float(tr.callback_metrics["reg/skipped_steps"]) == 1.0
    raising = NaNGradient(regularizers=[AdjointMagnitude(0.1)], nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"gradient of field.lin.weight is not finite"):
        trainer(max_steps=3).fit(raising, loader(*data(24)))


def exploding(regs: list, **kwargs: Any) -> ODEModel:
    # z0 ~ 1e-34 * x grows by ~1e33 to O(1): the task loss and its gradient are finite, but
    # the adjoint a_0 ~ 1e33 squares to inf in float32, so log|a_0| and R_adj are infinite.
    return ODEModel("linear", scale=1e-34, span=2.0, lr=1e-3, regularizers=regs, **kwargs)


def test_exploding_field_drops_only_the_overflowing_term_and_task_still_trains() -> None:
    x, y = data(16)
    adj, sens = AdjointMagnitude(0.1), SensitivityMagnitude(0.1)
    model = exploding([adj, sens])
    before = snapshot(model)
    tr = trainer(max_steps=2)
    tr.fit(model, loader(x, y))
    after = snapshot(model)
    assert int(adj.skipped) == 2 and int(sens.skipped) == 0
    assert float(tr.callback_metrics["reg/skipped"]) == 2.0
    assert torch.isfinite(tr.callback_metrics["task"])
    assert torch.isfinite(tr.callback_metrics["reg/sensitivity_magnitude"])
    assert "reg/adjoint_magnitude" not in tr.callback_metrics
    assert all(torch.isfinite(p).all() for p in after.values())
    assert max_diff(before, after) > 1e-4  # it trained
    # exactly as if the overflowing term had not been there
    reference = exploding([SensitivityMagnitude(0.1)])
    trainer(max_steps=2).fit(reference, loader(x, y))
    assert max_diff(after, snapshot(reference)) < 1e-7


def test_exploding_field_raises_under_raise_policy() -> None:
    x, y = data(8)
    model = exploding([AdjointMagnitude(0.1)], nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"'adjoint_magnitude' is not finite at step 0"):
        model.training_step((x, y), 0)
    assert model._recorder is None


# --------------------------------------------------------------------------- validation table


def _adjoints(k: int = 3) -> torch.Tensor:
    return torch.randn(k, 2, 3)


def _run_step(reg: Any) -> None:
    model = ODEModel(regularizers=[reg])
    model.training_step(data(4), 0)


INVALID = [
    # (id, call, argument, accepted range as printed)
    *[
        (f"{cls.__name__}-weight", lambda c=cls: c(weight=-0.1), "weight", "[0.0, inf)")
        for cls in (
            AdjointMagnitude,
            SensitivityMagnitude,
            DirectionalConstraint,
            SpectralConstraint,
            SkewJacobianPenalty,
        )
    ],
    ("weight-nan", lambda: AdjointMagnitude(weight=math.nan), "weight", "[0.0, inf)"),
    *[
        (f"{cls.__name__}-every_n", lambda c=cls: c(every_n_steps=0), "every_n_steps", ">= 1")
        for cls in (AdjointMagnitude, SensitivityMagnitude, SkewJacobianPenalty)
    ],
    ("every_n-float", lambda: AdjointMagnitude(every_n_steps=1.5), "every_n_steps", ">= 1"),
    *[
        (f"{cls.__name__}-warmup", lambda c=cls: c(warmup_steps=-1), "warmup_steps", ">= 0")
        for cls in (AdjointMagnitude, DirectionalConstraint, SkewJacobianPenalty)
    ],
    ("directional-gamma-high", lambda: DirectionalConstraint(gamma=1.5), "gamma", "[-1.0, 1.0]"),
    ("directional-gamma-low", lambda: DirectionalConstraint(gamma=-1.01), "gamma", "[-1.0, 1.0]"),
    ("spectral-gamma", lambda: SpectralConstraint(gamma=2.0), "gamma", "[-1.0, 1.0]"),
    (
        "functional-directional-gamma",
        lambda: directional_penalty(torch.randn(3, 4), gamma=1.2),
        "gamma",
        "[-1.0, 1.0]",
    ),
    (
        "functional-spectral-gamma",
        lambda: spectral_penalty(torch.eye(3).expand(2, 3, 3), gamma=-2.0),
        "gamma",
        "[-1.0, 1.0]",
    ),
    ("probes", lambda: SkewJacobianPenalty(probes=0), "probes", ">= 1"),
    (
        "functional-probes",
        lambda: skew_jacobian_penalty(lambda t, z: z, torch.zeros(1), torch.ones(1, 2, 2), 0),
        "probes",
        ">= 1",
    ),
    ("max_states", lambda: SkewJacobianPenalty(max_states=0), "max_states", ">= 1"),
    (
        "checkpoints-zero",
        lambda: integrate(
            lambda t, z: -z, torch.ones(2, 2), torch.tensor([0.0, 1.0]), checkpoints=0
        ),
        "checkpoints",
        ">= 1",
    ),
    (
        "checkpoints-outside",
        lambda: integrate(
            lambda t, z: -z, torch.ones(2, 2), torch.tensor([0.0, 1.0]), checkpoints=[0.5, 1.5]
        ),
        "checkpoints",
        "between t[0] = 0 and t[-1] = 1",
    ),
    (
        "module-odeint-checkpoints",
        lambda: ODEModel().odeint(
            lambda t, z: -z, torch.ones(2, 2), torch.tensor([0.0, 1.0]), checkpoints=-2
        ),
        "checkpoints",
        ">= 1",
    ),
    (
        "t-not-monotonic",
        lambda: integrate(lambda t, z: -z, torch.ones(2, 2), torch.tensor([0.0, 1.0, 0.5])),
        "t",
        "strictly increasing or strictly decreasing",
    ),
    (
        "functional-adjoint-reference",
        lambda: adjoint_magnitude_penalty(_adjoints(3), reference=3),
        "reference",
        "[-3, 2]",
    ),
    (
        "functional-sensitivity-reference",
        lambda: sensitivity_magnitude_penalty(torch.randn(3, 5), reference=-4),
        "reference",
        "[-3, 2]",
    ),
    (
        "functional-directional-reference",
        lambda: directional_penalty(torch.randn(3, 5), reference=7),
        "reference",
        "[-3, 2]",
    ),
    (
        "functional-spectral-reference",
        lambda: spectral_penalty(torch.eye(2).expand(3, 2, 2), reference=3),
        "reference",
        "[-3, 2]",
    ),
    (
        "class-reference-at-first-step",
        lambda: _run_step(AdjointMagnitude(reference=20)),
        "reference",
        "[-9, 8]",
    ),
    (
        "functional-eps",
        lambda: adjoint_magnitude_penalty(_adjoints(), eps=0.0),
        "eps",
        "(0.0, inf)",
    ),
    (
        "nonfinite",
        lambda: ODEModel(nonfinite="ignore"),
        "nonfinite",
        "('skip', 'raise')",
    ),
    (
        "not-a-regularizer",
        lambda: ODEModel(regularizers=[AdjointMagnitude(), nn.Linear(2, 2)]),
        "regularizers",
        "Regularizer instances",
    ),
    (
        "duplicate-names",
        lambda: ODEModel(regularizers=[AdjointMagnitude(0.1), AdjointMagnitude(0.2)]),
        "regularizers",
        "distinct names",
    ),
    (
        "duplicate-explicit-names",
        lambda: ODEModel(
            regularizers=[SensitivityMagnitude(name="a"), DirectionalConstraint(name="a")]
        ),
        "regularizers",
        "distinct names",
    ),
]


@pytest.mark.parametrize(
    ("call", "arg", "accepted"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_option_raises_value_error_naming_argument_and_range(call, arg, accepted) -> None:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert f"`{arg}`" in message, message
    assert accepted in message, message


# --------------------------------------------------------------------------- resume


class ResumableLoader:
    """Mini-batches, reshuffled each epoch (seeded by the trainer's epoch), resumable mid-epoch.

    Lightning restores a loader's position only through ``state_dict``/``load_state_dict``;
    a plain ``DataLoader`` would restart the epoch from its first batch after a resume.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, epoch: Any) -> None:
        self.x, self.y, self.batch_size, self.epoch = x, y, batch_size, epoch
        self.pos = 0
        self._resume = 0

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch()))
        start, self._resume = self._resume, 0
        for j in range(start, len(self)):
            self.pos = j + 1
            idx = perm[j * self.batch_size : (j + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = state["pos"]


class ResumeModel(ODEModel):
    def train_dataloader(self) -> ResumableLoader:
        x, y = data(40, seed=5)
        return ResumableLoader(x, y, 8, lambda: self.trainer.current_epoch)


class Interrupt(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError(f"interrupted at step {self.at_step}")


class SkippedAtStart(Callback):
    def __init__(self) -> None:
        self.skipped: list[int] | None = None
        self.step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.skipped = [int(r.skipped) for r in pl_module.regularizers]
        self.step = trainer.global_step


def resume_regularizers() -> list:
    return [
        SensitivityMagnitude(0.3),
        DirectionalConstraint(gamma=1.0, weight=0.3),
        FlakyAdjointMagnitude(0.3, bad_steps=(2, 9)),
    ]


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path: Path) -> None:
    epochs = 3  # 5 steps an epoch
    L.seed_everything(0)
    full = ResumeModel(regularizers=resume_regularizers())
    trainer(max_epochs=epochs).fit(full)
    assert [int(r.skipped) for r in full.regularizers] == [0, 0, 2]

    def checkpointing(*extra: Callback) -> L.Trainer:
        ckpt = ModelCheckpoint(
            dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0
        )
        return trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[ckpt, *extra])

    L.seed_everything(0)
    first = ResumeModel(regularizers=resume_regularizers())
    with pytest.raises(RuntimeError, match="interrupted at step 7"):
        checkpointing(Interrupt(7)).fit(first)
    last = tmp_path / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert 0 < state["global_step"] < 10 and state["global_step"] % 5 != 0  # mid-epoch
    # the counters are run state under their own key, not model weights
    assert not [k for k in state["state_dict"] if k.startswith("regularizers.")]
    assert state["ode_reg_run_state"]["terms"][2]["state"]["skipped"] == 1

    L.seed_everything(0)
    resumed = ResumeModel(regularizers=resume_regularizers())
    start = SkippedAtStart()
    checkpointing(start).fit(resumed, ckpt_path=last)
    assert start.step == state["global_step"]
    assert start.skipped == [0, 0, 1]  # the skipped buffers came back
    assert [int(r.skipped) for r in resumed.regularizers] == [0, 0, 2]
    assert max_diff(snapshot(full), snapshot(resumed)) < 1e-6


# --------------------------------------------------------------------------- solver failure


class Square(nn.Module):
    """``dz/dt = z^2``: from ``z(0) = 1``, ``z = 1 / (1 - t)`` blows up at ``t = 1``."""

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z * z


def reached(message: str) -> float:
    match = re.search(r"reached t = (-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)", message)
    assert match, message
    return float(match.group(1))


def test_adaptive_solver_blow_up_reports_time_reached_and_field() -> None:
    y0 = torch.ones(2, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    with pytest.raises(AssertionError) as raw:  # torchdiffeq alone: no time in the message
        torchdiffeq.odeint(Square(), y0, t, method="dopri5")
    assert "underflow" in str(raw.value) and "t =" not in str(raw.value)
    with pytest.raises(IntegrationError) as info:
        integrate(Square(), y0, t, method="dopri5", checkpoints=4)
    message = str(info.value)
    assert "Square" in message and "dopri5" in message and "underflow in dt" in message
    assert 0.999 < reached(message) <= 1.0 + 1e-6  # the blow-up time (the step that failed)
    assert isinstance(info.value.__cause__, AssertionError)


def test_adaptive_solver_step_budget_reports_time_reached() -> None:
    y0 = torch.ones(2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 10.0], dtype=torch.float64)
    field = TanhField(2).double()
    with pytest.raises(IntegrationError) as info:
        integrate(
            field, y0, t, method="dopri5", checkpoints=1, options={"max_num_steps": 3}, rtol=1e-12
        )
    message = str(info.value)
    assert "TanhField" in message and "max_num_steps" in message
    assert 0.0 < reached(message) < 10.0


def test_solver_failure_inside_training_step_propagates_and_resets_recording() -> None:
    class BlowUp(ODEModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, _ = batch
            zs = self.odeint(Square(), x.abs() + 1.0, torch.tensor([0.0, 2.0]), method="dopri5")
            return zs[-1].sum()

    model = BlowUp(regularizers=[AdjointMagnitude(0.1)])
    with pytest.raises(IntegrationError, match="Square"):
        model.training_step(data(4), 0)
    assert model._recorder is None


# --------------------------------------------------------------------------- DDP


def run_worker(out: Path, scenarios: tuple[str, ...], timeout: float = 180.0) -> str:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), *scenarios],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"DDP worker hung (> {timeout} s):\n{proc.communicate()[0][-4000:]}")


def load(out: Path, name: str) -> dict[str, Any]:
    return torch.load(out / name, weights_only=False)


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_reliability")
    log = run_worker(out, ("nonfinite", "loss_nan", "step_skip", "step_raise"))
    (out / "worker.log").write_text(log)
    return out


def status(out: Path, name: str) -> str:
    path = out / f"{name}.status"
    assert path.exists(), (out / "worker.log").read_text()[-4000:]
    return path.read_text().partition("\n")[2].strip()


def test_ddp_one_rank_nonfinite_collective_skip(ddp_out: Path) -> None:
    """Only rank 1 meets a non-finite term (step 1): both ranks skip it, nobody hangs, and the
    result is the one-process run that skipped the term on that step."""
    assert status(ddp_out, "nonfinite-ddp") == "ok"
    assert status(ddp_out, "nonfinite-single") == "ok"
    single = load(ddp_out, "nonfinite-single-rank0.pt")
    r0, r1 = load(ddp_out, "nonfinite-ddp-rank0.pt"), load(ddp_out, "nonfinite-ddp-rank1.pt")
    for res in (single, r0, r1):
        assert res["skipped"] == {"adjoint_magnitude": 1, "sensitivity_magnitude": 0}
        assert res["steps"] == 4
        logged = res["logged"]
        assert "reg/adjoint_magnitude" not in logged[1] and "reg/adjoint_magnitude" in logged[2]
        assert [row["reg/skipped"] for row in logged] == [0.0, 1.0, 1.0, 1.0]
        assert all(torch.isfinite(p).all() for p in res["params"].values())
    assert max_diff(r0["params"], r1["params"]) == 0.0
    assert max_diff(single["params"], r0["params"]) < 1e-5


def test_ddp_one_rank_nan_task_loss_skips_the_step_on_every_rank(ddp_out: Path) -> None:
    """Only rank 1's task loss is NaN (step 1): both ranks drop that optimizer step (the
    decision is collective), stay equal and finite, and match one process that dropped it."""
    assert status(ddp_out, "loss_nan-ddp") == "ok", status(ddp_out, "loss_nan-ddp")
    assert status(ddp_out, "loss_nan-single") == "ok"
    single = load(ddp_out, "loss_nan-single-rank0.pt")
    r0, r1 = load(ddp_out, "loss_nan-ddp-rank0.pt"), load(ddp_out, "loss_nan-ddp-rank1.pt")
    for res in (single, r0, r1):
        assert res["steps"] == 4 and res["skipped_steps"] == 1
        assert res["skipped"] == {"adjoint_magnitude": 0, "sensitivity_magnitude": 0}
        assert all(torch.isfinite(p).all() for p in res["params"].values())
    assert max_diff(r0["params"], r1["params"]) == 0.0
    assert max_diff(single["params"], r0["params"]) < 1e-5


def test_ddp_one_rank_nonfinite_bare_step(ddp_out: Path) -> None:
    """One training step on a bare gloo group: under "skip" both ranks skip and return their
    task loss plus the finite term; under "raise" both ranks raise (none waits forever)."""
    assert status(ddp_out, "step_skip-ddp") == "ok"
    assert status(ddp_out, "step_raise-ddp") == "ok"
    for r in (0, 1):
        res = load(ddp_out, f"step_skip-ddp-rank{r}.pt")
        assert res["skipped"] == {"adjoint_magnitude": 1, "sensitivity_magnitude": 0}
        assert math.isfinite(res["loss"]) and res["loss"] >= res["task"]
        res = load(ddp_out, f"step_raise-ddp-rank{r}.pt")
        assert res["raised"].startswith("FloatingPointError: regularizer 'adjoint_magnitude'")
        assert res["skipped"] == {"adjoint_magnitude": 0, "sensitivity_magnitude": 0}
    assert "another DDP rank" in load(ddp_out, "step_raise-ddp-rank0.pt")["raised"]


def test_skew_jacobian_probes_travel_in_the_checkpoint() -> None:
    from ode_reg import SkewJacobianPenalty

    torch.manual_seed(0)
    a = SkewJacobianPenalty(0.01)
    torch.manual_seed(1)
    b = SkewJacobianPenalty(0.01)
    assert int(a.base_seed) != int(b.base_seed)  # drawn from the global generator

    def draw(r: SkewJacobianPenalty, step: int) -> torch.Tensor:
        return torch.randint(0, 2, (64,), generator=r.generator(step, torch.device("cpu")))

    assert not torch.equal(draw(a, 5), draw(b, 5))
    b.load_run_state(a.run_state())  # a resumed run gets the same probes at each step
    assert torch.equal(draw(a, 5), draw(b, 5))
    assert not torch.equal(draw(a, 5), draw(a, 6))  # fresh probes each step
    assert SkewJacobianPenalty(0.01, seed=7).base_seed == 7
    with pytest.raises(ValueError, match="`seed` must be an integer >= 0"):
        SkewJacobianPenalty(0.01, seed=-1)


def _logged(folder: Path) -> dict[int, dict[str, float]]:
    """``metrics.csv`` rows of a CSVLogger run, merged by step: {step: {key: value}}."""
    import csv

    rows: dict[int, dict[str, float]] = {}
    for path in folder.rglob("metrics.csv"):
        with open(path) as fh:
            for row in csv.DictReader(fh):
                step = int(row["step"])
                for key, value in row.items():
                    if key != "step" and value not in ("", None):
                        rows.setdefault(step, {})[key] = float(value)
    return rows


class InterruptBefore(Callback):
    """Raise before the batch of ``at_step`` runs (the previous step is complete and logged)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError(f"interrupted before step {self.at_step}")


def test_resumed_run_logs_the_same_sequence_as_an_uninterrupted_one(tmp_path: Path) -> None:
    """Monitors, the stochastic skew-Jacobian term and the task loss: interrupted at step 7,
    resumed from the last checkpoint, the logged sequence equals the uninterrupted run's."""
    from lightning.pytorch.loggers import CSVLogger

    from ode_reg.callbacks import GradientNormMonitor, OrthogonalityMonitor, SpectrumMonitor

    def regs() -> list:
        return [AdjointMagnitude(0.1), SkewJacobianPenalty(0.05, seed=3)]

    def monitors() -> list:
        return [
            GradientNormMonitor(every_n_steps=1),
            SpectrumMonitor(every_n_steps=2),
            OrthogonalityMonitor(every_n_steps=1),
        ]

    def run(root: Path, *extra: Callback, ckpt: Path | None = None) -> None:
        L.seed_everything(0)
        model = ResumeModel(regularizers=regs())
        t = trainer(
            max_epochs=3,
            logger=CSVLogger(root),
            log_every_n_steps=1,
            enable_checkpointing=True,
            callbacks=[
                ModelCheckpoint(
                    dirpath=root / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0
                ),
                *monitors(),
                *extra,
            ],
        )
        t.fit(model, ckpt_path=ckpt)

    run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="interrupted before step 7"):
        run(tmp_path / "first", InterruptBefore(7))
    last = tmp_path / "first" / "ckpt" / "last.ckpt"
    resume_step = torch.load(last, weights_only=False)["global_step"]
    run(tmp_path / "resumed", ckpt=last)

    full = _logged(tmp_path / "full")
    first, resumed = _logged(tmp_path / "first"), _logged(tmp_path / "resumed")
    joined = {s: r for s, r in first.items() if s < resume_step}
    for s, r in resumed.items():
        joined.setdefault(s, {}).update(r)
    keys = [
        "task",
        "reg/adjoint_magnitude_step",
        "reg/skew_jacobian_step",
        "grad/total_norm",
        "adjoint/ratio_max_min",
        "spectrum/abscissa",
    ]
    compared = 0
    for step, row in full.items():
        for key in keys:
            if key in row:
                assert key in joined.get(step, {}), (step, key)
                assert joined[step][key] == pytest.approx(row[key], rel=1e-5, abs=1e-7), (step, key)
                compared += 1
    assert compared > 40
    assert max(full) == max(joined)


# --------------------------------------------------------------------------- the same checks


class CallsOdeint(RegularizedODEModule):
    """A training step that makes one ``ode_reg.odeint`` call with the given arguments."""

    def __init__(self, field: Any, t: Any, adjoint: bool = False, **odeint_kw: Any) -> None:
        term = SkewJacobianPenalty(0.1, seed=0) if adjoint else AdjointMagnitude(0.1)
        super().__init__(regularizers=[term])  # recorded: a term is active
        self.field, self.t, self.adjoint, self.odeint_kw = field, t, adjoint, odeint_kw
        self.out: torch.Tensor | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.out = self.odeint(self.field, batch, self.t, adjoint=self.adjoint, **self.odeint_kw)
        return self.out[-1].pow(2).mean()


def solve_both_ways(field: Any, t: Any, adjoint: bool = False, **kw: Any) -> dict[str, Any]:
    """``ode_reg.odeint`` outside training and inside a training step (recorded): the result,
    or the error message, of each."""
    from ode_reg import odeint, odeint_adjoint

    torch.manual_seed(0)
    z0 = torch.randn(3, 4)
    out: dict[str, Any] = {}
    try:
        call = odeint_adjoint if adjoint else odeint
        out["outside"] = call(field, z0, t, method="rk4", options={"step_size": 0.25}, **kw)
    except ValueError as exc:
        out["outside"] = str(exc)
    model = CallsOdeint(field, t, adjoint=adjoint, method="rk4", options={"step_size": 0.25}, **kw)
    try:
        model.training_step(z0, 0)
        out["inside"] = model.out
    except ValueError as exc:
        out["inside"] = str(exc)
    return out


def test_off_grid_checkpoints_are_refused_inside_and_outside_training() -> None:
    field = TanhField(4)
    res = solve_both_ways(field, torch.tensor([0.0, 1.0]), checkpoints=[0.3])
    assert res["outside"] == res["inside"]
    assert (
        "`checkpoints` time 0.3 is not on the 'rk4' grid (nearest grid time 0.25)" in res["inside"]
    )
    on_grid = solve_both_ways(field, torch.tensor([0.0, 1.0]), checkpoints=[0.25, 0.5])
    assert torch.equal(on_grid["outside"], on_grid["inside"].detach())


def test_a_list_of_times_is_accepted_inside_and_outside_training() -> None:
    field = TanhField(4)
    listed = solve_both_ways(field, [0.0, 0.5, 1.0])
    tensor = solve_both_ways(field, torch.tensor([0.0, 0.5, 1.0]))
    for where in ("outside", "inside"):
        assert isinstance(listed[where], torch.Tensor), listed[where]
        assert torch.equal(listed[where].detach(), tensor[where].detach())


class OneColumn(nn.Module):
    """A field that returns ``(B, 1)`` for a ``(B, 4)`` state (broadcastable, wrong)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z))


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("kind", ["module", "closure"])
def test_a_field_output_of_the_wrong_shape_is_refused_everywhere(kind: str, adjoint: bool) -> None:
    f = OneColumn()
    field = f if kind == "module" else (lambda t, z: f(t, z))
    kw = {"adjoint_params": tuple(f.parameters())} if adjoint and kind == "closure" else {}
    res = solve_both_ways(field, torch.tensor([0.0, 1.0]), adjoint=adjoint, **kw)
    for where in ("outside", "inside"):
        msg = res[where]
        assert isinstance(msg, str), f"{where}: accepted a (3, 1) output for a (3, 4) state"
        assert "returned shape (3, 1) for a state of shape (3, 4)" in msg, msg
    # torchdiffeq alone steps it silently (rk4 broadcasts (3, 1) against (3, 4))
    z0 = torch.randn(3, 4)
    assert torchdiffeq.odeint(field, z0, torch.tensor([0.0, 1.0]), method="rk4").shape == (2, 3, 4)
    assert not f._forward_hooks  # the check's hook is gone


# --------------------------------------------------------------------------- fail early

TWO_MOONS = Path(__file__).resolve().parents[1] / "recipes" / "two_moons.yaml"


def wandb_folder() -> Path:
    """The W&B folder of the ``offline_wandb`` fixture (empty unless a W&B run was made)."""
    return Path(os.environ["WANDB_DIR"])


def fit_two_moons(tmp_path: Path, *extra: str):
    from ode_reg.cli import run

    args = ["fit", "--config", str(TWO_MOONS), "--trainer.max_steps", "2"]
    args += ["--trainer.limit_val_batches", "1", "--data.init_args.n_samples", "200"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    return run([*args, *extra])


@pytest.mark.usefixtures("offline_wandb")
def test_an_unwritable_run_folder_is_refused_before_any_w_and_b_run(tmp_path: Path) -> None:
    from ode_reg.cli import ConfigError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    root = blocker / "runs"
    with pytest.raises(ConfigError) as info:
        fit_two_moons(tmp_path, "--trainer.default_root_dir", str(root))
    message = str(info.value)
    assert message.startswith(f"cannot write to {root} (--trainer.default_root_dir): ")
    assert "\n" not in message  # one line
    assert list(wandb_folder().iterdir()) == []  # no W&B run was created
    assert not (tmp_path / "logs").exists()


def test_an_unwritable_checkpoint_folder_is_refused_before_training(tmp_path: Path) -> None:
    from ode_reg.cli import ConfigError, preflight

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ckpt = ModelCheckpoint(dirpath=blocker / "ckpt")
    t = trainer(enable_checkpointing=True, callbacks=[ckpt], default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"cannot write to .*a_file/ckpt \(the ModelCheckpoint's"):
        preflight(t)
    preflight(trainer(enable_checkpointing=True, default_root_dir=tmp_path / "new"))  # made
    assert (tmp_path / "new").is_dir()


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    real = tmp_path / "real.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "global_step": 3}, real)
    data = real.read_bytes()
    files = {"empty": b"", "truncated": data[: len(data) // 2], "text": b"epoch=3 not a ckpt\n"}
    out = {}
    for name, content in files.items():
        (tmp_path / f"{name}.ckpt").write_bytes(content)
        out[name] = tmp_path / f"{name}.ckpt"
    out["missing"] = tmp_path / "missing.ckpt"
    return out


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty", "the file is empty"),
        ("truncated", "a truncated or damaged checkpoint"),
        ("text", "not a checkpoint torch can read"),
        ("missing", "no such file"),
    ],
)
@pytest.mark.usefixtures("offline_wandb")
def test_a_bad_ckpt_path_gets_one_line_naming_the_file(
    tmp_path: Path, kind: str, reason: str
) -> None:
    from ode_reg.cli import ConfigError

    path = _bad_checkpoints(tmp_path)[kind]
    with pytest.raises(ConfigError) as info:
        fit_two_moons(
            tmp_path, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(path)
        )
    message = str(info.value)
    assert message.startswith(f"--ckpt_path {path}: {reason}"), message
    assert "\n" not in message
    assert list(wandb_folder().iterdir()) == []


@pytest.mark.usefixtures("offline_wandb")
def test_wandb_online_with_an_unreachable_server_falls_back_within_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B asked online, an account configured, the server a loopback port that refuses
    connections: the run says so and goes on with the CSV logger in seconds (wandb.init itself
    waits about 90 s)."""
    import socket
    import time

    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from ode_reg.cli import ensure_logger_available

    with socket.socket() as sock:  # a free port on 127.0.0.1, closed again: connections refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    t = trainer(logger=WandbLogger(save_dir=str(tmp_path / "logs"), project="p"),
                default_root_dir=tmp_path)  # fmt: skip
    start = time.perf_counter()
    with pytest.warns(UserWarning, match=rf"W&B server is http://127.0.0.1:{port} unreachable"):
        ensure_logger_available(t)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, elapsed  # "within a few seconds"; the fallback itself is immediate
    assert [type(lg) for lg in t.loggers] == [CSVLogger]
    assert list(wandb_folder().iterdir()) == []
