"""The antisymmetric field of AntisymmetricRNN (MATH.md, eq. 6; arXiv 1902.09689)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ode_reg._checks import check_bool, check_int, check_range
from ode_reg.dynamics._activations import get_activation

__all__ = ["AntisymmetricODEFunc"]

InputSignal = Tensor | Callable[[Tensor], Tensor]


class AntisymmetricODEFunc(nn.Module):
    """``f(t, z) = sigma((W - W^T - gamma I) z + V u(t) + b)``, acting row-wise on ``z (B, dim)``.

    The Jacobian is ``D (W - W^T - gamma I)`` with ``D = diag(sigma') >= 0``, so every
    eigenvalue has real part ``<= 0``, and exactly ``0`` when ``gamma = 0`` (MATH.md). Forward
    Euler with step ``eps`` is the AntisymmetricRNN recurrence
    ``h_t = h_{t-1} + eps tanh((W - W^T - gamma I) h_{t-1} + V x_t + b)``.

    Gated variant (``gated=True``): the gate and the update share the antisymmetric matrix,
    ``f = sigmoid(M z + V_g u + b_g) * sigma(M z + V u + b)`` with ``M = W - W^T - gamma I``.
    (The eigenvalue bound is stated for the ungated field; the gated Jacobian has an extra
    term ``diag(sigmoid' sigma) M`` whose sign is not fixed.)

    Input signal (only with ``input_dim``): set it before integrating, with
    :meth:`set_input`. A tensor ``u`` of shape ``(B, input_dim)`` (or ``(input_dim,)``, shared
    by the batch) is held constant over the integration interval (zero-order hold, as an
    ODE-RNN does between observations); a callable ``u(t) -> (B, input_dim)`` gives a
    time-varying signal. The signal is a plain attribute (not a buffer): it is not saved in
    the state dict. Evaluating the field with ``input_dim`` set and no signal raises
    ``RuntimeError``.

    Initialization (ANCHORS.md, AntisymmetricRNN): ``W ~ N(0, recurrent_std^2 / dim)``, input
    weights ``V ~ N(0, 1 / input_dim)``, biases zero.

    Args:
        dim: state dimension, ``>= 1``.
        gamma: diffusion ``gamma >= 0``.
        activation: one of ``"tanh"``, ``"sigmoid"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``,
            ``"softplus"``, ``"identity"`` (monotone, so ``sigma' >= 0`` and the eigenvalue
            bound holds).
        input_dim: dimension of the input signal ``u``, ``>= 1``, or ``None`` (no input).
        gated: use the gated variant.
        recurrent_std: ``sigma_w >= 0`` of the recurrent initialization.
        bias: learn the biases ``b`` (and ``b_g``); without them they are fixed at zero.

    Raises:
        ValueError: if ``dim < 1``, ``gamma < 0``, the activation is unknown,
            ``input_dim < 1``, ``gated`` is not a bool or ``recurrent_std < 0``.

    Example::

        >>> import torch
        >>> from ode_reg import integrate
        >>> f = AntisymmetricODEFunc(4, gamma=0.01, input_dim=2)
        >>> f.set_input(torch.randn(3, 2))  # held over the next interval
        >>> traj = integrate(f, torch.zeros(3, 4), torch.tensor([0.0, 1.0]), method="euler",
        ...                  options={"step_size": 0.1})
        >>> traj.ys.shape
        torch.Size([2, 3, 4])
    """

    def __init__(
        self,
        dim: int,
        gamma: float = 0.01,
        activation: str = "tanh",
        input_dim: int | None = None,
        gated: bool = False,
        recurrent_std: float = 1.0,
        bias: bool = True,
    ) -> None:
        check_int("dim", dim, 1)
        check_range("gamma", gamma, 0.0)
        act = get_activation(activation)
        if input_dim is not None:
            check_int("input_dim", input_dim, 1)
        check_bool("gated", gated)
        check_range("recurrent_std", recurrent_std, 0.0)
        check_bool("bias", bias)
        super().__init__()
        self.dim = dim
        self.gamma = float(gamma)
        self.activation = activation
        self._act = act
        self.input_dim = input_dim
        self.gated = gated
        self.recurrent_std = float(recurrent_std)

        self.weight = nn.Parameter(torch.randn(dim, dim) * (recurrent_std / math.sqrt(dim)))
        if input_dim is not None:
            self.input_weight = nn.Parameter(torch.randn(dim, input_dim) / math.sqrt(input_dim))
            gate_in = torch.randn(dim, input_dim) / math.sqrt(input_dim) if gated else None
            self.gate_input_weight = None if gate_in is None else nn.Parameter(gate_in)
        else:
            self.register_parameter("input_weight", None)
            self.register_parameter("gate_input_weight", None)
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.gate_bias = nn.Parameter(torch.zeros(dim)) if (bias and gated) else None
        self._input: InputSignal | None = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, gamma={self.gamma}, activation={self.activation!r}, "
            f"input_dim={self.input_dim}, gated={self.gated}"
        )

    def antisymmetric_matrix(self) -> Tensor:
        """``M = W - W^T - gamma I``, shape ``(dim, dim)``."""
        eye = torch.eye(self.dim, dtype=self.weight.dtype, device=self.weight.device)
        return self.weight - self.weight.mT - self.gamma * eye

    def set_input(self, u: InputSignal | None) -> None:
        """Set the input signal ``u`` used by :meth:`forward` (``None`` clears it).

        Args:
            u: a tensor of shape ``(B, input_dim)`` or ``(input_dim,)``, held constant in time
                (zero-order hold), or a callable ``u(t)`` returning such a tensor, or ``None``.

        Raises:
            ValueError: if the field has no input (``input_dim=None``) and ``u`` is not
                ``None``, or a tensor ``u`` does not end in ``input_dim``.
        """
        if u is None:
            self._input = None
            return
        if self.input_dim is None:
            raise ValueError("`u` must be None: this field was built with input_dim=None")
        if isinstance(u, Tensor):
            if u.dim() not in (1, 2) or u.shape[-1] != self.input_dim:
                raise ValueError(
                    f"`u` must have shape (B, {self.input_dim}) or ({self.input_dim},), "
                    f"got {tuple(u.shape)}"
                )
        elif not callable(u):
            raise ValueError(
                f"`u` must be a tensor, a callable u(t) or None, got {type(u).__name__}"
            )
        self._input = u

    def ode_reg_snapshot(self) -> dict[str, object]:
        """The held input signal (:class:`~ode_reg.protocol.HoldsInputs`):
        :func:`ode_reg.integrate` restores it when the field is evaluated after the solve
        (sensitivities, skew-Jacobian penalty, spectra), so each step of an ODE-RNN is
        evaluated with its own input."""
        return {"_input": self._input}

    def input_at(self, t: Tensor) -> Tensor | None:
        """The input signal at time ``t`` (``None`` for a field without input)."""
        if self.input_dim is None:
            return None
        if self._input is None:
            raise RuntimeError(
                "AntisymmetricODEFunc was built with input_dim="
                f"{self.input_dim} but no input is set: call set_input(u) first"
            )
        if isinstance(self._input, Tensor):
            return self._input
        u = self._input(t)
        if not isinstance(u, Tensor) or u.shape[-1] != self.input_dim:
            shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise RuntimeError(f"the input callable must return (B, {self.input_dim}), got {shape}")
        return u

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        """``f(t, z)`` for ``z`` of shape ``(B, dim)`` (or ``(dim,)``)."""
        mz = z @ self.antisymmetric_matrix().mT
        u = self.input_at(t)
        pre = mz if u is None else mz + u.to(z.dtype) @ self.input_weight.mT
        if self.bias is not None:
            pre = pre + self.bias
        out = self._act(pre)
        if not self.gated:
            return out
        gate = mz if u is None else mz + u.to(z.dtype) @ self.gate_input_weight.mT
        if self.gate_bias is not None:
            gate = gate + self.gate_bias
        return torch.sigmoid(gate) * out
