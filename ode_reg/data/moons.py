"""Two interleaved half circles (``sklearn.datasets.make_moons``): a non-sequential toy task."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import make_moons
from torch import Tensor

from ode_reg._checks import check_int, check_range
from ode_reg.data._base import SplitDataModule, check_split_fractions, stratified_splits

_N_CLASSES = 2


class TwoMoonsDataModule(SplitDataModule):
    """Two moons: points in the plane labelled by the half circle they were drawn from.

    Not a sequence: ``x`` is float32 ``(B, 2)`` (the initial state ``z(0)`` of a neural ODE
    classifier), not ``(B, T, input_dim)``, and :attr:`seq_len` is ``None``. ``y`` is long
    ``(B,)`` in {0, 1}. The classes are not linearly separable, so a flow that is linear in
    ``z(0)`` cannot classify them.

    ``n_samples`` points come from one ``make_moons(n_samples, noise=noise, random_state=seed)``
    call (the two moons in equal numbers, up to one point); ``test_fraction`` of them are held
    out for testing and ``val_fraction`` of the rest for validation, both stratified by class
    with ``train_test_split(random_state=seed)``.

    Attributes:
        input_dim: 2.
        seq_len: ``None`` (not a sequence).
        num_classes: 2.

    Args:
        n_samples: points in all splits together, an integer >= 40.
        noise: standard deviation of the Gaussian noise added to the points, >= 0.
        test_fraction: share of the points held out for testing, in (0, 1), leaving at least
            10 points on each side.
        val_fraction: share of the remaining points held out for validation, in (0, 1),
            leaving at least 10 points on each side.
        batch_size: samples per batch, an integer >= 1.
        num_workers: ``DataLoader`` worker processes, an integer >= 0.
        seed: seed of the points, the splits and the training-set shuffling, an integer >= 0.

    Raises:
        ValueError: if an argument lies outside the range above (the message names it).

    Example::

        >>> dm = TwoMoonsDataModule(n_samples=500, noise=0.1, batch_size=32)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape), dm.seq_len
        ((32, 2), (32,), None)
    """

    input_dim = 2
    seq_len = None
    num_classes = _N_CLASSES

    def __init__(
        self,
        n_samples: int = 1_000,
        noise: float = 0.1,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        check_int("n_samples", n_samples, 40)
        check_range("noise", noise, 0.0)
        check_split_fractions(test_fraction, val_fraction, n_samples, 10)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.n_samples = n_samples
        self.noise = noise
        self.test_fraction = test_fraction
        self.val_fraction = val_fraction

    def _generate(self) -> dict[str, tuple[Tensor, Tensor]]:
        points, labels = make_moons(self.n_samples, noise=self.noise, random_state=self.seed)
        points = points.astype(np.float32)
        labels = labels.astype(np.int64)
        splits = stratified_splits(labels, self.test_fraction, self.val_fraction, self.seed)
        return {
            split: (torch.from_numpy(points[idx]), torch.from_numpy(labels[idx]))
            for split, idx in splits.items()
        }
