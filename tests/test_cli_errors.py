"""The structured argument error (``ode_reg._checks.ArgumentError``) and what ``ode-reg`` makes
of it: the class, the setting's place and the accepted range, found from the error's own
attributes and the parsed configuration (no traceback frames).

The recipe-level cases already covered in tests/test_newcomer.py (a regularizer's weight or gamma
in a config file, a data module's ``order``, a wrong type) are not repeated here.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ode_reg import AdjointMagnitude, SkewJacobianPenalty
from ode_reg._checks import ArgumentError
from ode_reg.callbacks import GradientNormMonitor
from ode_reg.cli import ConfigError, config_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("build", "argument", "accepted", "value"),
    [
        (lambda: AdjointMagnitude(weight=-1.0), "weight", "[0.0, inf)", -1.0),
        (lambda: SkewJacobianPenalty(probes=0), "probes", "an integer >= 1", 0),
        (lambda: GradientNormMonitor(every_n_steps=0), "every_n_steps", "an integer >= 1", 0),
    ],
    ids=["AdjointMagnitude.weight", "SkewJacobianPenalty.probes", "GradientNormMonitor.every_n"],
)
def test_argument_checks_raise_a_structured_error(build, argument, accepted, value) -> None:
    with pytest.raises(ValueError) as info:  # still a ValueError: existing callers unchanged
        build()
    err = info.value
    assert isinstance(err, ArgumentError)
    assert (err.argument, err.accepted, err.value) == (argument, accepted, value)
    # The message is the one it always was, built from the same three parts.
    verb = "lie in" if accepted.startswith("[") else "be"
    assert str(err) == f"`{argument}` must {verb} {accepted}, got {value!r}"
    # It survives pickling (errors travel between processes under DDP), attributes and all.
    again = pickle.loads(pickle.dumps(err))
    assert (again.argument, again.accepted, again.value, str(again)) == (
        argument,
        accepted,
        value,
        str(err),
    )


def _two_magnitudes(second_weight: float) -> dict:
    terms = [
        {"class_path": "ode_reg.AdjointMagnitude", "init_args": {"weight": 0.1}},
        {"class_path": "ode_reg.AdjointMagnitude", "init_args": {"weight": second_weight}},
    ]
    return {
        "model": {
            "class_path": "ode_reg.models.SequenceModel",
            "init_args": {"regularizers": terms},
        }
    }


def test_config_error_names_the_refused_one_of_two_settings_of_the_same_class() -> None:
    """Two AdjointMagnitude terms, the second refused: the place is the second (its value is
    the refused one), not the first class that has a `weight`."""
    config = _two_magnitudes(-1.0)
    with pytest.raises(ArgumentError) as info:
        AdjointMagnitude(weight=-1.0)
    err = config_error(info.value, config)
    assert isinstance(err, ConfigError)
    lines = str(err).splitlines()
    assert lines[0] == "AdjointMagnitude: `weight` must lie in [0.0, inf), got -1.0"
    assert lines[1] == (
        "  set by model.init_args.regularizers[1].init_args.weight in the config file "
        "(ode_reg.AdjointMagnitude)"
    )
    assert (
        lines[2] == "  arguments and ranges: ode-reg fit --model.help ode_reg.models.SequenceModel"
    )


def test_config_error_leaves_other_errors_alone() -> None:
    config = _two_magnitudes(-1.0)
    # Not an argument check, and a plain ValueError whose value is not the configured one.
    assert config_error(RuntimeError("`weight` must lie in [0.0, inf), got -1.0"), config) is None
    assert config_error(ValueError("`weight` must lie in [0, 1], got 7.0"), config) is None
    assert config_error(ValueError("shapes do not match"), config) is None
    # An argument check whose argument is set nowhere in the config: the message, no place.
    err = config_error(ArgumentError("horizon", "(0.0, inf)", 0.0, "`horizon` ..."), config)
    assert str(err) == "`horizon` ...\n  all options: ode-reg fit --help"


def _ode_reg(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    wandb = tmp_path / "wandb"
    wandb.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    env.update({v: str(wandb) for v in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "ode_reg", "fit", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _two_moons(tmp_path: Path, edit=None) -> Path:
    config = yaml.safe_load((ROOT / "recipes" / "two_moons.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    if edit is not None:
        edit(config)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    return [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("Seed set")]


def test_a_bad_monitor_setting_in_a_config_file_names_the_class_place_and_range(
    tmp_path: Path,
) -> None:
    def monitor_every_0(config: dict) -> None:
        config["trainer"]["callbacks"][0]["init_args"] = {"every_n_steps": 0}

    res = _ode_reg(tmp_path, "--config", str(_two_moons(tmp_path, monitor_every_0)))
    lines = _error_lines(res)
    assert lines[0] == (
        "ode-reg: error: SpectrumMonitor: `every_n_steps` must be an integer >= 1, got 0"
    )
    assert lines[1] == (
        "  set by trainer.callbacks[0].init_args.every_n_steps in the config file "
        "(ode_reg.callbacks.SpectrumMonitor)"
    )
    assert lines[-1] == "  all options: ode-reg fit --help" and len(lines) == 3, res.stderr
    assert not (tmp_path / "runs").exists() and list((tmp_path / "wandb").iterdir()) == []


def test_a_bad_model_value_on_the_command_line_names_the_flag_and_range(tmp_path: Path) -> None:
    res = _ode_reg(
        tmp_path, "--config", str(_two_moons(tmp_path)), "--model.init_args.step_size=-0.5"
    )
    lines = _error_lines(res)
    assert lines == [
        "ode-reg: error: FlowClassifier: `step_size` must lie in (0.0, inf), got -0.5",
        "  set by --model.init_args.step_size (in the config file or on the command line)",
        "  arguments and ranges: ode-reg fit --model.help ode_reg.models.FlowClassifier",
        "  all options: ode-reg fit --help",
    ], res.stderr
    assert not (tmp_path / "runs").exists() and list((tmp_path / "wandb").iterdir()) == []
