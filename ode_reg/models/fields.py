"""The unstructured baseline field: ``f(t, z) = tanh(W z + V u + b)`` with a free ``W``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ode_reg._checks import check_int, check_range


class UnstructuredODEFunc(nn.Module):
    """``f(t, z) = tanh(W z + V u + b)`` with an unconstrained ``W`` (the baseline).

    The input ``u`` is held over each interval (:meth:`set_input`), as in
    :class:`~ode_reg.AntisymmetricODEFunc`.

    Args:
        dim: state dimension, ``>= 1``.
        input_dim: input dimension, ``>= 1``, or ``None``.
        recurrent_std: ``W ~ N(0, recurrent_std^2 / dim)``, ``>= 0``.

    Raises:
        ValueError: if ``dim < 1``, ``input_dim < 1`` or ``recurrent_std < 0``.

    Example::

        >>> import torch
        >>> f = UnstructuredODEFunc(4, input_dim=2)
        >>> f.set_input(torch.zeros(3, 2))
        >>> f(torch.tensor(0.0), torch.zeros(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int, input_dim: int | None = None, recurrent_std: float = 1.0) -> None:
        check_int("dim", dim, 1)
        if input_dim is not None:
            check_int("input_dim", input_dim, 1)
        check_range("recurrent_std", recurrent_std, 0.0)
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) * (recurrent_std / math.sqrt(dim)))
        self.input_weight = (
            nn.Parameter(torch.randn(dim, input_dim) / math.sqrt(input_dim)) if input_dim else None
        )
        self.bias = nn.Parameter(torch.zeros(dim))
        self.input_dim = input_dim
        self._input: Tensor | None = None

    def set_input(self, u: Tensor | None) -> None:
        """Hold the input ``u`` (``(B, input_dim)``) over the next interval."""
        self._input = u

    def ode_reg_snapshot(self) -> dict[str, object]:
        """The held input, restored when the field is evaluated after integration."""
        return {"_input": self._input}

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        pre = z @ self.weight.mT + self.bias
        if self.input_weight is not None:
            if self._input is None:
                raise RuntimeError("UnstructuredODEFunc has input_dim set: call set_input(u) first")
            pre = pre + self._input.to(z.dtype) @ self.input_weight.mT
        return torch.tanh(pre)
