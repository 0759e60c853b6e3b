"""The exactly orthogonal recurrent cell (``SequenceModel(cell="orthogonal")``)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torchdiffeq
from torch.utils.data import DataLoader, TensorDataset

from ode_reg import AdjointMagnitude
from ode_reg.callbacks import OrthogonalityMonitor
from ode_reg.models import OrthogonalRNN, SequenceModel
from ode_reg.models.orthogonal_rnn import henaff_generator, mod_relu


def _random_generator(rnn: OrthogonalRNN, scale: float = 0.3) -> None:
    with torch.no_grad():
        rnn.flow.A.copy_(torch.randn_like(rnn.flow.A) * scale)


@pytest.mark.parametrize("orthogonal_map", ["exp", "cayley"])
def test_transition_is_orthogonal_to_rounding(orthogonal_map: str) -> None:
    torch.manual_seed(0)
    rnn = OrthogonalRNN(3, 40, orthogonal_map=orthogonal_map).double()
    _random_generator(rnn, 1.0)
    w = rnn.transition()
    assert (w.T @ w - torch.eye(40, dtype=w.dtype)).abs().max() < 1e-12


def test_exp_map_is_the_exact_flow_of_the_skew_linear_field() -> None:
    """With no input and modReLU bias 0 the cell is ``h_s = W h_{s-1}``: it must equal an
    independent numerical solution of ``dz/dt = (A - A^T) z`` sampled at integer times."""
    torch.manual_seed(1)
    rnn = OrthogonalRNN(2, 6).double()
    _random_generator(rnn)
    with torch.no_grad():
        rnn.bias.zero_()
    h0 = torch.randn(4, 6, dtype=torch.float64)
    x = torch.zeros(4, 5, 2, dtype=torch.float64)
    states, last = rnn(x, h0)
    s = (rnn.flow.A - rnn.flow.A.T).detach()
    ref = torchdiffeq.odeint(
        lambda t, z: z @ s.T,
        h0,
        torch.arange(6, dtype=torch.float64),
        method="dopri5",
        rtol=1e-11,
        atol=1e-12,
    )[1:].transpose(0, 1)
    assert torch.allclose(states, ref, atol=1e-8)
    assert torch.allclose(last, ref[:, -1], atol=1e-8)
    # |W h| = |h|: the norm of the state is kept over the whole sequence.
    assert torch.allclose(states.norm(dim=-1), h0.norm(dim=-1)[:, None].expand(4, 5), atol=1e-10)


def test_cayley_map_of_a_plane_rotation() -> None:
    """For ``S = [[0, t], [-t, 0]]`` the Cayley map is the rotation with ``cos = (1-t²)/(1+t²)``."""
    rnn = OrthogonalRNN(1, 2, orthogonal_map="cayley", init="identity").double()
    theta = 0.7
    with torch.no_grad():
        rnn.flow.A.copy_(torch.tensor([[0.0, theta], [0.0, 0.0]]))
    w = rnn.transition()
    c, s = (1 - theta**2) / (1 + theta**2), 2 * theta / (1 + theta**2)
    assert torch.allclose(w, torch.tensor([[c, -s], [s, c]], dtype=torch.float64), atol=1e-12)


def test_henaff_initialization_puts_the_eigenvalues_on_the_circle_at_the_drawn_angles() -> None:
    a = henaff_generator(8, torch.Generator().manual_seed(3))
    theta = a[torch.arange(4) * 2, torch.arange(4) * 2 + 1]
    assert bool((theta.abs() <= math.pi).all())
    eig = torch.linalg.eigvals(torch.linalg.matrix_exp((a - a.T).double()))
    assert torch.allclose(eig.abs(), torch.ones(8, dtype=torch.float64), atol=1e-12)
    angles = sorted(eig.angle().abs().tolist())
    expected = sorted([abs(t) for t in theta.tolist()] * 2)
    assert max(abs(x - y) for x, y in zip(angles, expected, strict=True)) < 1e-6


def test_mod_relu_closed_form() -> None:
    z = torch.tensor([-3.0, -0.2, 0.0, 0.5, 2.0])
    assert torch.equal(mod_relu(z, torch.tensor(-1.0)), torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.0]))
    assert torch.equal(mod_relu(z, torch.tensor(0.5)), torch.tensor([-3.5, -0.7, 0.0, 1.0, 2.5]))


@pytest.mark.parametrize("orthogonal_map", ["exp", "cayley"])
def test_gradients_match_finite_differences(orthogonal_map: str) -> None:
    torch.manual_seed(2)
    rnn = OrthogonalRNN(3, 5, orthogonal_map=orthogonal_map).double()
    _random_generator(rnn)
    x = torch.randn(2, 4, 3, dtype=torch.float64)

    def f(a, v, b):
        return torch.func.functional_call(rnn, {"flow.A": a, "input_weight": v, "bias": b}, (x,))[0]

    params = [p.detach().clone().requires_grad_() for p in (rnn.flow.A, rnn.input_weight, rnn.bias)]
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6)


def test_sequence_model_refuses_terms_and_bad_maps() -> None:
    with pytest.raises(ValueError, match="regularizers"):
        SequenceModel(10, 9, task="sequence", cell="orthogonal", regularizers=[AdjointMagnitude()])
    with pytest.raises(ValueError, match="orthogonal_map"):
        SequenceModel(10, 9, task="sequence", cell="orthogonal", orthogonal_map="householder")
    with pytest.raises(ValueError, match="orthogonal_map"):
        OrthogonalRNN(2, 4, orthogonal_map="qr")
    with pytest.raises(ValueError, match="init"):
        OrthogonalRNN(2, 4, init="random")


def test_orthogonality_monitor_sees_the_transition_stay_orthogonal_while_it_trains(
    tmp_path,
) -> None:
    """lr 0.05 Adam for 6 steps: ``W`` moves, its logged defect stays at float32 rounding."""
    torch.manual_seed(0)
    model = SequenceModel(3, 4, task="sequence", cell="orthogonal", hidden_dim=16, lr=0.05)
    w0 = model.rnn.transition().detach().clone()
    x = torch.randn(48, 7, 3)
    y = torch.randint(0, 4, (48, 7))
    monitor = OrthogonalityMonitor(every_n_steps=1)
    trainer = L.Trainer(
        max_steps=6,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    w = model.rnn.transition().detach()
    assert (w - w0).abs().max() > 1e-2  # it trained
    defect = trainer.callback_metrics["orthogonality/rnn.transition"]
    assert float(defect) < 1e-5
    expected = torch.linalg.matrix_norm(w.T @ w - torch.eye(16))
    assert float(expected) < 1e-5
