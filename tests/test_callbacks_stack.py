"""The library pieces the monitors now stand on (issue 23, helper 23c): each against an
independent computation (``statistics.median``, a hand fold, the definition of ``|``)."""

from __future__ import annotations

import itertools
import random
import statistics
import warnings

import pytest
import torch

from ode_reg._once import SayOnce
from ode_reg._ranks import gather_padded
from ode_reg.callbacks._solver_reduce import EpochCounts, epoch_entry
from ode_reg.callbacks._solver_warning import RunningMedian
from ode_reg.metrics import (
    MaxOrthogonalityDefect,
    MeanAdjointRatio,
    RunningMax,
    metric_state,
    restore_metric_state,
)
from ode_reg.plan import Need


def test_running_median_is_the_median_of_the_last_window_values():
    rng = random.Random(0)
    m, seen = RunningMedian(7), []
    for _ in range(60):
        v = rng.choice([rng.random(), 0.5, 0.25])  # ties too
        m.append(v)
        seen.append(v)
        assert m.median() == statistics.median(seen[-7:])
        assert list(m) == seen[-7:]
    with pytest.raises(ValueError, match="median of no values"):
        RunningMedian(3).median()


def test_say_once_warns_once_per_key_and_once_per_message():
    said = SayOnce()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        said.warn("step 1: nothing measured", key="none")
        said.warn("step 2: nothing measured", key="none")  # same key, other text: silent
        said.warn("plain message")
        said.warn("plain message")
    assert [str(w.message) for w in got] == ["step 1: nothing measured", "plain message"]


def test_running_max_folds_like_max_and_keeps_float64():
    class Holder:
        best = RunningMax(0.0)
        nan_kept = RunningMax(0.0, nan_strategy="disable")

    h, values = Holder(), [0.1, 1.1401071597399914, 0.7, 1e-3]
    for v in values:
        Holder.best.fold(h, v)
    assert h.best == max([0.0, *values])  # exact: float64 state, not a float32 rounding
    h.best = 0.25
    assert h.best == 0.25 and Holder.best.fold(h, 0.2) == 0.25
    assert Holder.nan_kept.fold(h, float("nan")) != Holder.nan_kept.fold(h, 1.0)  # NaN shows


def test_restored_metric_state_continues_the_fold():
    a = MaxOrthogonalityDefect()
    a.update(torch.tensor([0.3, 0.1]))
    b = MaxOrthogonalityDefect()
    restore_metric_state(b, metric_state(a))
    b.update(0.2)  # smaller: the restored 0.3 stays
    assert float(b.compute()) == pytest.approx(0.3)
    m1, m2 = MeanAdjointRatio(), MeanAdjointRatio()
    m1.update(torch.tensor([2.0, 4.0]))
    restore_metric_state(m2, metric_state(m1))
    m2.update(6.0)
    assert float(m2.compute()) == pytest.approx(4.0)  # (2 + 4 + 6) / 3
    with pytest.raises(ValueError, match="`state`"):
        restore_metric_state(m2, {"nope": torch.tensor(0.0)})


def test_epoch_counts_add_counts_and_fold_step_extremes():
    m = EpochCounts()
    m.update([26.0, 0.0, 4.0, 1.0, 1.0], 0.25, 0.5, 0)
    m.update([30.0, 8.0, 5.0, 0.0, 2.0], 0.125, 0.25, 1)
    out = m.compute()
    assert (out["nfe"], out["nfe_backward"], out["accepted"], out["rejected"]) == (56, 8, 9, 1)
    assert (out["steps"], out["dt_min"], out["dt_max"], out["warnings"]) == (3, 0.125, 0.5, 1)
    entry, keys = epoch_entry(out, 4)
    assert entry["nfe_per_step"] == pytest.approx(56 / 3) and entry["epoch"] == 4
    assert keys["solver/epoch_rejected_per_step"] == pytest.approx(1 / 3)


class _TwoRanks:
    """``all_gather`` of two ranks: this rank's table and a given other one."""

    root_device = torch.device("cpu")

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t, self.other])


def test_gather_padded_pools_every_ranks_rows_in_rank_order():
    nan = float("nan")
    other = torch.tensor([[2.0, 0.125], [nan, nan], [nan, nan]], dtype=torch.float64)
    rows = gather_padded(_TwoRanks(other), [(0.0, 0.5), (1.0, 0.25)], 2, 3)
    assert rows == [(0.0, 0.5), (1.0, 0.25), (2.0, 0.125)]


def test_need_or_and_bool_are_fieldwise():
    for a, b in itertools.product(itertools.product((False, True), repeat=5), repeat=2):
        got = Need(*a) | Need(*b)
        assert got == Need(*(x or y for x, y in zip(a, b)))
        assert bool(Need(*a)) is any(a)
