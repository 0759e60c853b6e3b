"""``ode_reg._ranks.Ranks``: the terms' collectives through a strategy's ``reduce``, checked on
a stand-in strategy that plays rank 0 of 2 (the other rank's tensors are given), in one process.
"""

from __future__ import annotations

import pytest
import torch

from ode_reg._ranks import Ranks


class TwoRanks:
    """``strategy.reduce`` of rank 0 of 2: the other rank contributes ``other`` (forward) or
    the same gradient as this rank (backward: every rank's loss holds the same reduced term)."""

    world_size = 2
    root_device = torch.device("cpu")

    def __init__(self, other: dict[str, torch.Tensor]) -> None:
        self.other = other
        self.calls: list[tuple[str, torch.device, tuple[int, ...]]] = []

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        self.calls.append((reduce_op, tensor.device, tuple(tensor.shape)))
        other = self.other.get(reduce_op, tensor)
        if reduce_op == "max":
            return torch.maximum(tensor, other)
        out = tensor + other
        return out / 2 if reduce_op == "mean" else out


def test_differentiable_mean_and_its_gradient_rule() -> None:
    """Forward: the mean of the ranks' tensors. Backward: the mean over ranks of the incoming
    gradient, through ``strategy.reduce`` as well (so each rank's share gets the gradient of
    the whole-batch quantity, and DDP's averaging gives the one-process gradient)."""
    other = torch.tensor([3.0, -1.0])
    strategy = TwoRanks({"mean": other})
    ranks = Ranks(strategy)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = ranks.mean(x)
    torch.testing.assert_close(y, (x.detach() + other) / 2)
    strategy.other = {}  # backward: the other rank sends the same gradient
    (g,) = torch.autograd.grad((y * torch.tensor([2.0, 5.0])).sum(), x)
    torch.testing.assert_close(g, torch.tensor([2.0, 5.0]))
    assert [c[0] for c in strategy.calls] == ["mean", "mean"]
    assert all(c[1] == strategy.root_device for c in strategy.calls)


def test_agree_raises_the_same_error_when_ranks_differ() -> None:
    # the other rank holds 9 checkpoints where this one holds 8: max and -min disagree
    strategy = TwoRanks({"max": torch.tensor([9.0, -8.0], dtype=torch.float64)})
    with pytest.raises(RuntimeError, match="different checkpoint counts"):
        Ranks(strategy).agree("checkpoint counts", [8])
    same = TwoRanks({"max": torch.tensor([8.0, -8.0], dtype=torch.float64)})
    Ranks(same).agree("checkpoint counts", [8])
    assert same.calls == [("max", torch.device("cpu"), (2,))]  # one fixed-size collective


def test_one_process_has_no_collective() -> None:
    ranks = Ranks()
    x = torch.ones(3, requires_grad=True)
    assert not ranks.distributed and ranks.mean(x) is x
    assert ranks.max([1.0, 2.0]) == [1.0, 2.0]
    ranks.agree("anything", [1, 2])
