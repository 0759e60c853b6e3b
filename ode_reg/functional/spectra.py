"""Per-sample Jacobians of a vector field and their spectra (MATH.md, "Quantities the monitors report").

The field acts row-wise: row ``i`` of ``f(t, z)`` depends only on row ``i`` of ``z`` (no
batch normalization or attention across samples). Then the Jacobian of the batch sum
``z -> sum_i f(t, z)_i`` with respect to ``z`` holds every per-sample Jacobian
``J_i = df(t, z_i)/dz_i``, at the cost of ``d`` vector-Jacobian products on the whole batch,
and fields that hold per-sample side inputs (an ODE-RNN's held input ``u``, of batch ``B``)
work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ode_reg.functional.penalties import UNTRACEABLE, announce_fallback

__all__ = [
    "jacobian",
    "jacobian_eigvals",
    "jacobian_ritz_values",
    "krylov_eigvals",
    "spectral_abscissa",
    "spectral_radius",
]


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
    except UNTRACEABLE as err:  # plain autograd, one output coordinate at a time; said once
        # per field. A genuine error of the field is raised again there.
        announce_fallback(
            getattr(func, "__qualname__", type(func).__name__),
            err,
            "torch.func.jacrev",
            "its Jacobian is taken by plain autograd instead (same values; d backward passes "
            "instead of one vectorized one)",
        )
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


def _start_vectors(d: int, count: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Fixed pseudo-random unit vectors, the same for every row: a sample's estimate does not
    # depend on its position in the batch (so DDP ranks and one process agree).
    g = torch.Generator().manual_seed(20261201)
    v = torch.randn(count, d, generator=g, dtype=torch.float64)
    return (v / v.norm(dim=1, keepdim=True)).to(dtype=dtype, device=device)


def _orthogonalize(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram-Schmidt twice (CGS2), batched over rows: ``w (n, d)``, ``basis (n, j, d)``.

    Returns the projected-out ``w`` and the coefficients ``(n, j)``.
    """
    h = (basis @ w[:, :, None])[..., 0]
    w = w - (h[:, None, :] @ basis)[:, 0]
    h2 = (basis @ w[:, :, None])[..., 0]
    return w - (h2[:, None, :] @ basis)[:, 0], h + h2


def _unit(w: Tensor) -> Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def _next_direction(w: Tensor, basis: Tensor, fresh: Tensor) -> Tensor:
    """``w`` orthogonalized against ``basis`` and normalized, per row.

    Where ``w`` lies in the span already (breakdown: an invariant subspace was found), a fixed
    vector orthogonalized against the basis takes its place; the projection stays a valid
    Rayleigh-Ritz space.
    """
    scale = w.norm(dim=1)
    w, _ = _orthogonalize(w, basis)
    broken = w.norm(dim=1) <= 1e-10 * scale + torch.finfo(w.dtype).tiny
    if bool(broken.any()):
        alt, _ = _orthogonalize(fresh.expand_as(w).clone(), basis)
        w = torch.where(broken[:, None], alt, w)
    return _unit(w)


def _kept_coordinates(theta: Tensor, vecs: Tensor, k: int, q: int) -> Tensor:
    """Orthonormal real coordinates ``(n, m, q)`` spanning the wanted Ritz vectors, per row.

    Wanted: the ``k`` rightmost and the ``k`` largest-modulus Ritz values, one of each
    conjugate pair; their Ritz vectors' real and imaginary parts are spanned (an SVD of
    the masked coordinates, which depends only on that span, so that a row's result does not
    depend on rounding elsewhere in the batch), at most ``q`` directions. Where the span has
    fewer than ``q`` dimensions, coordinate vectors of the last Krylov directions,
    orthogonalized, fill up.
    """
    n, m = theta.shape
    upper = theta.imag >= -1e-12 * theta.abs().amax(dim=1, keepdim=True)
    low = torch.finfo(theta.real.dtype).min
    wanted = torch.zeros_like(upper)
    for score in (theta.real, theta.abs()):
        idx = torch.where(upper, score, torch.full_like(score, low)).topk(k, dim=1).indices
        wanted.scatter_(1, idx, True)
    mask = wanted[:, None, :].to(vecs.real.dtype)
    parts = torch.cat([vecs.real * mask, vecs.imag * mask], dim=2)  # (n, m, 2m)
    u, sv, _ = torch.linalg.svd(parts, full_matrices=False)
    u, sv = u[:, :, :q], sv[:, :q]
    good = sv > 1e-8 * sv[:, :1]
    cols: list[Tensor] = []
    eye = torch.eye(m, dtype=u.dtype, device=u.device)
    for j in range(q):
        col = u[:, :, j]
        fill = eye[m - 1 - j].expand(n, m)
        for prev in cols * 2:  # Gram-Schmidt twice against the columns kept so far
            fill = fill - (fill * prev).sum(1, keepdim=True) * prev
        fill = fill / fill.norm(dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
        cols.append(torch.where(good[:, j : j + 1], col, fill))
    return torch.stack(cols, dim=2)


def krylov_eigvals(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    krylov_dim: int = 32,
    restarts: int = 2,
    *,
    return_residuals: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Ritz values of ``n`` operators at once by restarted Arnoldi iteration (matrix-free).

    Row ``i`` of ``matvec(V)`` must be ``A_i v_i`` (row-wise operators, as the per-sample
    Jacobians of a row-wise field). Each cycle grows an orthonormal basis (Gram-Schmidt twice)
    of a Krylov space to ``krylov_dim`` vectors and takes the Ritz values of ``A_i`` on it
    (Rayleigh-Ritz: eigenvalues of ``V^T A V``). A restart keeps the Ritz vectors of the
    ``krylov_dim // 8`` rightmost and the ``krylov_dim // 8`` largest-modulus Ritz values
    (real and imaginary parts) plus the residual direction, so the next cycle again spans a
    Krylov space around the wanted part of the spectrum (a thick restart, as Krylov-Schur).
    The Ritz values lie in the numerical range of ``A_i``; the outermost converge first. For
    a normal ``A_i`` the estimated spectral abscissa and radius never exceed the true ones.
    With ``krylov_dim >= d`` the values are the eigenvalues (to rounding). Matrix-vector
    products: ``krylov_dim + restarts * (krylov_dim - 4 (krylov_dim // 8))``.

    Args:
        matvec: ``(n, d) -> (n, d)``, row-wise products ``A_i v_i``.
        start: starting vectors ``(n, d)`` (normalized here), floating point.
        krylov_dim: basis size per cycle, ``>= 2`` (capped at ``d``).
        restarts: extra cycles, ``>= 0``.
        return_residuals: also return the residual norms ``|A_i y - theta y|`` of the unit
            Ritz vectors ``y`` (no extra products): small means converged.

    Returns:
        Complex tensor ``(n, min(krylov_dim, d))`` of Ritz values (and, with
        ``return_residuals``, a real tensor of the same shape).

    Raises:
        ValueError: if ``start`` is not a non-empty 2-D floating-point tensor,
            ``krylov_dim < 2`` or ``restarts < 0``.

    Example::

        >>> import torch
        >>> a = torch.diag(torch.tensor([-3.0, -1.0, 0.5, 2.0]))
        >>> ritz = krylov_eigvals(lambda v: v @ a.T, torch.ones(1, 4), krylov_dim=4)
        >>> round(float(ritz.real.max()), 6), round(float(ritz.abs().max()), 6)
        (2.0, 3.0)
    """
    from ode_reg._checks import check_int

    _check_state(start)
    check_int("krylov_dim", krylov_dim, 2)
    check_int("restarts", restarts, 0)
    n, d = start.shape
    m = min(krylov_dim, d)
    if m == d or m < 3:
        restarts = 0  # the whole space (exact after one cycle), or no room to restart
    k = max(1, m // 8)
    kept = min(4 * k, m - 1)
    fresh = _start_vectors(d, m + 1, start.dtype, start.device)
    vs = start.new_zeros(n, m, d)  # orthonormal basis rows v_j
    avs = start.new_zeros(n, m, d)  # their images A v_j
    vs[:, 0] = _unit(start)
    avs[:, 0] = matvec(vs[:, 0])
    j = 1
    for cycle in range(restarts + 1):
        while j < m:
            vs[:, j] = _next_direction(avs[:, j - 1], vs[:, :j], fresh[j])
            avs[:, j] = matvec(vs[:, j])
            j += 1
        proj = (vs @ avs.mT).double()  # V^T A V: [a, b] = v_a . A v_b
        theta, vecs = torch.linalg.eig(proj)
        if cycle == restarts:
            if not return_residuals:
                return theta
            # |A y - theta y| of each unit Ritz vector y = V s, from the stored products.
            s = vecs.to(torch.promote_types(vs.dtype, torch.complex64))
            ay = s.mT @ avs.to(s.dtype)
            y = s.mT @ vs.to(s.dtype)
            res = (ay - theta.to(s.dtype)[:, :, None] * y).norm(dim=2)
            return theta, res.real.double() / y.norm(dim=2).real.double().clamp_min(1e-300)
        residual = _next_direction(avs[:, m - 1], vs, fresh[m])
        coef = _kept_coordinates(theta, vecs, k, kept).to(vs.dtype)  # (n, m, kept)
        q = coef.shape[2]
        kept_v, kept_av = coef.mT @ vs, coef.mT @ avs
        vs = torch.zeros_like(vs)
        avs = torch.zeros_like(avs)
        vs[:, :q], avs[:, :q] = kept_v, kept_av
        vs[:, q] = residual
        avs[:, q] = matvec(residual)
        j = q + 1
    raise AssertionError("unreachable")  # pragma: no cover


def jacobian_ritz_values(
    func: Callable[[Tensor, Tensor], Tensor],
    t: float | Tensor,
    z: Tensor,
    rows: Sequence[int] | None = None,
    *,
    krylov_dim: int = 32,
    restarts: int = 2,
) -> Tensor:
    """Matrix-free estimates of the eigenvalues of per-sample Jacobians (Arnoldi on VJPs).

    The eigenvalues of ``J_i`` are those of ``J_i^T``, and the rows of one vector-Jacobian
    product ``v^T df/dz`` of a row-wise field on the whole batch are ``J_i^T v_i``: the field
    is evaluated once, and each Arnoldi step is one ``torch.autograd.grad`` through that
    graph, for all sampled rows together. Cost: one backward pass of the field on the batch
    per product, ``krylov_dim + restarts * (krylov_dim - 4 (krylov_dim // 8))`` of them (64
    with the defaults), instead of ``d`` backward passes and a dense
    ``O(d^3)`` eigendecomposition per sample (:func:`jacobian_eigvals`). Accuracy: see
    :func:`krylov_eigvals` (extreme Ritz values; for a normal Jacobian the estimated abscissa
    and radius are lower bounds that converge to the true values).

    Args:
        func: vector field ``f(t, z)`` acting row-wise on ``z`` (see :func:`jacobian`).
        t: the time, a number or 0-d tensor.
        z: states, shape ``(B, d)``.
        rows: the samples whose Jacobians are estimated (default all).
        krylov_dim: Arnoldi steps per cycle, ``>= 1``.
        restarts: extra Arnoldi cycles, ``>= 0``.

    Returns:
        Complex tensor ``(len(rows), min(krylov_dim, d))`` of Ritz values.

    Raises:
        ValueError: as :func:`jacobian`, or if a row is outside ``[0, B)``, ``krylov_dim < 1``
            or ``restarts < 0``.

    Example::

        >>> import torch
        >>> m = torch.tensor([[0.0, 2.0], [-2.0, -1.0]])
        >>> ritz = jacobian_ritz_values(lambda t, z: z @ m.T, 0.0, torch.randn(3, 2))
        >>> round(float(ritz.real.max()), 6)  # eigenvalues -0.5 +- i sqrt(15)/2
        -0.5
    """
    _check_state(z)
    tt = _as_time(t, z)
    b, d = z.shape
    idx = list(range(b)) if rows is None else [int(r) for r in rows]
    if not idx or any(r < 0 or r >= b for r in idx):
        raise ValueError(f"`rows` must be indices in [0, {b}), got {list(rows or [])}")
    index = torch.tensor(idx, device=z.device)
    with torch.enable_grad():
        x = z.detach().requires_grad_(True)
        out = func(tt, x)
        if not isinstance(out, Tensor) or out.shape != z.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"`func` must map z of shape {tuple(z.shape)} to the same shape, got {shape}"
            )

        def matvec(v: Tensor) -> Tensor:
            grad_out = torch.zeros_like(out)
            grad_out[index] = v.to(out.dtype)
            (g,) = torch.autograd.grad(out, x, grad_out, retain_graph=True)
            return g[index].detach()

        start = _start_vectors(d, 1, z.dtype, z.device).expand(len(idx), d)
        return krylov_eigvals(matvec, start, krylov_dim=krylov_dim, restarts=restarts)
