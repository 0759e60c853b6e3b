"""A classifier whose ODE block lives in a submodule: digits, dopri5, ``AdjointMagnitude``.

``Classifier.body`` is ``nn.Sequential(encoder, ODEBlock, decoder)``; the block's ``forward``
calls ``ode_reg.odeint`` with dopri5. Only the LightningModule's base class changed from
``L.LightningModule`` to ``ode_reg.RegularizedODEModule``: the solve in the submodule is
recorded into the training step wherever it is made, and ``AdjointMagnitude`` regularizes it.
With no term (``--adjoint_weight 0``) the run is torchdiffeq's exactly:
``--solver torchdiffeq`` runs the same model with ``torchdiffeq.odeint`` and
``tests/test_examples.py`` compares the two.

Run: ``python examples/ode_block_classifier.py --steps 100``.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
import torchdiffeq
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ode_reg


class Field(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z)


class ODEBlock(nn.Module):
    """``z(1)`` of ``dz/dt = f(z)``, ``z(0)`` the input (dopri5, tolerances 1e-3)."""

    def __init__(self, dim: int, solver: str = "ode_reg") -> None:
        super().__init__()
        self.field = Field(dim)
        self.odeint = ode_reg.odeint if solver == "ode_reg" else torchdiffeq.odeint
        self.register_buffer("t", torch.tensor([0.0, 1.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.odeint(self.field, x, self.t, method="dopri5", rtol=1e-3, atol=1e-3)[-1]


class Classifier(ode_reg.RegularizedODEModule):
    def __init__(
        self,
        hidden: int = 16,
        adjoint_weight: float = 0.1,
        lr: float = 1e-2,
        solver: str = "ode_reg",
    ) -> None:
        regs = [ode_reg.AdjointMagnitude(weight=adjoint_weight)] if adjoint_weight else []
        super().__init__(regularizers=regs)
        self.lr = lr
        self.body = nn.Sequential(
            nn.Linear(64, hidden), ODEBlock(hidden, solver), nn.Linear(hidden, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1]: (train, held-out 297 images)."""
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def train(args: argparse.Namespace) -> tuple[Classifier, L.Trainer]:
    torch.manual_seed(0)
    (x, y), _ = digits()
    model = Classifier(adjoint_weight=args.adjoint_weight, solver=args.solver)
    trainer = L.Trainer(
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=args.batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    trainer.fit(model, loader)
    return model, trainer


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adjoint_weight", type=float, default=0.1)
    p.add_argument("--solver", default="ode_reg", choices=["ode_reg", "torchdiffeq"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; print and return held-out accuracy and the term; ``model`` for comparisons."""
    args = parse(argv)
    _, (xt, yt) = digits()
    torch.manual_seed(0)
    untrained = Classifier(adjoint_weight=args.adjoint_weight, solver=args.solver)
    with torch.no_grad():
        acc0 = float((untrained(xt).argmax(-1) == yt).float().mean())
    model, trainer = train(args)
    with torch.no_grad():
        acc1 = float((model(xt).argmax(-1) == yt).float().mean())
    reg = trainer.callback_metrics.get("reg/adjoint_magnitude")
    out = {
        "acc_before": acc0,
        "acc_after": acc1,
        "reg_adjoint_magnitude": None if reg is None else float(reg),
        "model": model,
    }
    print(
        f"held-out accuracy {acc0:.3f} -> {acc1:.3f} after {args.steps} steps ({args.solver}); "
        f"reg/adjoint_magnitude {out['reg_adjoint_magnitude']}"
    )
    return out


if __name__ == "__main__":
    main()
