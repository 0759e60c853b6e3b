"""Shared machinery for the in-memory data modules: splits, seeding, data loaders.

Every data module in :mod:`ode_reg.data` makes its tensors once, in :meth:`setup`, from its
``seed`` alone (nothing is downloaded and ``prepare_data`` does nothing). Each split draws from
its own random stream, ``numpy.random.default_rng([seed, split_index])``, so changing the size
of one split never changes the samples of another.

Resuming. The training order of every epoch is a function of ``(seed, epoch)`` alone
(:class:`EpochShuffle`), so a run resumed from an epoch-end checkpoint sees the batches the
uninterrupted run saw. The training loader (:class:`ResumableLoader`) also saves how far into
the epoch the run was, so a checkpoint from the middle of an epoch (``every_n_train_steps``,
``save_on_exception``) resumes with the epoch's next batch. What this guarantees: the same
batches in the same order; with the same seeds, hardware and library versions, the same
parameters (the tests check 1e-6 for two moons and digits). Not covered: a loader with
``num_workers > 0`` whose workers draw their own random numbers (these data modules draw none
there), random numbers a model draws from torch's global generator (dropout; Lightning does not
save it), and a DDP run resumed with another number of ranks.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from ode_reg._checks import check_choice, check_int, check_range

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


def check_split_fractions(
    test_fraction: float, val_fraction: float, n_total: int, min_count: int
) -> None:
    """Raise ``ValueError`` unless the two fractions of :func:`stratified_splits` each leave at
    least ``min_count`` samples on both sides (the test side of ``n_total`` samples, then the
    validation side of the rest).
    """
    check_fraction("test_fraction", test_fraction, n_total, min_count, 2 * min_count)
    n_rest = n_total - math.ceil(test_fraction * n_total)
    check_fraction("val_fraction", val_fraction, n_rest, min_count, min_count)


def stratified_splits(
    labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Indices of the train / val / test splits of samples labelled ``labels``, by class.

    ``test_fraction`` of all samples is held out for testing and ``val_fraction`` of the rest
    for validation, both with ``sklearn.model_selection.train_test_split(stratify=...,
    random_state=seed)``.

    Example::

        >>> idx = stratified_splits(np.repeat([0, 1], 50), 0.2, 0.25, seed=0)
        >>> {k: len(v) for k, v in idx.items()}
        {'train': 60, 'val': 20, 'test': 20}
    """
    index = np.arange(len(labels))
    rest, test = train_test_split(
        index, test_size=test_fraction, stratify=labels, random_state=seed
    )
    train, val = train_test_split(
        rest, test_size=val_fraction, stratify=labels[rest], random_state=seed
    )
    return {"train": train, "val": val, "test": test}


class EpochShuffle(RandomSampler):
    """A random order of the training set that depends on ``(seed, epoch)`` only.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also the first epoch of a
    resumed run), so the order does not depend on how many epochs the loader has served in this
    process: a run resumed from an epoch-end checkpoint sees the batches of the uninterrupted
    run. Under DDP, Lightning replaces it, like any ``RandomSampler``, by a
    ``DistributedSampler``, whose order depends on the seed and the epoch too.

    The order of epoch ``e`` is the one that an uninterrupted run of the earlier data modules
    gave (a ``DataLoader(shuffle=True)`` with a generator seeded ``seed + 7919 * b``, ``b`` the
    epoch at which the run last rebuilt the loader: ``e - e % n`` with
    ``Trainer(reload_dataloaders_every_n_epochs=n)``, ``n > 0``, else 0), so recorded runs keep
    their batches: the draws that loader made from its generator in the epochs before are made
    again and dropped (per iterator Lightning opens, the ``DataLoader``'s base seed; per epoch
    ``RandomSampler``'s permutation, and an empty second one when the last batch is partial).
    Not kept: a loader rebuilt every epoch without a noise option served epoch 0's order again
    in every epoch; now each epoch has its own.

    Args:
        data_source: the dataset.
        seed: the seed, an integer >= 0.
        batch_size: the loader's batch size (whether the last batch is partial), >= 1.
        epoch: the epoch of the first iteration, an integer >= 0.
        reload_every: the trainer's ``reload_dataloaders_every_n_epochs``, an integer >= 0.

    Raises:
        ValueError: if an argument lies outside the range above.

    Example::

        >>> s = EpochShuffle(range(10), seed=0, batch_size=2, epoch=3)
        >>> again = EpochShuffle(range(10), seed=0, batch_size=2)
        >>> again.set_epoch(3)
        >>> list(s) == list(again) != list(EpochShuffle(range(10), seed=0, batch_size=2))
        True
    """

    def __init__(
        self, data_source: Any, seed: int, batch_size: int, epoch: int = 0, reload_every: int = 0
    ) -> None:
        check_int("seed", seed, 0)
        check_int("batch_size", batch_size, 1)
        check_int("epoch", epoch, 0)
        check_int("reload_every", reload_every, 0)
        super().__init__(data_source)
        self.seed = seed
        self.batch_size = batch_size
        self.epoch = epoch
        self.reload_every = reload_every

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on (Lightning calls it).

        Args:
            epoch: the epoch, an integer >= 0.
        """
        self.epoch = int(epoch)

    def __iter__(self):  # noqa: ANN204 - an iterator of indices
        n, e, every = len(self.data_source), self.epoch, self.reload_every
        base = e - e % every if every > 0 else 0
        gen = torch.Generator().manual_seed(self.seed + 7919 * base)
        partial = n % self.batch_size != 0
        for k in range(base, e + 1):
            # Lightning opens one iterator in the epoch it (re)builds the loader and one at the
            # start of every epoch after the first: two in a rebuilt epoch > 0.
            for _ in range(2 if k == base and k > 0 else 1):
                torch.empty((), dtype=torch.int64).random_(generator=gen)  # the base seed
            order = torch.randperm(n, generator=gen)
            if k == e:
                break
            if partial:  # the sampler was run to its end: RandomSampler's empty second draw
                torch.randperm(n, generator=gen)
        yield from order.tolist()


class ResumableLoader(DataLoader):
    """The training ``DataLoader`` of the ode_reg data modules: it resumes in mid-epoch.

    Lightning saves its :meth:`state_dict` in every checkpoint: the epoch and the number of its
    batches the run has processed (``trainer.fit_loop.epoch_loop.batch_progress``: a batch
    whose step an exception interrupted is not counted, and Lightning runs it again). A run
    resumed from a checkpoint made in the middle of an epoch (``every_n_train_steps``,
    ``save_on_exception``) then starts with that epoch's next batch instead of its first one,
    so it sees the batches of the uninterrupted run.

    Args:
        *args: as ``torch.utils.data.DataLoader``.
        progress: a callable returning ``(epoch, batches processed)``; ``None``: ``(0, 0)``.
        **kwargs: as ``torch.utils.data.DataLoader``.

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> loader = ResumableLoader(TensorDataset(torch.arange(6.0)), batch_size=2)
        >>> loader.load_state_dict({"epoch": 0, "batches": 2})
        >>> [b[0].tolist() for b in loader]  # the third batch of epoch 0 on
        [[4.0, 5.0]]
    """

    def __init__(self, *args: Any, progress: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "batches": n}``: ``n`` batches of epoch ``e`` are done."""
        epoch, done = self.progress() if self.progress is not None else (0, 0)
        return {"epoch": int(epoch), "batches": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next iteration after ``state["batches"]`` batches, if it is the same
        epoch ``state["epoch"]`` and not its end."""
        self._resume = (int(state.get("epoch", -1)), int(state.get("batches", 0)))

    def _epoch(self) -> int:
        sampler = self.sampler
        return int(getattr(sampler, "epoch", 0))

    def __iter__(self):  # noqa: ANN204 - DataLoader's iterator, or a slice of it
        resume, self._resume = self._resume, None
        it = super().__iter__()
        if resume is None:
            return it
        epoch, done = resume
        if epoch != self._epoch() or not 0 < done < len(self):
            return it
        return itertools.islice(it, done, None)


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
        check_choice("split", split, SPLITS)
        self.setup()
        return getattr(self, f"{split}_set")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if not shuffle:
            return DataLoader(dataset, **kwargs)
        trainer = self.trainer
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        every = getattr(trainer, "reload_dataloaders_every_n_epochs", 0) or 0
        sampler = EpochShuffle(
            dataset, self.seed, self.batch_size, epoch=epoch, reload_every=int(every)
        )
        return ResumableLoader(dataset, sampler=sampler, progress=self._progress, **kwargs)

    def _progress(self) -> tuple[int, int]:
        """``(epoch, training batches of it done)`` of the attached trainer, or ``(0, 0)``."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return int(trainer.current_epoch), int(done)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(x, y)``; the order of each epoch is fixed by ``seed``
        and the epoch (:class:`EpochShuffle`)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches ``(x, y)`` in a fixed order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches ``(x, y)`` in a fixed order."""
        return self._loader("test", shuffle=False)


class GeneratedDataModule(SplitDataModule):
    """Base class of the data made on the fly: ``n_train`` / ``n_val`` / ``n_test`` samples,
    each split drawn from its own stream :func:`split_rng` by :meth:`_make`.

    Subclasses validate their own arguments, call ``super().__init__`` and implement
    ``_make(n, rng) -> (x, y)``.

    Args:
        n_train: training samples, an integer >= 1.
        n_val: validation samples, an integer >= 1.
        n_test: test samples, an integer >= 1.
        batch_size: samples per batch, an integer >= 1.
        num_workers: ``DataLoader`` worker processes, an integer >= 0.
        seed: seed of the data and of the training-set shuffling, an integer >= 0.

    Raises:
        ValueError: if an argument lies outside the range above (the message names it).
    """

    def __init__(
        self,
        n_train: int,
        n_val: int,
        n_test: int,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        check_int("n_train", n_train, 1)
        check_int("n_val", n_val, 1)
        check_int("n_test", n_test, 1)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.n_train = n_train
        self.n_val = n_val
        self.n_test = n_test

    def _make(self, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _generate(self) -> dict[str, tuple[Tensor, Tensor]]:
        sizes = {"train": self.n_train, "val": self.n_val, "test": self.n_test}
        return {s: self._make(sizes[s], split_rng(self.seed, s)) for s in SPLITS}
