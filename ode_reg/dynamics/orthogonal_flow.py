"""Orthogonal weight flows (ODEtoODE, arXiv 2006.11421; MATH.md eqs. 20-22).

``dz/dt = sigma(W_t z)`` with ``dW/dt = W b_theta(W, t)``, ``b_theta`` skew-symmetric and
``W_0`` orthogonal, so ``W_t`` stays on the orthogonal group. A generic Runge-Kutta step on
``dW/dt = W b`` drifts off the group; a Lie-group step ``W_{n+1} = W_n exp(h b)`` (or the
Cayley step ``W_n (I - h b / 2)^{-1} (I + h b / 2)``) stays on it to rounding.

``W_t`` does not depend on ``z``: ``f_theta(t, z) = sigma(W_t(theta) z)`` is an ordinary
time-dependent field whose parameters reach it through ``W_t``, so the sensitivity density
``y_k = a_k df(t_k, z_k)/dtheta`` is obtained by autograd through the recorded ``W_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ode_reg._checks import check_bool, check_choice, check_int, check_range
from ode_reg.dynamics._activations import get_activation
from ode_reg.protocol import DEFAULT_ATOL, DEFAULT_RTOL, IntegratorCall, SelfIntegratingField

__all__ = ["STEPS", "OrthogonalFlow"]

#: Weight-step rules of :class:`OrthogonalFlow`.
STEPS = ("exp", "cayley", "rk4")


def _num_steps(span: float, step_size: float) -> int:
    # ceil(|span| / step_size), forgiving the rounding of an exact multiple (1.25 / 0.01).
    return max(1, math.ceil(abs(span) / step_size * (1.0 - 1e-9)))


class OrthogonalFlow(SelfIntegratingField, nn.Module):
    """``dz/dt = sigma(W_t z)``, ``dW/dt = W b_theta(W, t)``, acting row-wise on ``z (B, dim)``.

    **Generator** ``b_theta``: by default ``b_theta(W, t) = skew(B0 + t B1)`` with
    ``skew(M) = M - M^T`` and learnable ``B0, B1 ~ N(0, b_std^2 / dim)``: a skew rate that
    drifts linearly in time, independent of ``W`` (then ``W_t`` is a time-ordered exponential
    and ``W_{t + T/2} = -W_t`` type cancellations can be learned). Any callable
    ``b(W, t) -> (dim, dim)`` returning a skew-symmetric matrix may replace it (an
    ``nn.Module`` is registered, so its parameters train); it receives ``W`` and ``t`` in
    ``weight_dtype``.

    **Initial weight** ``W_{t0} = matrix_exp(C - C^T)``, a rotation, with
    ``C ~ N(0, (pi / (2 sqrt(2 dim)))^2)`` so that the rotation angles spread over
    ``[-pi, pi]``. ``C`` is a fixed buffer (default) or, with ``learn_initial=True``, a
    parameter: ``W_0`` is then learnable and orthogonal by construction.

    **Integration** (:class:`~ode_reg.protocol.SelfIntegratingField`: by :meth:`ode_reg_integrate`
    on every call of :func:`ode_reg.integrate`, :func:`ode_reg.odeint` and
    :func:`ode_reg.odeint_adjoint`, in training and evaluation alike; ``odeint_adjoint``
    differentiates through these steps):
    each checkpoint interval is cut into ``ceil(interval / step_size)`` equal sub-steps ``h``.
    ``z`` advances by classical RK4 with ``W`` at the stage times: for ``step="exp"``
    ``W_{n+1/2} = W_n exp(h/2 b(W_n, t_n))``, ``W_{n+1} = W_n exp(h b(W_{n+1/2}, t_n + h/2))``
    (the exponential midpoint rule, second order, on the group); ``step="cayley"`` uses
    ``cay(X) = (I - X/2)^{-1} (I + X/2)`` in place of ``exp``; ``step="rk4"`` is the baseline
    that drifts: classical RK4 on the pair ``(z, W)``. The step size is ``step_size`` unless
    ``options={"step_size": h}`` is passed; the only accepted ``method`` is ``"rk4"`` (the rule
    for ``z``). The step is fixed: ``rtol``/``atol`` other than the defaults, ``event_fn`` and
    the ``adjoint_*`` keywords are refused by name.

    **Precision**: ``W`` is integrated in ``weight_dtype`` (default float64) and cast to the
    state's dtype where it meets ``z``. In float32, 1000 products of 64 x 64 orthogonal factors
    lose ~1e-4 of orthogonality to rounding alone; in float64 the recorded float32 ``W_k``
    stay orthogonal to ~1e-6. ``weight_dtype=None`` uses the state's dtype.

    Args:
        dim: state dimension, ``>= 1``.
        activation: one of ``"tanh"``, ``"sigmoid"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``,
            ``"softplus"``, ``"identity"``.
        step: weight-step rule, one of ``"exp"``, ``"cayley"``, ``"rk4"``.
        step_size: sub-step bound ``h > 0``.
        b: ``None`` (the default generator above) or a callable ``b(W, t)``.
        b_std: scale of the default generator's initialization, ``>= 0``.
        learn_initial: make ``W_{t0}`` learnable.
        weight_dtype: floating dtype for the weight flow, or ``None``.
        t0: the time at which ``W = W_{t0}``.

    Raises:
        ValueError: if ``dim < 1``, the activation or ``step`` is unknown, ``step_size <= 0``,
            ``b`` is not callable, ``b_std < 0``, ``learn_initial`` is not a bool,
            ``weight_dtype`` is not a floating dtype, or ``t0`` is not finite.

    Example::

        >>> import torch
        >>> from ode_reg import integrate
        >>> from ode_reg.functional.orthogonal import orthogonality_defect
        >>> flow = OrthogonalFlow(8, step="exp", step_size=0.05)
        >>> traj = integrate(flow, torch.randn(4, 8), torch.tensor([0.0, 1.0]))
        >>> bool(orthogonality_defect(traj.weight_matrices).max() < 1e-5)
        True
    """

    #: ``W_k`` recorded by :meth:`ode_reg_integrate` are orthogonal (``False`` for ``step="rk4"``).
    weights_orthogonal = True

    def __init__(
        self,
        dim: int,
        activation: str = "tanh",
        step: str = "exp",
        step_size: float = 0.1,
        *,
        b: Callable[[Tensor, Tensor], Tensor] | None = None,
        b_std: float = 0.5,
        learn_initial: bool = False,
        weight_dtype: torch.dtype | None = torch.float64,
        t0: float = 0.0,
    ) -> None:
        check_int("dim", dim, 1)
        act = get_activation(activation)
        check_choice("step", step, list(STEPS))
        check_range("step_size", step_size, 0.0, low_open=True)
        if b is not None and not callable(b):
            raise ValueError(f"`b` must be None or a callable b(W, t), got {type(b).__name__}")
        check_range("b_std", b_std, 0.0)
        check_bool("learn_initial", learn_initial)
        if weight_dtype is not None and (
            not isinstance(weight_dtype, torch.dtype) or not weight_dtype.is_floating_point
        ):
            raise ValueError(
                f"`weight_dtype` must be None or a floating torch.dtype, got {weight_dtype!r}"
            )
        check_range("t0", t0)
        super().__init__()
        self.dim = dim
        self.activation = activation
        self._act = act
        self.step = step
        self.step_size = float(step_size)
        self.weight_dtype = weight_dtype
        self.t0 = float(t0)
        if step == "rk4":
            self.weights_orthogonal = False
        if b is None:
            scale = b_std / math.sqrt(dim)
            self.b0 = nn.Parameter(torch.randn(dim, dim) * scale)
            self.b1 = nn.Parameter(torch.randn(dim, dim) * scale)
            self.b_fn = None
        else:
            self.register_parameter("b0", None)
            self.register_parameter("b1", None)
            self.b_fn = b
        gen = torch.randn(dim, dim) * (math.pi / (2.0 * math.sqrt(2.0 * dim)))
        if learn_initial:
            self.initial_generator = nn.Parameter(gen)
        else:
            self.register_buffer("initial_generator", gen)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, activation={self.activation!r}, step={self.step!r}, "
            f"step_size={self.step_size}, weight_dtype={self.weight_dtype}"
        )

    # --- the weight flow ------------------------------------------------------------------

    def _wdtype(self, like: Tensor) -> torch.dtype:
        return like.dtype if self.weight_dtype is None else self.weight_dtype

    def initial_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W_{t0} = matrix_exp(C - C^T)`` in ``dtype`` (default ``weight_dtype`` or ``C``'s)."""
        c = self.initial_generator
        c = c.to(dtype or self.weight_dtype or c.dtype)
        return torch.linalg.matrix_exp(c - c.mT)

    def orthogonal_weights(self) -> dict[str, Tensor]:
        """``{"initial_weight": W_{t0}}``, for :class:`~ode_reg.callbacks.OrthogonalityMonitor`.

        The flow's ``W_k`` are recorded on each trajectory (``Trajectory.weights``).
        """
        return {"initial_weight": self.initial_weight()}

    def b(self, w: Tensor, t: Tensor) -> Tensor:
        """The skew generator ``b_theta(W, t)`` in ``W``'s dtype."""
        if self.b_fn is not None:
            return self.b_fn(w, t)
        m = self.b0.to(w.dtype) + t.to(w.dtype) * self.b1.to(w.dtype)
        return m - m.mT

    def _lie(self, x: Tensor) -> Tensor:
        if self.step == "exp":
            return torch.linalg.matrix_exp(x)
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return torch.linalg.solve(eye - 0.5 * x, eye + 0.5 * x)

    def _advance(
        self, t: Tensor, h: Tensor, w: Tensor, z: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """One sub-step from ``(t, W, z)`` to ``(t + h, W', z')`` (``z`` may be None)."""
        if self.step == "rk4":
            k1w = w @ self.b(w, t)
            w2 = w + 0.5 * h * k1w
            k2w = w2 @ self.b(w2, t + 0.5 * h)
            w3 = w + 0.5 * h * k2w
            k3w = w3 @ self.b(w3, t + 0.5 * h)
            w4 = w + h * k3w
            k4w = w4 @ self.b(w4, t + h)
            w_next = w + (h / 6.0) * (k1w + 2.0 * k2w + 2.0 * k3w + k4w)
            stages = (w, w2, w3, w4)
        else:
            w_half = w @ self._lie(0.5 * h * self.b(w, t))
            w_next = w @ self._lie(h * self.b(w_half, t + 0.5 * h))
            stages = (w, w_half, w_half, w_next)
        if z is None:
            return w_next, None
        hz = h.to(z.dtype)
        ws = [s.to(z.dtype) for s in stages]
        k1 = self._act(z @ ws[0].mT)
        k2 = self._act((z + 0.5 * hz * k1) @ ws[1].mT)
        k3 = self._act((z + 0.5 * hz * k2) @ ws[2].mT)
        k4 = self._act((z + hz * k3) @ ws[3].mT)
        return w_next, z + (hz / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

    def _flow(
        self, ta: Tensor, tb: Tensor, w: Tensor, z: Tensor | None, step_size: float
    ) -> tuple[Tensor, Tensor | None]:
        n = _num_steps(float(tb - ta), step_size)
        h = (tb - ta) / n
        for j in range(n):
            w, z = self._advance(ta + j * h, h, w, z)
        return w, z

    def weight_at(self, t: float | Tensor) -> Tensor:
        """``W_t`` in ``weight_dtype``, integrated from ``t0`` with the ``step`` rule.

        Raises:
            ValueError: if ``t`` is not a finite scalar.
        """
        if isinstance(t, Tensor):
            if t.numel() != 1:
                raise ValueError(f"`t` must be a scalar time, got shape {tuple(t.shape)}")
            t = float(t)
        check_range("t", t)
        w = self.initial_weight()
        if float(t) == self.t0:
            return w
        ta = torch.tensor(self.t0, dtype=w.dtype, device=w.device)
        w, _ = self._flow(ta, ta.new_tensor(float(t)), w, None, self.step_size)
        return w

    # --- the vector field -----------------------------------------------------------------

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        """``sigma(W_t z)``; ``W_t`` is integrated from ``t0`` on every call (probes only).

        :func:`ode_reg.integrate` never calls this: it advances ``W`` once along the grid.
        """
        return self.ode_reg_field_at(t, z, self.weight_at(t))

    def ode_reg_field_at(self, t: Tensor, z: Tensor, weight: Tensor) -> Tensor:
        """``f(t, z) = sigma(W z)`` given ``W = W_t`` (used for the sensitivity density)."""
        return self._act(z @ weight.to(z.dtype).mT)

    def ode_reg_integrate(
        self, y0: Tensor, grid: Tensor, call: IntegratorCall
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Advance ``(z, W)`` over the checkpoint ``grid`` (:class:`SelfIntegratingField`).

        Args:
            y0: initial state ``(B, dim)``; ``states[0]`` is this very tensor.
            grid: increasing 1-D checkpoint times; ``grid[0]`` is the start.
            call: ``method`` must be ``"rk4"`` (the rule for ``z``) or ``None``; ``options``
                ``None`` or ``{"step_size": h}`` overriding ``step_size``; ``rtol``/``atol``
                the defaults (the step is fixed); ``record`` does not matter (the states are
                on the autograd path either way).

        Returns:
            ``(states, weights)``: ``z_k`` and ``W_k`` (in ``y0``'s dtype) at every grid time,
            all on the autograd path from the parameters and ``y0``.

        Raises:
            ValueError: on another ``method``, unknown ``options`` keys, a step size ``<= 0``,
                or a ``rtol``/``atol`` that is not the default.
        """
        method = call.method
        if method not in (None, "rk4"):
            raise ValueError(
                "`method` must be 'rk4' for OrthogonalFlow (z advances by RK4, W by the "
                f"`step` rule {self.step!r}), got {method!r}"
            )
        for name, value, default in (
            ("rtol", call.rtol, DEFAULT_RTOL),
            ("atol", call.atol, DEFAULT_ATOL),
        ):
            if value != default:
                raise ValueError(
                    f"`{name}` has no effect on OrthogonalFlow, which steps with a fixed "
                    f"`step_size` ({self.step_size:g}; options={{'step_size': h}} sets it), got "
                    f"{value!r}"
                )
        opts = dict(call.options or {})
        step_size = opts.pop("step_size", self.step_size)
        if opts:
            raise ValueError(
                f"`options` accepts only 'step_size' for OrthogonalFlow, got {sorted(opts)}"
            )
        check_range("options['step_size']", step_size, 0.0, low_open=True)
        wd = self._wdtype(y0)
        times = grid.to(wd)
        w = self.weight_at(times[0]).to(wd)
        z = y0
        states, weights = [y0], [w.to(y0.dtype)]
        for k in range(1, times.numel()):
            w, z = self._flow(times[k - 1], times[k], w, z, float(step_size))
            states.append(z)
            weights.append(w.to(y0.dtype))
        return states, weights
