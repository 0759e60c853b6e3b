"""torchmetrics Metrics for the monitors' epoch aggregates (they reduce correctly across ranks).

The monitoring callbacks update these with their per-step values and log the Metric objects
with ``self.log(..., on_step=False, on_epoch=True)``; Lightning then calls ``compute()`` at the
end of the epoch, which reduces the states over DDP ranks (``max`` for the defect, ``sum`` of
totals and counts for the means) and resets them. :class:`RunningMax` keeps a running maximum
(never reset) in a ``MaxMetric``; :func:`metric_state` / :func:`restore_metric_state` carry a
Metric's states through a callback's ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MaxMetric, Metric

__all__ = ["MaxOrthogonalityDefect", "MeanAdjointRatio", "MeanSpectralAbscissa"]


def _as_values(name: str, value: Tensor | float) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (Tensor, int, float)):
        raise ValueError(f"`{name}` must be a tensor or a real number, got {type(value).__name__}")
    value = torch.as_tensor(value)
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"`{name}` must be real, got dtype {value.dtype}")
    return value.detach().reshape(-1).float()


class MaxOrthogonalityDefect(Metric):
    """The largest orthogonality defect ``|W^T W - I|_F`` seen since the last reset.

    States reduce with ``max`` across ranks. A NaN defect propagates (a NaN weight shows).
    Before any update, ``compute()`` returns 0.

    Raises:
        ValueError: in ``update``, if a defect is negative or not a real number.

    Example::

        >>> import torch
        >>> m = MaxOrthogonalityDefect()
        >>> m.update(torch.tensor([0.1, 0.3]))
        >>> m.update(0.2)
        >>> float(m.compute())
        0.30000001192092896
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    max_defect: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("max_defect", default=torch.tensor(0.0), dist_reduce_fx="max")

    def update(self, defect: Tensor | float) -> None:
        """Fold in one or more defects (any shape)."""
        v = _as_values("defect", defect).to(self.max_defect.device)
        if v.numel() == 0:
            return
        if bool((v < 0).any()):
            raise ValueError(f"`defect` must be >= 0, got min {v.min().item():g}")
        self.max_defect = torch.maximum(self.max_defect, v.max())

    def compute(self) -> Tensor:
        """The largest defect."""
        return self.max_defect


class _Mean(Metric):
    is_differentiable = False
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def _add(self, v: Tensor) -> None:
        self.total = self.total + v.to(self.total.device).sum()
        self.count = self.count + v.numel()

    def compute(self) -> Tensor:
        """The mean (NaN before any update)."""
        return self.total / self.count


class MeanAdjointRatio(_Mean):
    """Mean of the adjoint profile's max/min ratio ``max_k p_k / min_k p_k`` since the last reset.

    Totals and counts reduce with ``sum`` across ranks, so the result is the mean over all
    updates on all ranks.

    Args:
        geometric: average ``log`` ratios and return ``exp`` of the mean (the geometric mean),
            which an exploding step does not dominate.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: if ``geometric`` is not a bool; in ``update``, if a ratio is not ``> 0``.

    Example::

        >>> m = MeanAdjointRatio(geometric=True)
        >>> m.update(torch.tensor([1.0, 100.0]))
        >>> round(float(m.compute()), 4)
        10.0
    """

    higher_is_better = False

    def __init__(self, geometric: bool = False, **kwargs) -> None:
        if not isinstance(geometric, bool):
            raise ValueError(f"`geometric` must be a bool, got {geometric!r}")
        super().__init__(**kwargs)
        self.geometric = geometric

    def update(self, ratio: Tensor | float) -> None:
        """Fold in one or more ratios (any shape), each ``> 0`` (``inf`` allowed)."""
        v = _as_values("ratio", ratio)
        if bool((~(v > 0)).any()):
            raise ValueError(f"`ratio` must be > 0, got {v.tolist()}")
        self._add(torch.log(v) if self.geometric else v)

    def compute(self) -> Tensor:
        """The (arithmetic or geometric) mean ratio."""
        mean = super().compute()
        return torch.exp(mean) if self.geometric else mean


class MeanSpectralAbscissa(_Mean):
    """Mean of the spectral abscissa ``max Re lambda`` since the last reset (``sum`` reduction).

    Raises:
        ValueError: in ``update``, if a value is not a real number.

    Example::

        >>> m = MeanSpectralAbscissa()
        >>> m.update(torch.tensor([-1.0, 0.5]))
        >>> float(m.compute())
        -0.25
    """

    higher_is_better = False

    def update(self, abscissa: Tensor | float) -> None:
        """Fold in one or more spectral abscissae (any shape)."""
        self._add(_as_values("abscissa", abscissa))


class RunningMax:
    """A float attribute of a monitor kept as a running maximum in a torchmetrics
    ``MaxMetric`` (never reset: it is not handed to Lightning, so no epoch end resets it).
    Reading gives the maximum so far (``start`` before any value), assigning sets it, and
    :meth:`fold` folds a value in (the values are already reduced across ranks: the metric
    is not synced).

    Args:
        start: the value before any fold.
        nan_strategy: torchmetrics' ``nan_strategy`` (``"disable"``: a NaN propagates).

    Example::

        >>> class M:
        ...     best = RunningMax(0.0)
        >>> m = M()
        >>> M.best.fold(m, 2.0), M.best.fold(m, 1.0), m.best
        (2.0, 2.0, 2.0)
    """

    def __init__(self, start: float = float("-inf"), nan_strategy: str = "disable") -> None:
        self.start = float(start)
        self.nan_strategy = nan_strategy

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"_{name}_metric"

    def metric(self, obj: Any) -> MaxMetric:
        """The ``MaxMetric`` behind the attribute on ``obj``."""
        m = obj.__dict__.get(self.key)
        if m is None:
            m = obj.__dict__[self.key] = MaxMetric(
                nan_strategy=self.nan_strategy, sync_on_compute=False
            )
            m.set_dtype(torch.float64)  # the logged float, not a float32 rounding of it
            m.update(self.start)
        return m

    def fold(self, obj: Any, value: Tensor | float) -> float:
        """Fold ``value`` in; returns the maximum so far."""
        m = self.metric(obj)
        m.update(value)
        return float(m.compute())

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return float(self.metric(obj).compute())

    def __set__(self, obj: Any, value: float) -> None:
        m = self.metric(obj)
        m.reset()
        m.update(float(value))


def metric_state(metric: Metric) -> dict[str, Tensor]:
    """A torchmetrics Metric's rank-local states, detached on the CPU (for ``state_dict``)."""
    return {k: v.detach().cpu().clone() for k, v in metric.metric_state.items()}


def restore_metric_state(metric: Metric, state: Mapping[str, Tensor]) -> None:
    """Put states saved by :func:`metric_state` back (on the metric's device).

    Raises:
        ValueError: if ``state`` does not hold exactly the metric's state names.
    """
    names = set(metric.metric_state)
    if set(state) != names:
        raise ValueError(f"`state` must hold the states {sorted(names)}, got {sorted(state)}")
    metric.reset()
    device = next(iter(metric.metric_state.values())).device
    # torchmetrics' own merge: each state folded into the (reset) default by its reduction.
    metric.merge_state({k: torch.as_tensor(v).to(device).clone() for k, v in state.items()})
