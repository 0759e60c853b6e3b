"""Per-sample Jacobians of a vector field and their spectra (MATH.md, "Quantities the monitors report").

The field acts row-wise: row ``i`` of ``f(t, z)`` depends only on row ``i`` of ``z`` (no
batch normalization or attention across samples). Then the Jacobian of the batch sum
``z -> sum_i f(t, z)_i`` with respect to ``z`` holds every per-sample Jacobian
``J_i = df(t, z_i)/dz_i``, at the cost of ``d`` vector-Jacobian products on the whole batch,
and fields that hold per-sample side inputs (an ODE-RNN's held input ``u``, of batch ``B``)
work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["jacobian", "jacobian_eigvals", "spectral_abscissa", "spectral_radius"]


def _check_state(z: Tensor) -> None:
    if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() != 2 or z.numel() == 0:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(
            f"`z` must be a non-empty floating-point tensor of shape (B, d), got {shape}"
        )


def _as_time(t: float | Tensor, z: Tensor) -> Tensor:
    if isinstance(t, Tensor):
        if t.numel() != 1:
            raise ValueError(f"`t` must be a scalar time, got shape {tuple(t.shape)}")
        return t.reshape(())
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ValueError(f"`t` must be a real number or a 0-d tensor, got {t!r}")
    return torch.tensor(float(t), dtype=z.dtype, device=z.device)


def _jacobian_loop(func: Callable[[Tensor, Tensor], Tensor], t: Tensor, z: Tensor) -> Tensor:
    # Plain autograd, one output coordinate at a time: works for any differentiable field.
    z_in = z if z.requires_grad else z.detach().requires_grad_(True)
    with torch.enable_grad():
        out = func(t, z_in)
        if not isinstance(out, Tensor) or out.shape != z.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"`func` must map z of shape {tuple(z.shape)} to the same shape, got {shape}"
            )
        rows = []
        for j in range(out.shape[1]):
            (g,) = torch.autograd.grad(
                out[:, j].sum(), z_in, retain_graph=True, create_graph=torch.is_grad_enabled()
            )
            rows.append(g)
    return torch.stack(rows, dim=1)


def jacobian(func: Callable[[Tensor, Tensor], Tensor], t: float | Tensor, z: Tensor) -> Tensor:
    """Per-sample Jacobians ``J_i = df(t, z_i)/dz_i`` of a field acting row-wise on ``z``.

    Computed with ``torch.func.jacrev`` of ``z -> f(t, z).sum(0)`` (``d`` vectorized
    vector-Jacobian products on the whole batch); if ``torch.func`` cannot trace the field
    (data-dependent Python control flow, unsupported in-place ops, ``.item()``), it falls back
    to ``d`` plain ``torch.autograd.grad`` calls. The result is differentiable in the field's
    parameters and in ``z`` when grad mode is on.

    Args:
        func: vector field ``f(t, z)`` mapping ``(B, d)`` to ``(B, d)``, row-wise (row ``i``
            of the output depends only on row ``i`` of ``z``): an ``nn.Module`` or any callable.
        t: the time, a number or 0-d tensor.
        z: states, shape ``(B, d)``.

    Returns:
        Tensor of shape ``(B, d, d)``; ``[i, j, l] = d f_j(t, z_i) / d z_{i, l}``.

    Raises:
        ValueError: if ``z`` is not a 2-D floating-point tensor, ``t`` is not a scalar, or
            ``func`` does not return a tensor of ``z``'s shape.

    Example::

        >>> import torch
        >>> m = torch.tensor([[0.0, 1.0], [-2.0, 0.0]])
        >>> jac = jacobian(lambda t, z: z @ m.T, 0.0, torch.randn(5, 2))
        >>> jac.shape, torch.allclose(jac[3], m)
        (torch.Size([5, 2, 2]), True)
    """
    _check_state(z)
    tt = _as_time(t, z)

    def summed(x: Tensor) -> Tensor:
        return func(tt, x).sum(0)

    try:
        jac = torch.func.jacrev(summed)(z).movedim(0, 1)  # (d_out, B, d_in) -> (B, d_out, d_in)
    except Exception:  # noqa: BLE001 - any torch.func tracing failure: use plain autograd
        jac = _jacobian_loop(func, tt, z)
    b, d = z.shape
    if jac.shape != (b, d, d):
        raise ValueError(
            f"`func` must map z of shape {(b, d)} to the same shape; its Jacobian came out "
            f"{tuple(jac.shape)} instead of {(b, d, d)}"
        )
    return jac


def jacobian_eigvals(
    func: Callable[[Tensor, Tensor], Tensor], t: float | Tensor, z: Tensor
) -> Tensor:
    """Eigenvalues of the per-sample Jacobians ``J_i = df(t, z_i)/dz_i``.

    Args:
        func: vector field ``f(t, z)`` acting row-wise on ``z`` (see :func:`jacobian`).
        t: the time, a number or 0-d tensor.
        z: states, shape ``(B, d)``.

    Returns:
        Complex tensor of shape ``(B, d)`` (``torch.linalg.eigvals``, unordered).

    Raises:
        ValueError: as :func:`jacobian`.

    Example::

        >>> import torch
        >>> m = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # eigenvalues +-i
        >>> eig = jacobian_eigvals(lambda t, z: z @ m.T, 0.0, torch.randn(3, 2))
        >>> float(eig.real.abs().max()), float(eig.imag.abs().max())
        (0.0, 1.0)
    """
    return torch.linalg.eigvals(jacobian(func, t, z))


def _check_eigs(eigs: Tensor) -> None:
    if not isinstance(eigs, Tensor) or eigs.dim() < 1 or eigs.shape[-1] == 0:
        shape = tuple(eigs.shape) if isinstance(eigs, Tensor) else type(eigs).__name__
        raise ValueError(f"`eigs` must be a tensor of shape (..., d) with d >= 1, got {shape}")


def spectral_abscissa(eigs: Tensor) -> Tensor:
    """The spectral abscissa ``max_j Re(lambda_j)`` over the last dimension.

    Negative: the linearized flow contracts; zero: it preserves norms (skew Jacobian);
    positive: some direction grows.

    Args:
        eigs: real or complex eigenvalues, shape ``(..., d)``.

    Returns:
        Real tensor of shape ``(...)``.

    Raises:
        ValueError: if ``eigs`` is not a tensor with a non-empty last dimension.

    Example::

        >>> import torch
        >>> spectral_abscissa(torch.tensor([-1 + 2j, 0.5 - 1j]))
        tensor(0.5000)
    """
    _check_eigs(eigs)
    real = eigs.real if eigs.is_complex() else eigs
    return real.amax(dim=-1)


def spectral_radius(eigs: Tensor) -> Tensor:
    """The spectral radius ``max_j |lambda_j|`` over the last dimension.

    Args:
        eigs: real or complex eigenvalues, shape ``(..., d)``.

    Returns:
        Real tensor of shape ``(...)``.

    Raises:
        ValueError: if ``eigs`` is not a tensor with a non-empty last dimension.

    Example::

        >>> import torch
        >>> spectral_radius(torch.tensor([3 + 4j, -1 + 0j]))
        tensor(5.)
    """
    _check_eigs(eigs)
    return eigs.abs().amax(dim=-1)
