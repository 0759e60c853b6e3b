"""Sequential 8×8 digits from ``sklearn.datasets.load_digits`` (shipped inside scikit-learn)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ode_reg._checks import check_choice, check_int, check_range
from ode_reg.data._base import (
    SplitDataModule,
    check_split_fractions,
    split_rng,
    stratified_splits,
)

#: The accepted values of ``DigitsDataModule(order=...)``.
ORDERS = ("pixel", "permuted", "noise_padded")

_N_DIGITS = 1797  # images in load_digits
_N_CLASSES = 10
_SIDE = 8  # image side; 64 pixels


class DigitsDataModule(SplitDataModule):
    """The 1797 8×8 handwritten digits of ``load_digits`` read as sequences (no download).

    Pixels (0 .. 16) are scaled to [0, 1] and then standardized with one mean and one standard
    deviation, both computed over all pixels of the training split (:attr:`mean`, :attr:`std`,
    set by :meth:`setup`), so the training pixels have mean 0 and standard deviation 1.

    Orders (``B`` the batch size):

    * ``"pixel"``: 64 steps of one pixel in row-major order; ``x`` is ``(B, 64, 1)``.
    * ``"permuted"``: the same 64 pixels in a fixed random order, :attr:`permutation`, which
      depends only on ``permutation_seed`` (not on ``seed``); ``x`` is ``(B, 64, 1)`` with
      ``x[:, i, 0] == pixel_x[:, permutation[i], 0]``.
    * ``"noise_padded"``: 8 steps of one image row (8 pixels) each, then ``seq_len - 8``
      steps of N(0, 1) noise, as in noise-padded CIFAR-10 (Chang et al. 2019); the noise is
      drawn once per sample in :meth:`setup`, from ``seed``. ``x`` is ``(B, seq_len, 8)``.
      With ``resample_noise=True`` the *training* noise is drawn again for every epoch
      (epoch ``e`` from ``split_rng(seed, "train", e)``; epoch 0 is the noise of
      :meth:`setup`), so a model cannot memorize a sample by its noise; validation and test
      noise stay fixed. Lightning asks for the training loader once per fit unless
      ``Trainer(reload_dataloaders_every_n_epochs=1)``, which this option therefore requires.

    Augmentation: ``pixel_noise_std > 0`` adds N(0, pixel_noise_std²) to every standardized
    training pixel (all orders), drawn again every epoch (epoch ``e`` from
    ``numpy.random.default_rng([seed, 0, e, 1])``); it too needs the loader rebuilt every epoch.
    Validation and test pixels are never perturbed.

    Splits: ``test_fraction`` of the images is held out for testing and ``val_fraction`` of
    the rest for validation, both stratified by class with
    ``sklearn.model_selection.train_test_split(random_state=seed)``; the defaults give
    1293 / 144 / 360 images (train / val / test; train + val is 80 %). The indices into
    ``load_digits()`` of each split are in :attr:`split_indices` after :meth:`setup`.
    ``x`` is float32 and ``y`` long ``(B,)`` in ``0 .. 9``.

    Attributes:
        input_dim: 1 for ``"pixel"`` and ``"permuted"``, 8 for ``"noise_padded"``.
        seq_len: 64 for ``"pixel"`` and ``"permuted"``, ``seq_len`` for ``"noise_padded"``.
        num_classes: 10.
        permutation: long ``(64,)``, the pixel order of ``"permuted"`` (``None`` otherwise).

    Args:
        order: ``"pixel"``, ``"permuted"`` or ``"noise_padded"``.
        seq_len: ``None`` or 64 for ``"pixel"`` and ``"permuted"``; for ``"noise_padded"`` an
            integer >= 8, default 200.
        permutation_seed: seed of the ``"permuted"`` pixel order, an integer >= 0.
        test_fraction: share of all images held out for testing, in (0, 1), leaving at least
            10 images on each side.
        val_fraction: share of the remaining images held out for validation, in (0, 1),
            leaving at least 10 images on each side.
        batch_size: samples per batch, an integer >= 1.
        num_workers: ``DataLoader`` worker processes, an integer >= 0.
        seed: seed of the splits, of the padding noise and of the training-set shuffling,
            an integer >= 0.
        resample_noise: for ``"noise_padded"``, draw the training noise again every epoch
            (see above); ``False`` for the other orders.
        pixel_noise_std: standard deviation of the training-pixel augmentation (see above),
            ``>= 0``; ``0`` turns it off.

    Raises:
        ValueError: if an argument lies outside the range above (the message names it), if
            ``resample_noise`` is set for an order without noise, or (from
            :meth:`train_dataloader`) if the attached trainer does not reload the training
            loader every epoch while ``resample_noise`` or ``pixel_noise_std`` is set.

    Example::

        >>> dm = DigitsDataModule(order="noise_padded", seq_len=32, batch_size=16)
        >>> dm.input_dim, dm.seq_len, dm.num_classes
        (8, 32, 10)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape), y.dtype
        ((16, 32, 8), (16,), torch.int64)
    """

    num_classes = _N_CLASSES

    def __init__(
        self,
        order: str = "pixel",
        seq_len: int | None = None,
        permutation_seed: int = 0,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        resample_noise: bool = False,
        pixel_noise_std: float = 0.0,
    ) -> None:
        check_choice("order", order, ORDERS)
        if resample_noise and order != "noise_padded":
            raise ValueError(
                f"`resample_noise` must be False for order={order!r} (only 'noise_padded' "
                "has noise), got True"
            )
        if order == "noise_padded":
            if seq_len is None:
                seq_len = 200
            check_int("seq_len", seq_len, _SIDE)
        elif seq_len is not None and seq_len != _SIDE * _SIDE:
            raise ValueError(
                f"`seq_len` must be None or 64 for order={order!r} (64 pixels), got {seq_len!r}"
            )
        check_int("permutation_seed", permutation_seed, 0)
        check_range("pixel_noise_std", pixel_noise_std, 0.0)
        check_split_fractions(test_fraction, val_fraction, _N_DIGITS, _N_CLASSES)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.order = order
        self.permutation_seed = permutation_seed
        self.test_fraction = test_fraction
        self.val_fraction = val_fraction
        if order == "noise_padded":
            self.seq_len = seq_len
            self.input_dim = _SIDE
        else:
            self.seq_len = _SIDE * _SIDE
            self.input_dim = 1
        self.permutation: Tensor | None = None
        if order == "permuted":
            perm = np.random.default_rng(permutation_seed).permutation(_SIDE * _SIDE)
            self.permutation = torch.from_numpy(perm)
        self.mean: float | None = None
        self.std: float | None = None
        self.split_indices: dict[str, np.ndarray] | None = None
        self.resample_noise = resample_noise
        self.pixel_noise_std = float(pixel_noise_std)
        self._noise_epoch = 0
        self._clean_train: TensorDataset | None = None

    def _generate(self) -> dict[str, tuple[Tensor, Tensor]]:
        digits = load_digits()
        images = digits.data.astype(np.float64) / 16.0  # (1797, 64) in [0, 1]
        labels = digits.target.astype(np.int64)
        self.split_indices = stratified_splits(
            labels, self.test_fraction, self.val_fraction, self.seed
        )
        train = self.split_indices["train"]
        self.mean = float(images[train].mean())
        self.std = float(images[train].std())
        standardized = ((images - self.mean) / self.std).astype(np.float32)

        out = {}
        for split, idx in self.split_indices.items():
            pixels = standardized[idx]  # (n, 64)
            n = len(idx)
            if self.order == "pixel":
                x = pixels[:, :, None]
            elif self.order == "permuted":
                x = pixels[:, self.permutation.numpy(), None]
            else:
                rows = pixels.reshape(n, _SIDE, _SIDE)
                noise = split_rng(self.seed, split).standard_normal(
                    (n, self.seq_len - _SIDE, _SIDE), dtype=np.float32
                )
                x = np.concatenate([rows, noise], axis=1)
            out[split] = (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels[idx]))
        return out

    def train_noise(self, epoch: int) -> Tensor:
        """The training split's padding noise of ``epoch``: float32 ``(n_train, seq_len - 8, 8)``.

        Raises:
            ValueError: if the order is not ``"noise_padded"`` or ``epoch`` is negative.
        """
        if self.order != "noise_padded":
            raise ValueError(f"`order` must be 'noise_padded' to have noise, got {self.order!r}")
        check_int("epoch", epoch, 0)
        self.setup()
        n = len(self.split_indices["train"])
        noise = split_rng(self.seed, "train", epoch).standard_normal(
            (n, self.seq_len - _SIDE, _SIDE), dtype=np.float32
        )
        return torch.from_numpy(noise)

    def check_trainer(self, trainer: Any) -> None:
        """Raise ``ValueError`` unless ``trainer`` rebuilds the training loader every epoch
        while ``resample_noise`` or ``pixel_noise_std`` asks for fresh noise every epoch.

        Args:
            trainer: the ``lightning.Trainer`` about to fit.

        Raises:
            ValueError: naming ``--trainer.reload_dataloaders_every_n_epochs 1`` (the
                ``ode-reg`` flag; ``Trainer(reload_dataloaders_every_n_epochs=1)`` in Python).

        Example::

            >>> import lightning as L
            >>> dm = DigitsDataModule(pixel_noise_std=0.5)
            >>> dm.check_trainer(L.Trainer(logger=False, reload_dataloaders_every_n_epochs=1))
        """
        if not self.resample_noise and self.pixel_noise_std == 0:
            return
        every = getattr(trainer, "reload_dataloaders_every_n_epochs", None)
        if every != 1:
            options = []
            if self.resample_noise:
                options.append("--data.init_args.resample_noise true")
            if self.pixel_noise_std > 0:
                options.append(f"--data.init_args.pixel_noise_std {self.pixel_noise_std:g}")
            verbs = (
                "draw fresh training noise every epoch and need"
                if len(options) > 1
                else ("draws fresh training noise every epoch and needs")
            )
            raise ValueError(
                f"{' and '.join(options)} {verbs} "
                "--trainer.reload_dataloaders_every_n_epochs 1 "
                "(Trainer(reload_dataloaders_every_n_epochs=1) in Python; Lightning builds the "
                f"training loader once per fit otherwise), got {every}"
            )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; with ``resample_noise`` / ``pixel_noise_std``, this
        epoch's padding noise / pixel perturbation.

        Raises:
            ValueError: if ``resample_noise`` or ``pixel_noise_std`` is set and the attached
                trainer's ``reload_dataloaders_every_n_epochs`` is not 1.
        """
        if not self.resample_noise and self.pixel_noise_std == 0:
            return super().train_dataloader()
        trainer = self.trainer
        epoch = 0
        if trainer is not None:
            self.check_trainer(trainer)
            epoch = trainer.current_epoch
        self.setup()
        if self._clean_train is None:
            self._clean_train = self.train_set
        if self.pixel_noise_std > 0 or epoch != self._noise_epoch:
            x, y = self._clean_train.tensors
            x = x.clone()
            if self.resample_noise:
                x[:, _SIDE:] = self.train_noise(epoch)
            if self.pixel_noise_std > 0:
                image = x[:, :_SIDE] if self.order == "noise_padded" else x
                rng = np.random.default_rng([self.seed, 0, epoch, 1])
                shape = tuple(image.shape)
                image += self.pixel_noise_std * torch.from_numpy(
                    rng.standard_normal(shape, dtype=np.float32)
                )
            self.train_set = TensorDataset(x, y)
            self._noise_epoch = epoch
        return self._loader("train", shuffle=True)
