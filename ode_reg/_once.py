"""Warn once: the one cache behind every "said once" line of ode_reg."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_warn


class SayOnce(WarningCache):
    """Lightning's ``WarningCache`` (a rank-zero warning per distinct message), also keyed by a
    name: ``warn(message, key=...)`` says the first message of each key only (a message that
    names a step or a field differs from one step to the next).

    Example::

        >>> said = SayOnce()
        >>> said.warn("no solve at step 3", key="no_solve")
        >>> "no_solve" in said
        True
    """

    def warn(
        self, message: str, stacklevel: int = 5, key: str | None = None, **kwargs: Any
    ) -> None:
        """``rank_zero_warn(message)`` unless ``key`` (default: the message) was said."""
        name = message if key is None else key
        if name not in self:
            self.add(name)
            rank_zero_warn(message, stacklevel=stacklevel, **kwargs)


#: What this process has said (for warnings that are once per process, not per object).
SAID = SayOnce()


def say_once(message: str, key: str | None = None, stacklevel: int = 5) -> None:
    """Warn ``message`` on rank zero unless ``key`` (default: the message) was said in this
    process.

    Args:
        message: the one line.
        key: what makes two messages the same (e.g. a field's name); default the message.
        stacklevel: as ``warnings.warn``'s.

    Example::

        >>> say_once("ode_reg: vmap cannot trace Field; one checkpoint at a time", key="vmap:Field")
    """
    SAID.warn(message, stacklevel=stacklevel, key=key)
