"""What a new user meets in the first hour: README commands, the summary, plots, errors.

Each test stands for one way the README or the ``ode-reg`` command failed a newcomer
(issue "A newcomer's first hour"): README commands that only work with ``.venv`` on the
``PATH``, plots without labels, a summary listing plots by string order, long tracebacks for a
bad recipe value, a W&B run created before a configuration error, ``--help`` not naming the
recipe models.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ode_reg.cli import ConfigError, run
from ode_reg.plotting import eigenvalue_figure, histogram_figure, profile_figure
from ode_reg.summary import format_summary, latest_plots, near_zero

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

PROGRAMS = ("ode-reg ", "python ", ".venv/bin/", "bash scripts/", "wandb ", "torchrun ", "source ")


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline, all its folders under ``tmp_path / "wandb"`` (returned)."""
    folder = tmp_path / "wandb"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(folder))
    return folder


# --------------------------------------------------------------------------- README commands


def readme_commands(text: str) -> list[str]:
    """Every shell command of the README: lines of ```bash blocks and inline command spans."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if span.startswith(PROGRAMS) and " " in span:
            commands.append(span)
    return list(dict.fromkeys(commands))


_GPU = {"--trainer.accelerator": "cpu", "--trainer.devices": "1", "--trainer.strategy": "auto"}


def fast_form(command: str, out: str) -> str | None:
    """The ``--help`` / ``--fast`` form of a README command, or None if no rule covers it.

    Training commands run one batch (``--trainer.fast_dev_run 1``) with their files under
    ``out``; a multi-GPU command runs so on one CPU; multi-process launchers and the multi-run
    scripts show their ``--help``. ``"UNKNOWN"`` marks a command no rule covers.
    """
    fast = (
        f"--trainer.fast_dev_run 1 --trainer.default_root_dir {out} "
        f"--trainer.logger.init_args.save_dir {out}"
    )
    words = command.split()
    if command == "source .venv/bin/activate":
        return None  # run before every command
    if "mymodel" in command:
        # The README's own model and data module (mymodel.py, mymodel.yaml) live in the
        # README: tests/test_front_door.py writes them to a folder and runs the command there.
        return None
    if command.startswith("bash scripts/main_job.sh"):
        cpu = " ".join(f"{k} {v}" for k, v in _GPU.items() if k in words)
        return " ".join(x for x in (command, cpu, fast) if x)
    if command.startswith("bash scripts/test.sh"):
        return "bash scripts/test.sh --version"
    if re.match(r"^(\.venv/bin/)?(ode-reg|python -m ode_reg) ", command):
        if any(w.endswith("help") for w in words):
            return command
        cpu = " ".join(f"{k} {v}" for k, v in _GPU.items() if k in words)
        return " ".join(x for x in (command, cpu, fast) if x)
    if command.startswith("torchrun "):
        return "torchrun --help"
    if re.match(r"^python (recipes/\w+\.py|benchmarks/\w+\.py|-m benchmarks)$", command):
        return f"{command} --help"
    if m := re.match(r"^python ((?:benchmarks|recipes)/\w+\.py) .*$", command):
        return f"python {m.group(1)} --help"
    if re.match(r"^python -m benchmarks --sections \S+$", command):
        return "python -m benchmarks --help"
    if command == "python scripts/render_benchmarks.py":
        # It would rewrite the README; its read-only form compares the tables with the record.
        return "python scripts/render_benchmarks.py --check"
    if m := re.match(r"^python -m (benchmarks\.\w+)$", command):
        # A benchmark module without --help (it would run): it must import from the shell.
        return f'python -c "import {m.group(1)}"'
    if m := re.match(r"^(?:\.venv/bin/)?python -m pytest(?: .*)?$", command):
        return "python -m pytest --version"
    if command.startswith("wandb sync "):
        return "wandb sync --help"
    if command == "bash scripts/refresh_readme.sh" or re.match(
        r"^\.venv/bin/python scripts/readme_figures\.py \w+$", command
    ):
        # Both would rewrite the README; their read-only part compares it with the record.
        return ".venv/bin/python scripts/readme_figures.py check"
    return "UNKNOWN"


def merged_training_commands(commands: list[str]) -> list[str]:
    """README ``ode-reg fit --config C --flag value ...`` commands, one per config C.

    Commands with the same recipe are merged (later values of a flag win), so the test starts
    one process per recipe; every flag the README uses still reaches the parser.
    """
    merged: dict[str, dict[str, str]] = {}
    others = []
    for command in commands:
        words = command.split()
        m = re.match(r"^(?:\.venv/bin/)?ode-reg fit --config (\S+)", command)
        if not m or any(w.endswith("help") for w in words) or len(words[4:]) % 2:
            others.append(command)
            continue
        flags = merged.setdefault(m.group(1), {})
        pairs = words[4:]
        flags.update(zip(pairs[::2], pairs[1::2], strict=True))
    # scripts/main_job.sh is `ode-reg fit --config recipes/digits.yaml "$@"`: the digits
    # commands' flags ride on it.
    main = "bash scripts/main_job.sh"
    if main in others and "recipes/digits.yaml" in merged:
        assert "--config recipes/digits.yaml" in (ROOT / "scripts" / "main_job.sh").read_text()
        flags = merged.pop("recipes/digits.yaml")
        others[others.index(main)] = " ".join([main, *(f"{k} {v}" for k, v in flags.items())])
    out = [
        " ".join(["ode-reg fit --config", config, *(f"{k} {v}" for k, v in flags.items())])
        for config, flags in merged.items()
    ]
    return others + out


def _fresh_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    env["WANDB_MODE"] = "offline"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[var] = str(tmp_path / "wandb")
    (tmp_path / "wandb").mkdir(exist_ok=True)
    return env


def _shell(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_readme_commands_are_all_covered_by_a_fast_form() -> None:
    commands = readme_commands(README.read_text())
    # The README's own list, as a newcomer reads it (a few that the issue names).
    for expected in (
        "bash scripts/main_job.sh",
        "source .venv/bin/activate",
        "python -m benchmarks",
    ):
        assert expected in commands
    assert any(c.startswith("wandb sync") for c in commands)
    assert any(c.startswith("python recipes/") for c in commands)
    unknown = [c for c in commands if fast_form(c, "/tmp/x") == "UNKNOWN"]
    assert not unknown, f"README commands without a --help/--fast form in this test: {unknown}"


def test_readme_commands_work_from_a_fresh_shell(tmp_path: Path) -> None:
    """Every README command, in its fast form, from a shell that knows nothing of .venv."""
    text = README.read_text()
    commands = readme_commands(text)
    assert "source .venv/bin/activate" in commands, "README must say how to reach .venv"
    env = _fresh_env(tmp_path)
    # The shell is fresh: without the README's activation line there is no ode-reg.
    bare = _shell("command -v ode-reg || echo missing", env)
    assert bare.stdout.strip() == "missing"
    forms = []
    for n, command in enumerate(merged_training_commands(commands)):
        form = fast_form(command, str(tmp_path / f"run{n}"))
        if form is not None:
            forms.append((command, form))
    # The quick ones (no Lightning import) share one shell; the rest get one each.
    quick = [(c, f) for c, f in forms if not re.search(r"ode-reg|ode_reg|main_job|benchmarks", f)]
    slow = [cf for cf in forms if cf not in quick]
    jobs = [(" ; ".join(c for c, _ in quick), " && ".join(f for _, f in quick)), *slow]
    prefix = "set -e; source .venv/bin/activate; "
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda cf: (cf, _shell(prefix + cf[1], env)), jobs))
    failures = []
    for (command, form), res in results:
        if res.returncode != 0:
            failures.append(f"{command!r} as {form!r}: rc {res.returncode}\n{res.stderr[-1500:]}")
        for warning in (
            "both args and command line arguments",
            "anonymous setting",
            "git root",
            "LeafSpec",
            "Trying to infer the `batch_size`",
        ):
            if warning in res.stderr:
                failures.append(f"{command!r} prints a warning nobody can act on: {warning!r}")
    assert not failures, "\n\n".join(failures)
    helps = {c: r.stdout for (c, f), r in results if f.endswith("--help") and "ode-reg" in f}
    for command, out in helps.items():
        assert "SequenceModel" in out or "ode-reg" in out, command


# --------------------------------------------------------------------------- --help


def test_fit_help_names_the_recipe_models_and_data_modules(
    capsys: pytest.CaptureFixture, offline_wandb: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in (
        "ode_reg.models.SequenceModel",
        "ode_reg.models.FlowClassifier",
        "ode_reg.data.DigitsDataModule",
        "ode_reg.data.AddingDataModule",
        "ode_reg.data.CopyingDataModule",
        "ode_reg.data.TwoMoonsDataModule",
    ):
        assert name in out, name
    assert "--model.help" in README.read_text()


# --------------------------------------------------------------------------- errors


def _bad_recipe(tmp_path: Path, edit) -> Path:
    config = yaml.safe_load((ROOT / "recipes" / "digits.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    edit(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _negative_weight(config: dict) -> None:
    config["model"]["init_args"]["regularizers"][0]["init_args"]["weight"] = -1


def _directional_gamma_2(config: dict) -> None:
    config["model"]["init_args"]["regularizers"] = [
        {"class_path": "ode_reg.DirectionalConstraint", "init_args": {"gamma": 2, "weight": 0.1}}
    ]


@pytest.mark.parametrize(
    ("edit", "cls", "arg", "accepted"),
    [
        (_negative_weight, "AdjointMagnitude", "weight", "[0.0, inf)"),
        (_directional_gamma_2, "DirectionalConstraint", "gamma", "[-1.0, 1.0]"),
    ],
    ids=["weight=-1", "gamma=2"],
)
def test_bad_recipe_value_is_one_short_error_before_any_wandb_run(
    tmp_path: Path, offline_wandb: Path, edit, cls: str, arg: str, accepted: str
) -> None:
    recipe = _bad_recipe(tmp_path, edit)
    with pytest.raises(ConfigError) as info:
        run(["fit", "--config", str(recipe)])
    message = str(info.value)
    lines = message.splitlines()
    assert len(lines) <= 5, message
    assert lines[0].startswith(f"{cls}: `{arg}` must lie in {accepted}"), message
    assert f"model.init_args.regularizers[0].init_args.{arg}" in message
    assert "--model.help ode_reg.models.SequenceModel" in message and "--help" in lines[-1]
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # Nothing of W&B exists: neither a run folder nor `wandb/latest-run`.
    assert not list(tmp_path.rglob("offline-run-*")) and not list(tmp_path.rglob("latest-run"))


def test_bad_value_from_the_command_prints_a_few_lines_and_no_traceback(
    tmp_path: Path, offline_wandb: Path
) -> None:
    recipe = _bad_recipe(tmp_path, _negative_weight)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "-m", "ode_reg", "fit", "--config", str(recipe)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    error = [ln for ln in lines if ln.startswith("ode-reg: error:")]
    assert error == ["ode-reg: error: AdjointMagnitude: `weight` must lie in [0.0, inf), got -1.0"]
    assert len(lines) <= 8, res.stderr
    assert not list(tmp_path.rglob("offline-run-*"))


def test_wrong_type_in_a_recipe_is_one_line_naming_the_key(
    tmp_path: Path, offline_wandb: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = _bad_recipe(
        tmp_path,
        lambda c: c["model"]["init_args"]["regularizers"][0]["init_args"].update(weight="abc"),
    )
    with pytest.raises(SystemExit) as info:
        run(["fit", "--config", str(recipe)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ode-reg: error: model (ode_reg.models.SequenceModel) > regularizers "
        "(ode_reg.AdjointMagnitude) > weight: Expected a <class 'float'>. Got value: abc",
        "  all options: ode-reg fit --help",
    ]
    assert not list(tmp_path.rglob("offline-run-*"))


def test_data_module_trainer_error_names_the_cli_flag_before_wandb_starts(
    tmp_path: Path, offline_wandb: Path
) -> None:
    recipe = _bad_recipe(
        tmp_path, lambda c: c["trainer"].update(reload_dataloaders_every_n_epochs=0)
    )
    with pytest.raises(ConfigError) as info:
        run(["fit", "--config", str(recipe)])
    message = str(info.value)
    sigma = yaml.safe_load(recipe.read_text())["data"]["init_args"]["pixel_noise_std"]
    assert message.startswith(f"DigitsDataModule: --data.init_args.pixel_noise_std {sigma:g} draws")
    assert "--trainer.reload_dataloaders_every_n_epochs 1" in message
    assert len(message.splitlines()) <= 3
    assert not list(tmp_path.rglob("offline-run-*")) and not list(tmp_path.rglob("latest-run"))


def test_data_module_init_error_names_the_cli_flag(tmp_path: Path, offline_wandb: Path) -> None:
    recipe = _bad_recipe(tmp_path, lambda c: c["data"]["init_args"].update(order="spiral"))
    with pytest.raises(ConfigError) as info:
        run(["fit", "--config", str(recipe)])
    lines = str(info.value).splitlines()
    assert lines[0].startswith("DigitsDataModule: `order` must be one of")
    assert lines[1].strip().startswith("set by --data.init_args.order")
    assert "--data.help ode_reg.data.DigitsDataModule" in lines[2]


# --------------------------------------------------------------------------- plots


def _tick_labels(axis) -> list[str]:
    axis.figure.canvas.draw()
    lo, hi = sorted(axis.axes.get_ylim())
    return [
        t.get_text()
        for t, v in zip(axis.get_majorticklabels(), axis.get_majorticklocs(), strict=True)
        if t.get_text() and lo <= v <= hi
    ]


def test_adjoint_profile_plot_is_readable() -> None:
    t = torch.linspace(0.0, 12.8, 65)  # the main job: 64 pixels, step 0.2
    a = 0.015 * torch.exp(0.1 * (12.8 - t))  # spans a factor ~3.6: less than a decade
    fig = profile_figure(
        t, a, None, title="adjoint profile (backward) and sensitivity norms", step=1199, samples=32
    )
    ax = fig.axes[0]
    assert "loss / state unit" in ax.get_ylabel()
    assert "time" in ax.get_xlabel()
    assert ax.get_yscale() == "log"
    assert len(_tick_labels(ax.yaxis)) >= 3, "a log axis with fewer than 3 labels cannot be read"
    title = ax.get_title()
    assert "training step 1199" in title and "32 samples" in title
    assert "sensitivity" not in title  # no sensitivity curve was given
    assert len(ax.lines) == 1 and len(fig.axes) == 1  # one curve, no empty right axis
    assert len(ax.child_axes) == 1  # the index axis on top
    index_axis = ax.child_axes[0]
    assert "index k" in index_axis.get_xlabel()
    assert index_axis.get_xlim() == pytest.approx((-3.2, 67.2), abs=0.5)  # k = 0 .. 64

    y = torch.linspace(1e-4, 3e-4, 65)
    fig = profile_figure(t, a, y, step=10, samples=4)
    assert "sensitivity norms" in fig.axes[0].get_title()
    right = [ax for ax in fig.axes if ax.get_ylabel().startswith("‖y_k‖")]
    assert len(right) == 1 and "time unit" in right[0].get_ylabel()
    assert len(_tick_labels(right[0].yaxis)) >= 3


def test_eigenvalue_and_histogram_plots_are_labelled() -> None:
    fig = eigenvalue_figure(torch.tensor([-0.01 + 1j, -0.01 - 1j]), step=5, samples=4)
    ax = fig.axes[0]
    assert "1 / unit of ODE time" in ax.get_xlabel() and "1 / unit of ODE time" in ax.get_ylabel()
    assert "training step 5" in ax.get_title() and "4 states" in ax.get_title()
    fig = histogram_figure(torch.randn(40), bins=5, title="spectrum/jacobian_real", xlabel="Re λ")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Re λ" and ax.get_ylabel() == "count per bin"
    assert "40 values" in ax.get_title()


# --------------------------------------------------------------------------- summary


def test_summary_lists_the_newest_plot_of_each_key_by_step(tmp_path: Path) -> None:
    images = tmp_path / "files" / "media" / "images"
    for key, steps in (("adjoint/profile", (99, 449, 1000)), ("spectrum/eigenvalues", (8, 12))):
        for s in steps:
            p = images / f"{key}_{s}_{s:04x}abcd.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"")
    for s in (990, 1230):
        p = tmp_path / "plots" / "adjoint" / "profile" / f"step_{s:07d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    latest = latest_plots(tmp_path)
    assert latest["adjoint/profile"]["step"] == 1230  # string order would pick 990
    assert latest["adjoint/profile"]["count"] == 5
    assert latest["spectrum/eigenvalues"]["path"].endswith("eigenvalues_12_000cabcd.png")


def _summary(**kw) -> dict:
    base = {"epochs": 2, "steps": 82, "run_dir": "runs/x", "latest_plots": {}, "plot_cadence": 100}
    return {**base, **kw}


def test_summary_says_why_a_short_run_has_no_plot_and_where_checkpoints_are() -> None:
    ckpt = {"dir": "runs/x/checkpoints", "best": "runs/x/checkpoints/epoch=1.ckpt", "last": None}
    text = format_summary(_summary(checkpoints=ckpt))
    assert "none yet: the monitors plot every 100 steps and this run" in text
    assert "took 82" in text and "--trainer.log_every_n_steps" in text
    assert "runs/x/checkpoints" in text and "best: epoch=1.ckpt" in text


def test_summary_prints_float_rounding_as_zero_and_rounds_figures() -> None:
    eps32 = float(np.finfo(np.float32).eps)
    # The two-moons field's spectral abscissa is 0; float32 Jacobians gave 1.49e-07.
    text = format_summary(
        _summary(
            spectral_abscissa=1.49e-07,
            spectral_radius=1.3,
            skew_real_max=4.44e-16,
            float_eps=eps32,
            test_acc=0.911111,
            test_n=360,
            adjoint_ratio_max_min=22.0634,
        )
    )
    assert re.search(r"spectral abscissa \(max Re lambda\)\s+0 \(to float rounding\)", text)
    assert re.search(r"W - W\^T\)\| \(0 for a skew W\)\s+0 \(to float rounding\)", text)
    assert "0.9111 (328 of 360)" in text and re.search(
        r"training step\)\s+22\.1$", text, flags=re.M
    )
    # A genuinely negative abscissa (gamma > 0) is not rounded away.
    assert not near_zero(-1.77e-05, 1.0, eps32)
    assert "-1.77e-05" in format_summary(_summary(spectral_abscissa=-1.77e-05, float_eps=eps32))


def test_summary_json_of_a_run_lists_latest_plots_and_cadence(
    tmp_path: Path, offline_wandb: Path, capsys: pytest.CaptureFixture
) -> None:
    run(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "two_moons.yaml"),
            "--trainer.max_steps",
            "4",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["plot_cadence"] == 100 and summary["latest_plots"] == {}
    assert "none yet: the monitors plot every 100 steps and this run" in out
    assert summary["wall_s"] is not None and summary["wall_s"] > 0
    assert Path(summary["checkpoints"]["dir"]).is_dir() and summary["checkpoints"]["dir"] in out
    assert format_summary(summary) in out


def test_training_commands_merge_by_recipe() -> None:
    commands = [
        "ode-reg fit --config recipes/digits.yaml",
        "ode-reg fit --config recipes/digits.yaml --trainer.max_epochs 150",
        "ode-reg fit --config recipes/adding.yaml --trainer.max_epochs 5",
        "ode-reg fit --config recipes/digits.yaml --trainer.devices 4 --trainer.max_epochs 2",
        "ode-reg fit --help",
    ]
    assert merged_training_commands([*commands, "bash scripts/main_job.sh"])[-1:] == [
        "ode-reg fit --config recipes/adding.yaml --trainer.max_epochs 5"
    ]
    assert merged_training_commands([*commands, "bash scripts/main_job.sh"])[1] == (
        "bash scripts/main_job.sh --trainer.max_epochs 2 --trainer.devices 4"
    )
    assert merged_training_commands(commands) == [
        "ode-reg fit --help",
        "ode-reg fit --config recipes/digits.yaml --trainer.max_epochs 2 --trainer.devices 4",
        "ode-reg fit --config recipes/adding.yaml --trainer.max_epochs 5",
    ]
    form = fast_form(merged_training_commands(commands)[1], "/o")
    assert "--trainer.devices 4 --trainer.devices 1" in form  # one CPU, the flag still parsed


def test_fast_forms_keep_the_command_and_add_one_batch() -> None:
    command = "ode-reg fit --config recipes/adding.yaml --trainer.max_epochs 5"
    form = fast_form(command, "/o")
    assert form.startswith(command + " ")
    assert "--trainer.fast_dev_run 1" in form and "--trainer.default_root_dir /o" in form
    assert fast_form("torchrun --nnodes 2 -m ode_reg fit", "/o") == "torchrun --help"
    assert fast_form("rm -rf /", "/o") == "UNKNOWN"
