"""The copying memory problem (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ode_reg._checks import check_int
from ode_reg.data._base import GeneratedDataModule


class CopyingDataModule(GeneratedDataModule):
    """Remember ``n_copy`` symbols over ``delay`` steps and reproduce them after a marker.

    Standard formulation (Arjovsky, Shah & Bengio 2016), with ``T = delay``, ``K = n_copy``
    and ``S = n_symbols`` (defaults ``K = 10``, ``S = 8``); every sequence has ``T + 2K`` steps.
    Class ``0`` is the blank, ``1 .. S`` the symbols and ``S + 1`` the marker.

    * input: ``K`` symbols drawn uniformly from ``{1 .. S}``, then ``T - 1`` blanks, then the
      marker, then ``K`` blanks;
    * target: blanks for the first ``T + K`` steps, then the ``K`` input symbols, in order.

    So the marker comes ``T`` steps after the last symbol and the model must output the symbols
    in the ``K`` steps after it.

    Memoryless baseline: a model that remembers nothing can still output blank with certainty
    for the first ``T + K`` steps and a uniform guess over the ``S`` symbols for the last ``K``;
    its mean cross-entropy per step is ``K ln S / (T + 2K)``, i.e. ``10 ln 8 / (T + 20)`` with the
    defaults (0.173 for ``T = 100``, 0.0945 for ``T = 200``). See :attr:`memoryless_baseline`.

    Shapes (``B`` the batch size, ``L = T + 2K``): ``x`` is float32 one-hot ``(B, L, S + 2)``;
    ``y`` is long ``(B, L)`` with values in ``0 .. S``.

    Attributes:
        input_dim: ``S + 2`` (blank, ``S`` symbols, marker).
        seq_len: ``T + 2K``.
        num_classes: ``S + 1``, the target classes (blank and the symbols; the marker is
            never a target).

    Args:
        delay: ``T``, steps from the last symbol to the marker, an integer >= 1.
        n_symbols: ``S``, symbols to draw from, an integer >= 2.
        n_copy: ``K``, symbols to copy, an integer >= 1.
        n_train: training sequences, an integer >= 1.
        n_val: validation sequences, an integer >= 1.
        n_test: test sequences, an integer >= 1.
        batch_size: samples per batch, an integer >= 1.
        num_workers: ``DataLoader`` worker processes, an integer >= 0.
        seed: seed of the data and of the training-set shuffling, an integer >= 0.

    Raises:
        ValueError: if an argument lies outside the range above (the message names it).

    Example::

        >>> dm = CopyingDataModule(delay=100, n_train=64, n_val=16, n_test=16, batch_size=8)
        >>> round(dm.memoryless_baseline, 3), dm.seq_len, dm.input_dim, dm.num_classes
        (0.173, 120, 10, 9)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape), y.dtype
        ((8, 120, 10), (8, 120), torch.int64)
    """

    def __init__(
        self,
        delay: int = 100,
        n_symbols: int = 8,
        n_copy: int = 10,
        n_train: int = 10_000,
        n_val: int = 1_000,
        n_test: int = 1_000,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        check_int("delay", delay, 1)
        check_int("n_symbols", n_symbols, 2)
        check_int("n_copy", n_copy, 1)
        super().__init__(n_train, n_val, n_test, batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.delay = delay
        self.n_symbols = n_symbols
        self.n_copy = n_copy
        self.seq_len = delay + 2 * n_copy
        self.input_dim = n_symbols + 2
        self.num_classes = n_symbols + 1
        self.marker = n_symbols + 1

    @property
    def memoryless_baseline(self) -> float:
        """``n_copy * ln(n_symbols) / (delay + 2 * n_copy)``: the cross-entropy per step of the
        best model that remembers nothing (blank with certainty, then uniform guesses)."""
        return self.n_copy * math.log(self.n_symbols) / self.seq_len

    def _make(self, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        k, length = self.n_copy, self.seq_len
        symbols = rng.integers(1, self.n_symbols + 1, size=(n, k))
        tokens = np.zeros((n, length), dtype=np.int64)
        tokens[:, :k] = symbols
        tokens[:, self.delay + k - 1] = self.marker
        target = np.zeros((n, length), dtype=np.int64)
        target[:, -k:] = symbols
        x = F.one_hot(torch.from_numpy(tokens), self.input_dim).to(torch.float32)
        return x, torch.from_numpy(target)
