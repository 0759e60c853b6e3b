"""Every recipe starts and runs a couple of steps (``--trainer.fast_dev_run 2``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ode_reg.cli import run

ROOT = Path(__file__).resolve().parents[1]
# Lightning configs (with a ``model``); the experiment lists (``sweep.yaml``,
# ``experiments.yaml``) are not recipes.
RECIPES = sorted(
    p for p in (ROOT / "recipes").glob("*.yaml") if "model" in yaml.safe_load(p.read_text())
)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()


def test_recipes_exist() -> None:
    names = {p.stem for p in RECIPES}
    assert {
        "digits",
        "digits_permuted",
        "digits_noise_padded",
        "adding",
        "copying",
        "two_moons",
    } <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_two_steps(recipe: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(recipe.read_text())
    data_args = config["data"]["init_args"]
    # Enough steps for every term to be due once (the n-th step for every_n_steps = n).
    regs = config["model"].get("init_args", {}).get("regularizers") or []
    steps = max([2] + [int(r.get("init_args", {}).get("every_n_steps", 1)) for r in regs])
    overrides = ["--trainer.fast_dev_run", str(steps), "--trainer.default_root_dir", str(tmp_path)]
    # Small splits keep the test fast; shapes and models are those of the recipe.
    n_train = max(160, steps * int(data_args.get("batch_size", 1)))
    for key, value in (("n_train", n_train), ("n_val", 32), ("n_test", 32)):
        if key in data_args:
            overrides += [f"--data.init_args.{key}", str(value)]
    cli = run(["fit", "--config", str(recipe), *overrides])
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == steps
    assert all(p.isfinite().all() for p in model.parameters())
    loss = trainer.callback_metrics.get(
        "train/loss_step", trainer.callback_metrics.get("train/loss")
    )
    assert loss is not None and loss.isfinite()
    if getattr(model, "regularizers", None):
        assert (
            "reg/total_step" in trainer.callback_metrics or "reg/total" in trainer.callback_metrics
        )


def _two_moons_two_steps(tmp_path: Path):
    """Two training steps of the two-moons recipe (its W&B logger as configured)."""
    recipe = ROOT / "recipes" / "two_moons.yaml"
    return run(
        [
            "fit",
            "--config",
            str(recipe),
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )


def test_wandb_online_without_account_falls_back_to_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.warns(UserWarning, match="W&B is unavailable.*no W&B account"):
        cli = _two_moons_two_steps(tmp_path)
    assert [type(lg) for lg in cli.trainer.loggers] == [CSVLogger]
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert metrics and "train/loss" in metrics[0].read_text()


def test_wandb_init_failure_falls_back_to_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb
    from lightning.pytorch.loggers import CSVLogger

    def broken_init(*args, **kwargs):
        raise wandb.errors.CommError("network unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="wandb.init failed: CommError"):
        cli = _two_moons_two_steps(tmp_path)
    assert [type(lg) for lg in cli.trainer.loggers] == [CSVLogger]
