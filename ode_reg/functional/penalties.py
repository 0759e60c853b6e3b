"""The penalties of MATH.md (the note's five and RNODE's two), as functions of tensors.

The note's are dimensionless (unchanged when the loss is scaled), zero exactly when their
property holds, and guarded against zero norms with ``eps``; RNODE's (kinetic energy, Jacobian
Frobenius norm) are integrals over time with units, zero exactly for ``f = 0``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ode_reg._checks import check_gamma, check_int, check_range, check_square
from ode_reg._once import say_once


def _log_norm(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    # 0.5 * log(|x|^2 + eps): smooth at x = 0, equal to log|x| for |x|^2 >> eps.
    return 0.5 * torch.log(x.pow(2).sum(dim=dims) + eps)


def _log_ratio_mse(logn: Tensor, ref: int) -> Tensor:
    """``mean_{k != ref} (logn_k - logn_ref)^2`` over dim 0 (and the rest): the magnitude terms'
    common form."""
    diff = logn - logn[ref]
    keep = torch.ones(logn.shape[0], dtype=torch.bool, device=logn.device)
    keep[ref] = False
    return diff[keep].pow(2).mean()


def _check_reference(reference: int, n: int) -> int:
    if isinstance(reference, bool) or not isinstance(reference, int) or not -n <= reference < n:
        raise ValueError(f"`reference` must be an integer in [{-n}, {n - 1}], got {reference!r}")
    return reference % n


def _check_stack(name: str, x: Tensor, min_dim: int) -> None:
    if not isinstance(x, Tensor) or x.dim() < min_dim or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"`{name}` must be a tensor of at least {min_dim} dims with K + 1 >= 2 checkpoints "
            f"along dim 0, got {shape}"
        )


def adjoint_magnitude_penalty(adjoints: Tensor, reference: int = -1, eps: float = 1e-20) -> Tensor:
    """``R_adj = mean_{k != ref, i} (log|a_{k,i}| - log|a_{ref,i}|)^2`` (constant adjoint norm).

    Per sample, so a batch split over DDP ranks needs no communication.

    Args:
        adjoints: ``(K + 1, B, ...)`` adjoints; dimension 1 is the batch.
        reference: checkpoint index of the reference adjoint (default the final time).
        eps: added to the squared norms relative to each sample's reference norm before the
            log (``log(|a_k,i|^2 / |a_ref,i|^2 + eps)``): scale-free, whatever the loss weighs
            the sample.

    Returns:
        Scalar tensor ``>= 0``.

    Raises:
        ValueError: on fewer than 2 checkpoints, a reference out of range or ``eps <= 0``.

    Example::

        >>> import torch
        >>> a = torch.randn(1, 5, 3).expand(4, 5, 3)  # same adjoint at every checkpoint
        >>> float(adjoint_magnitude_penalty(a))
        0.0
    """
    _check_stack("adjoints", adjoints, 2)
    check_range("eps", eps, 0.0, low_open=True)
    ref = _check_reference(reference, adjoints.shape[0])
    dims = tuple(range(2, adjoints.dim()))
    sq = adjoints.pow(2).sum(dim=dims) if dims else adjoints.pow(2)
    # Each sample relative to its own reference norm (a constant: the ratios are unchanged),
    # so that eps guards relative to the sample's scale, whatever the loss weighs it.
    scale = sq[ref].detach().clamp_min(torch.finfo(sq.dtype).tiny)
    return _log_ratio_mse(0.5 * torch.log(sq / scale + eps), ref)


def sensitivity_magnitude_penalty(sens: Tensor, reference: int = -1, eps: float = 1e-20) -> Tensor:
    """``R_sens = mean_{k != ref} (log|y_k| - log|y_ref|)^2`` (constant sensitivity norm).

    Args:
        sens: ``(K + 1, P)`` sensitivity densities (under DDP: all-reduced mean of the ranks').
        reference: checkpoint index of the reference (default the final time).
        eps: added to squared norms before the log.

    Returns:
        Scalar tensor ``>= 0``.

    Raises:
        ValueError: on fewer than 2 checkpoints, a reference out of range or ``eps <= 0``.

    Example::

        >>> import torch
        >>> y = torch.tensor([[3.0, 4.0], [0.0, 5.0], [5.0, 0.0]])  # all of norm 5
        >>> float(sensitivity_magnitude_penalty(y))
        0.0
    """
    _check_stack("sens", sens, 2)
    check_range("eps", eps, 0.0, low_open=True)
    ref = _check_reference(reference, sens.shape[0])
    return _log_ratio_mse(_log_norm(sens.flatten(1), (1,), eps), ref)


def directional_penalty(
    sens: Tensor, gamma: float = 0.0, reference: int = -1, eps: float = 1e-20
) -> Tensor:
    """``R_dir = mean_k relu(gamma - y_k . y_* / |y_*|^2)^2`` (the note's eqs. 31-32).

    Zero when ``y_k^T y_* >= gamma |y_*|^2`` at every checkpoint.

    Args:
        sens: ``(K + 1, P)`` sensitivity densities.
        gamma: the constraint level in ``[-1, 1]``.
        reference: checkpoint index ``k*`` of the reference direction (default the final time).
        eps: added to ``|y_*|^2``.

    Returns:
        Scalar tensor ``>= 0``.

    Raises:
        ValueError: if ``gamma`` is outside ``[-1, 1]``, the reference is out of range, or
            ``eps <= 0``.

    Example::

        >>> import torch
        >>> y = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])  # y_1 opposes y_*
        >>> float(directional_penalty(y, gamma=0.0))
        0.3333333432674408
    """
    check_gamma(gamma)
    _check_stack("sens", sens, 2)
    check_range("eps", eps, 0.0, low_open=True)
    ref = _check_reference(reference, sens.shape[0])
    flat = sens.flatten(1)
    star = flat[ref]
    proj = flat @ star / (star.pow(2).sum() + eps)
    return torch.relu(gamma - proj).pow(2).mean()


def spectral_penalty(weights: Tensor, gamma: float = 0.0, reference: int = -1) -> Tensor:
    """``R_spec = mean_k sum_i relu(gamma - lambda_i((Q_k + Q_k^T)/2))^2``, ``Q_k = W_k^T W_*``.

    For orthogonal ``W_k`` the eigenvalues of the symmetric part are the real parts of the
    eigenvalues of ``Q_k`` (eqs. 33-34); ``eigvalsh`` keeps this stable and differentiable.

    Args:
        weights: ``(K + 1, n, n)`` matrices ``W_k`` (orthogonal for the spectral reading).
        gamma: the level in ``[-1, 1]`` that every ``Re lambda(Q_k)`` should reach.
        reference: checkpoint index of ``W_*`` (default the final time).

    Returns:
        Scalar tensor ``>= 0``.

    Raises:
        ValueError: if ``weights`` is not a stack of square matrices, ``gamma`` is outside
            ``[-1, 1]`` or the reference is out of range.

    Example::

        >>> import torch
        >>> w = torch.eye(3).expand(4, 3, 3)  # Q_k = I, eigenvalues 1 >= gamma
        >>> float(spectral_penalty(w, gamma=0.5))
        0.0
    """
    check_gamma(gamma)
    _check_stack("weights", weights, 3)
    check_square("weights", weights)
    ref = _check_reference(reference, weights.shape[0])
    q = weights.mT @ weights[ref]
    lam = torch.linalg.eigvalsh(0.5 * (q + q.mT))
    return torch.relu(gamma - lam).pow(2).sum(-1).mean()


def skew_jacobian_penalty(
    func: Callable[[Tensor, Tensor], Tensor],
    times: Tensor,
    states: Tensor,
    probes: int = 1,
    generator: torch.Generator | None = None,
    span: float | None = None,
) -> Tensor:
    """``R_skew = (t_K - t_0)^2 E_v |1/2 (J + J^T) v|^2 / d`` with ``J = df/dz`` (Hutchinson).

    MATH.md's normalised term, the value :class:`~ode_reg.SkewJacobianPenalty` adds:
    ``d/dt |a|^2 = -a (J + J^T) a^T``, so a Jacobian with zero symmetric part keeps every
    adjoint's norm constant; the factor ``(t_K - t_0)^2 / d`` makes the term dimensionless
    (for ``f = M z`` it equals ``(t_K - t_0)^2 |sym M|_F^2 / d``, the mean squared log-growth
    rate of the adjoint over the horizon). One Jacobian-vector and one vector-Jacobian product
    per probe, Rademacher ``v``; the field must act on each sample independently (row ``i`` of
    ``f`` depends only on row ``i`` of ``z``). The estimate is averaged over samples,
    checkpoints and probes, and is unbiased.

    Args:
        func: vector field ``f(t, z)``.
        times: ``(K + 1,)`` times of the states.
        states: ``(K + 1, B, ...)`` states (keep them attached to differentiate through them);
            ``d`` is the size of one sample's state, ``states[0, 0].numel()``.
        probes: number of Rademacher probes, ``>= 1``.
        generator: random generator for the probes.
        span: the horizon ``t_K - t_0`` (``>= 0``); ``None``: ``|times[-1] - times[0]|``.

    Returns:
        Scalar tensor ``>= 0``, differentiable in the field's parameters.

    Raises:
        ValueError: if ``probes < 1``, ``span < 0`` or ``times`` and ``states`` disagree in
            length.

    Example::

        >>> import torch
        >>> m = torch.diag(torch.tensor([1.0, -2.0]))  # symmetric: |sym M|_F^2 = 5
        >>> z = torch.randn(3, 4, 2)
        >>> float(skew_jacobian_penalty(lambda t, z: z @ m.T, torch.tensor([0.0, 1.0, 2.0]), z))
        10.0
    """
    check_int("probes", probes, 1)
    if not isinstance(states, Tensor) or states.dim() < 2:
        raise ValueError("`states` must be a tensor (K + 1, B, ...)")
    if times.numel() != states.shape[0]:
        raise ValueError(
            f"`times` must have one entry per checkpoint state ({states.shape[0]}), got {times.numel()}"
        )
    if span is None:
        span = float((times[-1] - times[0]).abs())
    check_range("span", span, 0.0)
    vs = rademacher_probes(states.unbind(0), probes, generator)
    with torch.enable_grad():
        zs = states if states.requires_grad else states.detach().requires_grad_(True)
        out = evaluate_stacked(
            lambda t, z, _values: func(t, z),
            times,
            zs,
            fallback=lambda k, z: func(times[k], z),
            name=getattr(func, "__qualname__", type(func).__name__),
        )
        estimates = skew_hutchinson(out, zs, vs)
    return span**2 * estimates.mean()


def rademacher_probes(
    states: Sequence[Tensor], probes: int, generator: torch.Generator | None
) -> Tensor:
    """Rademacher probes ``(len(states), probes, *state.shape)``, drawn state by state, probe by
    probe (the order of the loop that :func:`skew_jacobian_penalty` was first written as)."""
    bits = [
        torch.randint(0, 2, z.shape, generator=generator, device=z.device)
        for z in states
        for _ in range(probes)
    ]
    vs = torch.stack(bits).to(states[0].dtype).mul_(2).sub_(1)
    return vs.reshape(len(states), probes, *states[0].shape)


def skew_hutchinson(out: Tensor, states: Tensor, vs: Tensor, mask: Tensor | None = None) -> Tensor:
    """The Hutchinson estimate of ``|sym J|_F^2 / d`` at each of ``n`` states: the one
    implementation of ``R_skew``'s estimator (MATH.md, regularizer 5).

    Per state ``k``: ``(1 / P) sum_p |m * S v_{k,p}|^2 / c`` with ``S = 1/2 (J + J^T)``,
    ``J = d out_k / d z_k`` (block diagonal over samples for a field that acts on each sample
    independently), ``m`` the ``mask`` (``None``: every coordinate) and ``c`` the number of
    coordinates it keeps in one state (``B d``: the sum over samples of ``|S_i v_i|^2 / d``
    divided by ``B``, i.e. the batch mean of ``|S_i v_i|^2 / d``). ``J^T v`` is a
    vector-Jacobian product with the cotangent ``u = v`` held as a leaf, and ``J v`` the VJP of
    the linear map ``u -> J^T u`` in ``u`` (double VJP): two backward calls per probe for all
    ``n`` states together; unbiased since ``E[v v^T] = I``.

    Args:
        out: ``(n, ...)`` the field at the states, a function of ``states`` (one evaluation of
            all of them: :func:`evaluate_stacked`).
        states: ``(n, ...)`` the states ``out`` was evaluated at (requires grad).
        vs: ``(n, P, ...)`` probes (:func:`rademacher_probes`; masked or not).
        mask: ``(...)`` or broadcastable 0/1 weights of the coordinates to keep.

    Returns:
        ``(n,)`` per-state estimates, differentiable in what ``out`` depends on.
    """
    n, probes = vs.shape[0], vs.shape[1]
    count = states[0].numel() if mask is None else float(mask.expand_as(states[0]).sum())
    if not out.requires_grad:
        return out.new_zeros(n)
    total = out.new_zeros(n)
    for p in range(probes):
        v = vs[:, p]
        # u = v as a leaf: J^T u is J^T v, and (J^T u linear in u) its VJP in u with v is J v.
        u = v.detach().clone().requires_grad_(True)
        (jtv,) = torch.autograd.grad(out, states, u, create_graph=True, retain_graph=True)
        (jv,) = torch.autograd.grad(jtv, u, v, create_graph=True, retain_graph=True)
        sv = 0.5 * (jv + jtv)
        if mask is not None:
            sv = sv * mask
        total = total + sv.pow(2).flatten(1).sum(1)
    return total / (probes * count)


#: What ``torch.func`` raises on a field it cannot trace (data-dependent control flow,
#: ``.item()``, an ``autograd.grad`` inside the field, an operator without a batching rule).
UNTRACEABLE = (RuntimeError, NotImplementedError)

#: Fields whose stacked (``vmap``) evaluation failed once: evaluated checkpoint by checkpoint
#: from then on, without trying again (weak keys: a field that goes away is forgotten).
_UNSTACKABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def known_unstackable(key: object) -> bool:
    """Whether the stacked evaluation of the field ``key`` failed before (``None``: never)."""
    try:
        return key is not None and _UNSTACKABLE.get(key, False)
    except TypeError:  # not weak-referenceable: never remembered
        return False


def mark_unstackable(key: object, name: str, err: BaseException) -> None:
    """Remember that the stacked evaluation of ``key`` failed (not tried again while the field
    lives) and say so once (:func:`announce_unstackable`)."""
    if key is not None:
        try:
            _UNSTACKABLE[key] = True
        except TypeError:  # not weak-referenceable: try again next time
            pass
    announce_unstackable(name, err)


def announce_fallback(name: str, err: BaseException, transform: str, instead: str) -> None:
    """Say once per field name and transform that ``transform`` failed on the field and what is
    done instead, with the cost (one line)."""
    text = str(err).strip()
    first = text.splitlines()[0][:160] if text else ""
    say_once(
        f"ode_reg: {transform} cannot trace the field {name} ({type(err).__name__}: {first}); "
        f"{instead}",
        key=f"{transform}:{name}",
    )


def announce_unstackable(name: str, err: BaseException) -> None:
    """:func:`announce_fallback` for the stacked evaluation at all checkpoints (``vmap``)."""
    announce_fallback(
        name,
        err,
        "torch.func.vmap",
        "the field is evaluated one checkpoint at a time instead of at all checkpoints in one "
        "call (same values; one field call and one backward node per checkpoint: slower for "
        "many checkpoints)",
    )


def evaluate_stacked(
    evaluate: Callable[[Tensor, Tensor, Sequence[Tensor]], Tensor],
    times: Tensor,
    states: Tensor,
    values: Sequence[Tensor] = (),
    *,
    fallback: Callable[[int, Tensor], Tensor],
    name: str,
    key: object = None,
) -> Tensor:
    """The field at ``n`` states in one ``torch.func.vmap`` call over (time, state, values),
    as one autograd tensor ``(n, ...)`` of ``states`` (and of everything the field reads).

    A field that ``vmap`` cannot trace (data-dependent control flow, ``.item()``, an
    ``autograd.grad`` inside the field such as a CNF's divergence) raises ``RuntimeError`` or
    ``NotImplementedError`` in ``vmap``: it is then evaluated one state at a time with
    ``fallback(k, states[k])`` (same values; one call per state instead of one in all), said
    once per field name with that cost, and (when ``key`` is given: the field object) not
    tried in ``vmap`` again. An error of the field itself is raised again by the fallback.
    """
    if not known_unstackable(key):
        try:
            return torch.func.vmap(lambda t, z, *vals: evaluate(t, z, vals))(times, states, *values)
        except UNTRACEABLE as err:
            mark_unstackable(key, name, err)
    return torch.stack([fallback(k, states[k]) for k in range(states.shape[0])])


# --------------------------------------------------------------------------- RNODE's terms
def time_integral(times: Tensor, rows: Tensor) -> Tensor:
    """``int rows dt`` over the checkpoint times by the trapezoid rule (``torch.trapezoid``
    along dim 0), in the length of time (a solve backwards in time integrates over
    ``|t - t_0|``, so a non-negative integrand gives a non-negative integral)."""
    span = (times - times[0]).abs().to(rows.dtype)
    return torch.trapezoid(rows, span, dim=0)


def field_norm_rows(
    out: Tensor,
    z: Tensor,
    index: Tensor,
    dims: int | None = None,
    probes: Tensor | None = None,
) -> Tensor:
    """Per-sample ``|f_i|^2`` (``probes is None``) or the Hutchinson estimate
    ``mean_p |J_i^T v_{p,i}|^2`` of ``|J_i|_F^2``, ``J_i = df_i/dz_i``, at one state.

    ``E_v |J^T v|^2 = tr(J J^T) = |J|_F^2`` for probes with ``E[v v^T] = I`` (Rademacher): one
    vector-Jacobian product per probe. The field must act on each sample independently (the
    batch Jacobian is block diagonal), as for the skew-Jacobian term.

    Args:
        out: ``f(t, z)``, shaped like ``z``.
        z: the state (requires grad for the Frobenius estimate).
        index: ``(B, d)`` positions of each sample's coordinates in ``z.reshape(-1)``.
        dims: read only each sample's first ``dims`` coordinates (``None``: all of them); the
            Frobenius estimate is then that of the block ``df_{:dims}/dz_{:dims}``.
        probes: ``(P, *z.shape)`` probes, or ``None`` for ``|f|^2``.

    Returns:
        ``(B,)`` per-sample values.
    """
    sel = index if dims is None else index[:, :dims]
    if probes is None:
        return out.reshape(-1)[sel].pow(2).sum(-1)
    rows = out.new_zeros(sel.shape[0])
    if not out.requires_grad:
        return rows
    mask = torch.zeros(z.numel(), dtype=out.dtype, device=out.device)
    mask[sel.reshape(-1)] = 1.0
    for v in probes:
        cot = (v.reshape(-1) * mask).reshape(out.shape)
        (g,) = torch.autograd.grad(
            out, z, cot, create_graph=True, retain_graph=True, allow_unused=True
        )
        if g is not None:
            rows = rows + g.reshape(-1)[sel].pow(2).sum(-1)
    return rows / probes.shape[0]


def _per_sample_index(state: Tensor) -> Tensor:
    """``(B, d)`` positions of each sample's coordinates in a ``(B, ...)`` state (dim 0 is the
    batch, as in the functional forms' ``(K + 1, B, ...)`` stacks)."""
    idx = torch.arange(state.numel(), device=state.device)
    return idx.reshape(state.shape[0], -1)


def _check_path(times: Tensor, states: Tensor, name: str) -> None:
    if not isinstance(states, Tensor) or states.dim() < 2 or states.shape[0] < 2:
        shape = tuple(states.shape) if isinstance(states, Tensor) else type(states).__name__
        raise ValueError(
            f"`{name}` must be a tensor (K + 1, B, ...) with K + 1 >= 2 checkpoints, got {shape}"
        )
    if not isinstance(times, Tensor) or times.dim() != 1 or times.numel() != states.shape[0]:
        got = tuple(times.shape) if isinstance(times, Tensor) else type(times).__name__
        raise ValueError(
            f"`times` must be a 1-D tensor with one entry per checkpoint ({states.shape[0]}), "
            f"got {got}"
        )


def kinetic_energy_penalty(times: Tensor, velocities: Tensor) -> Tensor:
    """``R_K = mean_i int |f(t, z_i(t))|^2 dt`` (RNODE's kinetic energy, MATH.md).

    Per sample, the squared Euclidean norm of the field (summed over the sample's coordinates,
    no factor 1/2), integrated over the checkpoint times by the trapezoid rule; then the batch
    mean. Per sample, so a batch split over DDP ranks needs no communication.

    Args:
        times: ``(K + 1,)`` checkpoint times (increasing or decreasing).
        velocities: ``(K + 1, B, ...)`` the field ``f(t_k, z_k)`` at the checkpoints.

    Returns:
        Scalar tensor ``>= 0``.

    Raises:
        ValueError: on fewer than 2 checkpoints or ``times`` of the wrong length.

    Example::

        >>> import torch
        >>> t = torch.linspace(0.0, 2.0, 5)
        >>> f = torch.ones(5, 3, 4)  # |f|^2 = 4 for every sample, over a time of 2
        >>> float(kinetic_energy_penalty(t, f))
        8.0
    """
    _check_path(times, velocities, "velocities")
    index = _per_sample_index(velocities[0])
    rows = torch.stack([field_norm_rows(v, v, index) for v in velocities.unbind(0)])
    return time_integral(times, rows).mean()


def jacobian_frobenius_penalty(
    func: Callable[[Tensor, Tensor], Tensor],
    times: Tensor,
    states: Tensor,
    probes: int = 1,
    generator: torch.Generator | None = None,
    probe_vectors: Tensor | None = None,
) -> Tensor:
    """``R_F = mean_i int |df/dz(t, z_i(t))|_F^2 dt`` by Hutchinson (RNODE's Jacobian term).

    At each checkpoint, ``|J_i|_F^2`` is estimated by ``mean_p |J_i^T v_p|^2`` with Rademacher
    ``v`` (the probes of the skew-Jacobian term, :func:`rademacher_probes`), unbiased; then the
    trapezoid rule over the checkpoint times, and the batch mean. The field must act on each
    sample independently.

    Args:
        func: vector field ``f(t, z)``.
        times: ``(K + 1,)`` checkpoint times.
        states: ``(K + 1, B, ...)`` states (keep them attached to differentiate through them).
        probes: Rademacher probes per state, ``>= 1``.
        generator: random generator for the probes.
        probe_vectors: ``(K + 1, P, B, ...)`` given probes instead of drawn ones (any
            ``E[v v^T] = I`` family; all ``2^d`` sign vectors give the exact value).

    Returns:
        Scalar tensor ``>= 0``, differentiable in the field's parameters and the states.

    Raises:
        ValueError: if ``probes < 1``, on fewer than 2 checkpoints, ``times`` of the wrong
            length or ``probe_vectors`` of the wrong shape.

    Example::

        >>> import torch
        >>> m = torch.tensor([[0.0, 2.0], [-2.0, 0.0]])  # |M^T v|^2 = 8 for every sign vector v
        >>> f = lambda t, z: z @ m.T
        >>> float(jacobian_frobenius_penalty(f, torch.tensor([0.0, 0.5, 1.0]), torch.randn(3, 4, 2)))
        8.0
    """
    check_int("probes", probes, 1)
    _check_path(times, states, "states")
    if probe_vectors is None:
        vs = rademacher_probes(states.unbind(0), probes, generator)
    else:
        if (
            not isinstance(probe_vectors, Tensor)
            or probe_vectors.dim() != states.dim() + 1
            or probe_vectors.shape[0] != states.shape[0]
            or probe_vectors.shape[2:] != states.shape[1:]
        ):
            got = (
                tuple(probe_vectors.shape)
                if isinstance(probe_vectors, Tensor)
                else type(probe_vectors).__name__
            )
            raise ValueError(
                f"`probe_vectors` must have shape (K + 1, P, *state.shape) = "
                f"({states.shape[0]}, P, {', '.join(map(str, states.shape[1:]))}), got {got}"
            )
        vs = probe_vectors.to(states.dtype)
    index = _per_sample_index(states[0])
    rows = []
    with torch.enable_grad():
        for k in range(states.shape[0]):
            z = states[k]
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            rows.append(field_norm_rows(func(times[k], z), z, index, None, vs[k]))
    return time_integral(times, torch.stack(rows)).mean()
