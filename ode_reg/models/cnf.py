"""A small continuous normalizing flow on 2-D points (FFJORD's construction, Grathwohl et al. 2019).

The state is the tuple ``(z, delta_logp)``: ``dz/dt = f(t, z)`` and
``d(delta_logp)/dt = -tr(df/dz)``, from ``z(0) = x`` to ``z(T)`` and a standard normal base,
so ``log p(x) = log N(z(T); 0, I) - delta_logp(T)`` with ``delta_logp(0) = 0``. During
training the trace is Hutchinson's estimate ``eps^T (df/dz) eps`` with one Rademacher ``eps``
per sample drawn once per solve (FFJORD); in evaluation it is exact (``d`` vector-Jacobian
products, cheap for ``d = 2``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ode_reg._checks import check_int, check_range
from ode_reg.models._checkpoint import RegularizersInCheckpoint
from ode_reg.module import RegularizedODEModule
from ode_reg.regularizers import Regularizer

_LOG_2PI = float(torch.log(torch.tensor(2.0 * torch.pi)))


class CNFField(nn.Module):
    """``f(t, z) = W_3 softplus(W_2 softplus(W_1 [z, t] + b_1) + b_2) + b_3`` and ``-tr(df/dz)``.

    Acts on the tuple ``(z, delta_logp)`` and returns ``(dz/dt, -tr(df/dz))``; each sample
    independently. The trace is Hutchinson's with the probes held in :attr:`eps` (set by
    :meth:`draw_probes`), or exact when :attr:`exact` is set.

    Args:
        dim: data dimension, ``>= 1``.
        hidden_dim: width of the two hidden layers, ``>= 1``.

    Raises:
        ValueError: if ``dim < 1`` or ``hidden_dim < 1``.

    Example::

        >>> import torch
        >>> f = CNFField(2, 8)
        >>> f.exact = True
        >>> dz, dlogp = f(torch.tensor(0.0), (torch.zeros(3, 2), torch.zeros(3, 1)))
        >>> tuple(dz.shape), tuple(dlogp.shape)
        ((3, 2), (3, 1))
    """

    def __init__(self, dim: int = 2, hidden_dim: int = 32) -> None:
        check_int("dim", dim, 1)
        check_int("hidden_dim", hidden_dim, 1)
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden_dim),
            nn.Softplus(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.Softplus(),
            nn.Linear(hidden_dim, dim),
        )
        self.eps: Tensor | None = None
        self.exact = False

    def draw_probes(self, z: Tensor, generator: torch.Generator | None = None) -> None:
        """Hold one Rademacher probe per sample (``z``'s shape) for the next solve."""
        bits = torch.randint(0, 2, z.shape, generator=generator, device=z.device)
        self.eps = bits.to(z.dtype) * 2 - 1

    def ode_reg_snapshot(self) -> dict[str, object]:
        """The held probes, restored when the field is evaluated after integration."""
        return {"eps": self.eps, "exact": self.exact}

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        z = state[0]
        outer = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            tt = t.to(z.dtype).expand(z.shape[0], 1)
            dz = self.net(torch.cat([z, tt], dim=-1))
            if self.exact or self.eps is None:
                div = z.new_zeros(z.shape[0])
                for i in range(z.shape[1]):
                    (g,) = torch.autograd.grad(
                        dz[:, i].sum(), z, create_graph=outer, retain_graph=True
                    )
                    div = div + g[:, i]
            else:
                (g,) = torch.autograd.grad(dz, z, self.eps, create_graph=outer)
                div = (g * self.eps).sum(-1)
        if not outer:
            dz, div = dz.detach(), div.detach()
        return dz, -div.unsqueeze(-1)


class CNF2D(RegularizersInCheckpoint, RegularizedODEModule):
    """A continuous normalizing flow on 2-D data, trained by maximum likelihood.

    The batch is ``(x, label)`` (the label is unused, so the two-moons data module serves);
    the logged metric is the negative log-likelihood in nats per sample, ``val/nll`` and
    ``test/nll`` with the exact trace.

    Args:
        dim: data dimension, ``>= 1``.
        hidden_dim: width of the field's hidden layers, ``>= 1``.
        horizon: integration time ``T > 0``.
        method: torchdiffeq solver.
        rtol: relative tolerance, ``> 0``.
        atol: absolute tolerance, ``> 0``.
        lr: Adam learning rate, ``> 0``.
        regularizers: ode_reg regularizers (for RNODE's terms on ``z`` only: ``dims=dim``).

    Raises:
        ValueError: on any argument out of its range.

    Example::

        >>> import torch
        >>> model = CNF2D(hidden_dim=8)
        >>> model.log_prob(torch.zeros(4, 2)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        dim: int = 2,
        hidden_dim: int = 32,
        horizon: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        lr: float = 1e-2,
        regularizers: list[Regularizer] | None = None,
    ) -> None:
        check_int("dim", dim, 1)
        check_int("hidden_dim", hidden_dim, 1)
        check_range("horizon", horizon, 0.0, low_open=True)
        check_range("rtol", rtol, 0.0, low_open=True)
        check_range("atol", atol, 0.0, low_open=True)
        check_range("lr", lr, 0.0, low_open=True)
        super().__init__(regularizers=regularizers or [])
        self.save_hyperparameters(ignore=["regularizers"])
        self.field = CNFField(dim, hidden_dim)
        self.register_buffer("span", torch.tensor([0.0, horizon]), persistent=False)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` per sample, ``(B,)`` (Hutchinson's trace in training, exact otherwise)."""
        self.field.exact = not self.training
        if self.training:
            self.field.draw_probes(x)
        h = self.hparams
        zero = x.new_zeros(x.shape[0], 1)
        z, dlogp = self.odeint(
            self.field,
            (x, zero),
            self.span.to(x.dtype),
            method=h.method,
            rtol=h.rtol,
            atol=h.atol,
        )
        z1, d1 = z[-1], dlogp[-1].squeeze(-1)
        base = -0.5 * (z1.pow(2).sum(-1) + z1.shape[-1] * _LOG_2PI)
        return base - d1

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, _ = batch
        loss = -self.log_prob(x).mean()
        self.log("train/nll", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/nll", -self.log_prob(batch[0]).mean(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test/nll", -self.log_prob(batch[0]).mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
