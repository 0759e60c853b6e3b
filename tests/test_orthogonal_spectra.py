"""Tests of ode_reg.functional.orthogonal and ode_reg.functional.spectra."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ode_reg.dynamics import AntisymmetricODEFunc
from ode_reg.functional.orthogonal import (
    cayley,
    expm_orthogonal,
    orthogonality_defect,
    scaled_cayley,
    skew,
)
from ode_reg.functional.spectra import (
    jacobian,
    jacobian_eigvals,
    spectral_abscissa,
    spectral_radius,
)

F64 = torch.float64


def random_skew(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, generator=g, dtype=F64) * scale
    return m - m.mT


# --------------------------------------------------------------------------- orthogonal maps


def test_skew_is_antisymmetric_and_linear():
    m = torch.randn(3, 5, 5, dtype=F64)
    s = skew(m)
    assert torch.equal(s, -s.mT)
    assert torch.equal(s.diagonal(dim1=-2, dim2=-1), torch.zeros(3, 5, dtype=F64))
    torch.testing.assert_close(skew(2 * m + s), 2 * s + 2 * s)  # skew(s) = 2 s for skew s


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_maps_are_orthogonal_in_float64(n):
    a = random_skew(4, n, n, scale=3.0, seed=n)  # batched, large entries
    d = torch.tensor([(-1.0) ** i for i in range(n)], dtype=F64)
    for q in (cayley(a), scaled_cayley(a, d), expm_orthogonal(a)):
        assert q.shape == (4, n, n)
        assert orthogonality_defect(q).max() <= 1e-12


def test_cayley_2x2_closed_form_is_a_rotation():
    # A = [[0, a], [-a, 0]] -> rotation by theta with cos = (1 - a^2)/(1 + a^2), sin = 2a/(1 + a^2).
    for a in (0.0, 0.3, 1.0, -2.5, 10.0):
        m = torch.tensor([[0.0, a], [-a, 0.0]], dtype=F64)
        c, s = (1 - a * a) / (1 + a * a), 2 * a / (1 + a * a)
        expected = torch.tensor([[c, -s], [s, c]], dtype=F64)
        torch.testing.assert_close(cayley(m), expected, rtol=0, atol=1e-15)
        theta = 2 * math.atan(a)
        torch.testing.assert_close(
            expm_orthogonal(torch.tensor([[0.0, -theta], [theta, 0.0]], dtype=F64)),
            expected,
            rtol=0,
            atol=1e-14,
        )


def test_cayley_is_inverted_by_its_inverse_formula_and_matches_inv():
    a = random_skew(6, 6, seed=3)
    q = cayley(a)
    eye = torch.eye(6, dtype=F64)
    # A = (I - Q)(I + Q)^{-1}: the Cayley map is its own inverse on skew matrices.
    torch.testing.assert_close((eye - q) @ torch.linalg.inv(eye + q), a, rtol=0, atol=1e-12)
    torch.testing.assert_close(q, torch.linalg.inv(eye + a) @ (eye - a), rtol=0, atol=1e-13)


def test_scaled_cayley_scales_columns_and_reaches_det_minus_one():
    a = random_skew(3, 5, 5, seed=4)
    d = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=F64)
    q = scaled_cayley(a, d)
    torch.testing.assert_close(q, cayley(a) @ torch.diag(d))
    d_odd = torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)
    torch.testing.assert_close(torch.linalg.det(scaled_cayley(a, d_odd)), -torch.ones(3, dtype=F64))
    torch.testing.assert_close(torch.linalg.det(cayley(a)), torch.ones(3, dtype=F64))
    # A batch of d broadcasts against the batch of A.
    dd = torch.stack([d, d_odd, -d])
    torch.testing.assert_close(scaled_cayley(a, dd)[1], scaled_cayley(a[1], d_odd))


def test_orthogonality_defect_closed_forms_and_batching():
    eye = torch.eye(4, dtype=F64)
    assert orthogonality_defect(eye).item() == 0.0
    # (cI)^T (cI) - I = (c^2 - 1) I: Frobenius |c^2 - 1| sqrt(n).
    w = torch.stack([c * eye for c in (0.5, 1.0, 2.0)])
    torch.testing.assert_close(
        orthogonality_defect(w), torch.tensor([0.75, 0.0, 3.0], dtype=F64) * 2.0
    )
    # Tall matrix with orthonormal columns: zero; shape (...,) for a batch.
    qr, _ = torch.linalg.qr(torch.randn(2, 7, 3, dtype=F64))
    out = orthogonality_defect(qr)
    assert out.shape == (2,) and out.max() < 1e-14


def test_gradcheck_float64():
    m = torch.randn(4, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: cayley(skew(x)), (m,))
    d = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda x: scaled_cayley(skew(x), d), (m,))
    w = torch.randn(2, 5, 3, dtype=F64, requires_grad=True)  # away from orthogonal
    assert torch.autograd.gradcheck(orthogonality_defect, (w,))
    assert torch.autograd.gradcheck(lambda x: expm_orthogonal(skew(x)), (m,))


def test_orthogonal_map_errors():
    rect = torch.zeros(3, 4)
    not_skew = torch.eye(3)
    for fn in (skew, cayley, expm_orthogonal):
        with pytest.raises(ValueError, match="`(m|a)` must be a .*square"):
            fn(rect)
    for fn in (cayley, expm_orthogonal):
        with pytest.raises(ValueError, match="`a` must be skew-symmetric"):
            fn(not_skew)
    with pytest.raises(ValueError, match="`a` must be skew-symmetric"):
        scaled_cayley(not_skew, torch.ones(3))
    with pytest.raises(ValueError, match="`a` must be a .*square"):
        scaled_cayley(rect, torch.ones(4))
    with pytest.raises(ValueError, match=r"`d` must have every entry equal to \+1 or -1"):
        scaled_cayley(torch.zeros(3, 3), torch.tensor([1.0, 0.5, -1.0]))
    with pytest.raises(ValueError, match=r"`d` must be a tensor of shape \(\.\.\., 3\)"):
        scaled_cayley(torch.zeros(3, 3), torch.ones(2))
    with pytest.raises(ValueError, match="`w` must be a tensor"):
        orthogonality_defect(torch.ones(3))
    with pytest.raises(ValueError, match="`m` must be"):
        skew([[0.0]])


# --------------------------------------------------------------------------- spectra


class MLPField(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, hidden), nn.Tanh(), nn.Linear(hidden, d))

    def forward(self, t, z):
        tt = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[0], 1)
        return self.net(torch.cat([z, tt], dim=1))


def blockdiag_reference(func, t, z):
    full = torch.autograd.functional.jacobian(lambda x: func(t, x), z)  # (B, d, B, d)
    b = z.shape[0]
    return torch.stack([full[i, :, i, :] for i in range(b)])


def test_jacobian_matches_autograd_functional_for_module_field():
    torch.manual_seed(0)
    f = MLPField(4, 16).double()
    z = torch.randn(6, 4, dtype=F64)
    t = torch.tensor(0.7, dtype=F64)
    jac = jacobian(f, t, z)
    assert jac.shape == (6, 4, 4)
    torch.testing.assert_close(jac, blockdiag_reference(f, t, z), rtol=1e-12, atol=1e-14)
    # Samples differ, so the blocks are genuinely per sample.
    assert (jac[0] - jac[1]).abs().max() > 1e-3


def test_jacobian_with_held_batch_input():
    torch.manual_seed(1)
    f = AntisymmetricODEFunc(5, gamma=0.1, input_dim=3, recurrent_std=2.0).double()
    f.set_input(torch.randn(4, 3, dtype=F64))
    z = torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(
        jacobian(f, 0.0, z), blockdiag_reference(f, 0.0, z), rtol=1e-12, atol=1e-14
    )


def test_jacobian_fallback_when_torch_func_fails(monkeypatch):
    torch.manual_seed(2)
    f = MLPField(3, 8).double()
    z = torch.randn(5, 3, dtype=F64)
    expected = jacobian(f, 0.2, z)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated torch.func failure")

    monkeypatch.setattr(torch.func, "jacrev", broken)
    torch.testing.assert_close(jacobian(f, 0.2, z), expected, rtol=1e-12, atol=1e-14)


def test_jacobian_is_differentiable_in_parameters():
    # f(z) = W z: J = W for every sample, so d(sum J)/dW = B * ones.
    lin = nn.Linear(3, 3, bias=False).double()
    jac = jacobian(lambda t, z: lin(z), 0.0, torch.randn(4, 3, dtype=F64))
    (g,) = torch.autograd.grad(jac.sum(), lin.weight)
    torch.testing.assert_close(g, torch.full((3, 3), 4.0, dtype=F64))


def test_eigvals_abscissa_radius_of_linear_field():
    torch.manual_seed(3)
    m = torch.randn(5, 5, dtype=F64)
    eig = jacobian_eigvals(lambda t, z: z @ m.T, 0.0, torch.randn(3, 5, dtype=F64))
    assert eig.shape == (3, 5) and eig.is_complex()
    ref = torch.linalg.eigvals(m)
    for row in eig:
        # Same multiset of eigenvalues (sort by real then imaginary part).
        key = lambda e: (e.real * 1e6 + e.imag).argsort()  # noqa: E731
        torch.testing.assert_close(row[key(row)], ref[key(ref)], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(spectral_abscissa(eig), ref.real.max().expand(3))
    torch.testing.assert_close(spectral_radius(eig), ref.abs().max().expand(3))


def test_abscissa_radius_values_and_errors():
    e = torch.tensor([[-1 + 2j, 0.5 - 1j, -3 + 0j], [0j, 1j, -1j]])
    torch.testing.assert_close(spectral_abscissa(e), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(spectral_radius(e), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(spectral_abscissa(torch.tensor([-2.0, 1.5])), torch.tensor(1.5))
    with pytest.raises(ValueError, match="`eigs`"):
        spectral_abscissa(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="`eigs`"):
        spectral_radius(torch.tensor(1.0))
    with pytest.raises(ValueError, match="`z` must be"):
        jacobian(lambda t, z: z, 0.0, torch.zeros(3))
    with pytest.raises(ValueError, match="`t` must be"):
        jacobian(lambda t, z: z, torch.zeros(2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`func` must map z"):
        jacobian(lambda t, z: z.sum(1), 0.0, torch.zeros(2, 3))
