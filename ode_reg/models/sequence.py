"""ODE-RNNs for the long-memory recipes (and a GRU for reference)."""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn

from ode_reg._checks import check_choice, check_int, check_range
from ode_reg.dynamics.antisymmetric import AntisymmetricODEFunc
from ode_reg.models._checkpoint import RegularizersInCheckpoint
from ode_reg.models._steps import SupervisedSteps
from ode_reg.models.fields import UnstructuredODEFunc
from ode_reg.models.orthogonal_rnn import OrthogonalRNN, check_map
from ode_reg.module import RegularizedODEModule
from ode_reg.regularizers import Regularizer

CELLS = ("antisymmetric", "antisymmetric_gated", "unstructured", "orthogonal", "gru")
#: Cells that solve no ODE (no ode_reg regularizers).
DISCRETE_CELLS = ("orthogonal", "gru")
TASKS = ("classification", "regression", "sequence")
SOLVERS = ("euler", "midpoint", "rk4")


class SequenceModel(SupervisedSteps, RegularizersInCheckpoint, RegularizedODEModule):
    """An ODE-RNN: the hidden state follows a field for ``step`` time units per input step.

    At sequence step ``s`` the input ``x[:, s]`` is held (zero-order hold) while
    ``self.odeint`` integrates the hidden state over ``[0, step]``; with ``solver="euler"`` and
    one substep this is exactly the AntisymmetricRNN recurrence ``h_s = h_{s-1} + step f``.
    The per-step trajectories are chained, so the regularizers and monitors see one trajectory
    over the whole sequence (``T + 1`` checkpoints).

    Checkpoints carry the regularizers (class, arguments, counters, probe seeds):
    ``SequenceModel.load_from_checkpoint(path)`` rebuilds them and loads strictly (see
    :class:`~ode_reg.models._checkpoint.RegularizersInCheckpoint`).

    Args:
        input_dim: features per sequence step, ``>= 1``.
        output_dim: classes (``classification``/``sequence``) or outputs (``regression``).
        task: ``"classification"`` (read out the last state), ``"regression"`` (MSE on the last
            state) or ``"sequence"`` (a class at every step, e.g. the copying problem).
        cell: ``"antisymmetric"``, ``"antisymmetric_gated"``, ``"unstructured"`` (free ``W``,
            the baseline), ``"orthogonal"`` (:class:`~ode_reg.models.OrthogonalRNN`: an exactly
            orthogonal transition, the exact flow of a skew-linear field, with modReLU; no
            regularizers) or ``"gru"`` (``nn.GRU``, no ODE, no regularizers).
        hidden_dim: state size, ``>= 1``.
        step: time per input step ``> 0`` (AntisymmetricRNN's epsilon).
        gamma: diffusion of the antisymmetric field, ``>= 0``.
        recurrent_std: initialization scale of the recurrent matrix, ``>= 0``.
        solver: ``"euler"``, ``"midpoint"`` or ``"rk4"``.
        substeps: solver steps per input step, ``>= 1``.
        orthogonal_map: ``"exp"`` or ``"cayley"``, the map of ``cell="orthogonal"``.
        lr: Adam learning rate, ``> 0``.
        weight_decay: Adam weight decay, ``>= 0``.
        cosine_epochs: anneal the learning rate to 0 over this many epochs (``0``: constant).
        regularizers: ode_reg regularizers.
        nonfinite: ``"skip"`` or ``"raise"`` (see :class:`~ode_reg.RegularizedODEModule`).

    Raises:
        ValueError: on any argument out of its range, or regularizers with ``cell="gru"`` or
            ``cell="orthogonal"``.

    Example::

        >>> from ode_reg.models import SequenceModel
        >>> from ode_reg import AdjointMagnitude
        >>> m = SequenceModel(1, 10, hidden_dim=16, regularizers=[AdjointMagnitude(0.01)])
        >>> m(torch.randn(2, 5, 1)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        task: str = "classification",
        cell: str = "antisymmetric",
        hidden_dim: int = 64,
        step: float = 0.2,
        gamma: float = 0.01,
        recurrent_std: float = 1.0,
        solver: str = "euler",
        substeps: int = 1,
        orthogonal_map: str = "exp",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        cosine_epochs: int = 0,
        regularizers: list[Regularizer] | None = None,
        nonfinite: str = "skip",
    ) -> None:
        check_int("input_dim", input_dim, 1)
        check_int("output_dim", output_dim, 1)
        check_choice("task", task, TASKS)
        check_choice("cell", cell, CELLS)
        check_int("hidden_dim", hidden_dim, 1)
        check_range("step", step, 0.0, low_open=True)
        check_range("gamma", gamma, 0.0)
        check_range("recurrent_std", recurrent_std, 0.0)
        check_choice("solver", solver, SOLVERS)
        check_int("substeps", substeps, 1)
        check_map(orthogonal_map)
        check_range("lr", lr, 0.0, low_open=True)
        check_range("weight_decay", weight_decay, 0.0)
        check_int("cosine_epochs", cosine_epochs, 0)
        if cell in DISCRETE_CELLS and regularizers:
            raise ValueError(f"`regularizers` must be empty for cell={cell!r} (it solves no ODE)")
        super().__init__(regularizers=regularizers or [], nonfinite=nonfinite)
        self.save_hyperparameters(ignore=["regularizers"])
        self.task, self.cell, self.solver = task, cell, solver
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        if cell == "gru":
            self.field = None
            self.rnn = nn.GRU(input_dim, hidden_dim, batch_first=True)
        elif cell == "orthogonal":
            self.field = None
            self.rnn = OrthogonalRNN(input_dim, hidden_dim, orthogonal_map=orthogonal_map)
        elif cell == "unstructured":
            self.field = UnstructuredODEFunc(hidden_dim, input_dim, recurrent_std)
        else:
            self.field = AntisymmetricODEFunc(
                hidden_dim,
                gamma=gamma,
                input_dim=input_dim,
                gated=cell == "antisymmetric_gated",
                recurrent_std=recurrent_std,
            )
        self.readout = nn.Linear(hidden_dim, output_dim)
        self.register_buffer("span", torch.tensor([0.0, step]), persistent=False)
        self.options = {"step_size": step / substeps}
        if task == "regression":
            self.metric_name = "mse"
            self.val_metric = torchmetrics.MeanSquaredError()
            self.test_metric = torchmetrics.MeanSquaredError()
        else:
            self.metric_name = "acc"
            self.val_metric = torchmetrics.Accuracy("multiclass", num_classes=output_dim)
            self.test_metric = torchmetrics.Accuracy("multiclass", num_classes=output_dim)

    def hidden_states(self, x: Tensor) -> Tensor:
        """Hidden states after every input step, shape ``(B, T, hidden_dim)``."""
        if x.dim() != 3 or x.shape[-1] != self.input_dim:
            raise ValueError(f"`x` must have shape (B, T, {self.input_dim}), got {tuple(x.shape)}")
        if self.field is None:
            return self.rnn(x)[0]
        h = x.new_zeros(x.shape[0], self.hidden_dim)
        out = []
        for s in range(x.shape[1]):
            self.field.set_input(x[:, s])
            h = self.odeint(
                self.field,
                h,
                self.span.to(x.dtype),
                method=self.solver,
                options=self.options,
                checkpoints=1,
            )[-1]
            out.append(h)
        return torch.stack(out, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs: ``(B, output_dim)``, or ``(B, T, output_dim)`` for ``task="sequence"``."""
        hs = self.hidden_states(x)
        if self.task == "sequence":
            return self.readout(hs)
        return self.readout(hs[:, -1])

    @property
    def loss_name(self) -> str:
        """What ``train/loss``, ``val/loss`` and ``test/loss`` are (the run summary names it)."""
        return "MSE" if self.task == "regression" else "cross-entropy"

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.task == "regression":
            return nn.functional.mse_loss(out, y)
        if self.task == "sequence":
            return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())
        return nn.functional.cross_entropy(out, y)

    def _update(self, metric: torchmetrics.Metric, out: Tensor, y: Tensor) -> None:
        if self.task == "sequence":
            metric.update(out.argmax(-1).flatten(), y.flatten())
        elif self.task == "regression":
            metric.update(out, y)
        else:
            super()._update(metric, out, y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if self.hparams.cosine_epochs == 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.cosine_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}
