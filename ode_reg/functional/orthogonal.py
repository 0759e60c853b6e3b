"""Orthogonal maps: skew part, Cayley, scaled Cayley, matrix exponential and the defect.

All functions act on the last two dimensions and broadcast over leading (batch) dimensions
(MATH.md, "Orthogonal maps"). Arguments are validated before any work: a bad input raises
``ValueError`` naming the argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ode_reg._checks import check_skew, check_square

__all__ = ["cayley", "expm_orthogonal", "orthogonality_defect", "scaled_cayley", "skew"]


def skew(m: Tensor) -> Tensor:
    """The skew-symmetric matrix ``M - M^T`` built from any square ``M``.

    Args:
        m: tensor of shape ``(..., n, n)``.

    Returns:
        ``m - m^T`` over the last two dimensions, same shape as ``m``.

    Raises:
        ValueError: if ``m`` is not a (batch of) square matrices.

    Example::

        >>> import torch
        >>> s = skew(torch.tensor([[1.0, 2.0], [0.0, 3.0]]))
        >>> s
        tensor([[ 0.,  2.],
                [-2.,  0.]])
    """
    check_square("m", m)
    return m - m.mT


def _eye_like(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def cayley(a: Tensor) -> Tensor:
    """The Cayley map ``(I + A)^{-1} (I - A)`` of a skew-symmetric ``A``: an orthogonal matrix.

    ``I + A`` is invertible for every real skew ``A`` (its eigenvalues are ``1 + i w``). The
    inverse is never formed: the result is ``torch.linalg.solve(I + A, I - A)``. The map
    reaches every orthogonal matrix without eigenvalue ``-1`` (use :func:`scaled_cayley` for
    the others).

    Args:
        a: skew-symmetric tensor of shape ``(..., n, n)``.

    Returns:
        Orthogonal tensor of shape ``(..., n, n)``, differentiable in ``a``.

    Raises:
        ValueError: if ``a`` is not square or not skew-symmetric (``A + A^T = 0`` within
            ``1e-5`` relative in single precision, ``1e-10`` in double).

    Example::

        >>> import torch
        >>> a = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
        >>> q = cayley(a)  # rotation by angle 2 atan(1) = pi/2
        >>> torch.allclose(q, torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
        True
    """
    check_skew("a", a)
    eye = _eye_like(a)
    return torch.linalg.solve(eye + a, eye - a)


def scaled_cayley(a: Tensor, d: Tensor) -> Tensor:
    """The scaled Cayley map ``(I + A)^{-1} (I - A) D`` with ``D = diag(d)``, ``d_i = +-1`` (scoRNN).

    With enough ``-1`` entries in ``d`` it reaches every orthogonal matrix (arXiv 1707.09520).

    Args:
        a: skew-symmetric tensor of shape ``(..., n, n)``.
        d: tensor of shape ``(n,)`` or ``(..., n)`` (broadcast against ``a``'s batch) whose
            entries are all ``+1`` or ``-1``.

    Returns:
        Orthogonal tensor of shape ``(..., n, n)``: column ``j`` of ``cayley(a)`` times ``d_j``.

    Raises:
        ValueError: if ``a`` is not square and skew-symmetric, or ``d`` has the wrong last
            dimension or an entry other than ``+-1``.

    Example::

        >>> import torch
        >>> q = scaled_cayley(torch.zeros(3, 3), torch.tensor([1.0, -1.0, 1.0]))
        >>> q.diagonal()
        tensor([ 1., -1.,  1.])
    """
    check_skew("a", a)
    n = a.shape[-1]
    if not isinstance(d, Tensor) or d.dim() < 1 or d.shape[-1] != n:
        shape = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
        raise ValueError(f"`d` must be a tensor of shape (..., {n}) with entries +-1, got {shape}")
    if not bool(((d == 1) | (d == -1)).all()):
        raise ValueError(f"`d` must have every entry equal to +1 or -1, got {d.tolist()}")
    return cayley(a) * d.to(dtype=a.dtype, device=a.device).unsqueeze(-2)


def orthogonality_defect(w: Tensor) -> Tensor:
    """The orthogonality defect ``|W^T W - I|_F`` over the last two dimensions.

    For a tall ``(m, n)`` matrix it measures how far the columns are from orthonormal. It is
    zero exactly for orthogonal (orthonormal-column) matrices and is differentiable away from
    them (the Frobenius norm is not differentiable at 0).

    Args:
        w: tensor of shape ``(..., m, n)``.

    Returns:
        Tensor of shape ``(...)`` (a 0-d tensor for a single matrix).

    Raises:
        ValueError: if ``w`` is not a tensor with at least 2 dimensions.

    Example::

        >>> import torch
        >>> float(orthogonality_defect(torch.eye(3)))
        0.0
        >>> float(orthogonality_defect(2 * torch.eye(2)))  # |3 I_2|_F = 3 sqrt(2)
        4.242640495300293
    """
    if not isinstance(w, Tensor) or w.dim() < 2:
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"`w` must be a tensor of shape (..., m, n) with >= 2 dims, got {shape}")
    gram = w.mT @ w
    return torch.linalg.matrix_norm(gram - _eye_like(gram))


def expm_orthogonal(a: Tensor) -> Tensor:
    """The matrix exponential ``exp(A)`` of a skew-symmetric ``A``: a rotation (``det = +1``).

    Args:
        a: skew-symmetric tensor of shape ``(..., n, n)``.

    Returns:
        Orthogonal tensor of shape ``(..., n, n)`` (``torch.linalg.matrix_exp``).

    Raises:
        ValueError: if ``a`` is not square or not skew-symmetric.

    Example::

        >>> import math, torch
        >>> q = expm_orthogonal(torch.tensor([[0.0, -math.pi / 2], [math.pi / 2, 0.0]]))
        >>> torch.allclose(q, torch.tensor([[0.0, -1.0], [1.0, 0.0]]), atol=1e-6)
        True
    """
    check_skew("a", a)
    return torch.linalg.matrix_exp(a)
