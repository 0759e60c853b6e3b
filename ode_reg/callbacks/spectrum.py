"""Spectrum monitor: Jacobian eigenvalues along the training step's trajectory.

Small states get the dense eigenvalues of each sampled Jacobian; above ``dense_max_dim``
the spectral abscissa and radius are estimated matrix-free, with a few restarted Arnoldi
cycles on vector-Jacobian products (:func:`~ode_reg.functional.spectra.jacobian_ritz_values`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from ode_reg._checks import check_bool, check_choice, check_int
from ode_reg.callbacks._logging import (
    WANDB_MAX_BINS,
    PreStepMonitor,
    has_plot_sink,
    is_due,
    log_figure,
    log_histogram,
    log_scalars,
    logger_step,
    reduce_values,
    resolve_every_n,
)
from ode_reg.callbacks.orthogonality import _is_orthogonal_flow
from ode_reg.functional.indices import spread_indices
from ode_reg.functional.spectra import (
    jacobian,
    jacobian_ritz_values,
    spectral_abscissa,
    spectral_radius,
)
from ode_reg.metrics import MeanSpectralAbscissa, RunningMax
from ode_reg.plotting import eigenvalue_figure
from ode_reg.trajectory import Trajectory

__all__ = ["METHODS", "SpectrumMonitor"]

#: Above this many Jacobian entries for the whole batch (B d^2), the sampled rows' Jacobians
#: are built by d plain VJPs instead of one vectorized ``jacrev`` (bounded memory).
_VECTORIZED_LIMIT = 1 << 22


METHODS = ("auto", "dense", "krylov")


def _flat_field(traj: Trajectory, k: int) -> tuple[Tensor, Any]:
    """The states ``z_k`` flattened to ``(B, d)`` and the field on such flattened states.

    The field is evaluated on the whole batch ``z_k`` through ``traj.field_at(k, .)``, so that
    inputs the field held during the solve (one per sample) line up with their rows.
    """
    z = traj.states[k].detach()
    single = z.dim() < 2  # a 1-D state is one sample (as in ``integrate``)
    b = 1 if single else z.shape[0]
    shape = tuple(z.shape) if single else tuple(z.shape[1:])

    def field(_t: Tensor, x: Tensor) -> Tensor:
        arg = x.reshape(shape) if single else x.reshape(x.shape[0], *shape)
        return traj.field_at(k, arg).reshape(x.shape[0], -1)

    return z.reshape(b, -1), field


def _sampled_jacobians(traj: Trajectory, k: int, rows: list[int]) -> Tensor:
    """Jacobians ``df(t_k, z)/dz`` at the rows ``rows`` of ``z_k``, shape ``(len(rows), d, d)``."""
    flat, field = _flat_field(traj, k)
    z = traj.states[k]
    b, d = flat.shape
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


def _rows_alone(field: Any, t: Tensor, flat: Tensor, rows: list[int]) -> bool:
    """Whether the field evaluated on the rows ``rows`` alone gives those rows of its value on
    the whole batch (it does for a row-wise field without per-sample held inputs; a held input
    of the whole batch fails to broadcast or changes the shape, and the batch is kept)."""
    with torch.no_grad():
        try:
            part = field(t, flat[rows])
        except (RuntimeError, ValueError, IndexError):  # e.g. a held input of the whole batch
            return False
        if not isinstance(part, Tensor) or part.shape != (len(rows), flat.shape[1]):
            return False
        whole = field(t, flat)[rows]
    return _close(part, whole)


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to the rounding of a reordered float sum (a wrong held input is off by O(1))."""
    tol = 1e-8 if a.dtype == torch.float64 else 1e-3
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * scale))


def _same_field(parts: list[tuple[Any, Tensor, Tensor, Any]]) -> bool:
    """Whether the fields of several checkpoints agree on all their sampled states."""
    if len(parts) < 2:
        return True
    stacked = torch.cat([p[2] for p in parts])
    with torch.no_grad():
        try:
            ref = parts[0][0](parts[0][1], stacked)
            scale = 1e-6 * float(ref.abs().max())
            for field, t, _, _ in parts[1:]:
                other = field(t, stacked)
                if other.shape != ref.shape or not torch.allclose(
                    other, ref, rtol=1e-5, atol=scale
                ):
                    return False
        except (RuntimeError, ValueError, IndexError):  # no stacked batch: keep them apart
            return False
    return True


class SpectrumMonitor(PreStepMonitor):
    r"""Logs eigenvalues of the field's Jacobian along the training step's trajectory.

    At each due step, before the optimizer step (``on_before_optimizer_step``, under
    ``torch.enable_grad``: the parameters are those that produced the trajectory; see
    :class:`~ode_reg.callbacks._logging.PreStepMonitor`), for every chained trajectory of
    ``pl_module.ode_step`` (a :class:`~ode_reg.RegularizedODEModule`), the per-sample
    Jacobians ``J = df(t_k, z_{k,i})/dz`` are taken at ``num_checkpoints`` checkpoints ``k``
    (spread evenly, the last one included) and ``num_samples`` samples ``i`` (spread evenly
    over the batch). The field is evaluated through ``Trajectory.field_at``, so held inputs
    (ODE-RNN) are those of the solve. Only ``torch.autograd.grad`` / ``torch.func`` are used:
    parameters' ``.grad`` are left untouched.

    Two ways to get the eigenvalues (``method``):

    - ``"dense"``: the sampled Jacobians ``(d, d)`` and ``torch.linalg.eigvals`` (exact;
      ``d`` vector-Jacobian products and ``O(d^3)`` per sample);
    - ``"krylov"``: matrix-free Ritz values from ``restarts + 1`` cycles of Arnoldi iteration
      with a ``krylov_dim``-vector basis on vector-Jacobian products, all sampled rows of a
      checkpoint at once (:func:`~ode_reg.functional.spectra.jacobian_ritz_values`): about
      ``krylov_dim (1 + restarts / 2)`` backward passes of the field per checkpoint, whatever
      ``d``. The outermost Ritz values converge first: the abscissa and radius are estimates
      (for a normal Jacobian, lower bounds; the accuracy measured on test spectra is in
      ``tests/test_spectrum_estimator.py``), and the histogram shows Ritz values;
    - ``"auto"`` (default): dense up to ``dense_max_dim`` state entries per sample, Krylov
      above.

    Logged scalar keys:

    - ``spectrum/abscissa``: ``max Re lambda`` over all sampled Jacobians (max over ranks);
    - ``spectrum/abscissa_mean``: mean over the sampled Jacobians of their abscissa (mean
      over ranks);
    - ``spectrum/radius``: ``max |lambda|`` (max over ranks);
    - ``spectrum/abscissa_running_max``: max of ``spectrum/abscissa`` since the start of
      training (kept in the checkpoint);
    - ``spectrum/abscissa_epoch_mean``: a :class:`~ode_reg.metrics.MeanSpectralAbscissa` of the
      step values, logged ``on_epoch`` (its state is kept in the checkpoint: a run resumed
      mid-epoch logs the uninterrupted value);
    - with ``structure=True``, for orthogonal flows (weights ``W_k`` on the trajectory), with
      ``Q_k = W_k^T W_K``:
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
        method: ``"auto"``, ``"dense"`` or ``"krylov"`` (see above).
        dense_max_dim: with ``"auto"``, the largest per-sample state size ``d`` that gets
            dense eigenvalues (``>= 1``).
        krylov_dim: Arnoldi basis size, ``>= 2`` (capped at ``d``; ``>= d`` is exact).
        restarts: extra Arnoldi cycles (thick restarts), ``>= 0``.

    Raises:
        ValueError: if a cadence, ``num_samples``, ``num_checkpoints`` or ``dense_max_dim``
            is below 1, ``bins`` is outside ``[1, 512]``, ``structure`` is not a bool,
            ``method`` is not one of ``"auto"``, ``"dense"``, ``"krylov"``, ``krylov_dim < 2``
            or ``restarts < 0``.

    Example::

        >>> import lightning as L
        >>> from ode_reg.callbacks import SpectrumMonitor
        >>> monitor = SpectrumMonitor(every_n_steps=50, num_samples=4, num_checkpoints=3)
        >>> trainer = L.Trainer(callbacks=[monitor])
    """

    #: ``spectrum/abscissa_running_max``: the largest abscissa since the start (a
    #: ``MaxMetric``).
    running_max_abscissa = RunningMax(float("-inf"), nan_strategy="ignore")

    def __init__(
        self,
        every_n_steps: int | None = None,
        plot_every_n_steps: int | None = None,
        *,
        num_samples: int | None = 4,
        num_checkpoints: int | None = 3,
        bins: int = 64,
        structure: bool = True,
        method: str = "auto",
        dense_max_dim: int = 256,
        krylov_dim: int = 32,
        restarts: int = 2,
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
        check_bool("structure", structure)
        check_choice("method", method, METHODS)
        check_int("dense_max_dim", dense_max_dim, 1)
        check_int("krylov_dim", krylov_dim, 2)
        check_int("restarts", restarts, 0)
        self.every_n_steps = every_n_steps
        self.plot_every_n_steps = plot_every_n_steps
        self.num_samples = num_samples
        self.num_checkpoints = num_checkpoints
        self.bins = bins
        self.structure = structure
        self.method = method
        self.dense_max_dim = dense_max_dim
        self.krylov_dim = krylov_dim
        self.restarts = restarts
        self.epoch_mean = MeanSpectralAbscissa()
        #: The eigenvalues of the last computation (``None`` before): ``"jacobian"``
        #: ``(n, d)`` complex (Ritz values ``(n, krylov_dim)`` with the Krylov method),
        #: ``"flow_q"`` ``(m, d)`` complex or ``None``.
        self.last_eigenvalues: dict[str, Tensor | None] | None = None
        #: The method the last computation used per trajectory (``"dense"``/``"krylov"``).
        self.last_methods: list[str] = []

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

    @override
    def cadences(self, trainer: pl.Trainer) -> tuple[int, int]:
        return self._cadences(trainer)

    def _cadences(self, trainer: pl.Trainer) -> tuple[int, int]:
        every = resolve_every_n(trainer, self.every_n_steps)
        plot = self.plot_every_n_steps if self.plot_every_n_steps is not None else 10 * every
        return every, plot

    def _method_for(self, d: int) -> str:
        if self.method != "auto":
            return self.method
        return "dense" if d <= self.dense_max_dim else "krylov"

    def _chain_eigs(self, traj: Trajectory) -> tuple[list[Tensor], str]:
        """Eigenvalues (or Ritz values) of the sampled Jacobians of one chained trajectory."""
        ks = spread_indices(traj.num_checkpoints, self.num_checkpoints)
        d = _flat_field(traj, ks[0])[0].shape[1]
        method = self._method_for(d)
        if method == "dense":
            eigs = []
            for k in ks:
                z = traj.states[k]
                rows = spread_indices(z.shape[0] if z.dim() > 1 else 1, self.num_samples)
                eigs.append(torch.linalg.eigvals(_sampled_jacobians(traj, k, rows)))
            return eigs, method
        # Krylov: the field on the sampled rows alone where it allows it (the products then
        # cost n / B of the batch's), and, if every sampled checkpoint has the same field (an
        # autonomous field without held inputs), all checkpoints' rows in one Arnoldi run, so
        # that each product reads the weights once for all of them.
        parts = []
        for k in ks:
            flat, field = _flat_field(traj, k)
            rows = spread_indices(flat.shape[0], self.num_samples)
            t = traj.times[k]
            alone = len(rows) == flat.shape[0] or _rows_alone(field, t, flat, rows)
            parts.append((field, t, flat[rows] if alone else flat, None if alone else rows))
        kw = {"krylov_dim": self.krylov_dim, "restarts": self.restarts}
        if all(p[3] is None for p in parts) and _same_field(parts):
            stacked = torch.cat([p[2] for p in parts])
            ritz = jacobian_ritz_values(parts[0][0], parts[0][1], stacked, **kw)
            return list(ritz.split([p[2].shape[0] for p in parts])), method
        return [jacobian_ritz_values(f, t, z, rows, **kw) for f, t, z, rows in parts], method

    def measure(self, pl_module: pl.LightningModule) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Compute the spectra now (rank-local): ``(scalars, eigenvalues)``.

        Returns:
            The rank-local scalar values by key (before any cross-rank reduction) and the
            eigenvalues (``"jacobian"``, ``"flow_q"``: complex tensors or ``None``).
        """
        values: dict[str, Tensor] = {}
        jac_eigs: list[Tensor] = []
        flow_eigs: list[Tensor] = []
        methods: list[str] = []
        record = getattr(pl_module, "ode_step", None)
        with torch.enable_grad():
            if record is not None:
                for traj in record.groups:
                    eigs, method = self._chain_eigs(traj)
                    jac_eigs.extend(eigs)
                    methods.append(method)
        self.last_methods = methods
        with torch.no_grad():
            if jac_eigs:
                per = torch.cat([spectral_abscissa(e) for e in jac_eigs])
                values["spectrum/abscissa"] = per.max()
                values["spectrum/abscissa_mean"] = per.mean()
                values["spectrum/radius"] = torch.cat([spectral_radius(e) for e in jac_eigs]).max()
            if self.structure:
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
            "jacobian": _cat_ragged(jac_eigs),
            "flow_q": torch.cat(flow_eigs).detach() if flow_eigs else None,
        }
        return values, eig

    @override
    def epoch_metrics(self) -> dict[str, Metric]:
        return {"epoch_mean": self.epoch_mean}

    @override
    def measure_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
                type(self).running_max_abscissa.fold(self, float(a))
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
                    trainer,
                    "spectrum/jacobian_real",
                    eig["jacobian"].real,
                    bins=self.bins,
                    xlabel="Re λ of ∂f/∂z (1 / unit of ODE time)",
                )
            if eig["flow_q"] is not None:
                log_histogram(
                    trainer,
                    "spectrum/flow_q_real",
                    eig["flow_q"].real,
                    bins=self.bins,
                    xlabel="Re λ(W_kᵀ W_*) (dimensionless)",
                )
            if eig["jacobian"] is not None or eig["flow_q"] is not None:
                jac = eig["jacobian"] if eig["jacobian"] is not None else torch.zeros(0)
                fig = eigenvalue_figure(
                    jac, flow_eigs=eig["flow_q"], step=logger_step(trainer), samples=len(jac)
                )
                log_figure(trainer, "spectrum/eigenvalues", fig)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "running_max_abscissa": self.running_max_abscissa,
            "epoch": self.save_epoch_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.running_max_abscissa = float(state_dict["running_max_abscissa"])
        self.load_epoch_state(state_dict.get("epoch"))


def _cat_ragged(eigs: list[Tensor]) -> Tensor | None:
    """Concatenate eigenvalue rows ``(n_j, d_j)``; rows of unequal width are flattened."""
    if not eigs:
        return None
    if len({e.shape[-1] for e in eigs}) == 1:
        return torch.cat(eigs).detach()
    return torch.cat([e.reshape(-1) for e in eigs]).detach()
