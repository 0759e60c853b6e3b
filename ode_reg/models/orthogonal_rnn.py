"""An exactly orthogonal recurrent network (expRNN / scoRNN style) for ``SequenceModel``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ode_reg._checks import check_choice, check_int
from ode_reg.dynamics.skew_linear import SkewLinearODEFunc
from ode_reg.functional.orthogonal import cayley

__all__ = ["MAPS", "OrthogonalRNN", "check_map", "henaff_generator", "mod_relu"]

MAPS = ("exp", "cayley")


def check_map(orthogonal_map: str) -> None:
    """Raise ``ValueError`` unless ``orthogonal_map`` is one of :data:`MAPS`."""
    check_choice("orthogonal_map", orthogonal_map, MAPS)


def mod_relu(z: Tensor, bias: Tensor) -> Tensor:
    """``sign(z) relu(|z| + bias)``: the modReLU of Arjovsky et al. (2016) for real states.

    It keeps the sign of every coordinate and shrinks its magnitude by ``-bias`` (a dead zone
    when ``bias < 0``), so together with an orthogonal transition it cannot blow up a state.

    Example::

        >>> mod_relu(torch.tensor([-2.0, 0.5]), torch.tensor(-1.0))
        tensor([-1.,  0.])
    """
    return torch.sign(z) * torch.relu(z.abs() + bias)


def henaff_generator(dim: int, generator: torch.Generator | None = None) -> Tensor:
    """The upper-triangular ``A`` whose ``A - A^T`` is Henaff et al.'s (2016) initialization.

    ``A - A^T`` is block diagonal with ``2 x 2`` blocks ``[[0, theta], [-theta, 0]]``,
    ``theta ~ U(-pi, pi)``: ``exp(A - A^T)`` is a rotation by ``theta`` in each plane, with
    eigenvalues spread over the unit circle (the initialization under which expRNN and scoRNN
    solve the copying problem). An odd ``dim`` leaves the last coordinate fixed.

    Args:
        dim: size, ``>= 1``.
        generator: random generator of the angles.

    Raises:
        ValueError: if ``dim < 1``.

    Example::

        >>> a = henaff_generator(4, torch.Generator().manual_seed(0))
        >>> bool((torch.linalg.eigvals(torch.linalg.matrix_exp(a - a.T)).abs() - 1).abs().max() < 1e-5)
        True
    """
    check_int("dim", dim, 1)
    a = torch.zeros(dim, dim)
    n = dim // 2
    theta = (torch.rand(n, generator=generator) * 2 - 1) * math.pi
    idx = torch.arange(n) * 2
    a[idx, idx + 1] = theta
    return a


class OrthogonalRNN(nn.Module):
    """``h_s = modReLU(W h_{s-1} + V x_s, b)`` with an exactly orthogonal transition ``W``.

    ``W = exp(A - A^T)`` (``orthogonal_map="exp"``, expRNN) or the Cayley map of ``A - A^T``
    (``"cayley"``, scoRNN without the scaling). The ``exp`` map is the ODE view of the cell:
    ``W`` is the exact transition over one time unit of the skew-linear field
    ``dz/dt = (A - A^T) z`` (:class:`~ode_reg.SkewLinearODEFunc` with ``alpha = 1``, which holds
    ``A``), so between inputs the state is rotated by the exact flow and ``|W h| = |h|``;
    the input and the modReLU act as a jump at each step. ``W`` is rebuilt from ``A`` on every
    forward pass, so it is orthogonal to float rounding after every optimizer step, and
    :meth:`orthogonal_weights` declares it to :class:`~ode_reg.callbacks.OrthogonalityMonitor`.

    The cell solves no ODE numerically (``torch.linalg.matrix_exp`` is the exact flow), so it
    takes no ode_reg regularizers. Called like ``nn.GRU(batch_first=True)``: it returns the
    states at every step and the last state.

    Args:
        input_dim: features per step, ``>= 1``.
        hidden_dim: state size, ``>= 1``.
        orthogonal_map: ``"exp"`` or ``"cayley"``.
        init: ``"henaff"`` (rotations by angles ``U(-pi, pi)``, see :func:`henaff_generator`)
            or ``"identity"`` (``A = 0``, ``W = I``).

    Raises:
        ValueError: if an argument is out of its range.

    Example::

        >>> rnn = OrthogonalRNN(3, 8)
        >>> out, last = rnn(torch.randn(2, 5, 3))
        >>> out.shape, last.shape
        (torch.Size([2, 5, 8]), torch.Size([2, 8]))
        >>> w = rnn.orthogonal_weights()["transition"]
        >>> bool((w.T @ w - torch.eye(8)).abs().max() < 1e-5)
        True
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        orthogonal_map: str = "exp",
        init: str = "henaff",
    ) -> None:
        check_int("input_dim", input_dim, 1)
        check_int("hidden_dim", hidden_dim, 1)
        check_map(orthogonal_map)
        if init not in ("henaff", "identity"):
            raise ValueError(f"`init` must be 'henaff' or 'identity', got {init!r}")
        super().__init__()
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.orthogonal_map = orthogonal_map
        self.flow = SkewLinearODEFunc(hidden_dim, alpha=1.0, init_std=0.0)
        if init == "henaff":
            with torch.no_grad():
                self.flow.A.copy_(henaff_generator(hidden_dim))
        self.input_weight = nn.Parameter(torch.empty(hidden_dim, input_dim))
        nn.init.kaiming_normal_(self.input_weight, nonlinearity="relu")
        self.bias = nn.Parameter(torch.empty(hidden_dim).uniform_(-0.01, 0.01))

    def transition(self) -> Tensor:
        """``W``: ``exp(A - A^T)`` or ``cayley(A - A^T)``, shape ``(hidden_dim, hidden_dim)``."""
        if self.orthogonal_map == "exp":
            return self.flow.transition_matrix(1.0)
        return cayley(self.flow.skew_matrix())

    def orthogonal_weights(self) -> dict[str, Tensor]:
        """``{"transition": W}`` for :class:`~ode_reg.callbacks.OrthogonalityMonitor`."""
        return {"transition": self.transition()}

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """States ``(B, T, hidden_dim)`` after every step and the last one ``(B, hidden_dim)``.

        Raises:
            ValueError: if ``x`` is not ``(B, T, input_dim)``.
        """
        if x.dim() != 3 or x.shape[-1] != self.input_dim:
            raise ValueError(f"`x` must have shape (B, T, {self.input_dim}), got {tuple(x.shape)}")
        w_t = self.transition().to(x.dtype).mT
        drive = x @ self.input_weight.to(x.dtype).mT
        h = x.new_zeros(x.shape[0], self.hidden_dim) if h0 is None else h0
        out = []
        for s in range(x.shape[1]):
            h = mod_relu(h @ w_t + drive[:, s], self.bias)
            out.append(h)
        return torch.stack(out, dim=1), h
