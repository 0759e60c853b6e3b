"""Gradient monitor: parameter gradient norms, the adjoint profile and the sensitivity ratios."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import Metric
from typing_extensions import override

from ode_reg._checks import check_bool, check_int
from ode_reg._once import SayOnce
from ode_reg.adjoint import sensitivities as compute_sensitivities
from ode_reg.callbacks._logging import (
    PreStepMonitor,
    has_plot_sink,
    is_due,
    log_figure,
    log_scalars,
    logger_step,
    resolve_every_n,
)
from ode_reg.metrics import MeanAdjointRatio, RunningMax
from ode_reg.plan import Need
from ode_reg.plotting import profile_figure
from ode_reg.trajectory import Trajectory

__all__ = ["GradientNormMonitor", "sensitivity_ratios"]

#: Floor of denominators (a zero adjoint or sensitivity gives a huge, not an infinite, ratio).
_TINY = 1e-30


def sensitivity_ratios(times: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The bound ratio and the cancellation ratio of sensitivity densities ``y_k`` (MATH.md).

    With ``G`` the trapezoid rule of ``y`` over the times (``torch.trapezoid``: the quadrature
    of eq. 23, ``dL/dtheta = integral of y dt``):

    - bound ratio ``|G| / ((t_K - t_0) max_k |y_k|)`` in ``[0, 1]`` (how tight eq. 30 is);
    - cancellation ratio ``|G| /`` (the trapezoid rule of ``|y_k|``) in ``[0, 1]`` (near 0: the gradient
      vanishes by cancellation although no ``y_k`` is small).

    Args:
        times: checkpoint times ``(K + 1,)``.
        y: sensitivity densities ``(K + 1, P)``.

    Returns:
        ``(bound_ratio, cancellation_ratio)``, 0-d tensors.

    Raises:
        ValueError: on mismatched shapes.

    Example::

        >>> import torch
        >>> t = torch.tensor([0.0, 1.0, 2.0])
        >>> y = torch.tensor([[1.0], [1.0], [1.0]])  # constant: both ratios are 1
        >>> [round(float(r), 6) for r in sensitivity_ratios(t, y)]
        [1.0, 1.0]
    """
    if not isinstance(times, Tensor) or times.dim() != 1 or times.numel() < 2:
        shape = tuple(times.shape) if isinstance(times, Tensor) else type(times).__name__
        raise ValueError(f"`times` must be a 1-D tensor of at least 2 times, got {shape}")
    if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[0] != times.shape[0]:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"`y` must have shape ({times.shape[0]}, P), got {shape}")
    t = times.to(y.dtype)
    norms = y.norm(dim=1)
    integral = torch.trapezoid(y, t, dim=0).norm()
    bound = integral / ((t[-1] - t[0]) * norms.max()).clamp_min(_TINY)
    cancel = integral / torch.trapezoid(norms, t).clamp_min(_TINY)
    return bound, cancel


def _sample_norms(x: Tensor) -> Tensor:
    """Per-sample norms ``(K + 1, B)`` of stacked states or adjoints ``(K + 1, B, ...)``.

    A stack of 1-D states ``(K + 1, d)`` is one sample (as in ``integrate``): ``(K + 1, 1)``.
    """
    if x.dim() == 2:
        return x.norm(dim=1, keepdim=True)
    return x.flatten(2).norm(dim=2)


def _adjoint_targets(traj: Trajectory) -> list[tuple[Tensor, bool]]:
    """For each checkpoint ``k``: the tensor whose gradient in the backward is ``a_k``, and
    whether ``a_k`` is its last row.

    As :func:`ode_reg.adjoint.adjoints_and_grads` reads them: a checkpoint state, or, where
    the end state ``z_K`` of a solve is a row of the solution the caller received (so the
    loss reads that tensor, not the solver's state), that solution. A chained trajectory names
    the solve and index each of its checkpoints comes from (``owners``).
    """
    out = []
    for tr, j in traj.checkpoint_owners():
        end = bool(getattr(tr, "end_from_solution", False)) and j == tr.num_checkpoints - 1
        solution = getattr(tr, "flat_solution", None) if end else None
        out.append((solution, True) if solution is not None else (tr.states[j], False))
    return out


def _first_last_finite(p: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(max/min ratio, first, last)`` over the finite entries of a profile (``None``: fewer
    than two, so no ratio can be read: one point is no profile)."""
    ok = torch.isfinite(p)
    if int(ok.sum()) < 2:
        return None
    q = p[ok]
    return q.max() / q.min().clamp_min(_TINY), q[0], q[-1]


def _loss_scale(trainer: pl.Trainer) -> float:
    """The AMP loss scale in effect for this backward (1 without a grad scaler)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    return 1.0


class GradientNormMonitor(PreStepMonitor):
    r"""Logs gradient norms, the adjoint profile and the sensitivity ratios of training steps.

    Everything is measured in ``on_before_optimizer_step``, while the parameters are those of
    the step's forward and backward (see :class:`~ode_reg.callbacks._logging.PreStepMonitor`):
    the sensitivities computed here are those of the field that was integrated.

    **Gradient norms** (after accumulation and AMP unscaling, before clipping; under DDP
    already averaged, so equal on all ranks): the ``norm_type``
    norm of the gradients of each top-level child module (``lightning`` ``grad_norm``) and of
    all of them together.

    **Adjoint profile** ``p_k = mean_i |a_{k,i}|`` over the chained trajectory of the last
    training step (``pl_module.ode_step`` of a :class:`~ode_reg.RegularizedODEModule`):

    - if a regularizer computed the task-loss adjoints in the step
      (``ode_step.adjoints[g]``), those are used;
    - otherwise tensor hooks are put on the checkpoint states ``z_k`` in
      ``on_before_backward`` and read the gradients the training backward itself delivers:
      **no extra backward pass**. This is the adjoint of the loss that is backpropagated
      (task loss plus any regularizer that reads ``z_k``); the AMP loss scale is divided out.

    The profile is that of the loss the optimizer effectively follows: under gradient
    accumulation the adjoint is divided by ``accumulate_grad_batches`` (as Lightning divides
    the loss), and under DDP each rank's adjoint -- ``world_size`` times the adjoint of the
    whole-batch mean loss, since DDP averages the ranks' gradients -- is divided by
    ``world_size`` and the sums of norms and sample counts are summed over ranks: the logged
    profile equals that of one process with the whole batch.

    **Sensitivities** ``y_k`` (when the step has them: from a regularizer in the
    ``StepRecord``, or, with ``compute_sensitivities=True``, from the adjoints above with one
    VJP of the field per checkpoint, still without a second backward through the trajectory;
    mean-reduced over ranks): their norms ``|y_k|`` and, with ``G = sum_k w_k y_k`` the
    trapezoid quadrature of ``dL/dtheta`` (eq. 23), the bound ratio
    ``|G| / ((t_K - t_0) max_k |y_k|)`` and the cancellation ratio ``|G| / sum_k w_k |y_k|``
    (see :func:`sensitivity_ratios`). ``compute_sensitivities`` needs a field whose value at a
    checkpoint depends on the parameters only through its own parameters (not, e.g., through
    an :class:`~ode_reg.dynamics.OrthogonalFlow`'s ``W_k``, whose graph the backward freed);
    otherwise it warns once and skips.

    Logged scalar keys (``<g>`` suffix ``/group<g>`` for a step's second and later chained
    trajectories, i.e. states of another shape):

    - ``grad/total_norm``, ``grad/norm/<child>`` (``<child>`` a top-level child module's
      name, ``_self`` for parameters held by the LightningModule itself);
    - ``adjoint/ratio_max_min``: ``max_k p_k / min_k p_k`` (explosion or vanishing),
      ``adjoint/norm_first`` (``p_0``), ``adjoint/norm_last`` (``p_K``); a checkpoint the
      training backward does not reach (``z_0`` an input that does not require grad, when no
      regularizer asked for ``a_0``) has no adjoint: it is NaN in the profile and left out
      (``norm_first`` is then the first checkpoint that has one, and the sensitivities from
      the backward are skipped);
    - ``adjoint/ratio_running_max`` (max since the start, kept in the checkpoint) and
      ``adjoint/ratio_epoch_geomean`` (a :class:`~ode_reg.metrics.MeanAdjointRatio`, geometric,
      logged ``on_epoch``; its state is kept in the checkpoint, so a run resumed mid-epoch
      logs the uninterrupted value);
    - ``sensitivity/bound_ratio``, ``sensitivity/cancellation_ratio``.

    Image at the plot cadence: ``adjoint/profile`` (log-scale ``p_k`` and ``|y_k|`` against
    ``t_k``). The last profiles are kept in :attr:`last_profiles`.

    Args:
        every_n_steps: scalars every n training batches (``>= 1``); ``None`` follows
            ``Trainer(log_every_n_steps=...)``.
        plot_every_n_steps: image every n batches (``>= 1``); ``None``: ten times the scalar
            cadence.
        norm_type: the p of the gradient norms, ``> 0`` or ``float("inf")``/``"inf"``.
        per_module: also log ``grad/norm/<child>``.
        adjoint_profile: capture the adjoint profile (hooks on due steps only).
        compute_sensitivities: compute ``y_k`` from the adjoints when no regularizer did.

    Raises:
        ValueError: if a cadence is below 1, ``norm_type`` is not positive, or a flag is not
            a bool.

    Example::

        >>> import lightning as L
        >>> from ode_reg.callbacks import GradientNormMonitor
        >>> trainer = L.Trainer(callbacks=[GradientNormMonitor(compute_sensitivities=True)])
    """

    #: ``adjoint/ratio_running_max``: the largest ratio since the start (a ``MaxMetric``).
    running_max_ratio = RunningMax(0.0, nan_strategy="ignore")

    def __init__(
        self,
        every_n_steps: int | None = None,
        plot_every_n_steps: int | None = None,
        *,
        norm_type: float | str = 2.0,
        per_module: bool = True,
        adjoint_profile: bool = True,
        compute_sensitivities: bool = False,
    ) -> None:
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, 1)
        if plot_every_n_steps is not None:
            check_int("plot_every_n_steps", plot_every_n_steps, 1)
        try:
            p = float(norm_type)
        except (TypeError, ValueError):
            p = float("nan")
        if isinstance(norm_type, bool) or not p > 0:
            raise ValueError(f"`norm_type` must be a number > 0 or 'inf', got {norm_type!r}")
        for name, flag in (
            ("per_module", per_module),
            ("adjoint_profile", adjoint_profile),
            ("compute_sensitivities", compute_sensitivities),
        ):
            check_bool(name, flag)
        self.every_n_steps = every_n_steps
        self.plot_every_n_steps = plot_every_n_steps
        self.norm_type = p
        self.per_module = per_module
        self.adjoint_profile = adjoint_profile
        self.compute_sensitivities = compute_sensitivities
        self.epoch_ratio = MeanAdjointRatio(geometric=True)
        #: Per chained trajectory of the last computed step: ``times``, ``adjoint`` (``p_k``),
        #: ``sensitivity`` (``|y_k|`` or ``None``), ``bound_ratio``, ``cancellation_ratio``
        #: (or ``None``) and ``source`` (``"regularizer"`` or ``"backward"``).
        self.last_profiles: list[dict[str, Any]] = []
        self._hooks: list[Any] = []
        self._captured: dict[int, list[Tensor | None]] | None = None
        self._capture_scale = 1.0
        self._grad_norms: dict[str, Tensor] | None = None
        self._profiles_now: list[dict[str, Any]] | None = None
        self._said = SayOnce()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, norm_type=self.norm_type)

    # ------------------------------------------------------------------ cadence
    def _cadences(self, trainer: pl.Trainer) -> tuple[int, int]:
        every = resolve_every_n(trainer, self.every_n_steps)
        plot = self.plot_every_n_steps if self.plot_every_n_steps is not None else 10 * every
        return every, plot

    @override
    def cadences(self, trainer: pl.Trainer) -> tuple[int, int]:
        return self._cadences(trainer)

    @property
    def needs(self) -> Need:  # type: ignore[override]
        """The chains' states for the adjoint profile; nothing for the gradient norms alone."""
        return Need(stats=True, chains=True) if self.adjoint_profile else Need()

    def _due(self, trainer: pl.Trainer) -> tuple[bool, bool]:
        every, plot = self._cadences(trainer)
        return is_due(trainer, every), is_due(trainer, plot)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.epoch_ratio = self.epoch_ratio.to(pl_module.device)
        if stage == "fit" and self.adjoint_profile and not hasattr(pl_module, "ode_step"):
            # As SpectrumMonitor: say once what cannot be measured, instead of logging nothing.
            rank_zero_warn(
                f"GradientNormMonitor: {type(pl_module).__name__} is not a RegularizedODEModule "
                "(no `ode_step`): only grad/* norms are logged, no adjoint/* or sensitivity/* "
                "(use ode_reg.RegularizedODEModule and ode_reg.odeint, or adjoint_profile=False)"
            )

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _make_hook(
        self, slots: list[Tensor | None], k: int, last_row: bool
    ) -> Callable[[Tensor], None]:
        keep_full = self.compute_sensitivities

        def hook(grad: Tensor) -> None:
            g = grad.detach()
            if last_row:
                g = g[-1]
            slots[k] = g.clone() if keep_full else _sample_norms(g.unsqueeze(0))[0]

        return hook

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        self._remove_hooks()
        self._captured = None
        if not self.adjoint_profile or not any(self._due(trainer)):
            return
        record = getattr(pl_module, "ode_step", None)
        if record is None:
            return
        # A step with no solve is said once by the module (its plan knows who was due).
        captured: dict[int, list[Tensor | None]] = {}
        for g, traj in enumerate(record.groups):
            if record.adjoints[g] is not None:
                continue
            slots: list[Tensor | None] = [None] * traj.num_checkpoints
            captured[g] = slots
            for k, (x, last_row) in enumerate(_adjoint_targets(traj)):
                if x.requires_grad:
                    self._hooks.append(x.register_hook(self._make_hook(slots, k, last_row)))
        self._captured = captured
        self._capture_scale = _loss_scale(trainer)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def _add_grad_norms(self, pl_module: pl.LightningModule) -> None:
        # Merged over the optimizer steps of the batch (manual optimization may step several).
        key = f"grad_{self.norm_type}_norm_total"
        norms: dict[str, Tensor] = dict(self._grad_norms or {})
        for name, child in pl_module.named_children():
            if any(p.grad is not None for p in child.parameters()):
                norms[name] = torch.as_tensor(grad_norm(child, self.norm_type)[key])
        own = [p.grad for p in pl_module.parameters(recurse=False) if p.grad is not None]
        if own:
            norms["_self"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g, self.norm_type) for g in own]),
                self.norm_type,
            )
        self._grad_norms = norms

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._due(trainer)[0]:
            self._add_grad_norms(pl_module)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def epoch_metrics(self) -> dict[str, Metric]:
        return {"epoch_ratio": self.epoch_ratio}

    @override
    def measure_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the profiles (collectives on every rank); they are logged at batch end."""
        self._remove_hooks()
        self._profiles_now = None
        if any(self._due(trainer)):
            self._profiles_now = self._profiles(trainer, pl_module)
            self.last_profiles = self._profiles_now

    # ------------------------------------------------------------------ profiles
    def _adjoint_norms(
        self, g: int, traj: Trajectory, record: Any, acc: int
    ) -> tuple[Tensor, Tensor | None, str] | None:
        """Per-sample adjoint norms ``(K + 1, B)``, the full adjoints (if kept) and the source."""
        if record.adjoints[g] is not None:
            adj = record.adjoints[g] / acc
            return _sample_norms(adj), adj, "regularizer"
        if self._captured is None or g not in self._captured:
            return None
        slots = self._captured[g]
        scale = self._capture_scale
        # A checkpoint the backward did not reach (z_0 = an input that does not require grad)
        # has no adjoint: NaN in the profile, left out of the ratios, no sensitivities.
        if self.compute_sensitivities:
            full = (
                torch.stack(
                    [
                        torch.full_like(z, float("nan")) if s is None else s
                        for s, z in zip(slots, traj.states, strict=True)
                    ]
                ).detach()
                / scale
            )
            complete = all(s is not None for s in slots)
            return _sample_norms(full), full if complete else None, "backward"
        b = traj.states[0].shape[0] if traj.states[0].dim() > 1 else 1
        like = traj.states[0].detach()
        nan = float("nan")
        norms = (
            torch.stack(
                [like.new_full((b,), nan) if s is None else s.to(like.dtype) for s in slots]
            )
            / scale
        )
        return norms, None, "backward"

    def _sensitivities(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        g: int,
        traj: Trajectory,
        record: Any,
        adj: Tensor | None,
    ) -> Tensor | None:
        acc = trainer.accumulate_grad_batches
        if record.sensitivities[g] is not None:
            return record.sensitivities[g].detach() / acc
        if not self.compute_sensitivities or adj is None:
            return None
        y: Tensor | None = None
        try:
            # A closure field has no parameters of its own: take y_k over the module's (as
            # RegularizedODEModule does); those it does not use give zeros.
            params = traj.parameters() or [p for p in pl_module.parameters() if p.requires_grad]
            with torch.enable_grad():
                y = compute_sensitivities(traj, adj, params=params, detach_states=True).detach()
        except (RuntimeError, ValueError) as exc:
            if "sensitivities" not in self._said:
                names = ", ".join(sorted({type(f).__name__ for f in traj.funcs or (traj.func,)}))
                self._said.warn(
                    "GradientNormMonitor(compute_sensitivities=True): cannot evaluate the "
                    f"sensitivity density of the field(s) {names} after the backward "
                    f"({exc}); sensitivity ratios are skipped for them",
                    key="sensitivities",
                )
        if trainer.world_size > 1:
            # Every rank must agree before the collective below.
            if not trainer.strategy.reduce_boolean_decision(y is not None, all=True):
                return None
            # Each rank's y is world_size times its share of the whole-batch y: the mean over
            # ranks is the whole-batch y.
            y = trainer.strategy.reduce(y.clone(), reduce_op="mean")
        return y

    def _profiles(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict]:
        record = getattr(pl_module, "ode_step", None)
        if record is None or not self.adjoint_profile:
            return []
        acc = trainer.accumulate_grad_batches
        world = trainer.world_size
        out = []
        for g, traj in enumerate(record.groups):
            found = self._adjoint_norms(g, traj, record, acc)
            if found is None:
                continue
            norms, adj, source = found
            sums = norms.sum(dim=1)
            count = torch.tensor([float(norms.shape[1])], dtype=sums.dtype, device=sums.device)
            if world > 1:
                packed = torch.cat([sums / world, count])
                packed = trainer.strategy.reduce(packed.clone(), reduce_op="sum")
                sums, count = packed[:-1], packed[-1:]
            profile = sums / count
            y = self._sensitivities(trainer, pl_module, g, traj, record, adj)
            entry: dict[str, Any] = {
                "times": traj.times.detach(),
                "adjoint": profile,
                "sensitivity": None,
                "bound_ratio": None,
                "cancellation_ratio": None,
                "source": source,
                "samples": int(count.item()),
            }
            if y is not None:
                entry["sensitivity"] = y.norm(dim=1)
                entry["bound_ratio"], entry["cancellation_ratio"] = sensitivity_ratios(
                    traj.times.detach(), y
                )
            out.append(entry)
        return out

    # ------------------------------------------------------------------ logging
    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            scalars_due, plot_due = self._due(trainer)
            if self._profiles_now is not None and (scalars_due or plot_due):
                self._log(trainer, pl_module, self._profiles_now, scalars_due, plot_due)
        finally:
            self._remove_hooks()
            self._captured = None
            self._grad_norms = None
            self._profiles_now = None

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        profiles: list[dict[str, Any]],
        scalars_due: bool,
        plot_due: bool,
    ) -> None:
        if scalars_due:
            metrics: dict[str, Tensor | float] = {}
            if self._grad_norms:
                norms = list(self._grad_norms.values())
                dtype = functools.reduce(torch.promote_types, [v.dtype for v in norms])
                values = torch.stack([v.to(dtype) for v in norms])
                metrics["grad/total_norm"] = torch.linalg.vector_norm(values, self.norm_type)
                if self.per_module:
                    for name, v in self._grad_norms.items():
                        metrics[f"grad/norm/{name}"] = v
            ratios = []
            for g, entry in enumerate(profiles):
                s = "" if g == 0 else f"/group{g}"
                found = _first_last_finite(entry["adjoint"])
                if found is None:
                    self._say_unreadable(entry)
                    continue
                ratio, first, last = found
                ratios.append(ratio)
                metrics[f"adjoint/ratio_max_min{s}"] = ratio
                metrics[f"adjoint/norm_first{s}"] = first
                metrics[f"adjoint/norm_last{s}"] = last
                if entry["bound_ratio"] is not None:
                    metrics[f"sensitivity/bound_ratio{s}"] = entry["bound_ratio"]
                    metrics[f"sensitivity/cancellation_ratio{s}"] = entry["cancellation_ratio"]
            if ratios:
                worst = float(torch.stack(ratios).max())
                if not math.isnan(worst):
                    type(self).running_max_ratio.fold(self, worst)
                metrics["adjoint/ratio_running_max"] = self.running_max_ratio
                first = ratios[0].detach().to(self.epoch_ratio.total.device)
                if bool(torch.isfinite(first)) and float(first) > 0:
                    self.epoch_ratio.update(first)
            log_scalars(trainer, pl_module, metrics)
            if ratios and self.epoch_ratio.count > 0:
                pl_module.log(
                    "adjoint/ratio_epoch_geomean",
                    self.epoch_ratio,
                    on_step=False,
                    on_epoch=True,
                    metric_attribute="_ode_reg_adjoint_ratio_epoch_geomean",
                )
        if plot_due and profiles and trainer.is_global_zero and has_plot_sink(trainer):
            for g, entry in enumerate(profiles):
                s = "" if g == 0 else f"/group{g}"
                if _first_last_finite(entry["adjoint"]) is None:
                    self._say_unreadable(entry)
                    continue  # one point is no profile: nothing drawn
                fig = profile_figure(
                    entry["times"],
                    entry["adjoint"],
                    entry["sensitivity"],
                    title=f"adjoint profile ({entry['source']})",
                    step=logger_step(trainer),
                    samples=entry["samples"],
                )
                log_figure(trainer, f"adjoint/profile{s}", fig)

    def _say_unreadable(self, entry: dict[str, Any]) -> None:
        """Say it or do it: a profile with fewer than two readable checkpoints logs nothing."""
        if "unreadable" in self._said:
            return
        readable = int(torch.isfinite(entry["adjoint"]).sum())
        self._said.warn(
            f"GradientNormMonitor: the adjoint profile has {readable} readable checkpoint(s) of "
            f"{entry['adjoint'].numel()} (an odeint_adjoint solve exposes only its result to "
            "autograd, not its checkpoint states), so no adjoint/ratio_* or adjoint/norm_* is "
            "logged for it; solve with ode_reg.odeint to read the profile (said once)",
            key="unreadable",
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"running_max_ratio": self.running_max_ratio, "epoch": self.save_epoch_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.running_max_ratio = float(state_dict["running_max_ratio"])
        self.load_epoch_state(state_dict.get("epoch"))
