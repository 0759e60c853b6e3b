"""Spectrum monitor: Jacobian eigenvalues along the last training step's trajectory."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ode_reg._checks import check_int
from ode_reg.callbacks._logging import (
    WANDB_MAX_BINS,
    has_plot_sink,
    is_due,
    log_figure,
    log_histogram,
    log_scalars,
    reduce_values,
    resolve_every_n,
)
from ode_reg.callbacks.orthogonality import _is_orthogonal_flow
from ode_reg.functional.spectra import jacobian, spectral_abscissa, spectral_radius
from ode_reg.metrics import MeanSpectralAbscissa
from ode_reg.plotting import eigenvalue_figure
from ode_reg.trajectory import Trajectory

__all__ = ["SpectrumMonitor"]

#: Above this many Jacobian entries for the whole batch (B d^2), the sampled rows' Jacobians
#: are built by d plain VJPs instead of one vectorized ``jacrev`` (bounded memory).
_VECTORIZED_LIMIT = 1 << 22


def _spread(n: int, num: int | None) -> list[int]:
    """``num`` indices spread evenly over ``range(n)``, first and last included (all if None)."""
    if num is None or num >= n:
        return list(range(n))
    if num == 1:
        return [n - 1]
    return sorted({int(round(i * (n - 1) / (num - 1))) for i in range(num)})


def _sampled_jacobians(traj: Trajectory, k: int, rows: list[int]) -> Tensor:
    """Jacobians ``df(t_k, z)/dz`` at the rows ``rows`` of ``z_k``, shape ``(len(rows), d, d)``.

    The field is evaluated on the whole batch ``z_k`` through ``traj.field_at(k, .)``, so that
    inputs the field held during the solve (one per sample) line up with their rows; the
    state is flattened to ``(B, d)``.
    """
    z = traj.states[k].detach()
    single = z.dim() < 2  # a 1-D state is one sample (as in ``integrate``)
    b = 1 if single else z.shape[0]
    shape = tuple(z.shape) if single else tuple(z.shape[1:])
    flat = z.reshape(b, -1)
    d = flat.shape[1]

    def field(_t: Tensor, x: Tensor) -> Tensor:
        arg = x.reshape(shape) if single else x.reshape(x.shape[0], *shape)
        return traj.field_at(k, arg).reshape(x.shape[0], -1)

    if b * d * d <= _VECTORIZED_LIMIT:
        return jacobian(field, traj.times[k], flat).detach()[rows]
    x = flat.clone().requires_grad_(True)
    out = field(traj.times[k], x)
    if out.shape != x.shape:
        raise ValueError(
            f"the field must map states of shape {tuple(z.shape)} to the same shape, got "
            f"{tuple(out.shape)}"
        )
    idx = torch.tensor(rows, device=x.device)
    cols = []
    for j in range(d):
        grad_out = torch.zeros_like(out)
        grad_out[idx, j] = 1.0
        (g,) = torch.autograd.grad(out, x, grad_out, retain_graph=j < d - 1)
        cols.append(g[idx])
    return torch.stack(cols, dim=1).detach()


def _skew_matrices(pl_module: torch.nn.Module) -> list[Tensor]:
    from ode_reg.dynamics import AntisymmetricODEFunc, SkewLinearODEFunc

    out = []
    for m in pl_module.modules():
        if isinstance(m, AntisymmetricODEFunc):
            out.append(m.weight - m.weight.mT)
        elif isinstance(m, SkewLinearODEFunc):
            out.append(m.A - m.A.mT)
    return out


class SpectrumMonitor(Callback):
    r"""Logs eigenvalues of the field's Jacobian along the last training step's trajectory.

    At each due step (``on_train_batch_end``, under ``torch.enable_grad``), for every chained
    trajectory of ``pl_module.ode_step`` (a :class:`~ode_reg.RegularizedODEModule`), the
    per-sample Jacobians ``J = df(t_k, z_{k,i})/dz`` are taken at ``num_checkpoints``
    checkpoints ``k`` (spread evenly, the last one included) and ``num_samples`` samples ``i``
    (spread evenly over the batch). The field is evaluated through ``Trajectory.field_at``, so
    held inputs (ODE-RNN) are those of the solve. Only ``torch.autograd.grad`` /
    ``torch.func`` are used: parameters' ``.grad`` are left untouched.

    Logged scalar keys:

    - ``spectrum/abscissa``: ``max Re lambda`` over all sampled Jacobians (max over ranks);
    - ``spectrum/abscissa_mean``: mean over the sampled Jacobians of their abscissa (mean
      over ranks);
    - ``spectrum/radius``: ``max |lambda|`` (max over ranks);
    - ``spectrum/abscissa_running_max``: max of ``spectrum/abscissa`` since the start of
      training (kept in the checkpoint);
    - ``spectrum/abscissa_epoch_mean``: a :class:`~ode_reg.metrics.MeanSpectralAbscissa` of the
      step values, logged ``on_epoch``;
    - with ``structure=True``: ``spectrum/skew_real_max``, ``max |Re lambda(W - W^T)|`` over
      every :class:`~ode_reg.dynamics.AntisymmetricODEFunc` (and ``A - A^T`` of every
      :class:`~ode_reg.dynamics.SkewLinearODEFunc`), which should be ~0; for orthogonal flows
      (weights ``W_k`` on the trajectory), with ``Q_k = W_k^T W_K``:
      ``spectrum/flow_q_min_real`` (``min Re lambda(Q_k)``, the quantity the spectral
      constraint bounds below by ``gamma``) and ``spectrum/flow_q_circle_dist``
      (``max ||lambda| - 1|``, ~0 for orthogonal ``W_k``).

    At the plot cadence, on rank zero (its own samples): histograms ``spectrum/jacobian_real``
    (``Re lambda``) and ``spectrum/flow_q_real`` (``Re lambda(Q_k)``, flows only), and the image
    ``spectrum/eigenvalues`` (complex-plane scatter; a second panel with ``eig(Q_k)`` against
    the unit circle for flows). See :mod:`ode_reg.callbacks._logging` for where they go.

    Args:
        every_n_steps: scalars every n training batches (``>= 1``); ``None`` follows
            ``Trainer(log_every_n_steps=...)``.
        plot_every_n_steps: histograms and image every n batches (``>= 1``); ``None``: ten
            times the scalar cadence.
        num_samples: samples per checkpoint (``>= 1``), ``None`` for the whole batch.
        num_checkpoints: checkpoints per trajectory (``>= 1``), ``None`` for all.
        bins: histogram bins, in ``[1, 512]``.
        structure: also log the skew and flow spectra.

    Raises:
        ValueError: if a cadence, ``num_samples`` or ``num_checkpoints`` is below 1, ``bins``
            is outside ``[1, 512]`` or ``structure`` is not a bool.

    Example::

        >>> import lightning as L
        >>> from ode_reg.callbacks import SpectrumMonitor
        >>> monitor = SpectrumMonitor(every_n_steps=50, num_samples=4, num_checkpoints=3)
        >>> trainer = L.Trainer(callbacks=[monitor])
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        plot_every_n_steps: int | None = None,
        *,
        num_samples: int | None = 4,
        num_checkpoints: int | None = 3,
        bins: int = 64,
        structure: bool = True,
    ) -> None:
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, 1)
        if plot_every_n_steps is not None:
            check_int("plot_every_n_steps", plot_every_n_steps, 1)
        if num_samples is not None:
            check_int("num_samples", num_samples, 1)
        if num_checkpoints is not None:
            check_int("num_checkpoints", num_checkpoints, 1)
        check_int("bins", bins, 1)
        if bins > WANDB_MAX_BINS:
            raise ValueError(f"`bins` must lie in [1, {WANDB_MAX_BINS}], got {bins}")
        if not isinstance(structure, bool):
            raise ValueError(f"`structure` must be a bool, got {structure!r}")
        self.every_n_steps = every_n_steps
        self.plot_every_n_steps = plot_every_n_steps
        self.num_samples = num_samples
        self.num_checkpoints = num_checkpoints
        self.bins = bins
        self.structure = structure
        self.running_max_abscissa = float("-inf")
        self.epoch_mean = MeanSpectralAbscissa()
        #: The eigenvalues of the last computation (``None`` before): ``"jacobian"``
        #: ``(n, d)`` complex, ``"flow_q"`` ``(m, d)`` complex or ``None``.
        self.last_eigenvalues: dict[str, Tensor | None] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            num_samples=self.num_samples,
            num_checkpoints=self.num_checkpoints,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.epoch_mean = self.epoch_mean.to(pl_module.device)
        if stage == "fit" and not hasattr(pl_module, "ode_step"):
            rank_zero_warn(
                f"SpectrumMonitor: {type(pl_module).__name__} is not a RegularizedODEModule "
                "(no `ode_step`): only the structural spectra (skew, flows) can be logged"
            )

    def _cadences(self, trainer: pl.Trainer) -> tuple[int, int]:
        every = resolve_every_n(trainer, self.every_n_steps)
        plot = self.plot_every_n_steps if self.plot_every_n_steps is not None else 10 * every
        return every, plot

    def measure(self, pl_module: pl.LightningModule) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Compute the spectra now (rank-local): ``(scalars, eigenvalues)``.

        Returns:
            The rank-local scalar values by key (before any cross-rank reduction) and the
            eigenvalues (``"jacobian"``, ``"flow_q"``: complex tensors or ``None``).
        """
        values: dict[str, Tensor] = {}
        jac_eigs: list[Tensor] = []
        flow_eigs: list[Tensor] = []
        record = getattr(pl_module, "ode_step", None)
        with torch.enable_grad():
            if record is not None:
                for traj in record.groups:
                    for k in _spread(traj.num_checkpoints, self.num_checkpoints):
                        z = traj.states[k]
                        rows = _spread(z.shape[0] if z.dim() > 1 else 1, self.num_samples)
                        jac = _sampled_jacobians(traj, k, rows)
                        jac_eigs.append(torch.linalg.eigvals(jac))
        with torch.no_grad():
            if jac_eigs:
                eigs = torch.cat(jac_eigs)  # (n, d)
                per = spectral_abscissa(eigs)
                values["spectrum/abscissa"] = per.max()
                values["spectrum/abscissa_mean"] = per.mean()
                values["spectrum/radius"] = spectral_radius(eigs).max()
            if self.structure:
                skews = _skew_matrices(pl_module)
                if skews:
                    worst = [
                        torch.linalg.eigvals(s.detach().double()).real.abs().max() for s in skews
                    ]
                    values["spectrum/skew_real_max"] = torch.stack(worst).max()
                if record is not None:
                    for tr in record.trajectories:
                        if tr.weights is None or not _is_orthogonal_flow(tr.func):
                            continue
                        w = tr.weight_matrices.detach().double()
                        flow_eigs.append(torch.linalg.eigvals(w.mT @ w[-1]))
                if flow_eigs:
                    q = torch.cat(flow_eigs)
                    values["spectrum/flow_q_min_real"] = q.real.min()
                    values["spectrum/flow_q_circle_dist"] = (q.abs() - 1.0).abs().max()
        eig = {
            "jacobian": torch.cat(jac_eigs).detach() if jac_eigs else None,
            "flow_q": torch.cat(flow_eigs).detach() if flow_eigs else None,
        }
        return values, eig

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        every, plot = self._cadences(trainer)
        scalars_due, plot_due = is_due(trainer, every), is_due(trainer, plot)
        if not (scalars_due or plot_due):
            return
        values, eig = self.measure(pl_module)
        self.last_eigenvalues = eig
        if scalars_due and values:
            values = reduce_values(
                trainer,
                values,
                {
                    "spectrum/abscissa": "max",
                    "spectrum/abscissa_mean": "mean",
                    "spectrum/radius": "max",
                },
            )
            metrics: dict[str, Tensor | float] = dict(values)
            if "spectrum/abscissa" in values:
                a = values["spectrum/abscissa"]
                self.running_max_abscissa = max(self.running_max_abscissa, float(a))
                metrics["spectrum/abscissa_running_max"] = self.running_max_abscissa
                self.epoch_mean.update(a.detach())
            log_scalars(trainer, pl_module, metrics)
            if "spectrum/abscissa" in values:
                pl_module.log(
                    "spectrum/abscissa_epoch_mean",
                    self.epoch_mean,
                    on_step=False,
                    on_epoch=True,
                    metric_attribute="_ode_reg_spectrum_epoch_mean",
                )
        if plot_due and trainer.is_global_zero and has_plot_sink(trainer):
            if eig["jacobian"] is not None:
                log_histogram(
                    trainer, "spectrum/jacobian_real", eig["jacobian"].real, bins=self.bins
                )
            if eig["flow_q"] is not None:
                log_histogram(trainer, "spectrum/flow_q_real", eig["flow_q"].real, bins=self.bins)
            if eig["jacobian"] is not None or eig["flow_q"] is not None:
                jac = eig["jacobian"] if eig["jacobian"] is not None else torch.zeros(0)
                fig = eigenvalue_figure(jac, flow_eigs=eig["flow_q"])
                log_figure(trainer, "spectrum/eigenvalues", fig)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"running_max_abscissa": self.running_max_abscissa}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.running_max_abscissa = float(state_dict["running_max_abscissa"])
