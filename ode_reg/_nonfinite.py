"""The non-finite guard of the whole step: batch, task loss and gradients, beside the terms'.

The terms' guard (``RegularizedODEMixin(nonfinite=...)``, counted in ``reg/skipped``) drops a
term that is not finite and keeps the step. Here, a step whose *task* side is not finite (a
NaN/Inf in the batch or in the task loss, or a non-finite gradient) is not applied at all:

* ``nonfinite="skip"``: the terms are not evaluated, the loss handed to Lightning is an exact
  zero with an exact zero gradient, and in ``on_before_optimizer_step`` every gradient is set
  to ``None``, so the optimizer leaves every parameter (and its own state) alone. The step is
  counted in ``reg/skipped_steps`` (logged at each skipped step: the count so far) and said
  once, in one line.
* ``nonfinite="raise"``: ``FloatingPointError`` naming what was not finite.

Under DDP the decision on the batch and loss is collective (a maximum over the ranks through
:class:`ode_reg._ranks.Ranks`: ``trainer.strategy``, or a bare process group): every rank skips, or
none. Gradients are already equal on all ranks in ``on_before_optimizer_step``. Under 16-bit
AMP the gradients are left to the ``GradScaler`` (it skips the steps whose scaled gradients
overflow, as it should); the batch and the task loss are still checked.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from ode_reg._ranks import Ranks

#: The logged count of skipped optimizer steps (``reg/skipped`` counts skipped terms).
SKIPPED_STEPS_KEY = "reg/skipped_steps"

_PENDING = "_ode_reg_skip_reason"
_COUNT = "_ode_reg_skipped_steps"
_SAID = "_ode_reg_skip_said"


def _tensors(obj: Any, path: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for n, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{n}]")


def nonfinite_batch(batch: Any) -> str | None:
    """Where ``batch`` holds a NaN or Inf (``"batch[0] (3 of 24 values)"``), or ``None``.

    Only floating-point tensors (in tuples, lists and dicts, at any depth) are checked.

    Args:
        batch: the training batch.

    Returns:
        The first non-finite tensor's place and count, or ``None`` when all are finite.

    Example::

        >>> nonfinite_batch((torch.tensor([1.0, float("nan")]), torch.tensor([1, 2])))
        'batch[0] (1 of 2 values)'
    """
    for path, t in _tensors(batch, "batch"):
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t.detach())
            if bool(bad.any()):
                return f"{path} ({int(bad.sum())} of {t.numel()} values)"
    return None


def _any_rank(module: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on some DDP rank (``trainer.strategy``, or a bare process group)."""
    return Ranks.of(module).max([1.0 if flag else 0.0])[0] > 0


def task_side_nonfinite(module: Any, loss: Tensor, batch: Any) -> bool:
    """Whether this step's batch or task loss is not finite (on any rank); marks the step.

    Under ``nonfinite="skip"`` the step is marked for :func:`drop_marked_step` and ``True`` is
    returned; the caller then hands :func:`zero_loss` to Lightning instead of the loss.

    Args:
        module: the ``RegularizedODEMixin`` module.
        loss: the task loss of the step.
        batch: the step's batch.

    Returns:
        ``True`` when the step is not to be applied.

    Raises:
        FloatingPointError: under ``nonfinite="raise"``, naming the batch tensor or the task
            loss (or another DDP rank) and the step.
    """
    floats = [t.detach() for _, t in _tensors(batch, "batch") if t.is_floating_point()]
    dev = loss.device
    flags = torch.stack([torch.isfinite(t).all().to(dev) for t in [*floats, loss.detach()]])
    reason = None
    if not bool(flags.all()):  # one host read for the batch and the loss together
        where = nonfinite_batch(batch)
        if where is not None:
            reason = f"the batch is not finite: {where}"
        else:
            reason = f"the task loss is not finite (value {float(loss.detach().sum())})"
    if not _any_rank(module, reason is not None):
        return False
    reason = reason or "the batch or task loss is not finite on another DDP rank"
    if module.nonfinite == "raise":
        raise FloatingPointError(f"{reason} at step {module.global_step}")
    setattr(module, _PENDING, reason)
    return True


def zero_loss(module: Any, loss: Tensor) -> Tensor:
    """A loss of value 0 whose gradient is exactly 0 for every trainable parameter of
    ``module`` (so DDP's gradient reduction sees every parameter, with zeros)."""
    params = [p for p in module.parameters() if p.requires_grad]
    zero = loss.detach().new_zeros(())
    if not params:
        return zero.requires_grad_(True)
    return zero + sum((p.reshape(-1)[:1] * 0.0).sum().to(zero.dtype) for p in params)


def _bad_gradient(optimizer: Any, names: dict[int, str]) -> str | None:
    grads = [
        (p, p.grad)
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None
    ]
    if not grads:
        return None
    finite = torch.stack([torch.isfinite(g).all() for _, g in grads])
    if bool(finite.all()):
        return None
    p, _ = grads[int((~finite).nonzero()[0])]
    return f"the gradient of {names.get(id(p), 'a parameter')} is not finite"


def _loss_scaled(module: Any) -> bool:
    """Under 16-bit AMP the ``GradScaler`` itself skips the steps with Inf gradients (an
    overflow of the loss scale is expected there, not a fault): the gradients are left to it."""
    trainer = getattr(module, "_trainer", None)
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    return getattr(plugin, "scaler", None) is not None


def drop_marked_step(module: Any, optimizer: Any) -> None:
    """In ``on_before_optimizer_step``: drop the step if it was marked or a gradient is not
    finite (every gradient set to ``None``), count it and log the count as
    ``reg/skipped_steps``.

    Args:
        module: the ``RegularizedODEMixin`` module.
        optimizer: the optimizer about to step.

    Raises:
        FloatingPointError: under ``nonfinite="raise"``, when a gradient is not finite
            (naming the parameter).
    """
    reason = getattr(module, _PENDING, None)
    if reason is None and not _loss_scaled(module):
        names = {id(p): n for n, p in module.named_parameters()}
        reason = _bad_gradient(optimizer, names)
        if reason is not None and module.nonfinite == "raise":
            raise FloatingPointError(f"{reason} at step {module.global_step}")
    if reason is None:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    count = skipped_steps(module) + 1
    set_skipped_steps(module, count)
    setattr(module, _PENDING, None)
    if not getattr(module, _SAID, False):
        setattr(module, _SAID, True)
        rank_zero_warn(
            f"ode_reg: optimizer step {module.global_step} skipped, {reason}; parameters "
            f"unchanged (later skips are counted in {SKIPPED_STEPS_KEY}, said once)"
        )
    if getattr(module, "_trainer", None) is not None:
        module.log(SKIPPED_STEPS_KEY, float(count), on_step=True, on_epoch=False, batch_size=1)


def skipped_steps(module: Any) -> int:
    """How many optimizer steps the guard has dropped so far (run state: the module saves it
    in the checkpoint, so a resumed run counts on)."""
    return int(getattr(module, _COUNT, 0))


def set_skipped_steps(module: Any, count: int) -> None:
    """Restore :func:`skipped_steps` (from a checkpoint)."""
    setattr(module, _COUNT, int(count))


def forget_step_values(module: Any, prefix: str = "reg/") -> None:
    """Forget the step values of ``prefix`` keys logged at earlier steps.

    Lightning sends every step value it holds to the loggers at each logging step, also one
    not logged at this step (a term inactive on this step, or dropped as not finite): the last
    measured value again, as if measured now. Called at the start of each training step, so
    the loggers get only the values measured in the step (epoch aggregates are unaffected).

    Args:
        module: the LightningModule.
        prefix: the keys to forget.
    """
    trainer = getattr(module, "_trainer", None)
    results = getattr(trainer, "_results", None) if trainer is not None else None
    if results is None:
        return
    for metric in results.values():
        meta = getattr(metric, "meta", None)
        if meta is not None and meta.on_step and str(meta.name).startswith(prefix):
            metric._forward_cache = None
