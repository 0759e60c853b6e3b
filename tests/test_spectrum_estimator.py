"""The matrix-free spectrum estimate (restarted Arnoldi) against closed-form spectra.

Test matrices are built with a known spectrum: a normal one ``Q blockdiag([[a, b], [-b, a]]) Q^T``
(eigenvalues ``a +- i b`` filling half an ellipse, no gap at the extremes: the hard case for
Krylov methods) and a non-normal one ``Q T Q^T`` with ``T`` upper triangular (eigenvalues its
diagonal). Dense ``torch.linalg.eigvals`` confirms each closed form. Accuracy measured with the
monitor's defaults (``krylov_dim=32, restarts=2``, 64 products) at d = 200 over ten start
vectors: normal (abscissa 0.30, radius 2.39), abscissa 0.011-0.035 and radius 0.007-0.062 too
low (at most 1.5 % and 2.6 % of the radius; never above the truth); non-normal (abscissa 0.50,
radius 1.98), abscissa 0.008-0.033 too high, radius within -0.0001..+0.0075. One cycle of the
same basis (no restart) is off by up to 0.150 (normal abscissa). A separated outlier is found
to 1e-8. With ``krylov_dim >= d`` the values are the eigenvalues.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from ode_reg.functional.spectra import (
    jacobian_eigvals,
    jacobian_ritz_values,
    krylov_eigvals,
    spectral_abscissa,
    spectral_radius,
)

F64 = torch.float64
D = 200


def orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q


def normal_matrix(d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``-1 + 1.3 cos(theta) +- 2i sin(theta)``, theta uniform in [0, pi]."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(d // 2, generator=g, dtype=F64) * math.pi
    a, b = -1.0 + 1.3 * torch.cos(theta), 2.0 * torch.sin(theta)
    blocks = torch.zeros(d, d, dtype=F64)
    for i in range(d // 2):
        blocks[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor([[a[i], b[i]], [-b[i], a[i]]])
    q = orthogonal(d, g)
    return q @ blocks @ q.T, torch.complex(torch.cat([a, a]), torch.cat([b, -b]))


def nonnormal_matrix(d: int = D, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q T Q^T``, ``T`` upper triangular with diagonal uniform in [-2, 0.5]."""
    g = torch.Generator().manual_seed(seed)
    diag = -2.0 + 2.5 * torch.rand(d, generator=g, dtype=F64)
    t = torch.triu(torch.randn(d, d, generator=g, dtype=F64), 1) / math.sqrt(d) + torch.diag(diag)
    q = orthogonal(d, g)
    return q @ t @ q.T, diag.to(torch.complex128)


def estimate(a: torch.Tensor, seed: int = 5, **kw) -> torch.Tensor:
    start = torch.randn(1, a.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64)
    return krylov_eigvals(lambda v: v @ a.T, start, **kw)[0]


@pytest.mark.parametrize(
    ("build", "tol_abscissa", "tol_radius", "normal"),
    [(normal_matrix, 0.05, 0.08, True), (nonnormal_matrix, 0.05, 0.01, False)],
)
def test_estimate_against_closed_form_spectrum(build, tol_abscissa, tol_radius, normal):
    a, eig = build()
    dense = torch.linalg.eigvals(a)
    true_abscissa, true_radius = float(eig.real.max()), float(eig.abs().max())
    # the closed form is right (dense eigenvalues agree)
    assert float(dense.real.max()) == pytest.approx(true_abscissa, abs=1e-8)
    assert float(dense.abs().max()) == pytest.approx(true_radius, abs=1e-8)
    errors, single_errors = [], []
    for seed in range(5):  # five start vectors
        ritz = estimate(a, seed)  # the monitor's defaults: krylov_dim=32, restarts=2
        assert ritz.shape == (32,)
        abscissa, radius = float(spectral_abscissa(ritz)), float(spectral_radius(ritz))
        errors.append((abscissa - true_abscissa, radius - true_radius))
        single_errors.append(float(estimate(a, seed, restarts=0).real.max()) - true_abscissa)
        if normal:  # Ritz values lie in the convex hull of the spectrum
            assert abscissa <= true_abscissa + 1e-10 and radius <= true_radius + 1e-10
    err = torch.tensor(errors).abs()
    assert float(err[:, 0].max()) < tol_abscissa, errors
    assert float(err[:, 1].max()) < tol_radius, errors
    assert float(err[:, 1].max()) < 0.04 * true_radius  # within 4 % of the radius
    if normal:  # the thick restarts improve on one cycle of the same basis size
        assert float(err[:, 0].mean()) < torch.tensor(single_errors).abs().mean()


def test_separated_outlier_converges_to_rounding():
    _, eig = normal_matrix()
    lam = eig[: D // 2].clone()
    lam[0] = 1.5 + 0.5j  # an unstable mode outside the bulk: eigenvalues 1.5 +- 0.5i
    blocks = torch.zeros(D, D, dtype=F64)
    for i in range(D // 2):
        x, y = float(lam[i].real), float(lam[i].imag)
        blocks[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor([[x, y], [-y, x]])
    q = orthogonal(D, torch.Generator().manual_seed(4))
    ritz = estimate(q @ blocks @ q.T)
    assert float(ritz.real.max()) == pytest.approx(1.5, abs=1e-8)
    # the Ritz value found is the eigenvalue itself (and its conjugate)
    near = ritz[(ritz - (1.5 + 0.5j)).abs() < 1e-6]
    assert near.numel() == 1 and abs(complex(near[0]) - (1.5 + 0.5j)) < 1e-8


@pytest.mark.parametrize("build", [normal_matrix, nonnormal_matrix])
def test_full_krylov_space_is_exact(build):
    a, eig = build(d=12)
    ritz, residuals = krylov_eigvals(
        lambda v: v @ a.T, torch.ones(1, 12, dtype=F64), krylov_dim=40, return_residuals=True
    )
    assert ritz.shape == (1, 12)
    got = torch.sort(ritz[0].real * 1e3 + ritz[0].imag).values
    want = torch.sort(eig.real * 1e3 + eig.imag).values
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert float(residuals.max()) < 1e-9


def test_rows_are_independent_operators():
    """Each row is its own operator; its estimate does not depend on the other rows (so a
    sample gets the same figure in one process and on a DDP rank)."""
    mats = [normal_matrix(d=40, seed=s)[0] for s in range(3)]
    start = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), dtype=F64)

    def batched(v: torch.Tensor) -> torch.Tensor:
        return torch.stack([v[i] @ mats[i].T for i in range(3)])

    together = krylov_eigvals(batched, start, krylov_dim=16)
    for i in range(3):
        alone = krylov_eigvals(lambda v, i=i: v @ mats[i].T, start[i : i + 1], krylov_dim=16)
        for key in (torch.real, torch.abs):  # the same values (their order may differ)
            torch.testing.assert_close(
                key(together[i]).sort().values, key(alone[0]).sort().values, rtol=0, atol=1e-9
            )


def test_jacobian_ritz_values_of_a_row_wise_field_match_dense():
    """Per-sample Jacobians of a nonlinear field with a per-sample held input."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 6, generator=g, dtype=F64)
    u = torch.randn(5, 6, generator=g, dtype=F64)  # one held input per sample

    def field(t, z):
        return torch.tanh(z @ w.T + u[: z.shape[0]])

    z = torch.randn(5, 6, generator=g, dtype=F64)
    dense = jacobian_eigvals(field, 0.0, z)[[1, 4]]
    ritz = jacobian_ritz_values(field, 0.0, z, rows=[1, 4], krylov_dim=6)
    torch.testing.assert_close(spectral_abscissa(ritz), spectral_abscissa(dense), rtol=1e-9, atol=0)
    torch.testing.assert_close(spectral_radius(ritz), spectral_radius(dense), rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    ("call", "argname"),
    [
        (lambda: krylov_eigvals(lambda v: v, torch.ones(1, 3), krylov_dim=1), "krylov_dim"),
        (lambda: krylov_eigvals(lambda v: v, torch.ones(1, 3), restarts=-1), "restarts"),
        (lambda: krylov_eigvals(lambda v: v, torch.ones(3)), "z"),
        (lambda: jacobian_ritz_values(lambda t, z: z, 0.0, torch.ones(2, 3), rows=[2]), "rows"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(call, argname):
    with pytest.raises(ValueError, match=f"`{argname}`"):
        call()


# --------------------------------------------------------------------------- in the monitor


class TimeField(torch.nn.Module):
    """``tanh(z W^T + t b)``: the field differs between checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = torch.nn.Parameter(torch.randn(3, 3, generator=g, dtype=F64))
        self.b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=F64))

    def forward(self, t, z):
        return torch.tanh(z @ self.w.T + t * self.b)


@pytest.mark.parametrize(
    ("field", "input_dim", "alone", "same"),
    [
        ("tanh", None, True, True),  # rows alone, one Arnoldi run for all checkpoints
        ("time", None, True, False),  # rows alone, one run per checkpoint
        ("held", 2, False, False),  # a per-sample held input: the whole batch
    ],
)
def test_monitor_krylov_paths_match_dense(field, input_dim, alone, same):
    from test_callbacks import Model, TanhField, fit, metric

    from ode_reg.callbacks import SpectrumMonitor
    from ode_reg.callbacks.spectrum import _flat_field, _rows_alone, _same_field
    from ode_reg.dynamics import AntisymmetricODEFunc

    def make():
        torch.manual_seed(0)
        f = {
            "tanh": TanhField,
            "time": TimeField,
            "held": lambda: AntisymmetricODEFunc(3, gamma=0.1, input_dim=2).double(),
        }[field]()
        return Model(f, input_dim=input_dim)

    class Keep(Callback):
        """The step's chain before the module releases the record (which drops the field)."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.chain = pl_module.ode_step.groups[0]

    logged = {}
    keep = Keep()
    for method in ("dense", "krylov"):
        mon = SpectrumMonitor(every_n_steps=1, num_samples=2, method=method, krylov_dim=3)
        model = make()
        trainer = fit(model, [mon, keep])
        logged[method] = [
            metric(trainer, k)
            for k in ("spectrum/abscissa", "spectrum/abscissa_mean", "spectrum/radius")
        ]
        assert mon.last_methods == [method]
    assert logged["krylov"] == pytest.approx(logged["dense"], rel=1e-9, abs=1e-12)
    chain = keep.chain
    parts = []
    for k in (0, chain.num_checkpoints - 1):
        flat, f = _flat_field(chain, k)
        assert _rows_alone(f, chain.times[k], flat, [0, 7]) is alone
        parts.append((f, chain.times[k], flat[[0, 7]], None))
    if alone:
        assert _same_field(parts) is same
