"""Regularizers that travel in the checkpoint, so ``load_from_checkpoint(strict=True)`` works.

The recipe models take their regularizers as an ``__init__`` argument and leave it out of the
hyperparameters (``nn.Module`` instances do not belong in ``hparams.yaml``). A checkpoint then
holds the regularizers' run state (``ode_reg_run_state``: skip counters, a ``base_seed``) but
nothing to rebuild them from, and ``Model.load_from_checkpoint(path)`` would build a model
without them. :class:`RegularizersInCheckpoint` saves each regularizer's class and constructor
arguments (plain values, so the checkpoint still loads with ``weights_only=True``) and rebuilds
them before the module restores their run state. (A module that lists its regularizers among
the arguments it gives ``save_hyperparameters()`` needs none of this: the module writes them
into the hyperparameters as the same plain specs.)
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ode_reg.regularizers import Regularizer

__all__ = ["CHECKPOINT_KEY", "RegularizersInCheckpoint", "build_regularizer", "regularizer_spec"]

#: Where the regularizers' specifications are kept in the checkpoint dict.
CHECKPOINT_KEY = "ode_reg_regularizers"

_PRIMITIVES = (type(None), bool, int, float, str)
_MISSING = object()


def _plain(value: Any) -> bool:
    if isinstance(value, _PRIMITIVES):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


def regularizer_spec(reg: nn.Module) -> dict[str, Any]:
    """``{"module", "qualname", "init_args"}`` of a regularizer, read from its attributes.

    Every named constructor argument (of the class and its bases, up to ``nn.Module``) that
    the instance holds as an attribute of the same name with a plain value (number, string,
    bool, ``None`` or a list of them) is recorded; the others take their defaults when the
    term is rebuilt, and the run state (counters, seeds) comes from the module's
    ``ode_reg_run_state`` entry.

    Args:
        reg: a regularizer (an ``nn.Module``).

    Returns:
        A dict of plain values.

    Raises:
        ValueError: if ``reg`` is not an ``nn.Module``.

    Example::

        >>> from ode_reg import AdjointMagnitude
        >>> regularizer_spec(AdjointMagnitude(0.5, every_n_steps=2))["init_args"]["every_n_steps"]
        2
    """
    if not isinstance(reg, nn.Module):
        raise ValueError(f"`reg` must be an nn.Module, got {type(reg).__name__}")
    cls = type(reg)
    args: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        if not issubclass(klass, nn.Module):
            continue  # a mixin (the probe terms' seeding): its arguments are the class's
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if name == "self" or name in args:
                continue
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            value = getattr(reg, name, _MISSING)
            if value is not _MISSING and _plain(value):
                args[name] = list(value) if isinstance(value, tuple) else value
    return {"module": cls.__module__, "qualname": cls.__qualname__, "init_args": args}


def build_regularizer(spec: Mapping[str, Any]) -> Regularizer:
    """Rebuild a regularizer from :func:`regularizer_spec` (global RNG state untouched).

    Only classes that are already imported (or defined in ``ode_reg``) are built, as
    Lightning does for the classes a checkpoint names: a checkpoint cannot make the loader
    import arbitrary code.

    Args:
        spec: ``{"module": "package.module", "qualname": "Class", "init_args": {...}}``.

    Returns:
        The regularizer.

    Raises:
        ValueError: if the class is not named as a module-level class, its module is not
            imported, or it is not a :class:`~ode_reg.Regularizer` subclass.

    Example::

        >>> from ode_reg import AdjointMagnitude
        >>> build_regularizer(regularizer_spec(AdjointMagnitude(0.5))).weight
        0.5
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"`spec` must be a mapping, got {type(spec).__name__}")
    module_name, qualname = spec.get("module"), spec.get("qualname")
    path = f"{module_name}.{qualname}"
    if not isinstance(module_name, str) or not isinstance(qualname, str) or "<" in qualname:
        raise ValueError(f"`spec` must name a module-level class, got {path!r}")
    if module_name not in sys.modules and module_name.split(".")[0] == "ode_reg":
        importlib.import_module(module_name)
    if module_name not in sys.modules:
        raise ValueError(
            f"`spec` names {path!r}, whose module is not imported: import it before loading "
            "(or pass `regularizers=` to load_from_checkpoint)"
        )
    obj: Any = sys.modules[module_name]
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, Regularizer)):
        raise ValueError(f"`spec` must name a subclass of ode_reg.Regularizer, got {path!r}")
    with torch.random.fork_rng(devices=[]):  # e.g. a seedless SkewJacobianPenalty draws one
        return obj(**dict(spec.get("init_args") or {}))


class RegularizersInCheckpoint:
    """Mixin for a :class:`~ode_reg.RegularizedODEModule` whose regularizers are an ``__init__``
    argument kept out of its hyperparameters: they are saved with the checkpoint and rebuilt
    by ``load_from_checkpoint`` (before the strict state-dict load), so that
    ``Model.load_from_checkpoint(path)`` gives back the saved model, regularizers, counters and
    probe seeds included. A model given ``regularizers=`` explicitly, or one attached to a
    trainer (``fit(ckpt_path=...)`` restores into the model as configured), is left alone.

    Put it before the module class in the bases: ``class Model(RegularizersInCheckpoint,
    RegularizedODEModule)``.

    Example::

        >>> from ode_reg import RegularizedODEModule
        >>> class Model(RegularizersInCheckpoint, RegularizedODEModule):
        ...     pass
        >>> CHECKPOINT_KEY in (lambda c: (Model().on_save_checkpoint(c), c)[1])({})
        True
    """

    regularizers: list[Regularizer]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the regularizers' specifications (then the next class's hook)."""
        checkpoint[CHECKPOINT_KEY] = [regularizer_spec(r) for r in self.regularizers]
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the saved regularizers into a model built without any."""
        specs = checkpoint.get(CHECKPOINT_KEY)
        attached = getattr(self, "_trainer", None) is not None
        if specs and len(self.regularizers) == 0 and not attached:
            self.regularizers.extend(build_regularizer(s) for s in specs)
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
