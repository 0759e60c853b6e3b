"""Tests of ode_reg.data: shapes, task definitions, baselines, splits, determinism, argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from ode_reg.data import (
    AddingDataModule,
    CopyingDataModule,
    DigitsDataModule,
    TwoMoonsDataModule,
)

SPLITS = ("train", "val", "test")


def small_adding(**kw):
    args = dict(seq_len=20, n_train=64, n_val=16, n_test=24, batch_size=8)
    return AddingDataModule(**{**args, **kw})


def small_copying(**kw):
    args = dict(delay=15, n_train=64, n_val=16, n_test=24, batch_size=8)
    return CopyingDataModule(**{**args, **kw})


def all_tensors(dm, split):
    return dm.dataset(split).tensors


def loaders(dm):
    dm.setup("fit")
    return {
        "train": dm.train_dataloader(),
        "val": dm.val_dataloader(),
        "test": dm.test_dataloader(),
    }


# --------------------------------------------------------------------------- shapes and dtypes


def test_adding_shapes_and_dtypes():
    dm = small_adding()
    assert (dm.input_dim, dm.seq_len, dm.output_dim) == (2, 20, 1)
    sizes = {"train": 64, "val": 16, "test": 24}
    for split, loader in loaders(dm).items():
        x, y = next(iter(loader))
        assert x.shape == (8, 20, 2) and x.dtype == torch.float32
        assert y.shape == (8, 1) and y.dtype == torch.float32
        assert len(loader.dataset) == sizes[split]


def test_copying_shapes_and_dtypes():
    dm = small_copying()
    assert (dm.input_dim, dm.seq_len, dm.num_classes) == (10, 35, 9)
    for loader in loaders(dm).values():
        x, y = next(iter(loader))
        assert x.shape == (8, 35, 10) and x.dtype == torch.float32
        assert y.shape == (8, 35) and y.dtype == torch.int64
        assert torch.all(x.sum(-1) == 1)  # one-hot
        assert 0 <= int(y.min()) and int(y.max()) < dm.num_classes


@pytest.mark.parametrize(
    ("order", "seq_len", "shape"),
    [("pixel", None, (64, 1)), ("permuted", 64, (64, 1)), ("noise_padded", 30, (30, 8))],
)
def test_digits_shapes_and_dtypes(order, seq_len, shape):
    dm = DigitsDataModule(order=order, seq_len=seq_len, batch_size=16)
    assert (dm.seq_len, dm.input_dim, dm.num_classes) == (shape[0], shape[1], 10)
    for loader in loaders(dm).values():
        x, y = next(iter(loader))
        assert x.shape == (16, *shape) and x.dtype == torch.float32
        assert y.shape == (16,) and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) <= 9


def test_digits_noise_padded_default_length():
    dm = DigitsDataModule(order="noise_padded")
    assert dm.seq_len == 200
    assert all_tensors(dm, "test")[0].shape == (360, 200, 8)


def test_moons_shapes_and_dtypes():
    dm = TwoMoonsDataModule(n_samples=300, batch_size=16)
    assert (dm.input_dim, dm.seq_len, dm.num_classes) == (2, None, 2)
    for loader in loaders(dm).values():
        x, y = next(iter(loader))
        assert x.shape == (16, 2) and x.dtype == torch.float32
        assert y.shape == (16,) and y.dtype == torch.int64
    total = sum(len(dm.dataset(s)) for s in SPLITS)
    assert total == 300
    assert len(dm.test_set) == 60
    y = torch.cat([all_tensors(dm, s)[1] for s in SPLITS])
    assert set(y.tolist()) == {0, 1} and int(y.sum()) == 150


def test_moons_not_linearly_separable():
    from sklearn.linear_model import LogisticRegression

    dm = TwoMoonsDataModule(n_samples=1000, noise=0.1)
    x, y = all_tensors(dm, "train")
    acc = LogisticRegression().fit(x.numpy(), y.numpy()).score(x.numpy(), y.numpy())
    assert 0.75 < acc < 0.95


# --------------------------------------------------------------------------- adding problem


def test_adding_target_is_sum_of_marked_values():
    dm = small_adding(seq_len=21)
    half = 21 // 2
    for split in SPLITS:
        x, y = all_tensors(dm, split)
        values, markers = x[..., 0], x[..., 1]
        assert torch.all((values >= 0) & (values < 1))
        assert set(markers.unique().tolist()) <= {0.0, 1.0}
        assert torch.all(markers[:, :half].sum(1) == 1)
        assert torch.all(markers[:, half:].sum(1) == 1)
        first = markers[:, :half].argmax(1)
        second = half + markers[:, half:].argmax(1)
        rows = torch.arange(len(x))
        expected = values[rows, first] + values[rows, second]
        torch.testing.assert_close(y[:, 0], expected, rtol=0, atol=0)


def test_adding_marker_positions_cover_both_halves():
    dm = small_adding(seq_len=10, n_train=2000)
    markers = all_tensors(dm, "train")[0][..., 1]
    # every step is marked at least once; no half is ever marked twice (checked above)
    assert torch.all(markers.sum(0) > 0)


def test_adding_constant_baseline_mse_is_one_sixth():
    n = 100_000
    dm = AddingDataModule(seq_len=4, n_train=n, n_val=1, n_test=1)
    _, y = all_tensors(dm, "train")
    mse = float(((y.double() - 1.0) ** 2).mean())
    # Var((S - 1)^2) = E[(S - 1)^4] - (1/6)^2 = 1/15 - 1/36 = 7/180
    se = math.sqrt(7 / 180 / n)
    assert dm.baseline_mse == pytest.approx(1 / 6)
    assert abs(mse - 1 / 6) < 5 * se
    assert abs(float(y.mean()) - 1.0) < 5 * math.sqrt(1 / 6 / n)


# --------------------------------------------------------------------------- copying problem


def test_copying_inputs_and_targets():
    delay, k = 15, 10
    dm = small_copying(delay=delay)
    for split in SPLITS:
        x, y = all_tensors(dm, split)
        tokens = x.argmax(-1)
        symbols = tokens[:, :k]
        assert torch.all((symbols >= 1) & (symbols <= 8))
        assert torch.all(tokens[:, k : k + delay - 1] == 0)
        assert torch.all(
            tokens[:, k + delay - 1] == 9
        )  # marker `delay` steps after the last symbol
        assert torch.all(tokens[:, k + delay :] == 0)
        assert torch.all(y[:, -k:] == symbols)
        assert torch.all(y[:, :-k] == 0)
        assert torch.all((tokens == 9).sum(1) == 1)  # exactly one marker


def test_copying_symbols_are_uniform():
    dm = small_copying(n_train=2000)
    symbols = all_tensors(dm, "train")[1][:, -10:].flatten()
    counts = torch.bincount(symbols, minlength=9)[1:].double()
    assert counts.sum() == 20_000
    assert torch.all((counts / 20_000 - 1 / 8).abs() < 0.01)


@pytest.mark.parametrize(("delay", "expected"), [(100, 0.173), (200, 0.0945)])
def test_copying_memoryless_baseline(delay, expected):
    dm = CopyingDataModule(delay=delay, n_train=32, n_val=1, n_test=1)
    assert dm.memoryless_baseline == pytest.approx(10 * math.log(8) / (delay + 20))
    assert dm.memoryless_baseline == pytest.approx(expected, abs=5e-4)
    # the memoryless strategy (blank for sure, then uniform over the 8 symbols) reaches it
    _, y = all_tensors(dm, "train")
    logits = torch.full((*y.shape, dm.num_classes), -1e9, dtype=torch.float64)
    logits[:, :-10, 0] = 0.0
    logits[:, -10:, 1:9] = 0.0
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert float(ce) == pytest.approx(dm.memoryless_baseline, rel=1e-9)


def test_copying_generalized_sizes():
    dm = CopyingDataModule(delay=5, n_symbols=3, n_copy=4, n_train=50, n_val=2, n_test=2)
    assert (dm.seq_len, dm.input_dim, dm.num_classes) == (13, 5, 4)
    assert dm.memoryless_baseline == pytest.approx(4 * math.log(3) / 13)
    x, y = all_tensors(dm, "train")
    tokens = x.argmax(-1)
    assert torch.all(tokens[:, 4 + 5 - 1] == 4)
    assert torch.all(y[:, -4:] == tokens[:, :4])
    assert set(tokens[:, :4].unique().tolist()) == {1, 2, 3}


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_raw():
    d = load_digits()
    return d.data / 16.0, d.target


@pytest.fixture(scope="module")
def pixel_dm():
    dm = DigitsDataModule(order="pixel")
    dm.setup()
    return dm


def test_digits_split_sizes_and_stratification(pixel_dm, digits_raw):
    _, labels = digits_raw
    n = {s: len(pixel_dm.dataset(s)) for s in SPLITS}
    assert sum(n.values()) == 1797
    assert n["test"] == 360  # ceil(0.2 * 1797)
    assert n["train"] + n["val"] == 1437
    assert n["val"] == 144  # ceil(0.1 * 1437)
    idx = np.concatenate([pixel_dm.split_indices[s] for s in SPLITS])
    assert sorted(idx.tolist()) == list(range(1797))  # disjoint and complete
    full = np.bincount(labels, minlength=10) / len(labels)
    for split in SPLITS:
        y = all_tensors(pixel_dm, split)[1].numpy()
        np.testing.assert_array_equal(y, labels[pixel_dm.split_indices[split]])
        props = np.bincount(y, minlength=10) / len(y)
        assert np.abs(props - full).max() < 0.01


def test_digits_standardized_with_train_statistics(pixel_dm, digits_raw):
    images, _ = digits_raw
    train = pixel_dm.split_indices["train"]
    assert pixel_dm.mean == pytest.approx(images[train].mean())
    assert pixel_dm.std == pytest.approx(images[train].std())
    x = all_tensors(pixel_dm, "train")[0].double()
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(x.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    test = pixel_dm.split_indices["test"]
    expected = (images[test] - pixel_dm.mean) / pixel_dm.std
    np.testing.assert_allclose(
        all_tensors(pixel_dm, "test")[0][..., 0].numpy(), expected, atol=1e-5
    )


def test_digits_permutation_is_fixed_permutation(pixel_dm):
    dm = DigitsDataModule(order="permuted", permutation_seed=3)
    perm = dm.permutation
    assert perm.shape == (64,) and perm.dtype == torch.int64
    assert sorted(perm.tolist()) == list(range(64))
    assert not torch.equal(perm, torch.arange(64))
    for split in SPLITS:
        xp = all_tensors(dm, split)[0][..., 0]
        x = all_tensors(pixel_dm, split)[0][..., 0]
        assert torch.equal(xp, x[:, perm])
        assert torch.equal(xp.sort(1).values, x.sort(1).values)
        assert torch.equal(all_tensors(dm, split)[1], all_tensors(pixel_dm, split)[1])
    again = DigitsDataModule(order="permuted", permutation_seed=3, seed=5)
    assert torch.equal(again.permutation, perm)  # independent of the data seed
    other = DigitsDataModule(order="permuted", permutation_seed=4)
    assert not torch.equal(other.permutation, perm)
    assert DigitsDataModule(order="pixel").permutation is None


def test_digits_noise_padding(pixel_dm):
    dm = DigitsDataModule(order="noise_padded", seq_len=100)
    for split in SPLITS:
        x, y = all_tensors(dm, split)
        image = all_tensors(pixel_dm, split)[0][..., 0].reshape(-1, 8, 8)
        assert torch.equal(x[:, :8], image)  # rows 0..7 are the standardized image rows
        assert torch.equal(y, all_tensors(pixel_dm, split)[1])
    noise = all_tensors(dm, "train")[0][:, 8:].double()
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(noise.std()) == pytest.approx(1.0, abs=0.01)
    # independent across samples and steps: neighbouring steps are uncorrelated
    a, b = noise[:, :-1].flatten(), noise[:, 1:].flatten()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.01
    # fresh noise per split and per seed
    val_noise = all_tensors(dm, "val")[0][:, 8:]
    assert not torch.equal(noise[: len(val_noise)].float(), val_noise)
    reseeded = DigitsDataModule(order="noise_padded", seq_len=100, seed=1)
    assert not torch.equal(
        all_tensors(reseeded, "test")[0][:, 8:], all_tensors(dm, "test")[0][:, 8:]
    )
    # shortest padding: the image alone
    short = DigitsDataModule(order="noise_padded", seq_len=8)
    assert torch.equal(all_tensors(short, "val")[0], all_tensors(dm, "val")[0][:, :8])


def _epoch_inputs(dm, epochs, reload=1):
    """Train ``epochs`` epochs of a tiny model; return each epoch's training inputs, as seen."""
    import lightning.pytorch as pl

    seen = {}

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            seen.setdefault(self.current_epoch, []).append(batch[0].clone())
            return (self.w * batch[0].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = pl.Trainer(
        max_epochs=epochs,
        reload_dataloaders_every_n_epochs=reload,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(Probe(), datamodule=dm)
    return {e: torch.cat(v) for e, v in seen.items()}


def test_digits_resample_noise_per_epoch():
    dm = DigitsDataModule(order="noise_padded", seq_len=12, batch_size=400, resample_noise=True)
    fixed = DigitsDataModule(order="noise_padded", seq_len=12, batch_size=400)
    dm.setup()
    images = all_tensors(dm, "train")[0][:, :8]
    seen = _epoch_inputs(dm, epochs=3)
    n = len(images)
    for epoch, x in seen.items():
        assert x.shape == (n, 12, 8)
        # the same images (in a per-epoch shuffled order), with epoch `epoch`'s noise
        order = torch.cdist(x[:, :8].flatten(1), images.flatten(1)).argmin(dim=1)
        assert torch.equal(order.sort().values, torch.arange(n))
        assert torch.equal(x[:, :8], images[order])
        assert torch.equal(x[:, 8:], dm.train_noise(epoch)[order])
    # epoch 0 is the noise of setup() (what resample_noise=False uses every epoch)
    assert torch.equal(dm.train_noise(0), all_tensors(fixed, "train")[0][:, 8:])
    assert not torch.allclose(dm.train_noise(1), dm.train_noise(0))
    assert not torch.allclose(dm.train_noise(2), dm.train_noise(1))
    # the shuffled order changes between epochs too, and val/test noise stays fixed
    assert not torch.equal(seen[0][:, :8], seen[1][:, :8])
    assert torch.equal(all_tensors(dm, "val")[0], all_tensors(fixed, "val")[0])


def test_digits_pixel_noise_augmentation_per_epoch():
    dm = DigitsDataModule(order="pixel", batch_size=400, pixel_noise_std=0.5)
    clean = DigitsDataModule(order="pixel", batch_size=400)
    images = all_tensors(clean, "train")[0]
    seen = _epoch_inputs(dm, epochs=2)
    deltas = []
    for epoch, x in seen.items():
        # epoch e's samples are the clean images plus 0.5 * N(0, 1) from its own stream
        rng = np.random.default_rng([0, 0, epoch, 1])
        delta = 0.5 * torch.from_numpy(rng.standard_normal(tuple(images.shape), dtype=np.float32))
        expected = images + delta
        pairwise = torch.cdist(
            x.flatten(1), expected.flatten(1), compute_mode="donot_use_mm_for_euclid_dist"
        )
        dist, order = pairwise.min(dim=1)
        assert float(dist.max()) < 1e-5
        assert torch.equal(order.sort().values, torch.arange(len(images)))
        assert float(delta.std()) == pytest.approx(0.5, rel=0.02)
        deltas.append(delta)
    assert not torch.allclose(deltas[0], deltas[1])  # drawn again each epoch
    # validation and test pixels are untouched
    for split in ("val", "test"):
        assert torch.equal(all_tensors(dm, split)[0], all_tensors(clean, split)[0])
    with pytest.raises(ValueError, match="pixel_noise_std"):
        DigitsDataModule(pixel_noise_std=-0.1)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        _epoch_inputs(DigitsDataModule(pixel_noise_std=0.1, batch_size=400), epochs=1, reload=0)


def test_digits_resample_noise_errors():
    with pytest.raises(ValueError, match="resample_noise"):
        DigitsDataModule(order="pixel", resample_noise=True)
    dm = DigitsDataModule(order="noise_padded", seq_len=12, batch_size=400, resample_noise=True)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        _epoch_inputs(dm, epochs=1, reload=0)
    with pytest.raises(ValueError, match="epoch"):
        dm.train_noise(-1)


# --------------------------------------------------------------------------- determinism


def make_modules(seed):
    return [
        small_adding(seed=seed),
        small_copying(seed=seed),
        DigitsDataModule(order="noise_padded", seq_len=16, seed=seed),
        TwoMoonsDataModule(n_samples=200, seed=seed),
    ]


@pytest.mark.parametrize("index", range(4))
def test_same_seed_same_tensors_different_seed_different(index):
    a, b, c = make_modules(0)[index], make_modules(0)[index], make_modules(1)[index]
    for split in SPLITS:
        (xa, ya), (xb, yb), (xc, _) = (all_tensors(m, split) for m in (a, b, c))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)
    # the training order is fixed by the seed too
    assert torch.equal(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])


def test_splits_differ_and_are_independent_of_other_split_sizes():
    dm = small_adding()
    x_train, x_val = all_tensors(dm, "train")[0], all_tensors(dm, "val")[0]
    assert not torch.equal(x_train[:16], x_val)
    bigger_val = small_adding(n_val=40)
    assert torch.equal(all_tensors(bigger_val, "train")[0], x_train)
    assert torch.equal(all_tensors(bigger_val, "test")[0], all_tensors(dm, "test")[0])


def test_setup_is_idempotent_and_train_loader_shuffles():
    dm = small_adding(n_train=64, batch_size=64)
    dm.setup("fit")
    first = dm.train_set
    dm.setup("test")
    assert dm.train_set is first
    x_batch = next(iter(dm.train_dataloader()))[0]
    assert not torch.equal(x_batch, first.tensors[0])  # shuffled
    assert torch.equal(x_batch.sort(0).values, first.tensors[0].sort(0).values)
    assert torch.equal(next(iter(dm.val_dataloader()))[0], dm.val_set.tensors[0][: dm.batch_size])


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (AddingDataModule, {"seq_len": 1}, "seq_len"),
        (AddingDataModule, {"seq_len": 2.5}, "seq_len"),
        (AddingDataModule, {"n_train": 0}, "n_train"),
        (AddingDataModule, {"n_val": -1}, "n_val"),
        (AddingDataModule, {"n_test": 0}, "n_test"),
        (AddingDataModule, {"batch_size": 0}, "batch_size"),
        (AddingDataModule, {"num_workers": -1}, "num_workers"),
        (AddingDataModule, {"seed": -1}, "seed"),
        (AddingDataModule, {"seed": True}, "seed"),
        (CopyingDataModule, {"delay": 0}, "delay"),
        (CopyingDataModule, {"n_symbols": 1}, "n_symbols"),
        (CopyingDataModule, {"n_copy": 0}, "n_copy"),
        (CopyingDataModule, {"n_train": 0}, "n_train"),
        (DigitsDataModule, {"order": "rows"}, "order"),
        (DigitsDataModule, {"order": "pixel", "seq_len": 100}, "seq_len"),
        (DigitsDataModule, {"order": "permuted", "seq_len": 32}, "seq_len"),
        (DigitsDataModule, {"order": "noise_padded", "seq_len": 7}, "seq_len"),
        (DigitsDataModule, {"permutation_seed": -2}, "permutation_seed"),
        (DigitsDataModule, {"test_fraction": 0.0}, "test_fraction"),
        (DigitsDataModule, {"test_fraction": 1.0}, "test_fraction"),
        (DigitsDataModule, {"test_fraction": 0.001}, "test_fraction"),
        (DigitsDataModule, {"val_fraction": 1.5}, "val_fraction"),
        (DigitsDataModule, {"val_fraction": float("nan")}, "val_fraction"),
        (DigitsDataModule, {"batch_size": 0}, "batch_size"),
        (TwoMoonsDataModule, {"n_samples": 10}, "n_samples"),
        (TwoMoonsDataModule, {"noise": -0.1}, "noise"),
        (TwoMoonsDataModule, {"noise": float("inf")}, "noise"),
        (TwoMoonsDataModule, {"test_fraction": 0.99}, "test_fraction"),
        (TwoMoonsDataModule, {"val_fraction": 0.0}, "val_fraction"),
    ],
)
def test_bad_arguments_raise(factory, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must"):
        factory(**kwargs)


def test_dataset_rejects_unknown_split():
    with pytest.raises(ValueError, match="`split` must be one of"):
        small_adding().dataset("training")
