"""Shared machinery for the in-memory data modules: splits, seeding, data loaders.

Every data module in :mod:`ode_reg.data` makes its tensors once, in :meth:`setup`, from its
``seed`` alone (nothing is downloaded and ``prepare_data`` does nothing). Each split draws from
its own random stream, ``numpy.random.default_rng([seed, split_index])``, so changing the size
of one split never changes the samples of another.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ode_reg._checks import check_int, check_range

#: The split names, in the order of their random streams.
SPLITS = ("train", "val", "test")


def split_rng(seed: int, split: str, stream: int = 0) -> np.random.Generator:
    """The random generator of one split: ``default_rng([seed, SPLITS.index(split), stream])``."""
    return np.random.default_rng([seed, SPLITS.index(split), stream])


def check_fraction(name: str, value: float, n_total: int, min_count: int, min_rest: int) -> None:
    """Raise ``ValueError`` unless ``value`` in (0, 1) leaves enough samples on both sides.

    ``sklearn.model_selection.train_test_split`` takes ``ceil(value * n_total)`` samples for the
    held-out side; it must hold at least ``min_count`` samples and leave ``min_rest``.
    """
    check_range(name, value, 0.0, 1.0, low_open=True, high_open=True)
    held_out = math.ceil(value * n_total)
    if held_out < min_count or n_total - held_out < min_rest:
        raise ValueError(
            f"`{name}` must hold out between {min_count} and {n_total - min_rest} of "
            f"{n_total} samples, got {value!r} ({held_out} samples)"
        )


class SplitDataModule(LightningDataModule):
    """Base class: train/val/test :class:`~torch.utils.data.TensorDataset` made in ``setup``.

    Subclasses validate their own arguments, call ``super().__init__`` and implement
    :meth:`_generate`, which returns ``{"train": (x, y), "val": (x, y), "test": (x, y)}``.

    Args:
        batch_size: samples per batch, an integer >= 1.
        num_workers: ``DataLoader`` worker processes, an integer >= 0.
        seed: the seed of every random draw (data and training-set shuffling), an integer >= 0.

    Raises:
        ValueError: if an argument lies outside the range above (the message names it).
    """

    #: Features per step (per sample for non-sequential data).
    input_dim: int
    #: Steps per sequence, or ``None`` for non-sequential data.
    seq_len: int | None

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def check_trainer(self, trainer: Any) -> None:
        """Raise ``ValueError`` if ``trainer`` cannot run this data module as configured.

        The ``ode-reg`` command calls it before ``fit`` starts any logger, so a misconfigured
        run stops before a W&B run is created. The base class accepts every trainer.

        Args:
            trainer: the ``lightning.Trainer`` about to fit.

        Raises:
            ValueError: naming the trainer setting (as its ``ode-reg`` flag) to change.

        Example::

            >>> import lightning as L
            >>> SplitDataModule().check_trainer(L.Trainer(logger=False))  # accepted
        """

    def _generate(self) -> dict[str, tuple[Tensor, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Make all three splits (once; later calls, for any ``stage``, reuse them)."""
        if self.train_set is not None:
            return
        splits = self._generate()
        self.train_set = TensorDataset(*splits["train"])
        self.val_set = TensorDataset(*splits["val"])
        self.test_set = TensorDataset(*splits["test"])

    def dataset(self, split: str) -> TensorDataset:
        """The ``"train"``, ``"val"`` or ``"test"`` dataset, running :meth:`setup` if needed.

        Raises:
            ValueError: if ``split`` is not one of the three names.
        """
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
        self.setup()
        return getattr(self, f"{split}_set")

    def _loader(self, split: str, shuffle: bool, epoch: int = 0) -> DataLoader:
        # A loader made once per fit shuffles differently every epoch (its generator advances);
        # one remade every epoch (``reload_dataloaders_every_n_epochs=1``) seeds by the epoch.
        generator = torch.Generator().manual_seed(self.seed + 7919 * epoch) if shuffle else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(x, y)``; the order is fixed by ``seed``."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches ``(x, y)`` in a fixed order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches ``(x, y)`` in a fixed order."""
        return self._loader("test", shuffle=False)
