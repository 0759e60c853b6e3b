"""The DDP ranks as the terms see them: every collective goes through ``trainer.strategy``.

:class:`Ranks` wraps the trainer's strategy (``reduce``, ``reduce_boolean_decision``) on its
root device; on a bare process group (a ``training_step`` called with no trainer, as some
tests do) the same operations are ``torch.distributed.all_reduce`` calls. Every collective
here has a shape fixed before it is called (never a rank's own step count): the sensitivity
density is all-reduced only after :meth:`Ranks.agree` has checked that every rank holds the
same number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _bare_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _BareGroup:
    """``strategy.reduce`` on a process group with no trainer (``torch.distributed``)."""

    @property
    def root_device(self) -> torch.device:
        """The device the group's backend reduces on (NCCL: the current CUDA device)."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce(self, tensor: Tensor, reduce_op: str = "mean") -> Tensor:
        op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=op[reduce_op])
        return tensor / dist.get_world_size() if reduce_op == "mean" else tensor


class _MeanOverRanks(torch.autograd.Function):
    """``mean_r x_r`` whose backward is the mean over ranks of the incoming gradient: each rank's
    share receives the gradient of the whole-batch quantity, and DDP's gradient averaging then
    gives the one-process gradient (the same rule as ``torch.distributed.nn``'s all-reduce)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, ranks: Ranks) -> Tensor:
        ctx.ranks = ranks
        return ranks.reduce(x.detach(), "mean")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.ranks.reduce(grad, "mean"), None


class Ranks:
    """The ranks of a run, through ``trainer.strategy`` (or a bare process group).

    Args:
        strategy: the trainer's strategy, or ``None`` (no trainer: a bare process group when
            one is initialized, else one process).

    Example::

        >>> import torch
        >>> Ranks().world_size, Ranks().mean(torch.ones(2)).tolist()
        (1, [1.0, 1.0])
    """

    def __init__(self, strategy: Any = None) -> None:
        if strategy is None and _bare_group():
            strategy = _BareGroup()
            self.world_size = dist.get_world_size()
        else:
            self.world_size = int(getattr(strategy, "world_size", 1) or 1)
        self.strategy = strategy if self.world_size > 1 else None

    @classmethod
    def of(cls, module: Any) -> Ranks:
        """The ranks of ``module``'s trainer (``module._trainer.strategy``)."""
        trainer = getattr(module, "_trainer", None)
        return cls(None if trainer is None else trainer.strategy)

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.strategy is not None

    def reduce(self, x: Tensor, op: str) -> Tensor:
        """``op`` (``"mean"``, ``"sum"``, ``"max"``) over ranks of a copy of ``x`` on the
        strategy's root device, returned on ``x``'s device (not differentiable)."""
        if self.strategy is None:
            return x.clone()
        out = self.strategy.reduce(x.detach().to(self.strategy.root_device).clone(), reduce_op=op)
        return out.to(x.device)

    def mean(self, x: Tensor) -> Tensor:
        """Differentiable mean over ranks (the identity in one process)."""
        if self.strategy is None:
            return x
        return _MeanOverRanks.apply(x, self)

    def max(self, values: Sequence[float]) -> list[float]:
        """The elementwise maximum over ranks of a list whose length every rank knows."""
        if self.strategy is None or not values:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return [float(v) for v in self.reduce(t, "max").tolist()]

    def agree(self, what: str, counts: Sequence[int]) -> None:
        """Raise (on every rank alike) unless every rank holds the same ``counts``.

        Raises:
            RuntimeError: naming ``what`` and the smallest and largest counts.
        """
        if self.strategy is None:
            return
        both = self.max([*counts, *(-c for c in counts)])
        n = len(counts)
        hi, lo = both[:n], [-v for v in both[n:]]
        if hi != lo:
            raise RuntimeError(
                f"ode_reg: the DDP ranks hold different {what} ({lo} to {hi}): a term that "
                "reduces over the batch needs the same checkpoint times on every rank; call "
                "ode_reg.odeint with the same `t` (and `checkpoints`) on every rank"
            )


def gather_rows(strategy: Any, local: Tensor) -> Tensor:
    """Every rank's ``local`` (the same shape on every rank), stacked ``(world, *shape)`` on
    the CPU: ``strategy.all_gather`` on the strategy's root device (NCCL gathers device tensors
    only). A collective: every rank calls it at the same point."""
    return strategy.all_gather(local.to(strategy.root_device)).reshape(-1, *local.shape).cpu()


def gather_padded(strategy: Any, rows: Sequence[Sequence[float]], width: int, length: int) -> list:
    """Every rank's ``rows`` (each ``width`` floats, at most ``length`` rows on any rank; the
    maximum over ranks, reduced before), pooled in rank order: each rank pads its table with
    NaN to ``length`` rows, the tables are gathered (:func:`gather_rows`) and the padding is
    dropped. A collective: every rank calls it with the same ``width`` and ``length``.

    Example::

        >>> class One:  # a strategy of one rank
        ...     root_device = torch.device("cpu")
        ...     def all_gather(self, t): return t[None]
        >>> gather_padded(One(), [(0.0, 0.5), (1.0, 0.25)], 2, 3)
        [(0.0, 0.5), (1.0, 0.25)]
    """
    local = torch.full((max(length, 1), width), float("nan"), dtype=torch.float64)
    if rows:
        local[: len(rows)] = torch.tensor(rows, dtype=torch.float64)
    flat = gather_rows(strategy, local).reshape(-1, width)
    flat = flat[torch.isfinite(flat[:, -1])]
    return [tuple(r) for r in flat.tolist()]
