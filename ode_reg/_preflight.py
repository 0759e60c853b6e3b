"""Checks the ``ode-reg`` command makes before ``fit`` starts a logger, a W&B run or a step.

Each refuses in one line that names the folder, the file or the server:

* :func:`check_folders`: the run, log and checkpoint folders can be created and written;
* :func:`check_checkpoint_file`: a ``--ckpt_path`` file exists, is not empty and is a
  checkpoint torch can open;
* :func:`wandb_server_unreachable`: the W&B server answers a TCP connection within seconds
  (W&B's own ``wandb.init`` waits about 90 s before it gives up).
"""

from __future__ import annotations

import os
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

#: Seconds :func:`wandb_server_unreachable` waits for the W&B server.
WANDB_PROBE_TIMEOUT_S = 3.0
_DEFAULT_WANDB_URL = "https://api.wandb.ai"


def _folders(trainer: Any) -> list[tuple[str, str]]:
    """``(what, folder)`` of every place the run will write to that is known before ``fit``."""
    out = [("--trainer.default_root_dir", str(trainer.default_root_dir))]
    for lg in trainer.loggers:
        for attr in ("save_dir", "root_dir"):
            folder = getattr(lg, attr, None)
            if isinstance(folder, (str, os.PathLike)) and str(folder):
                out.append((f"the {type(lg).__name__}'s {attr}", str(folder)))
                break
    for cb in trainer.callbacks:
        folder = getattr(cb, "dirpath", None)
        if type(cb).__name__.endswith("Checkpoint") and folder:
            out.append((f"the {type(cb).__name__}'s dirpath", str(folder)))
    return out


def _unwritable(folder: str) -> str | None:
    """Why ``folder`` cannot be created or written to, or ``None`` (it is made if missing)."""
    if "://" in folder:  # a remote file system (fsspec): left to it
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def check_folders(trainer: Any) -> None:
    """Raise ``ValueError`` if a folder the run writes to cannot be created or written.

    Checked: ``trainer.default_root_dir``, every logger's ``save_dir`` (or ``root_dir``) and
    every checkpoint callback's ``dirpath``. A missing folder is created (the run would make it).

    Args:
        trainer: the trainer about to fit.

    Raises:
        ValueError: one line naming the setting, the folder and the operating system's reason.

    Example::

        >>> import lightning as L, tempfile
        >>> check_folders(L.Trainer(logger=False, default_root_dir=tempfile.mkdtemp()))
    """
    seen: set[str] = set()
    for what, folder in _folders(trainer):
        key = os.path.abspath(folder)
        if key in seen:
            continue
        seen.add(key)
        why = _unwritable(folder)
        if why is not None:
            raise ValueError(f"cannot write to {folder} ({what}): {why}")


def check_checkpoint_file(ckpt_path: Any) -> None:
    """Raise ``ValueError`` if the ``--ckpt_path`` file cannot be a checkpoint.

    ``None``, Lightning's names (``"last"``, ``"best"``, ``"hpc"``, ``"registry"``...) and
    remote paths are left to Lightning. A local file must exist and be non-empty; a zip
    archive (torch's format) must have its directory, at the end of the file (a truncated
    file has none); any other file is loaded once (torch's legacy format).

    Args:
        ckpt_path: the ``--ckpt_path`` value.

    Raises:
        ValueError: one line naming the file and what is wrong with it.

    Example::

        >>> check_checkpoint_file(None)
        >>> check_checkpoint_file("last")  # Lightning's name for the last checkpoint
    """
    if ckpt_path is None:
        return
    text = str(ckpt_path)
    path = Path(text)
    if "://" in text or (not path.exists() and os.sep not in text and not path.suffix):
        return  # "last", "best", "registry:...": Lightning resolves them
    if not path.exists():
        raise ValueError(f"--ckpt_path {text}: no such file")
    if not path.is_file():
        raise ValueError(f"--ckpt_path {text}: not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ValueError(f"--ckpt_path {text}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise ValueError(f"--ckpt_path {text}: the file is empty (0 bytes)")
    if head == b"PK\x03\x04":  # torch's zip format
        try:
            with zipfile.ZipFile(path) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(
                f"--ckpt_path {text}: a truncated or damaged checkpoint ({size} bytes; {exc})"
            ) from None
        return
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - whatever torch says, in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"--ckpt_path {text}: not a checkpoint torch can read ({size} bytes; {reason})"
        ) from None


def wandb_server_url() -> str:
    """The W&B server ``wandb.init`` talks to: ``WANDB_BASE_URL``, else the public one."""
    return os.environ.get("WANDB_BASE_URL") or _DEFAULT_WANDB_URL


def wandb_server_unreachable(timeout: float = WANDB_PROBE_TIMEOUT_S) -> str | None:
    """Why the W&B server cannot be reached (a TCP connection to it), or ``None``.

    Args:
        timeout: seconds to wait for the connection.

    Returns:
        ``"<url> unreachable (<reason>)"``, or ``None`` when it accepts the connection.

    Example::

        >>> import os
        >>> os.environ["WANDB_BASE_URL"] = "http://127.0.0.1:9"  # discard port, nothing there
        >>> wandb_server_unreachable(1.0).startswith("http://127.0.0.1:9 unreachable")
        True
        >>> del os.environ["WANDB_BASE_URL"]
    """
    url = wandb_server_url()
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return f"{url} unreachable (not a URL)"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        reason = f"no answer in {timeout:g} s" if isinstance(exc, TimeoutError) else exc
        return f"{url} unreachable ({reason})"
