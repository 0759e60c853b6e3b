"""The monitors measure the field that produced the step's trajectory (issue 11, item 5).

With a learning rate > 0 the optimizer step changes the field between the solve and the end of
the batch. The logged spectra and adjoint/sensitivity profiles must be those of the field
before the step: the references below are computed independently, from a copy of the initial
parameters, at the states the solve recorded; each test also checks that the field after the
step gives clearly different values (so a monitor measuring after ``optimizer.step`` fails).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_callbacks import F64, B, D, Model, TanhField, data, direct_ratios, fit, metric

from ode_reg import adjoints, integrate
from ode_reg.callbacks import GradientNormMonitor, SpectrumMonitor

LR = 0.5


def spectra_of(field: torch.nn.Module, states: torch.Tensor) -> tuple[float, float, float]:
    """Abscissa (max and mean over states) and radius of ``d field / dz`` at every state."""
    per, radii = [], []
    for z in states.reshape(-1, D):
        jac = torch.autograd.functional.jacobian(lambda x: field(None, x[None])[0], z)
        eig = torch.linalg.eigvals(jac.detach())
        per.append(float(eig.real.max()))
        radii.append(float(eig.abs().max()))
    return max(per), sum(per) / len(per), max(radii)


@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_logged_spectrum_is_that_of_the_pre_step_field(method):
    field = TanhField()
    before = copy.deepcopy(field)
    # krylov_dim >= d: the Krylov estimate is exact, so both methods meet the same reference.
    mon = SpectrumMonitor(
        every_n_steps=1, num_samples=None, num_checkpoints=None, method=method, krylov_dim=D
    )
    model = Model(field, lr=LR)
    trainer = fit(model, [mon])
    states = torch.stack([z.detach() for z in model.ode_step.groups[0].states])
    assert states.shape == (5, B, D)
    assert mon.last_methods == [method]
    abscissa, mean, radius = spectra_of(before, states)
    assert metric(trainer, "spectrum/abscissa") == pytest.approx(abscissa, rel=1e-9)
    assert metric(trainer, "spectrum/abscissa_mean") == pytest.approx(mean, rel=1e-9)
    assert metric(trainer, "spectrum/radius") == pytest.approx(radius, rel=1e-9)
    # The step moved the field: measured after it, the figures would be off by far more.
    after = spectra_of(model.field, states)
    assert not torch.equal(model.field.w, before.w)
    assert abs(after[0] - abscissa) > 1e-2 and abs(after[2] - radius) > 1e-2


def profiles_of(field: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    traj = integrate(
        field,
        x.clone().requires_grad_(True),  # a_0 = dL/dz_0 exists
        torch.tensor([0.0, 1.0], dtype=F64),
        checkpoints=4,
        method="rk4",
        options={"step_size": 0.05},
    )
    loss = traj.ys[-1].pow(2).sum(-1).mean()
    return adjoints(loss, traj).flatten(2).norm(dim=2).mean(dim=1)


def test_adjoint_and_sensitivity_profiles_are_those_of_the_pre_step_field():
    field = TanhField()
    before = copy.deepcopy(field)
    mon = GradientNormMonitor(every_n_steps=1, compute_sensitivities=True)
    model = Model(field, lr=LR)
    trainer = fit(model, [mon])
    (entry,) = mon.last_profiles
    assert entry["source"] == "backward"
    torch.testing.assert_close(entry["adjoint"], profiles_of(before, data()), rtol=1e-9, atol=0)
    bound, cancel, norms = direct_ratios(before, data())
    torch.testing.assert_close(entry["sensitivity"], norms, rtol=1e-9, atol=0)
    assert metric(trainer, "sensitivity/bound_ratio") == pytest.approx(bound, rel=1e-9)
    assert metric(trainer, "sensitivity/cancellation_ratio") == pytest.approx(cancel, rel=1e-9)
    # Teeth: the updated field's sensitivity density is clearly another one.
    _, _, norms_after = direct_ratios(copy.deepcopy(model.field), data())
    assert float(((norms_after - norms).abs() / norms).max()) > 1e-2


def test_spectrum_measured_pre_step_at_every_step_of_a_run():
    """Over several steps (each with its own parameters), every logged abscissa is that of
    the parameters the step started from."""
    from lightning.pytorch.callbacks import Callback

    class Probe(Callback):
        def __init__(self) -> None:
            self.fields: list[torch.nn.Module] = []
            self.states: list[torch.Tensor] = []
            self.logged: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.fields.append(copy.deepcopy(pl_module.field))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            chain = pl_module.ode_step.groups[0]
            self.states.append(torch.stack([z.detach() for z in chain.states]))
            self.logged.append(metric(trainer, "spectrum/abscissa"))

    probe = Probe()
    mon = SpectrumMonitor(every_n_steps=1, num_samples=None, num_checkpoints=None)
    fit(Model(TanhField(), lr=LR), [mon, probe], max_steps=3, x=data(3 * B), batch_size=B)
    assert len(probe.logged) == 3
    for field, states, logged in zip(probe.fields, probe.states, probe.logged):
        assert logged == pytest.approx(spectra_of(field, states)[0], rel=1e-9)
