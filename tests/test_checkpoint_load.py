"""Checkpoints (issue 11, item 7): ``load_from_checkpoint(strict=True)`` gives back the saved
model, and a run resumed mid-epoch logs the same monitor epoch aggregates as an uninterrupted
one.

References: the saved model itself (every state-dict tensor, the regularizers' classes,
arguments, counters and seeds, and the outputs on a batch), and an uninterrupted run of the
same training (the epoch aggregates it logs).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callbacks import B, Model, TanhField, data, three_monitors
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ode_reg import (
    AdjointMagnitude,
    DirectionalConstraint,
    RegularizedODEModule,
    SensitivityMagnitude,
    SkewJacobianPenalty,
    SpectralConstraint,
)
from ode_reg.models import FlowClassifier, SequenceModel
from ode_reg.models._checkpoint import CHECKPOINT_KEY, build_regularizer, regularizer_spec

T, FEATURES, CLASSES, N = 4, 2, 3, 16


def trainer(root: Path, max_steps: int = 2, **kw) -> L.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kw,
    )


def sequence_data(task: str) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, T, FEATURES, generator=g)
    if task == "regression":
        y = torch.randn(N, CLASSES, generator=g)
    elif task == "sequence":
        y = torch.randint(0, CLASSES, (N, T), generator=g)
    else:
        y = torch.randint(0, CLASSES, (N,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def flow_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(N, 2, generator=g), torch.randint(0, 2, (N,), generator=g)),
        batch_size=8,
    )


RECIPE_MODELS = {
    "sequence-antisymmetric": lambda: SequenceModel(
        FEATURES,
        CLASSES,
        hidden_dim=8,
        regularizers=[AdjointMagnitude(0.1), SkewJacobianPenalty(0.01)],  # random base seed
    ),
    "sequence-gated-regression": lambda: SequenceModel(
        FEATURES,
        CLASSES,
        task="regression",
        cell="antisymmetric_gated",
        hidden_dim=8,
        solver="rk4",
        regularizers=[
            SensitivityMagnitude(0.1, every_n_steps=2),
            DirectionalConstraint(gamma=0.5, weight=0.1, detach_states=True),
        ],
    ),
    "sequence-unstructured-sequence": lambda: SequenceModel(
        FEATURES, CLASSES, task="sequence", cell="unstructured", hidden_dim=8, cosine_epochs=3
    ),
    "sequence-gru": lambda: SequenceModel(FEATURES, CLASSES, cell="gru", hidden_dim=8),
    "flow-antisymmetric": lambda: FlowClassifier(
        hidden_dim=4, regularizers=[AdjointMagnitude(0.1, warmup_steps=5)]
    ),
    "flow-skew_linear": lambda: FlowClassifier(flow="skew_linear", hidden_dim=4, alpha=0.5),
    "flow-orthogonal_flow": lambda: FlowClassifier(
        flow="orthogonal_flow", hidden_dim=4, regularizers=[SpectralConstraint(0.0, 0.1)]
    ),
    "flow-unstructured": lambda: FlowClassifier(flow="unstructured", hidden_dim=4),
}


def batch_of(model: L.LightningModule) -> torch.Tensor:
    if isinstance(model, SequenceModel):
        return next(iter(sequence_data(model.task)))[0]
    return next(iter(flow_data()))[0]


def assert_same_model(loaded: L.LightningModule, saved: L.LightningModule) -> None:
    a, b = loaded.state_dict(), saved.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [type(r) for r in loaded.regularizers] == [type(r) for r in saved.regularizers]
    assert [regularizer_spec(r) for r in loaded.regularizers] == [
        regularizer_spec(r) for r in saved.regularizers
    ]
    loaded.eval(), saved.eval()
    x = batch_of(saved)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved(x))


@pytest.mark.parametrize("name", sorted(RECIPE_MODELS))
def test_recipe_model_loads_strictly(name, tmp_path):
    torch.manual_seed(0)
    model = RECIPE_MODELS[name]()
    data = sequence_data(model.task) if isinstance(model, SequenceModel) else flow_data()
    fit = trainer(tmp_path)
    fit.fit(model, data)
    for r in model.regularizers:
        r.skipped += 3  # a counter that must travel
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=True)  # plain values only: safe loading works
    assert len(state[CHECKPOINT_KEY]) == len(model.regularizers)
    loaded = type(model).load_from_checkpoint(path, strict=True)
    assert_same_model(loaded, model)
    assert all(int(r.skipped) == 3 for r in loaded.regularizers)


def test_explicit_regularizers_argument_wins(tmp_path):
    model = RECIPE_MODELS["flow-antisymmetric"]()
    fit = trainer(tmp_path)
    fit.fit(model, flow_data())
    fit.save_checkpoint(tmp_path / "m.ckpt")
    given = [AdjointMagnitude(0.7)]
    loaded = FlowClassifier.load_from_checkpoint(tmp_path / "m.ckpt", regularizers=given)
    assert loaded.regularizers[0] is given[0] and loaded.regularizers[0].weight == 0.7
    # the saved counters still load into it
    assert int(loaded.regularizers[0].skipped) == int(model.regularizers[0].skipped)


class UserODE(RegularizedODEModule):
    """A user's module as in the README: regularizers built in ``__init__``."""

    def __init__(self, dim: int = 3, weight: float = 0.1) -> None:
        super().__init__(regularizers=[AdjointMagnitude(weight), SkewJacobianPenalty(0.01)])
        self.save_hyperparameters()
        self.field = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.odeint(
            lambda t, z: self.field(z),
            x,
            torch.tensor([0.0, 1.0]),
            method="rk4",
            options={"step_size": 0.25},
        )
        return self.head(z[-1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_user_module_loads_strictly(tmp_path):
    torch.manual_seed(0)
    model = UserODE(weight=0.2)
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1)), 8)
    fit = trainer(tmp_path)
    fit.fit(model, data)
    model.regularizers[0].skipped += 1
    fit.save_checkpoint(tmp_path / "user.ckpt")
    loaded = UserODE.load_from_checkpoint(tmp_path / "user.ckpt", strict=True)
    assert loaded.hparams.weight == 0.2
    a, b = loaded.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(loaded.regularizers[0].skipped) == 1
    assert int(loaded.regularizers[1].base_seed) == int(model.regularizers[1].base_seed)
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_rebuilding_draws_no_random_numbers_and_keeps_arguments():
    reg = DirectionalConstraint(gamma=0.25, weight=0.3, every_n_steps=3, detach_states=True)
    spec = regularizer_spec(SkewJacobianPenalty(0.01, probes=2))
    rng = torch.get_rng_state()
    rebuilt = build_regularizer(spec)
    assert torch.equal(torch.get_rng_state(), rng)  # a seedless term's draw is undone
    assert rebuilt.probes == 2
    again = build_regularizer(regularizer_spec(reg))
    assert (again.gamma, again.weight, again.every_n_steps, again.detach_states) == (
        0.25,
        0.3,
        3,
        True,
    )


def test_spec_refuses_classes_that_are_not_imported_regularizers():
    with pytest.raises(ValueError, match="`spec`"):
        build_regularizer({"module": "not_a_module_here", "qualname": "X", "init_args": {}})
    with pytest.raises(ValueError, match="`spec`"):
        build_regularizer({"module": "torch.nn", "qualname": "Linear", "init_args": {}})
    with pytest.raises(ValueError, match="`reg`"):
        regularizer_spec("AdjointMagnitude")


# --------------------------------------------------------------------------- monitors, resume


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning can resume mid-epoch (``state_dict`` / ``load_state_dict``):
    after a restore it skips the batches the checkpointed run had already drawn."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._drawn = self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._drawn = 0
        for i, batch in enumerate(super().__iter__()):
            self._drawn = i + 1
            if i >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self._drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["drawn"])


EPOCH_KEYS = (
    "spectrum/abscissa_epoch_mean",
    "adjoint/ratio_epoch_geomean",
    "orthogonality/epoch_max",
)
BATCHES = 6


def monitored_run(root: Path, *, ckpt_path=None, checkpoint=None, epochs: int = 1) -> dict:
    model = Model(TanhField(), encode=True, declared=False, lr=0.3)
    callbacks = three_monitors(every=1)
    if checkpoint is not None:
        callbacks.append(checkpoint)
    fit = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=root,
    )
    data_loader = ResumableLoader(TensorDataset(data(BATCHES * B)), batch_size=B, shuffle=False)
    fit.fit(model, data_loader, ckpt_path=ckpt_path)
    return {k: float(fit.callback_metrics[k]) for k in EPOCH_KEYS} | {"steps": fit.global_step}


def test_resume_mid_epoch_logs_the_uninterrupted_epoch_aggregates(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    full = monitored_run(tmp_path / "full", checkpoint=ckpt)
    assert full["steps"] == BATCHES
    mid = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"  # 2 of 6 batches done
    assert mid.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed = monitored_run(tmp_path / "resumed", ckpt_path=mid)
    assert resumed["steps"] == BATCHES
    for key in EPOCH_KEYS:
        assert resumed[key] == pytest.approx(full[key], rel=1e-6), key  # float32 states
    # Teeth: without the saved epoch states the resumed aggregates cover 4 batches only.
    state = torch.load(mid, weights_only=False)
    for value in state["callbacks"].values():
        value.pop("epoch", None)
    torch.save(state, tmp_path / "stripped.ckpt")
    stripped = monitored_run(tmp_path / "stripped", ckpt_path=tmp_path / "stripped.ckpt")
    assert stripped["spectrum/abscissa_epoch_mean"] != pytest.approx(
        full["spectrum/abscissa_epoch_mean"], rel=1e-6
    )
    assert stripped["adjoint/ratio_epoch_geomean"] != pytest.approx(
        full["adjoint/ratio_epoch_geomean"], rel=1e-6
    )


def test_resume_at_an_epoch_boundary_starts_the_next_epoch_empty(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)  # at each epoch end
    full = monitored_run(tmp_path / "full", checkpoint=ckpt, epochs=2)
    first = sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))
    assert len(first) == 1
    resumed = monitored_run(tmp_path / "resumed", ckpt_path=first[0], epochs=2)
    assert resumed["steps"] == 2 * BATCHES
    for key in EPOCH_KEYS:
        assert resumed[key] == pytest.approx(full[key], rel=1e-6), key  # float32 states
    assert math.isfinite(full["adjoint/ratio_epoch_geomean"])
