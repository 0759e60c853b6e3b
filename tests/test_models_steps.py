"""The recipe models' shared steps (``ode_reg.models._steps.SupervisedSteps``) log what they name.

Each logged validation / test figure is compared with the same figure computed by hand from the
model's outputs on the whole split (torch's own cross-entropy / MSE and argmax accuracy).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from ode_reg.data import AddingDataModule, TwoMoonsDataModule
from ode_reg.models import FlowClassifier, SequenceModel


def _trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _outputs(model: L.LightningModule, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        pairs = [(model(x), y) for x, y in loader]
    return torch.cat([o for o, _ in pairs]), torch.cat([y for _, y in pairs])


@pytest.mark.parametrize("split", ["val", "test"])
def test_flow_classifier_logs_accuracy_and_loss_of_the_whole_split(split: str) -> None:
    torch.manual_seed(0)
    data = TwoMoonsDataModule(n_samples=200, batch_size=16)  # 18 / 40 samples: partial batches
    model = FlowClassifier(hidden_dim=4, step_size=0.5)
    run = _trainer().validate if split == "val" else _trainer().test
    logged = run(model, datamodule=data, verbose=False)[0]
    out, y = _outputs(model, getattr(data, f"{split}_dataloader")())
    assert logged[f"{split}/acc"] == pytest.approx((out.argmax(-1) == y).float().mean().item())
    # Lightning averages the per-batch losses weighted by batch size: the mean over samples
    loss = nn.functional.cross_entropy(out, y).item()
    assert logged[f"{split}/loss"] == pytest.approx(loss, rel=1e-5)


def test_sequence_regression_logs_mse_not_accuracy() -> None:
    torch.manual_seed(0)
    data = AddingDataModule(seq_len=6, n_train=8, n_val=24, n_test=8, batch_size=10)
    model = SequenceModel(2, 1, task="regression", hidden_dim=4)
    logged = _trainer().validate(model, datamodule=data, verbose=False)[0]
    out, y = _outputs(model, data.val_dataloader())
    assert set(logged) == {"val/loss", "val/mse"}
    assert logged["val/mse"] == pytest.approx(nn.functional.mse_loss(out, y).item(), rel=1e-5)
