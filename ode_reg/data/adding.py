"""The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015), made on the fly."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ode_reg._checks import check_int
from ode_reg.data._base import GeneratedDataModule


class AddingDataModule(GeneratedDataModule):
    """Sequences of (value, marker) pairs; the target is the sum of the two marked values.

    Each step carries a value drawn from U(0, 1) and a marker in {0, 1}. Exactly one marker is
    1 in the first half (steps ``0 .. seq_len // 2 - 1``) and exactly one in the second half
    (steps ``seq_len // 2 .. seq_len - 1``), at uniformly drawn positions. The target is the sum
    of the two marked values.

    Baseline: the sum of two independent U(0, 1) values has mean 1 and variance
    ``2 / 12 = 1/6``, so always predicting 1 gives mean squared error ``1/6 ≈ 0.167``
    (:attr:`baseline_mse`); a model beats it only by remembering the marked values.

    Shapes (``B`` the batch size, ``T = seq_len``): ``x`` is float32 ``(B, T, 2)`` with
    ``x[..., 0]`` the values and ``x[..., 1]`` the markers; ``y`` is float32 ``(B, 1)``.

    Attributes:
        input_dim: 2 (value, marker).
        seq_len: ``T``.
        output_dim: 1.
        baseline_mse: ``1/6``, the MSE of the constant prediction 1.

    Args:
        seq_len: sequence length ``T``, an integer >= 2.
        n_train: training sequences, an integer >= 1.
        n_val: validation sequences, an integer >= 1.
        n_test: test sequences, an integer >= 1.
        batch_size: samples per batch, an integer >= 1.
        num_workers: ``DataLoader`` worker processes, an integer >= 0.
        seed: seed of the data and of the training-set shuffling, an integer >= 0.

    Raises:
        ValueError: if an argument lies outside the range above (the message names it).

    Example::

        >>> dm = AddingDataModule(seq_len=50, n_train=128, n_val=32, n_test=32, batch_size=16)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape), dm.input_dim, dm.output_dim
        ((16, 50, 2), (16, 1), 2, 1)
    """

    input_dim = 2
    output_dim = 1
    baseline_mse = 1.0 / 6.0

    def __init__(
        self,
        seq_len: int = 200,
        n_train: int = 10_000,
        n_val: int = 1_000,
        n_test: int = 1_000,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        check_int("seq_len", seq_len, 2)
        super().__init__(n_train, n_val, n_test, batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.seq_len = seq_len

    def _make(self, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        t = self.seq_len
        half = t // 2
        values = rng.random((n, t), dtype=np.float64).astype(np.float32)
        first = rng.integers(0, half, size=n)
        second = rng.integers(half, t, size=n)
        rows = np.arange(n)
        markers = np.zeros((n, t), dtype=np.float32)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        target = values[rows, first] + values[rows, second]  # float32 sum, as a model sees it
        x = torch.from_numpy(np.stack([values, markers], axis=-1))
        y = torch.from_numpy(target[:, None])
        return x, y
