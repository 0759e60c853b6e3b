"""Tests of the monitoring callbacks, their metrics, plots and logger plumbing.

References are independent computations: closed forms for linear fields (``matrix_exp``),
``torch.linalg.eigvals`` of known Jacobians, ``torch.trapezoid`` over autograd sensitivities,
one process against two DDP ranks, and the records of an offline W&B run read back from disk.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.nn.utils.parametrizations import orthogonal
from torch.utils.data import DataLoader, TensorDataset

from ode_reg import (
    AdjointMagnitude,
    RegularizedODEModule,
    SensitivityMagnitude,
    adjoints,
    integrate,
    sensitivities,
)
from ode_reg.callbacks import (
    GradientNormMonitor,
    HasOrthogonalWeights,
    OrthogonalityMonitor,
    SpectrumMonitor,
    find_orthogonal_matrices,
    sensitivity_ratios,
)
from ode_reg.callbacks._logging import plot_path
from ode_reg.dynamics import AntisymmetricODEFunc, OrthogonalFlow
from ode_reg.metrics import MaxOrthogonalityDefect, MeanAdjointRatio, MeanSpectralAbscissa
from ode_reg.plotting import (
    eigenvalue_figure,
    histogram_figure,
    profile_figure,
    save_figure,
)

F64 = torch.float64
D = 3
B = 8
CHECKPOINTS = 4  # times 0, .25, .5, .75, 1
STEP = 0.05


# --------------------------------------------------------------------------- module-level models
# (module level, so that DDP can pickle them)


def general_matrix(d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = 0.7 * torch.randn(d, d, generator=g, dtype=F64)
    m[0, 0] += 0.4
    return m


class LinearField(nn.Module):
    """``f(t, z) = z M^T``: Jacobian ``M`` everywhere."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.m = nn.Parameter(m.clone())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.m.T


class TanhField(nn.Module):
    """``f(t, z) = tanh(z W^T + b)``: a non-linear field with per-sample Jacobians."""

    def __init__(self, d: int = D, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, d, generator=g, dtype=F64))
        self.b = nn.Parameter(0.3 * torch.randn(d, generator=g, dtype=F64))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.w.T + self.b)


class CountedMatmul(torch.autograd.Function):
    """``z @ m.T`` whose backward counts its calls."""

    calls = 0

    @staticmethod
    def forward(ctx, z, m):  # noqa: D102
        ctx.save_for_backward(z, m)
        return z @ m.T

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        CountedMatmul.calls += 1
        z, m = ctx.saved_tensors
        return g @ m, g.T @ z


class CountingField(LinearField):
    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return CountedMatmul.apply(z, self.m)


class Declared(nn.Module):
    """Declares ``2 I_3`` (defect ``|3 I|_F = 3 sqrt 3``) and an orthonormal-row 2x3 matrix."""

    def orthogonal_weights(self) -> dict[str, torch.Tensor]:
        wide = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
        return {"double": 2.0 * torch.eye(3, dtype=F64), "wide": wide}


class Model(RegularizedODEModule):
    """``z(1)`` of ``dz/dt = f(z)`` from ``z(0) = x`` (or ``ortho(x)``); loss ``mean_i |z_i(1)|^2``.

    ``input_grad``: ``z(0)`` requires grad, so the training backward delivers ``a_0`` as well.
    """

    def __init__(
        self,
        field: nn.Module,
        regularizers=(),
        *,
        lr: float = 0.0,
        encode: bool = False,
        declared: bool = False,
        input_dim: int | None = None,
        closure: bool = False,
        single: bool = False,
        input_grad: bool = True,
    ) -> None:
        super().__init__(regularizers)
        self.input_grad = input_grad
        self.closure = closure
        self.single = single
        self.field = field
        self.lr = lr
        self.input_dim = input_dim
        if encode:
            torch.manual_seed(3)
            self.ortho = orthogonal(nn.Linear(D, D, bias=False))
        else:
            self.ortho = None
        self.declared = Declared() if declared else None

    def training_step(self, batch, batch_idx):
        (x,) = batch
        if self.input_dim is not None:  # a per-sample input held over the solve
            self.field.set_input(torch.cos(torch.arange(self.input_dim) + 3.0 * x[:, :1]))
        z0 = self.ortho(x) if self.ortho is not None else x
        if self.single:  # a 1-D state: one sample
            z0 = z0[0]
        if self.input_grad and not z0.requires_grad:  # so that the backward gives a_0 too
            z0 = z0.detach().requires_grad_(True)
        zs = self.odeint(
            (lambda t, z: self.field(t, z)) if self.closure else self.field,
            z0,
            torch.tensor([0.0, 1.0]),
            checkpoints=CHECKPOINTS,
            method="rk4",
            options={"step_size": STEP},
        )
        return zs[-1].pow(2).sum(-1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(n: int = B, d: int = D, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def loader(x: torch.Tensor, batch_size: int = B) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=False)


def fit(
    model, callbacks, *, max_steps=1, x=None, logger=False, root=None, batch_size=B, **kw
) -> L.Trainer:
    kw.setdefault("log_every_n_steps", 1)
    kw.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger,
        accelerator="cpu",
        devices=kw.pop("devices", 1),
        precision="64-true",
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kw,
    )
    trainer.fit(model, loader(data() if x is None else x, batch_size))
    return trainer


def metric(trainer: L.Trainer, key: str) -> float:
    return float(trainer.callback_metrics[key])


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("factory", "argname"),
    [
        (lambda: OrthogonalityMonitor(every_n_steps=0), "every_n_steps"),
        (lambda: OrthogonalityMonitor(modules=False, flows=False), "modules"),
        (lambda: OrthogonalityMonitor(per_matrix=1), "per_matrix"),
        (lambda: SpectrumMonitor(num_samples=0), "num_samples"),
        (lambda: SpectrumMonitor(num_checkpoints=0), "num_checkpoints"),
        (lambda: SpectrumMonitor(plot_every_n_steps=0), "plot_every_n_steps"),
        (lambda: SpectrumMonitor(bins=513), "bins"),
        (lambda: SpectrumMonitor(method="eig"), "method"),
        (lambda: SpectrumMonitor(dense_max_dim=0), "dense_max_dim"),
        (lambda: SpectrumMonitor(krylov_dim=1), "krylov_dim"),
        (lambda: SpectrumMonitor(restarts=-1), "restarts"),
        (lambda: GradientNormMonitor(norm_type=0), "norm_type"),
        (lambda: GradientNormMonitor(norm_type="l2"), "norm_type"),
        (lambda: GradientNormMonitor(every_n_steps=-1), "every_n_steps"),
        (lambda: GradientNormMonitor(compute_sensitivities="yes"), "compute_sensitivities"),
        (lambda: MeanAdjointRatio(geometric=1), "geometric"),
        (lambda: MaxOrthogonalityDefect().update(torch.tensor([-1.0])), "defect"),
        (lambda: MeanAdjointRatio().update(0.0), "ratio"),
        (lambda: profile_figure(torch.zeros(3), torch.zeros(4)), "times"),
        (lambda: histogram_figure(torch.zeros(3), bins=0), "bins"),
        (lambda: sensitivity_ratios(torch.zeros(1), torch.zeros(1, 2)), "times"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(factory, argname):
    with pytest.raises(ValueError, match=f"`{argname}`"):
        factory()


# --------------------------------------------------------------------------- metrics and plots


def test_metrics_values_and_cross_rank_merge():
    a, b = MaxOrthogonalityDefect(), MaxOrthogonalityDefect()
    a.update(torch.tensor([0.1, 0.4]))
    b.update(0.7)
    a.merge_state(b)  # the same reduction (dist_reduce_fx) that syncs ranks
    assert float(a.compute()) == pytest.approx(0.7)
    a.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(a.compute()) == 0.0

    m1, m2 = MeanAdjointRatio(), MeanAdjointRatio()
    m1.update(torch.tensor([1.0, 3.0]))
    m2.update(torch.tensor([8.0]))
    m1.merge_state(m2)
    assert float(m1.compute()) == pytest.approx(4.0)  # (1 + 3 + 8) / 3, not (2 + 8) / 2
    g = MeanAdjointRatio(geometric=True)
    g.update(torch.tensor([2.0, 8.0]))
    assert float(g.compute()) == pytest.approx(4.0)

    s = MeanSpectralAbscissa()
    s.update(torch.tensor([-1.0, 0.0]))
    s.update(0.5)
    assert float(s.compute()) == pytest.approx(-1.0 / 6.0)


def test_plots_render(tmp_path):
    fig = eigenvalue_figure(torch.tensor([1j, -1j, -0.5]), flow_eigs=torch.tensor([1 + 0j, -1]))
    assert len(fig.axes) == 2
    from matplotlib.image import imread

    px = imread(save_figure(fig, tmp_path / "eig.png"))  # RGBA floats of the written PNG
    assert px.ndim == 3 and px.shape[2] == 4 and px[..., :3].std() > 0
    t = torch.linspace(0, 1, 4)
    fig = profile_figure(t, torch.tensor([1.0, 0.1, 0.0, 1e-3]), torch.ones(4))
    assert fig.axes[0].get_yscale() == "log"
    path = save_figure(histogram_figure(torch.randn(50), bins=7), tmp_path / "a" / "h.png")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_path("/x", "spectrum/eig values", 12) == os.path.join(
        "/x", "plots", "spectrum", "eig_values", "step_0000012.png"
    )


def test_sensitivity_ratios_known_cases():
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    const = torch.ones(5, 2, dtype=F64)
    bound, cancel = sensitivity_ratios(t, const)
    assert float(bound) == pytest.approx(1.0) and float(cancel) == pytest.approx(1.0)
    # The note's W_{t + T/2} = -W_t: y flips sign halfway, the integral cancels.
    flip = torch.tensor([[1.0], [1.0], [0.0], [-1.0], [-1.0]], dtype=F64)
    bound, cancel = sensitivity_ratios(t, flip)
    assert float(bound) == pytest.approx(0.0, abs=1e-12)
    assert float(cancel) == pytest.approx(0.0, abs=1e-12)
    # Non-uniform times, by hand: G = (1 + 2) / 2 * 1 + (2 + 0) / 2 * 2 = 3.5, y_k >= 0.
    bound, cancel = sensitivity_ratios(
        torch.tensor([0.0, 1.0, 3.0], dtype=F64), torch.tensor([[1.0], [2.0], [0.0]], dtype=F64)
    )
    assert float(bound) == pytest.approx(3.5 / (3.0 * 2.0)) and float(cancel) == pytest.approx(1.0)


# --------------------------------------------------------------------------- orthogonality


def test_orthogonality_defects_of_modules_and_flows():
    model = Model(TanhField(), encode=True, declared=True)
    found = find_orthogonal_matrices(model)
    assert set(found) == {"ortho.weight", "declared.double", "declared.wide"}
    assert isinstance(model.declared, HasOrthogonalWeights)
    values = OrthogonalityMonitor().measure(model)
    assert values["orthogonality/declared.double"].item() == pytest.approx(3 * math.sqrt(3))
    assert values["orthogonality/declared.wide"].item() == pytest.approx(0.0, abs=1e-12)
    assert values["orthogonality/ortho.weight"].item() < 1e-5  # float32 until the Trainer casts
    assert "orthogonality/flow_max" not in values  # no training step recorded yet

    # Flows: the exponential rule stays on the group, RK4 on (z, W) drifts off it.
    for step, expect_small in (("exp", True), ("rk4", False)):
        torch.manual_seed(0)
        flow = OrthogonalFlow(D, step=step, step_size=0.5, b_std=3.0).double()
        m = Model(flow)
        trainer = fit(m, [OrthogonalityMonitor(every_n_steps=1)])
        w = m.ode_step.trajectories[0].weight_matrices.detach()
        eye = torch.eye(D, dtype=F64)
        expected = max(float(torch.linalg.norm(wk.T @ wk - eye)) for wk in w)
        got = metric(trainer, "orthogonality/flow_max")
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-12)
        assert (got < 1e-6) == expect_small, (step, got)
        assert metric(trainer, "orthogonality/max") == pytest.approx(got)


def test_orthogonality_logged_values_and_running_max():
    mon = OrthogonalityMonitor(every_n_steps=1)
    trainer = fit(Model(TanhField(), encode=True, declared=True), [mon], max_steps=2)
    assert metric(trainer, "orthogonality/declared.double") == pytest.approx(3 * math.sqrt(3))
    assert metric(trainer, "orthogonality/max") == pytest.approx(3 * math.sqrt(3))
    assert mon.running_max == pytest.approx(3 * math.sqrt(3))
    assert metric(trainer, "orthogonality/epoch_max") == pytest.approx(3 * math.sqrt(3), rel=1e-6)


# --------------------------------------------------------------------------- spectrum


def _eigs(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvals(m)


def test_spectrum_of_linear_field_is_that_of_its_matrix():
    m = general_matrix()
    mon = SpectrumMonitor(every_n_steps=1, num_samples=3, num_checkpoints=2)
    trainer = fit(Model(LinearField(m)), [mon])
    eig = _eigs(m)
    assert metric(trainer, "spectrum/abscissa") == pytest.approx(float(eig.real.max()), rel=1e-9)
    assert metric(trainer, "spectrum/abscissa_mean") == pytest.approx(
        float(eig.real.max()), rel=1e-9
    )
    assert metric(trainer, "spectrum/radius") == pytest.approx(float(eig.abs().max()), rel=1e-9)
    assert mon.last_eigenvalues["jacobian"].shape == (3 * 2, D)  # samples x checkpoints
    assert mon.running_max_abscissa == pytest.approx(float(eig.real.max()), rel=1e-9)


def test_spectrum_held_input_and_antisymmetric_structure():
    torch.manual_seed(0)
    field = AntisymmetricODEFunc(D, gamma=0.0, input_dim=2).double()
    model = Model(field, input_dim=2)
    mon = SpectrumMonitor(every_n_steps=1, num_samples=2, num_checkpoints=1)
    trainer = fit(model, [mon])
    # Independent: J_i = diag(1 - tanh^2(pre_i)) (W - W^T) at the last state, with sample i's
    # own held input (rows 0 and B-1 of the batch).
    traj = model.ode_step.groups[0]
    z = traj.states[-1].detach()
    u = field._input
    a = (field.weight - field.weight.T).detach()
    pre = z @ a.T + u @ field.input_weight.detach().T + field.bias.detach()
    expected = []
    for i in (0, B - 1):
        jac = torch.diag(1 - torch.tanh(pre[i]) ** 2) @ a
        expected.append(float(_eigs(jac).real.max()))
    assert metric(trainer, "spectrum/abscissa") == pytest.approx(max(expected), abs=1e-9)
    assert abs(metric(trainer, "spectrum/abscissa")) < 1e-9  # gamma = 0: Re lambda = 0
    # no logged check that cannot fail (eigenvalues of W - W^T are imaginary by construction)
    assert "spectrum/skew_real_max" not in trainer.callback_metrics


def test_spectrum_of_orthogonal_flow():
    torch.manual_seed(1)
    flow = OrthogonalFlow(D, step="exp", step_size=0.25).double()
    model = Model(flow)
    trainer = fit(model, [SpectrumMonitor(every_n_steps=1)])
    w = model.ode_step.trajectories[0].weight_matrices.detach()
    q = _eigs(w.mT @ w[-1])
    assert metric(trainer, "spectrum/flow_q_min_real") == pytest.approx(float(q.real.min()))
    assert metric(trainer, "spectrum/flow_q_circle_dist") < 1e-8


class GradSnapshot(Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


def test_spectrum_monitor_leaves_gradients_alone():
    before, after = GradSnapshot(), GradSnapshot()
    mon = SpectrumMonitor(every_n_steps=1, num_samples=None, num_checkpoints=None)
    fit(Model(TanhField(), lr=0.1), [before, mon, after], max_steps=2)
    assert len(before.grads) == 2 and mon.last_eigenvalues is not None
    for g0, g1 in zip(before.grads, after.grads):
        assert g0.keys() == g1.keys()
        for name in g0:
            assert torch.equal(g0[name], g1[name]), name


# --------------------------------------------------------------------------- gradients


def closed_form_profile(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mean_i |a_{k,i}|`` for ``z' = M z``, ``L = mean_i |z_i(1)|^2`` at t_k = k / 4."""
    times = torch.linspace(0.0, 1.0, CHECKPOINTS + 1, dtype=F64)
    z1 = x @ torch.linalg.matrix_exp(m).T
    a1 = 2.0 * z1 / x.shape[0]
    return torch.stack(
        [(a1 @ torch.linalg.matrix_exp(m * (1.0 - t))).norm(dim=1).mean() for t in times]
    )


@pytest.mark.parametrize(
    ("regularizers", "source"), [((), "backward"), ((AdjointMagnitude(0.5),), "regularizer")]
)
def test_adjoint_profile_matches_closed_form(regularizers, source):
    m = general_matrix()
    mon = GradientNormMonitor(every_n_steps=1)
    trainer = fit(Model(LinearField(m), regularizers), [mon])
    (entry,) = mon.last_profiles
    assert entry["source"] == source
    expected = closed_form_profile(m, data())
    torch.testing.assert_close(entry["adjoint"], expected, rtol=1e-6, atol=0)
    assert metric(trainer, "adjoint/norm_first") == pytest.approx(float(expected[0]), rel=1e-6)
    assert metric(trainer, "adjoint/norm_last") == pytest.approx(float(expected[-1]), rel=1e-6)
    ratio = float(expected.max() / expected.min())
    assert metric(trainer, "adjoint/ratio_max_min") == pytest.approx(ratio, rel=1e-6)
    assert ratio > 1.05  # a non-trivial profile


def test_checkpoint_the_backward_does_not_reach_is_left_out():
    """z_0 = an input without grad and no regularizer: the backward gives no a_0; the profile
    has NaN there and the ratios are over the other checkpoints (closed form)."""
    m = general_matrix()
    mon = GradientNormMonitor(every_n_steps=1, compute_sensitivities=True)
    trainer = fit(Model(LinearField(m), input_grad=False), [mon])
    (entry,) = mon.last_profiles
    expected = closed_form_profile(m, data())
    got = entry["adjoint"]
    if bool(torch.isnan(got[0])):  # a core that records z_0 = y0 itself
        torch.testing.assert_close(got[1:], expected[1:], rtol=1e-6, atol=0)
        tail = expected[1:]
        assert entry["bound_ratio"] is None  # y_k needs every a_k
        assert "sensitivity/bound_ratio" not in trainer.callback_metrics
    else:  # a core that makes z_0 differentiable by itself
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        tail = expected
    ratio = float(tail.max() / tail.min())
    assert metric(trainer, "adjoint/ratio_max_min") == pytest.approx(ratio, rel=1e-6)
    assert metric(trainer, "adjoint/norm_first") == pytest.approx(float(tail[0]), rel=1e-6)


@pytest.mark.parametrize("regularizers", [(), (AdjointMagnitude(0.5),)])
def test_adjoint_profile_under_gradient_accumulation(regularizers):
    # Two micro-batches of 4 make one step of 8: the profile is that of the effective loss
    # (the mean over 8) on the last micro-batch's samples, whichever route gave the adjoints.
    m, x = general_matrix(), data()
    mon = GradientNormMonitor(every_n_steps=1)
    trainer = fit(
        Model(LinearField(m), regularizers), [mon], batch_size=4, accumulate_grad_batches=2
    )
    (entry,) = mon.last_profiles
    expected = closed_form_profile(m, x[4:]) / 2.0
    torch.testing.assert_close(entry["adjoint"], expected, rtol=1e-6, atol=0)
    assert metric(trainer, "grad/total_norm") > 0


def test_one_dimensional_state_is_one_sample():
    m = general_matrix()
    grad, spec = GradientNormMonitor(every_n_steps=1), SpectrumMonitor(every_n_steps=1)
    trainer = fit(Model(LinearField(m), single=True), [grad, spec])
    expected = closed_form_profile(m, data()[:1])
    torch.testing.assert_close(grad.last_profiles[0]["adjoint"], expected, rtol=1e-6, atol=0)
    eig = _eigs(m)
    assert metric(trainer, "spectrum/abscissa") == pytest.approx(float(eig.real.max()), rel=1e-9)
    assert spec.last_eigenvalues["jacobian"].shape == (3, D)  # 1 sample x 3 checkpoints


def test_adjoint_profile_divides_out_the_amp_loss_scale():
    from lightning.pytorch.plugins import MixedPrecision

    m = general_matrix().float()
    mon = GradientNormMonitor(every_n_steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = L.Trainer(
        max_steps=1,
        callbacks=[mon],
        logger=False,
        accelerator="cpu",
        devices=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(Model(LinearField(m)), loader(data().float()))
    expected = closed_form_profile(m.double(), data()).float()
    torch.testing.assert_close(mon.last_profiles[0]["adjoint"], expected, rtol=1e-2, atol=0)


def test_gradient_norms_per_module_and_total():
    mon = GradientNormMonitor(every_n_steps=1)
    snap = GradSnapshot()
    trainer = fit(Model(TanhField(), encode=True), [snap, mon])
    g = snap.grads[-1]  # lr = 0 and SGD: the grads the optimizer saw
    field = torch.cat([g["field.w"].reshape(-1), g["field.b"]]).norm()
    ortho = torch.cat([v.reshape(-1) for k, v in g.items() if k.startswith("ortho.")]).norm()
    assert metric(trainer, "grad/norm/field") == pytest.approx(float(field), rel=1e-9)
    assert metric(trainer, "grad/norm/ortho") == pytest.approx(float(ortho), rel=1e-9)
    total = torch.cat([v.reshape(-1) for v in g.values()]).norm()
    assert metric(trainer, "grad/total_norm") == pytest.approx(float(total), rel=1e-9)


def direct_ratios(field: nn.Module, x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    traj = integrate(
        field,
        x.clone().requires_grad_(True),  # a_0 = dL/dz_0 exists
        torch.tensor([0.0, 1.0], dtype=F64),
        checkpoints=CHECKPOINTS,
        method="rk4",
        options={"step_size": STEP},
    )
    loss = traj.ys[-1].pow(2).sum(-1).mean()
    y = sensitivities(traj, adjoints(loss, traj), params=list(field.parameters()))
    t = traj.times
    integral = torch.trapezoid(y, t, dim=0).norm()
    norms = y.norm(dim=1)
    bound = integral / ((t[-1] - t[0]) * norms.max())
    cancel = integral / torch.trapezoid(norms, t)
    return float(bound), float(cancel), norms


@pytest.mark.parametrize("route", ["record", "computed", "computed_closure"])
def test_bound_and_cancellation_ratios_match_direct_computation(route):
    field = TanhField()
    bound, cancel, norms = direct_ratios(TanhField(), data())
    regs = (SensitivityMagnitude(0.1),) if route == "record" else ()
    mon = GradientNormMonitor(every_n_steps=1, compute_sensitivities=route != "record")
    trainer = fit(Model(field, regs, closure=route.endswith("closure")), [mon])
    assert metric(trainer, "sensitivity/bound_ratio") == pytest.approx(bound, rel=1e-9)
    assert metric(trainer, "sensitivity/cancellation_ratio") == pytest.approx(cancel, rel=1e-9)
    torch.testing.assert_close(mon.last_profiles[0]["sensitivity"], norms, rtol=1e-9, atol=0)
    assert 0.0 < bound < 1.0 and 0.0 < cancel <= 1.0


def test_no_extra_backward_pass():
    def backward_calls(callbacks) -> int:
        CountedMatmul.calls = 0
        fit(Model(CountingField(general_matrix()), lr=0.01), callbacks, max_steps=2)
        return CountedMatmul.calls

    baseline = backward_calls([])
    evals_per_step = 4 * round(1.0 / STEP)  # RK4 stages x steps over [0, 1]
    assert baseline == 2 * evals_per_step
    mon = GradientNormMonitor(every_n_steps=1)
    assert backward_calls([mon]) == baseline  # hooks only: not one extra field backward
    assert mon.last_profiles[0]["source"] == "backward"
    assert bool((mon.last_profiles[0]["adjoint"] > 0).all())
    # y_k from the captured adjoints: one VJP of the field per checkpoint, no second
    # backward through the trajectory (which would cost evals_per_step more calls per step).
    mon = GradientNormMonitor(every_n_steps=1, compute_sensitivities=True)
    assert baseline <= backward_calls([mon]) <= baseline + 2 * (CHECKPOINTS + 1)
    assert mon.last_profiles[0]["bound_ratio"] is not None


# --------------------------------------------------------------------------- cadence and loggers


def three_monitors(every=None, plot=None, **grad_kw):
    return [
        OrthogonalityMonitor(every_n_steps=every),
        SpectrumMonitor(every_n_steps=every, plot_every_n_steps=plot),
        GradientNormMonitor(every_n_steps=every, plot_every_n_steps=plot, **grad_kw),
    ]


def test_cadence_csv_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    model = Model(TanhField(), encode=True, lr=0.01)
    fit(model, three_monitors(every=2, plot=3), max_steps=6, x=data(24), logger=logger)
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    for key in (
        "orthogonality/max",
        "spectrum/abscissa",
        "adjoint/ratio_max_min",
        "grad/total_norm",
        "grad/norm/field",
    ):
        steps = sorted(int(r["step"]) for r in rows if r.get(key))
        assert steps == [1, 3, 5], (key, steps)  # (step + 1) % 2 == 0, once each
    for key in ("spectrum/eigenvalues", "spectrum/jacobian_real", "adjoint/profile"):
        folder = os.path.dirname(plot_path(logger.log_dir, key, 0))
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.png")))
        assert files == ["step_0000002.png", "step_0000005.png"], (key, files)


def test_default_cadence_follows_log_every_n_steps_and_no_logger_is_fine():
    mons = three_monitors()
    seen = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(
                (
                    "spectrum/abscissa" in trainer.callback_metrics,
                    id(mons[1].last_eigenvalues),
                    id(mons[2].last_profiles),
                )
            )

    fit(Model(TanhField(), lr=0.01), [*mons, Spy()], max_steps=4, x=data(32), log_every_n_steps=2)
    # No logger: the scalars still reach callback_metrics, from the first due step (1) on.
    assert [s[0] for s in seen] == [False, True, True, True]
    # The monitors computed at steps 1 and 3 only: (step + 1) % log_every_n_steps == 0.
    for j in (1, 2):
        changed = [i for i in range(1, 4) if seen[i][j] != seen[i - 1][j]]
        assert changed == [1, 3], (j, changed)


def test_tensorboard_logger_gets_figures_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(Model(TanhField()), three_monitors(every=1, plot=2), max_steps=2, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"spectrum/eigenvalues", "adjoint/profile"} <= set(tags["images"])
    assert "spectrum/jacobian_real" in tags["histograms"]
    assert [e.step for e in events.Images("adjoint/profile")] == [1]
    assert os.path.exists(plot_path(logger.log_dir, "adjoint/profile", 1))


# --------------------------------------------------------------------------- state


def test_state_dict_round_trip_and_state_keys():
    mon = OrthogonalityMonitor(every_n_steps=3)
    mon.running_max = 0.25
    other = OrthogonalityMonitor(every_n_steps=3)
    other.load_state_dict(mon.state_dict())
    assert other.running_max == 0.25
    spec, spec2 = SpectrumMonitor(), SpectrumMonitor()
    spec.running_max_abscissa = -0.5
    spec2.load_state_dict(spec.state_dict())
    assert spec2.running_max_abscissa == -0.5
    grad, grad2 = GradientNormMonitor(), GradientNormMonitor()
    grad.running_max_ratio = 7.0
    grad2.load_state_dict(grad.state_dict())
    assert grad2.running_max_ratio == 7.0
    keys = {
        OrthogonalityMonitor().state_key,
        OrthogonalityMonitor(every_n_steps=3).state_key,
        SpectrumMonitor().state_key,
        SpectrumMonitor(num_samples=8).state_key,
        GradientNormMonitor().state_key,
        GradientNormMonitor(norm_type="inf").state_key,
    }
    assert len(keys) == 6


class StateProbe(Callback):
    def __init__(self, monitors) -> None:
        self.monitors = monitors
        self.seen: list[float] | None = None

    def on_train_start(self, trainer, pl_module):
        self.seen = [running(m.state_dict()) for m in self.monitors]


def running(state: dict) -> dict:
    """The running maxima of a monitor's state (the epoch aggregates are tested elsewhere)."""
    return {k: v for k, v in state.items() if k != "epoch"}


def test_resume_from_checkpoint_restores_callback_state(tmp_path):
    model = Model(TanhField(), declared=True, lr=0.05)
    mons = three_monitors(every=1)
    trainer = fit(model, mons, max_steps=2, root=tmp_path)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = [running(m.state_dict()) for m in mons]
    assert saved[0]["running_max"] == pytest.approx(3 * math.sqrt(3))
    assert saved[2]["running_max_ratio"] > 1.0

    fresh = three_monitors(every=1)
    probe = StateProbe(fresh)
    trainer = L.Trainer(
        max_steps=3,
        callbacks=[*fresh, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="64-true",
        log_every_n_steps=1,
    )
    trainer.fit(Model(TanhField(), declared=True, lr=0.05), loader(data()), ckpt_path=ckpt)
    assert probe.seen == saved


# --------------------------------------------------------------------------- W&B, offline


def read_wandb_records(run_file: str) -> list:
    """The ``Record`` protos of a ``.wandb`` file (LevelDB-log framing: 32 KiB blocks of
    ``crc32 (4) | length (2) | type (1) | data`` chunks after a 7-byte ``:W&B`` header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(run_file).read_bytes()
    if raw[:4] != b":W&B":
        return []
    block, pos, chunks, buf = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        if pos + 7 + length > len(raw):  # a chunk still being written
            break
        chunk = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            chunks.append(buf + chunk)
    records = []
    for c in chunks:
        rec = pb.Record()
        rec.ParseFromString(c)
        records.append(rec)
    return records


def read_wandb_history(run_file: str, timeout: float = 30.0) -> list[dict]:
    """History rows of a finished offline run, as nested dicts.

    ``wandb.finish()`` may return before the writer has flushed the file: wait for the run's
    ``exit`` record.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_file} has no exit record after {timeout} s")
        time.sleep(0.1)
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in rec.history.item:
            path = [item.key] if item.key else list(item.nested_key)
            node = row
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def test_offline_wandb_run_read_back(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    m = general_matrix()
    model = Model(LinearField(m), declared=True)  # lr = 0: the Jacobian stays M
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="ode-reg-test")
    try:
        fit(
            model,
            three_monitors(plot=4, compute_sensitivities=True),
            max_steps=4,
            x=data(32),
            logger=logger,
            log_every_n_steps=2,
        )
    finally:
        wandb.finish()
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = read_wandb_history(run_file)

    def steps(key):
        return sorted(r["trainer/global_step"] for r in rows if key in r)

    eig = _eigs(m)
    for key in (
        "orthogonality/max",
        "orthogonality/declared.double",
        "spectrum/abscissa",
        "spectrum/radius",
        "grad/total_norm",
        "adjoint/ratio_max_min",
        "sensitivity/bound_ratio",
        "sensitivity/cancellation_ratio",
    ):
        assert steps(key) == [1, 3], (key, steps(key))  # default cadence: log_every_n_steps
    for r in rows:
        if "spectrum/abscissa" in r:
            assert r["spectrum/abscissa"] == pytest.approx(float(eig.real.max()), rel=1e-6)
        if "orthogonality/max" in r:
            assert r["orthogonality/max"] == pytest.approx(3 * math.sqrt(3), rel=1e-6)
        if "sensitivity/bound_ratio" in r:
            assert 0.0 < r["sensitivity/bound_ratio"] <= 1.0
    assert steps("spectrum/jacobian_real") == [3]  # plot cadence 4: step 3 only
    (hist,) = [r["spectrum/jacobian_real"] for r in rows if "spectrum/jacobian_real" in r]
    assert hist["_type"] == "histogram"
    assert len(hist["bins"]) == len(hist["values"]) + 1 <= 513
    assert sum(hist["values"]) == 4 * 3 * D  # num_samples x num_checkpoints x d eigenvalues
    assert hist["bins"][0] == pytest.approx(float(eig.real.min()), abs=1e-6)
    assert hist["bins"][-1] == pytest.approx(float(eig.real.max()), abs=1e-6)
    run_dir = Path(run_file).parent
    for key in ("spectrum/eigenvalues", "adjoint/profile"):
        assert steps(key) == [3]
        (img,) = [r[key] for r in rows if key in r]
        assert img["_type"] == "images/separated"
        (name,) = img["filenames"]
        assert (run_dir / "files" / name).read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- DDP, two ranks


class Dump(Callback):
    """Writes the monitors' values from each rank (fork: the parent's objects stay stale)."""

    def __init__(self, path: str, grad_monitor: GradientNormMonitor) -> None:
        self.path = path
        self.grad_monitor = grad_monitor

    def on_train_end(self, trainer, pl_module):
        out = {
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "profile": self.grad_monitor.last_profiles[0]["adjoint"].clone(),
            "sensitivity": self.grad_monitor.last_profiles[0]["sensitivity"].clone(),
        }
        torch.save(out, f"{self.path}_rank{trainer.global_rank}.pt")


def ddp_monitors():
    # The matrix-free spectrum (krylov_dim < d): each sample's estimate must not depend on
    # which rank (and which row of its batch) it is on.
    return [
        OrthogonalityMonitor(every_n_steps=1),
        SpectrumMonitor(
            every_n_steps=1, num_samples=None, num_checkpoints=None, method="krylov", krylov_dim=2
        ),
        GradientNormMonitor(every_n_steps=1, compute_sensitivities=True),
    ]


@pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform in ("win32", "darwin"),
    reason="needs torch.distributed with gloo and fork",
)
def test_ddp_two_ranks_match_one_process(tmp_path):
    x = data(2 * B)
    results = {}
    for tag, devices, strategy, batch in (("one", 1, "auto", 2 * B), ("ddp", 2, "ddp_fork", B)):
        mons = ddp_monitors()
        dump = Dump(str(tmp_path / tag), mons[2])
        model = Model(TanhField(), encode=True)
        trainer = L.Trainer(
            max_steps=1,
            callbacks=[*mons, dump],
            logger=False,
            accelerator="cpu",
            devices=devices,
            strategy=strategy,
            precision="64-true",
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
        trainer.fit(model, loader(x, batch))
        results[tag] = [torch.load(p) for p in sorted(glob.glob(f"{tmp_path / tag}_rank*.pt"))]
    (one,) = results["one"]
    rank0, rank1 = results["ddp"]
    keys = [
        "grad/total_norm",
        "grad/norm/field",
        "adjoint/ratio_max_min",
        "adjoint/norm_first",
        "adjoint/norm_last",
        "sensitivity/bound_ratio",
        "sensitivity/cancellation_ratio",
        "spectrum/abscissa",
        "spectrum/abscissa_mean",
        "spectrum/radius",
        "orthogonality/max",
        # epoch aggregates (torchmetrics states reduced across ranks)
        "spectrum/abscissa_epoch_mean",
        "adjoint/ratio_epoch_geomean",
        "orthogonality/epoch_max",
    ]
    for key in keys:
        assert rank0["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-9, abs=1e-15), key
        assert rank1["metrics"][key] == pytest.approx(rank0["metrics"][key], rel=1e-12), key
    for r in (rank0, rank1):
        torch.testing.assert_close(r["profile"], one["profile"], rtol=1e-9, atol=0)
        torch.testing.assert_close(r["sensitivity"], one["sensitivity"], rtol=1e-9, atol=0)
