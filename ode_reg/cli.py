"""The ``ode-reg`` command: LightningCLI over the recipe models and data modules.

``ode-reg fit --config recipes/digits.yaml`` trains a recipe; after ``fit`` it evaluates the
test split and prints a short summary (accuracy, adjoint ratio, orthogonality, where the run,
its checkpoints and its plots are). W&B runs offline unless an account is configured.

A value an ode_reg class refuses (``weight: -1``, ``gamma: 2``) stops the command before any
logger or W&B run starts, with one short message that names the class, the argument, its
place in the configuration and the accepted range (:class:`ConfigError`).
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ode_reg._checks import ArgumentError


def wandb_account_configured() -> bool:
    """Whether W&B credentials exist (``WANDB_API_KEY`` or a ``~/.netrc`` entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_wandb_mode() -> str:
    """Set ``WANDB_MODE=offline`` unless the user chose a mode or has an account; returns it."""
    if "WANDB_MODE" not in os.environ and not wandb_account_configured():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def _fallback_logger(trainer: L.Trainer, reason: str) -> None:
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import rank_zero_warn

    save_dir = trainer.default_root_dir
    rank_zero_warn(
        f"W&B is unavailable ({reason}). Falling back to CSVLogger in {save_dir}: scalars go to "
        "metrics.csv, plots are saved as PNG files beside it. Set WANDB_MODE=offline to keep "
        "W&B without an account, or configure one with `wandb login`.",
        category=UserWarning,
    )
    trainer.loggers = [CSVLogger(save_dir)]


def _drop_unset_wandb_options(logger: Any) -> None:
    # Lightning's WandbLogger passes ``anonymous=None`` to ``wandb.init``, which makes W&B warn
    # that "the anonymous setting has no effect" on every run; None means "not set" here.
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    # W&B looks for a git repository from its folder and warns "git root ... does not exist"
    # when the folder is not made yet (the recipes' runs/<recipe> on a first run).
    save_dir = getattr(logger, "save_dir", None)
    if isinstance(save_dir, str) and save_dir:
        os.makedirs(save_dir, exist_ok=True)


def ensure_logger_available(trainer: L.Trainer) -> None:
    """Replace an unusable WandbLogger by a CSVLogger, with a clear message, before training.

    W&B is unusable when it should run online without an account, or when ``wandb.init``
    fails. The run then goes on with local logging instead of stopping.

    Args:
        trainer: the trainer about to fit.
    """
    from lightning.pytorch.loggers import WandbLogger

    if not any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        return
    mode = os.environ.get("WANDB_MODE", "online")
    if mode not in ("offline", "disabled", "dryrun") and not wandb_account_configured():
        _fallback_logger(trainer, f"WANDB_MODE={mode} but no W&B account is configured")
        return
    unreachable = _wandb_unreachable(trainer, mode)
    if unreachable is not None:
        _fallback_logger(trainer, f"WANDB_MODE={mode} but the W&B server is {unreachable}")
        return
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            _drop_unset_wandb_options(lg)
            try:
                lg.experiment  # noqa: B018 - starts wandb.init
            except Exception as exc:  # wandb raises many error types on init failure
                _fallback_logger(trainer, f"wandb.init failed: {type(exc).__name__}: {exc}")
                return


def _wandb_unreachable(trainer: L.Trainer, mode: str) -> str | None:
    """``"<url> unreachable (...)"`` when a WandbLogger would go online to a server that does
    not answer within seconds (``wandb.init`` would wait about 90 s), else ``None``."""
    from lightning.pytorch.loggers import WandbLogger

    from ode_reg._preflight import wandb_server_unreachable

    online = [
        lg
        for lg in trainer.loggers
        if isinstance(lg, WandbLogger) and getattr(lg, "_wandb_init", {}).get("mode") != "offline"
    ]
    if mode in ("offline", "disabled", "dryrun") or not online:
        return None
    return wandb_server_unreachable()


def preflight(trainer: L.Trainer | None, ckpt_path: Any = None) -> None:
    """Refuse, in one line, what would fail later: an unwritable run, log or checkpoint folder
    and an unreadable ``--ckpt_path`` file (before any logger, W&B run or training step).

    Args:
        trainer: the trainer about to fit (``None``: only the checkpoint file is checked).
        ckpt_path: the ``--ckpt_path`` value (``None``: none).

    Raises:
        ConfigError: naming the folder or file and the reason.

    Example::

        >>> import lightning as L, tempfile
        >>> preflight(L.Trainer(logger=False, default_root_dir=tempfile.mkdtemp()))
    """
    from ode_reg._preflight import check_checkpoint_file, check_folders

    try:
        if trainer is not None:
            check_folders(trainer)
        check_checkpoint_file(ckpt_path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class _DropLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing ..." advertisements (two per run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


def quiet_lightning_tips() -> None:
    """Leave Lightning's "💡 Tip" lines (suggestions to install other packages) out of a run.

    Example::

        >>> quiet_lightning_tips()  # idempotent
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in log.filters):
            log.addFilter(_DropLightningTips())


def configure_threads() -> int:
    """One intra-op thread unless ``OMP_NUM_THREADS`` or ``ODE_REG_NUM_THREADS`` says otherwise.

    The recipes' recurrent matmuls are small (hidden 64-128, batch 32-64): a second thread
    gains little, and on a busy 2-core machine OpenMP's spinning threads made steps slower, not
    faster (BENCHMARKS.md, the paragraph on threads). Returns the number of threads set.
    """
    import torch

    if "OMP_NUM_THREADS" in os.environ and "ODE_REG_NUM_THREADS" not in os.environ:
        return torch.get_num_threads()
    n = int(os.environ.get("ODE_REG_NUM_THREADS", "1"))
    torch.set_num_threads(n)
    return n


_NOISE = re.compile(
    r"^\s*(Does not validate against any of the Union subtypes|Subtypes: |Errors:|"
    r"Given value( type)?: |- Expected a <class 'NoneType'>)"
)


def short_parse_error(message: str) -> str:
    r"""One line for a jsonargparse error: the path to the refused key and the reason.

    jsonargparse explains a wrong type inside nested classes with one paragraph per level
    (each union alternative, each given value); the user needs the key and the reason.

    Args:
        message: the error message jsonargparse produced.

    Returns:
        ``"model (ode_reg.models.SequenceModel) > regularizers (...) > weight: reason"``, or
        the message's first informative lines when it has no nested keys.

    Example::

        >>> short_parse_error('Parser key "model":\n  Problem with given class_path '
        ...     "'ode_reg.models.SequenceModel':\n    Parser key \"lr\":\n"
        ...     "      Expected a <class 'float'>. Got value: abc")
        "model (ode_reg.models.SequenceModel) > lr: Expected a <class 'float'>. Got value: abc"
    """
    keep = [ln for ln in message.splitlines() if ln.strip() and not _NOISE.match(ln)]
    path: list[str] = []
    reason: str | None = None
    for line in keep:
        text = line.strip().lstrip("- ").strip()
        key = re.match(r'^Parser key "([^"]+)":$', text)
        cls = re.match(r"^Problem with given class_path '([^']+)':$", text)
        if key:
            path.append(key.group(1))
        elif cls and path and f"({cls.group(1)})" not in path[-1]:
            path[-1] += f" ({cls.group(1)})"
        elif reason is None:
            reason = text
    if path and reason:
        return f"{' > '.join(path)}: {reason}"
    return "\n".join(ln.strip() for ln in keep[:6]) or message


class ODERegArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with a short error: one line naming the key, then the help hint."""

    def error(self, message: str, ex: Exception | None = None):  # noqa: ANN201 - NoReturn
        """Print ``ode-reg: error: <key path>: <reason>`` and the ``--help`` hint; exit 2."""
        from jsonargparse import ArgumentParser

        if not self.exit_on_error:
            return ArgumentParser.error(self, message, ex)
        words = self.prog.replace(" [options]", "").split()
        prog = " ".join(["ode-reg", *words[1:]])  # also under `python -m ode_reg`
        sys.stderr.write(f"ode-reg: error: {short_parse_error(message)}\n")
        sys.stderr.write(f"  all options: {prog} --help\n")
        sys.exit(2)


_GROUP_HELP = {"model": "--model.help", "data": "--data.help"}


class ConfigError(ValueError):
    """A configuration value that an ode_reg class refused, as one short message.

    Raised by :func:`run` (and printed without a traceback by ``ode-reg``) before any logger
    or W&B run is created.

    Args:
        message: the whole message (what was wrong, where it is set, where to read more).

    Example::

        >>> str(ConfigError("`weight` must lie in [0.0, inf), got -1.0"))
        '`weight` must lie in [0.0, inf), got -1.0'
    """


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _find_setting(
    node: Any, cls_name: str | None, arg: str | None, path: str = ""
) -> list[tuple[str, str, Any]]:
    """``(place of the class in the config, its class_path, the value of arg)`` matches."""
    found: list[tuple[str, str, Any]] = []
    if isinstance(node, dict):
        class_path = node.get("class_path")
        init_args = node.get("init_args")
        if isinstance(class_path, str) and isinstance(init_args, dict):
            name_ok = cls_name is None or class_path.rsplit(".", 1)[-1] == cls_name
            if name_ok and (arg is None or arg in init_args):
                found.append((path, class_path, init_args.get(arg) if arg else None))
        for key, value in node.items():
            found += _find_setting(value, cls_name, arg, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for n, value in enumerate(node):
            found += _find_setting(value, cls_name, arg, f"{path}[{n}]")
    return found


def _refused_setting(
    exc: BaseException, config: dict[str, Any]
) -> tuple[str, str, list[tuple[str, str, Any]]] | None:
    """``(message, argument, settings holding it)`` for the error an ode_reg class raised on
    one of its arguments, or ``None``.

    An :class:`~ode_reg._checks.ArgumentError` (the package's argument checks) names its
    argument and value: the settings are the classes in ``config`` that set that argument, to
    that value where one does. A plain ``ValueError`` / ``TypeError`` (the few checks not
    written with those helpers yet) counts only when its message names a configured argument
    in backticks and shows that argument's configured value (``repr``).
    """
    chain = _exception_chain(exc)
    for e in chain:
        if isinstance(e, ArgumentError):
            hits = _find_setting(config, None, e.argument)
            same = [h for h in hits if h[2] == e.value]
            return _first_line(e), e.argument, same or hits
    for e in chain:
        if not isinstance(e, (ValueError, TypeError)):
            continue
        message = _first_line(e)
        match = re.match(r"`(\w+)`", message)
        if match is None:
            continue
        hits = [h for h in _find_setting(config, None, match.group(1)) if repr(h[2]) in message]
        if hits:
            return message, match.group(1), hits
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def config_error(exc: BaseException, config: dict[str, Any] | None = None) -> ConfigError | None:
    """Turn an error raised while instantiating the configuration into a :class:`ConfigError`.

    Turned: an :class:`~ode_reg._checks.ArgumentError` (what the package's argument checks
    raise; its ``argument`` and ``value`` find the class and the place in ``config``), and a
    plain ``ValueError`` / ``TypeError`` whose message names a configured argument and its
    value (see :func:`_refused_setting`). Any other error is left alone (``None``).

    Args:
        exc: the error LightningCLI's instantiation raised.
        config: the parsed configuration of the subcommand as a dict (to find the class and
            where the refused value is set); ``None`` leaves both out.

    Returns:
        The short error, or ``None``.

    Example::

        >>> from ode_reg import AdjointMagnitude
        >>> try:
        ...     AdjointMagnitude(weight=-1.0)
        ... except ValueError as exc:
        ...     err = config_error(exc, {"model": {"class_path": "ode_reg.models.SequenceModel",
        ...         "init_args": {"regularizers": [{"class_path": "ode_reg.AdjointMagnitude",
        ...         "init_args": {"weight": -1.0}}]}}})
        >>> print(str(err).splitlines()[0])
        AdjointMagnitude: `weight` must lie in [0.0, inf), got -1.0
    """
    found = _refused_setting(exc, config or {})
    if found is None:
        return None
    message, arg, hits = found
    if not hits:
        return ConfigError(f"{message}\n  all options: ode-reg fit --help")
    place, class_path, _ = hits[0]
    lines = [f"{class_path.rsplit('.', 1)[-1]}: {message}"]
    group = place.split(".", 1)[0].split("[", 1)[0]
    setting = f"{place}.init_args.{arg}"
    if "[" not in setting:
        lines.append(f"  set by --{setting} (in the config file or on the command line)")
    else:
        lines.append(f"  set by {setting} in the config file ({class_path})")
    top = None
    if group in _GROUP_HELP and config and isinstance(config.get(group), dict):
        top = config[group].get("class_path")
    if top:
        lines.append(f"  arguments and ranges: ode-reg fit {_GROUP_HELP[group]} {top}")
    lines.append("  all options: ode-reg fit --help")
    return ConfigError("\n".join(lines))


def _subcommand_config(cli: LightningCLI) -> dict[str, Any] | None:
    try:
        config = cli.config[cli.subcommand] if cli.subcommand else cli.config
        return config.as_dict()
    except (KeyError, AttributeError, TypeError):  # no config for it: the place is left out
        return None


class ODERegCLI(LightningCLI):
    """LightningCLI that checks the configuration and the logger before ``fit``, tests after it
    and prints a summary.

    Configuration errors of ode_reg classes become :class:`ConfigError`; the data module's
    :meth:`~ode_reg.data._base.SplitDataModule.check_trainer` runs before the logger starts.
    """

    _started: float | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--test_weights``: which weights the test after ``fit`` runs on."""
        parser.add_argument(
            "--test_weights",
            type=Literal["final", "best"],
            default="final",
            help=(
                "Weights the test after fit runs on: 'final' (the state after the last "
                "training step) or 'best' (the best checkpoint of a ModelCheckpoint that "
                "monitors a metric; without one, the final weights, said in the summary)."
            ),
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the --ckpt_path file (for its hyperparameters) right after parsing:
        # an empty, truncated or foreign file is refused in one line first.
        subcommand = self.config.get("subcommand")
        if subcommand:
            preflight(None, self.config[subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; an ode_reg argument error becomes ConfigError."""
        self._started = time.perf_counter()
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as exc:  # what the classes' argument checks raise
            err = config_error(exc, _subcommand_config(self))
            if err is None:
                raise
            raise err from None

    def before_fit(self) -> None:
        check = getattr(self.datamodule, "check_trainer", None)
        if check is not None:
            try:
                check(self.trainer)
            except ValueError as exc:
                name = type(self.datamodule).__name__
                raise ConfigError(f"{name}: {exc}\n  all options: ode-reg fit --help") from None
        preflight(self.trainer)
        ensure_logger_available(self.trainer)
        attach_sample_counter(self.trainer)

    def _test_weights(self) -> str:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        return str((config or {}).get("test_weights") or "final")

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.fast_dev_run or trainer.interrupted:
            return
        # trainer.test resets callback_metrics: keep what fit (and the monitors) left there.
        fit_metrics = {k: v for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        datamodule = self.datamodule
        results: list[dict[str, float]] = []
        weights, fallback = choose_test_weights(trainer, self._test_weights())
        if fallback:
            weights["note"] = fallback
        note = None
        if datamodule is None or not _has_test_loader(datamodule):
            note = "not run: the data module has no test_dataloader"
        else:
            attach_sample_counter(trainer)
            # verbose: Lightning's own table of the test metrics stays on screen.
            results = trainer.test(
                model, datamodule=datamodule, ckpt_path=weights.get("path"), verbose=True
            )
        if trainer.is_global_zero:
            from ode_reg.summary import print_summary

            wall = None if self._started is None else time.perf_counter() - self._started
            print_summary(
                trainer,
                model,
                results[0] if results else {},
                fit_metrics,
                wall,
                test_weights=weights,
                test_note=note,
            )


def _has_test_loader(datamodule: Any) -> bool:
    """Whether a data module defines its own ``test_dataloader`` (not Lightning's stub)."""
    method = getattr(type(datamodule), "test_dataloader", None)
    return method is not None and method is not L.LightningDataModule.test_dataloader


def attach_sample_counter(trainer: L.Trainer) -> None:
    """Add a :class:`~ode_reg.summary.SampleCounter` to the trainer (once), so the summary
    counts the samples the last validation and the test ran on."""
    from ode_reg.summary import SampleCounter

    if not any(isinstance(cb, SampleCounter) for cb in trainer.callbacks):
        trainer.callbacks.append(SampleCounter())


def choose_test_weights(trainer: L.Trainer, choice: str) -> tuple[dict[str, Any], str | None]:
    """The weights the test after ``fit`` runs on, and a note when ``best`` cannot be had.

    Args:
        trainer: the trainer after ``fit``.
        choice: ``"final"`` or ``"best"`` (``--test_weights``).

    Returns:
        ``({"which": "final"}, None)``, ``({"which": "best", "path": p}, None)``, or the
        final weights and one line saying why ``best`` fell back to them.

    Example::

        >>> import lightning as L
        >>> choose_test_weights(L.Trainer(logger=False, enable_checkpointing=False), "best")[1]
        '--test_weights best: no ModelCheckpoint monitors a metric; tested the final weights'
    """
    if choice != "best":
        return {"which": "final"}, None
    cb = trainer.checkpoint_callback
    if cb is None or getattr(cb, "monitor", None) is None:
        return {"which": "final"}, (
            "--test_weights best: no ModelCheckpoint monitors a metric; tested the final weights"
        )
    path = getattr(cb, "best_model_path", "")
    if not path or not Path(path).is_file():
        return {"which": "final"}, (
            f"--test_weights best: no best checkpoint was saved ({cb.monitor}); tested the "
            "final weights"
        )
    return {"which": "best", "path": path}, None


def _register_recipe_classes() -> None:
    # LightningCLI lists the subclasses of LightningModule / LightningDataModule that are
    # imported: import the recipe models and data modules so `--help` names them.
    import ode_reg.data  # noqa: F401
    import ode_reg.models  # noqa: F401


def run(args: list[str] | None = None) -> ODERegCLI:
    """Run the CLI in-process (recipes, tests).

    Args:
        args: command-line arguments; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The :class:`ODERegCLI` instance (its ``trainer`` and ``model`` hold the run).

    Raises:
        ConfigError: if an ode_reg class refuses a configured value (before any logger or
            W&B run is created).

    Example::

        >>> from ode_reg.cli import run  # doctest: +SKIP
        >>> cli = run(["fit", "--config", "recipes/digits.yaml", "--trainer.fast_dev_run", "2"])  # doctest: +SKIP
    """
    configure_wandb_mode()
    configure_threads()
    quiet_lightning_tips()
    # Lightning 2.x calls a torch.utils._pytree API that torch 2.13 deprecates, on every
    # evaluation loop; nothing a user of ode-reg can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    os.environ.setdefault("ODE_REG_ROOT", str(Path.cwd()))
    _register_recipe_classes()
    with warnings.catch_warnings():
        if args is not None:
            # Arguments given in Python are meant to replace sys.argv (that of pytest or of a
            # script calling run): LightningCLI's warning about the two is then noise.
            warnings.filterwarnings("ignore", message=".*both args and command line arguments")
        return ODERegCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_class=ODERegArgumentParser,
        )


def add_working_folder_to_path() -> str:
    """Put the working folder first on ``sys.path``, as ``python -m ode_reg`` does.

    ``python -m`` puts the working folder on the module path; a console script (``ode-reg``)
    puts only its own folder (``.venv/bin``) there. Without this, ``ode-reg fit --model
    mymod.Model`` could not import a ``mymod.py`` that ``python -m ode_reg fit`` finds.

    Returns:
        The folder put on the path.

    Example::

        >>> import os, sys
        >>> add_working_folder_to_path() in sys.path
        True
    """
    cwd = os.getcwd()
    on_path = {os.path.abspath(p or os.curdir) for p in sys.path}
    if cwd not in on_path:
        sys.path.insert(0, cwd)
    return cwd


def main() -> None:
    """Entry point of ``ode-reg`` and ``python -m ode_reg``.

    User modules (``--model mymod.Model``, ``class_path: mymod.Data``) are imported from the
    working folder under both commands (:func:`add_working_folder_to_path`). A
    :class:`ConfigError` is printed as ``ode-reg: error: ...`` (no traceback) and the process
    exits with status 2.
    """
    add_working_folder_to_path()
    try:
        run()
    except ConfigError as exc:
        print(f"ode-reg: error: {exc}", file=sys.stderr)
        sys.exit(2)
