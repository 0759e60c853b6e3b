"""The skew-linear field with matrix dynamics (MATH.md, eqs. 7-10 and 14-19)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ode_reg._checks import check_int, check_range
from ode_reg._probe import odeint_error
from ode_reg._probe import td_odeint as _td_odeint
from ode_reg.protocol import IntegratorCall, SelfIntegratingField

__all__ = ["SkewLinearODEFunc"]


def _as_times(name: str, t: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(t, Tensor):
        if t.dim() > 1 or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"`{name}` must be a number, a 0-d or a 1-D tensor, got {tuple(t.shape)}"
            )
        out = t.to(dtype=like.dtype, device=like.device)
    elif isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ValueError(f"`{name}` must be a number, a 0-d or a 1-D tensor, got {t!r}")
    else:
        out = torch.tensor(float(t), dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"`{name}` must be finite, got {out.tolist()}")
    return out


class SkewLinearODEFunc(SelfIntegratingField, nn.Module):
    """``dz/dt = alpha (A - A^T) z`` with ``dA/dt = g(A)``, acting row-wise on ``z (B, dim)``.

    For every ``g``, ``|z(t)| = |z(0)|`` and ``z(t) = Q_t z(0)`` with
    ``dQ/dt = alpha (A - A^T) Q``, ``Q_{t0} = I`` orthogonal (eqs. 9-17): the flow is linear
    in ``z(0)``, so it cannot separate classes that are not linearly separable.

    ``A`` is the learnable parameter ``A`` = the matrix at time ``t0``. With ``g=None`` it is
    constant, :meth:`forward` is an ordinary autonomous field (use it with
    ``torchdiffeq.odeint`` or :func:`ode_reg.integrate`) and
    ``Q_t = matrix_exp(alpha (t - t0) (A - A^T))``. With a ``g``, ``A(t)`` solves
    ``dA/dt = g(A)``, ``A(t0) = A``:

    - the field integrates itself (:class:`~ode_reg.protocol.SelfIntegratingField`) on every
      call of :func:`ode_reg.integrate`, :func:`ode_reg.odeint` and
      :func:`ode_reg.odeint_adjoint`: ``(z, A)`` are solved jointly by torchdiffeq with the
      call's ``method``, ``options``, ``rtol`` and ``atol`` (``event_fn`` and the
      ``adjoint_*`` keywords are refused by name). Outside a recorded step (and without
      grad) that is one solve over the requested times, the same as
      ``torchdiffeq.odeint(f, (z0, f.A), t)[0]``; a recorded solve (grad on) restarts at
      each checkpoint so that every ``z_k`` is on the autograd path, and records ``A_k`` as
      the trajectory's ``weights`` (``weights_orthogonal = False``). ``A_k`` depend on
      ``theta`` through autograd, not on ``z``, so the sensitivity density
      ``y_k = a_k df(t_k, z_k)/dtheta`` is exact.
    - ``forward(t, (z, A))`` (a tuple state) returns ``(dz/dt, g(A))``, for
      ``torchdiffeq.odeint`` on the pair.
    - ``forward(t, z)`` (a tensor) first integrates ``A`` from ``t0`` to ``t`` with RK4 of step
      ``step_size``: correct but costly, meant for probes (Jacobians, penalties).

    Initialization: ``A ~ N(0, init_std^2 / dim)``.

    Args:
        dim: state dimension, ``>= 1``.
        alpha: the scale ``alpha`` of the field (eqs. 18-19), any finite real.
        g: ``None`` (``A`` constant), or a callable (or ``nn.Module``, registered as a
            submodule) mapping ``A (dim, dim)`` to ``dA/dt (dim, dim)``.
        init_std: standard deviation scale of the initialization, ``>= 0``.
        t0: the time at which ``A(t0) = A`` (and ``Q_{t0} = I``).
        step_size: RK4 step of the internal ``A``/``Q`` integrations (``g`` given), ``> 0``.

    Raises:
        ValueError: if ``dim < 1``, ``alpha``/``t0`` are not finite, ``g`` is not callable,
            ``init_std < 0`` or ``step_size <= 0``.

    Example::

        >>> import torch
        >>> from torchdiffeq import odeint
        >>> f = SkewLinearODEFunc(3)
        >>> z0 = torch.randn(5, 3)
        >>> z1 = odeint(f, z0, torch.tensor([0.0, 2.0]), method="rk4",
        ...             options={"step_size": 0.01})[-1]
        >>> torch.allclose(z1.norm(dim=1), z0.norm(dim=1), rtol=1e-4)
        True
        >>> torch.allclose(z1, z0 @ f.transition_matrix(2.0).mT, atol=1e-4)
        True
    """

    #: The recorded weights ``A_k`` are not orthogonal (monitors skip their defect).
    weights_orthogonal = False

    def __init__(
        self,
        dim: int,
        alpha: float = 1.0,
        g: Callable[[Tensor], Tensor] | None = None,
        *,
        init_std: float = 1.0,
        t0: float = 0.0,
        step_size: float = 0.01,
    ) -> None:
        check_int("dim", dim, 1)
        check_range("alpha", alpha)
        if g is not None and not callable(g):
            raise ValueError(f"`g` must be None or a callable A -> dA/dt, got {type(g).__name__}")
        check_range("init_std", init_std, 0.0)
        check_range("t0", t0)
        check_range("step_size", step_size, 0.0, low_open=True)
        super().__init__()
        self.dim = dim
        self.alpha = float(alpha)
        self.g = g
        self.t0 = float(t0)
        self.step_size = float(step_size)
        self.A = nn.Parameter(torch.randn(dim, dim) * (init_std / math.sqrt(dim)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, alpha={self.alpha}, g={'None' if self.g is None else 'given'}"

    def skew_matrix(self, a: Tensor | None = None) -> Tensor:
        """``alpha (A - A^T)`` for ``a`` (default: the parameter ``A``)."""
        a = self.A if a is None else a
        return self.alpha * (a - a.mT)

    def _velocity(self, a: Tensor, z: Tensor) -> Tensor:
        # Row convention: dz_i/dt = alpha (A - A^T) z_i  <=>  dZ/dt = Z (alpha (A - A^T))^T.
        return z @ self.skew_matrix(a.to(z.dtype)).mT

    def _matrix_rate(self, a: Tensor) -> Tensor:
        if self.g is None:
            return torch.zeros_like(a)
        da = self.g(a)
        if not isinstance(da, Tensor) or da.shape != a.shape:
            shape = tuple(da.shape) if isinstance(da, Tensor) else type(da).__name__
            raise RuntimeError(f"g(A) must return a tensor of shape {tuple(a.shape)}, got {shape}")
        return da

    def forward(self, t: Tensor, z: Tensor | tuple[Tensor, Tensor]) -> Any:
        """``dz/dt`` for a tensor ``z (B, dim)``; ``(dz/dt, g(A))`` for a tuple state ``(z, A)``."""
        if isinstance(z, tuple):
            x, a = z
            return self._velocity(a, x), self._matrix_rate(a)
        return self._velocity(self.weight_at(t), z)

    def weight_at(self, t: float | Tensor) -> Tensor:
        """``A(t)``: the parameter itself when ``g`` is None or ``t == t0``, else integrated (RK4).

        Raises:
            ValueError: if ``t`` is not a finite scalar.
        """
        tt = _as_times("t", t, self.A)
        if tt.dim() != 0:
            raise ValueError(f"`t` must be a scalar time, got shape {tuple(tt.shape)}")
        if self.g is None or float(tt) == self.t0:
            return self.A
        span = torch.stack([tt.new_tensor(self.t0), tt])
        return _td_odeint(
            lambda s, a: self._matrix_rate(a),
            self.A,
            span,
            method="rk4",
            options={"step_size": self.step_size},
        )[-1]

    def transition_matrix(self, t: float | Tensor) -> Tensor:
        """``Q_t`` with ``dQ/dt = alpha (A(t) - A(t)^T) Q``, ``Q_{t0} = I``, so ``z(t) = Q_t z(t0)``.

        In the row convention of :meth:`forward`, ``z(t) = z(t0) @ Q_t.mT``. Closed form
        ``matrix_exp(alpha (t - t0) (A - A^T))`` when ``g`` is None; otherwise ``(Q, A)`` are
        integrated jointly with RK4 of step ``step_size``.

        Args:
            t: a time, or a 1-D tensor of times.

        Returns:
            ``(dim, dim)`` for a scalar ``t``, ``(T, dim, dim)`` for ``T`` times.

        Raises:
            ValueError: if ``t`` is not a finite number, 0-d or 1-D tensor.

        Example::

            >>> import torch
            >>> f = SkewLinearODEFunc(4)
            >>> q = f.transition_matrix(torch.tensor([0.5, 1.0]))
            >>> q.shape, bool((q[0].T @ q[0] - torch.eye(4)).abs().max() < 1e-5)
            (torch.Size([2, 4, 4]), True)
        """
        tt = _as_times("t", t, self.A)
        if self.g is None:
            tau = (tt - self.t0).reshape(*tt.shape, 1, 1)
            return torch.linalg.matrix_exp(tau * self.skew_matrix())
        eye = torch.eye(self.dim, dtype=self.A.dtype, device=self.A.device)
        out = []
        for ti in tt.reshape(-1):
            if float(ti) == self.t0:
                out.append(eye)
                continue
            span = torch.stack([ti.new_tensor(self.t0), ti])
            # Q^T evolves like a batch of row states: d(Q^T)/dt = Q^T (alpha (A - A^T))^T.
            qt, _ = _td_odeint(
                self, (eye, self.A), span, method="rk4", options={"step_size": self.step_size}
            )
            out.append(qt[-1].mT)
        q = torch.stack(out)
        return q.reshape(*tt.shape, self.dim, self.dim)

    # --- the SelfIntegratingField protocol (used only when g is given) --------------------

    @property
    def integrates_itself(self) -> bool:
        """Whether ``(z, A)`` are integrated jointly (``g`` given); with ``g=None`` the field is
        an ordinary autonomous field (and ``odeint_adjoint`` solves the adjoint ODE)."""
        return self.g is not None

    def ode_reg_integrate(
        self, y0: Tensor, grid: Tensor, call: IntegratorCall
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Solve ``(z, A)`` jointly with torchdiffeq over ``grid``.

        Args:
            y0: initial state ``(B, dim)``.
            grid: increasing checkpoint times.
            call: torchdiffeq's ``method`` (``None``: ``"dopri5"``), ``options``, ``rtol`` and
                ``atol``, all passed on; with ``record`` the solve restarts at each grid time,
                so that each ``z_k`` is on the autograd path (else one solve, its values at
                the grid times).

        Returns:
            ``(states, weights)``: ``z_k`` and ``A_k`` at the grid times.

        Raises:
            IntegrationError: if an adaptive solver fails (with the time reached).
        """
        kw = {
            "method": call.method or "dopri5",
            "options": call.options,
            "rtol": call.rtol,
            "atol": call.atol,
        }
        a = self.weight_at(grid[0])
        if not call.record:
            zs, As = self._solve((y0, a.to(y0.dtype)), grid, kw)
            return [y0, *zs[1:].unbind(0)], [a, *As[1:].unbind(0)]
        z = y0
        states, weights = [y0], [a]
        for k in range(1, grid.numel()):
            zs, As = self._solve((z, a.to(z.dtype)), grid[k - 1 : k + 1], kw)
            z, a = zs[-1], As[-1]
            states.append(z)
            weights.append(a)
        return states, weights

    def _solve(self, y0: tuple[Tensor, Tensor], times: Tensor, kw: dict[str, Any]) -> Any:
        try:
            return _td_odeint(self, y0, times, **kw)
        except AssertionError as exc:
            raise odeint_error(exc, kw["method"], self) from exc

    def ode_reg_field_at(self, t: Tensor, z: Tensor, weight: Tensor) -> Tensor:
        """``f(t, z)`` given ``A(t) = weight`` (used for the sensitivity density)."""
        return self._velocity(weight, z)
