"""Resume reproduces the run: a run interrupted and resumed from ``last.ckpt`` ends where the
uninterrupted run ends (the recipes' data modules draw each epoch's order from (seed, epoch),
the probes from (seed, step), and ``last.ckpt`` is the last epoch end)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_reliability import Interrupt  # raises after the optimizer step of a given step

from ode_reg import AdjointMagnitude, SkewJacobianPenalty
from ode_reg.callbacks import GradientNormMonitor, OrthogonalityMonitor, SpectrumMonitor
from ode_reg.checkpointing import LastStateCheckpoint
from ode_reg.data import DigitsDataModule, TwoMoonsDataModule
from ode_reg.models import FlowClassifier, SequenceModel

INTERRUPT_AT = 19  # the global step after which the interrupted run stops
EPOCHS = 4


def _trainer(root: Path, *extra: Callback, on_exception: bool = False, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=root,
        callbacks=[
            # as the recipes: the best by val/acc, last.ckpt the last epoch end
            LastStateCheckpoint(
                dirpath=root / "ckpt", monitor="val/acc", mode="max", save_on_exception=on_exception
            ),
            GradientNormMonitor(every_n_steps=1),
            SpectrumMonitor(every_n_steps=3),
            OrthogonalityMonitor(every_n_steps=2),
            *extra,
        ],
        **kwargs,
    )


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _three_runs(tmp_path: Path, make, **trainer_kw: Any) -> tuple[dict, dict, dict, int]:
    """Uninterrupted, interrupted at step 19, resumed from last.ckpt: parameters of the first
    and the third, the interrupted run's parameters, and the step last.ckpt held."""

    def fit(root: Path, *extra: Callback, ckpt: Path | None = None) -> L.LightningModule:
        L.seed_everything(0)
        model, data = make()
        _trainer(root, *extra, **trainer_kw).fit(model, datamodule=data, ckpt_path=ckpt)
        return model

    full = fit(tmp_path / "full")
    L.seed_everything(0)
    model, data = make()
    with pytest.raises(RuntimeError, match="interrupted at step 19"):
        _trainer(tmp_path / "cut", Interrupt(INTERRUPT_AT), **trainer_kw).fit(
            model, datamodule=data
        )
    cut = _params(model)
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    step = torch.load(last, weights_only=False, map_location="cpu")["global_step"]
    resumed = fit(tmp_path / "resumed", ckpt=last)
    return _params(full), _params(resumed), cut, step


def moons() -> tuple[FlowClassifier, TwoMoonsDataModule]:
    regs = [AdjointMagnitude(0.05), SkewJacobianPenalty(0.01)]
    model = FlowClassifier(hidden_dim=6, horizon=1.0, step_size=0.25, checkpoints=4,
                           regularizers=regs)  # fmt: skip
    return model, TwoMoonsDataModule(n_samples=200, batch_size=16, seed=3)


def test_two_moons_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    full, resumed, cut, step = _three_runs(tmp_path, moons)
    steps_per_epoch = 9  # 144 training points, batches of 16
    assert step == 2 * steps_per_epoch < INTERRUPT_AT  # last.ckpt: the last epoch end
    assert _max_diff(full, cut) > 1e-3  # the interrupted run had not finished
    assert _max_diff(full, resumed) < 1e-6


def digits() -> tuple[SequenceModel, DigitsDataModule]:
    regs = [AdjointMagnitude(0.05, every_n_steps=2), SkewJacobianPenalty(0.01)]
    model = SequenceModel(8, 10, hidden_dim=6, lr=0.01, regularizers=regs)
    data = DigitsDataModule(order="noise_padded", seq_len=10, test_fraction=0.9,
                            val_fraction=0.1, batch_size=16, seed=1)  # fmt: skip
    return model, data


def test_digits_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    full, resumed, cut, step = _three_runs(tmp_path, digits)
    assert step < INTERRUPT_AT and step % 11 == 0  # 161 training images, batches of 16
    assert _max_diff(full, cut) > 1e-3
    assert _max_diff(full, resumed) < 1e-6


class _DecliningAcc(Callback):
    """Logs a ``val/acc`` that only gets worse after the first epoch (the best stays epoch 0)."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("val/acc", 1.0 - 0.1 * trainer.current_epoch)


@pytest.mark.parametrize("cls", [ModelCheckpoint, LastStateCheckpoint])
def test_last_ckpt_is_the_last_epoch_end_with_a_monitored_best(tmp_path: Path, cls) -> None:
    """The recipes' checkpointing (best by ``val/acc``, ``save_last``): with Lightning's class,
    ``last.ckpt`` stays at the best epoch; with ``LastStateCheckpoint`` it is the last epoch end,
    and the best checkpoint is still the best epoch."""
    L.seed_everything(0)
    model, data = moons()
    model.regularizers = torch.nn.ModuleList()  # the checkpoints, not the terms, are tested
    ckpt = cls(dirpath=tmp_path, monitor="val/acc", mode="max", save_last=True)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[_DecliningAcc(), ckpt])  # fmt: skip
    trainer.fit(model, datamodule=data)
    steps_per_epoch = 9
    last = torch.load(tmp_path / "last.ckpt", weights_only=False, map_location="cpu")
    best = torch.load(ckpt.best_model_path, weights_only=False, map_location="cpu")
    assert best["global_step"] == steps_per_epoch  # epoch 0
    if cls is LastStateCheckpoint:
        assert last["global_step"] == 3 * steps_per_epoch == trainer.global_step
    else:  # Lightning 2.6: last.ckpt only rewritten with a new best
        assert last["global_step"] == steps_per_epoch


@pytest.mark.parametrize("make", [moons, digits], ids=["two_moons", "digits"])
def test_resumed_from_an_interrupt_in_mid_epoch_equals_uninterrupted(
    tmp_path: Path, make, recwarn: pytest.WarningsRecorder
) -> None:
    """``save_on_exception``: last.ckpt is the state at the interrupt (step 19, mid-epoch); the
    training loader resumes with the epoch's next batch (Lightning does not warn that it is
    "not resumable"), and the run ends where the uninterrupted one does."""
    full, resumed, cut, step = _three_runs(tmp_path, make, on_exception=True)
    assert step == INTERRUPT_AT
    assert _max_diff(full, cut) > 1e-3
    assert _max_diff(full, resumed) < 1e-6
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


class _OldOrder(TwoMoonsDataModule):
    """The loader the data modules made before the order depended on the epoch: one
    ``DataLoader(shuffle=True)`` whose generator, seeded ``seed + 7919 * epoch`` when built,
    advances from epoch to epoch."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        epoch = self.trainer.current_epoch if self.reload else 0
        gen = torch.Generator().manual_seed(self.seed + 7919 * epoch)
        return torch.utils.data.DataLoader(
            self.dataset("train"), batch_size=self.batch_size, shuffle=True, generator=gen
        )


class _Labels(Callback):
    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch[1].tolist())


class _Still(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.lin(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize(
    ("n_samples", "reload"), [(200, 0), (210, 0), (200, 1)], ids=["full", "partial", "reload"]
)
def test_uninterrupted_runs_keep_the_batches_of_the_earlier_loader(n_samples: int, reload: int):
    """EpochShuffle gives, epoch by epoch, the batches the earlier generator-driven loader gave
    in an uninterrupted run (so recorded results stay reproducible): 144 and 151 training
    points in batches of 16 (a full and a partial last batch), and a loader rebuilt every epoch."""

    def batches(cls: type) -> list[list[int]]:
        data = cls(n_samples=n_samples, batch_size=16, seed=3)
        data.reload = reload
        labels = _Labels()
        L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, limit_val_batches=0,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[labels],
                  reload_dataloaders_every_n_epochs=reload).fit(_Still(), datamodule=data)  # fmt: skip
        return labels.seen

    new, old = batches(TwoMoonsDataModule), batches(_OldOrder)
    assert len(new) == len(old) >= 36
    assert new == old
    per_epoch = len(new) // 4
    assert new[:per_epoch] != new[per_epoch : 2 * per_epoch]  # each epoch its own order
