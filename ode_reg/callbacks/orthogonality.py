"""Orthogonality monitor: the defect ``|W^T W - I|_F`` of every orthogonal matrix the model holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torchmetrics import Metric
from typing_extensions import override

from ode_reg._checks import check_bool, check_int
from ode_reg.callbacks._logging import (
    PreStepMonitor,
    is_due,
    log_scalars,
    resolve_every_n,
)
from ode_reg.functional.orthogonal import orthogonality_defect
from ode_reg.metrics import MaxOrthogonalityDefect, RunningMax
from ode_reg.plan import Need

__all__ = ["HasOrthogonalWeights", "OrthogonalityMonitor", "find_orthogonal_matrices"]

try:  # the class behind torch.nn.utils.parametrizations.orthogonal (private, stable since 1.11)
    from torch.nn.utils.parametrizations import _Orthogonal as _ORTHOGONAL_PARAMETRIZATION
except ImportError:  # pragma: no cover - older/newer torch without the private name
    _ORTHOGONAL_PARAMETRIZATION = None


@runtime_checkable
class HasOrthogonalWeights(Protocol):
    """The duck-typed protocol by which a module declares matrices that should be orthogonal.

    A module (at any depth of the LightningModule) that defines a method
    ``orthogonal_weights()`` returning a mapping ``name -> tensor`` of shape ``(..., m, n)``
    has each tensor monitored by :class:`OrthogonalityMonitor` under the key
    ``orthogonality/<module path>.<name>``. Leading dimensions are a batch of matrices (the
    reported defect is their maximum); a wide matrix (``m < n``) is checked for orthonormal
    rows. Use it for weights built by hand (a Cayley or exponential map, a scoRNN ``W``) that
    do not go through ``torch.nn.utils.parametrizations.orthogonal``, which is found without
    any help.

    Example::

        >>> import torch
        >>> from ode_reg.functional.orthogonal import cayley
        >>> class Rotation(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Parameter(torch.zeros(3, 3))
        ...     def orthogonal_weights(self):
        ...         return {"q": cayley(self.a - self.a.T)}
        >>> isinstance(Rotation(), HasOrthogonalWeights)
        True
    """

    def orthogonal_weights(self) -> Mapping[str, Tensor]:
        """The matrices that should be orthogonal, by name."""
        ...


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_orthogonal_parametrization(p: nn.Module) -> bool:
    if _ORTHOGONAL_PARAMETRIZATION is not None:
        return isinstance(p, _ORTHOGONAL_PARAMETRIZATION)
    return type(p).__name__ == "_Orthogonal"  # pragma: no cover


def find_orthogonal_matrices(module: nn.Module) -> dict[str, Tensor]:
    """Every matrix ``module`` declares orthogonal, by qualified name (as ``named_parameters``).

    Two sources: tensors registered with ``torch.nn.utils.parametrizations.orthogonal`` (found
    through ``torch.nn.utils.parametrize``) and the :class:`HasOrthogonalWeights` protocol.
    Parametrized tensors are recomputed on access; call under ``torch.no_grad()`` to build no
    graph.

    Args:
        module: any module.

    Returns:
        ``{name: tensor (..., m, n)}``, e.g. ``{"encoder.weight": ...}``.

    Raises:
        ValueError: if ``orthogonal_weights()`` returns something other than a mapping of
            names to tensors with at least 2 dimensions.

    Example::

        >>> import torch
        >>> from torch.nn.utils.parametrizations import orthogonal
        >>> net = torch.nn.Sequential(orthogonal(torch.nn.Linear(4, 4)), torch.nn.Linear(4, 2))
        >>> sorted(find_orthogonal_matrices(net))
        ['0.weight']
    """
    out: dict[str, Tensor] = {}
    for prefix, m in module.named_modules():
        if parametrize.is_parametrized(m):
            for tensor_name, plist in m.parametrizations.items():
                if any(_is_orthogonal_parametrization(p) for p in plist):
                    out[_qualified(prefix, tensor_name)] = getattr(m, tensor_name)
        method = getattr(type(m), "orthogonal_weights", None)
        if callable(method):
            weights = m.orthogonal_weights()
            if not isinstance(weights, Mapping):
                raise ValueError(
                    f"`{_qualified(prefix, 'orthogonal_weights')}()` must return a mapping of "
                    f"names to tensors, got {type(weights).__name__}"
                )
            for name, w in weights.items():
                if not isinstance(w, Tensor) or w.dim() < 2:
                    shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
                    raise ValueError(
                        f"`{_qualified(prefix, 'orthogonal_weights')}()[{name!r}]` must be a "
                        f"tensor of shape (..., m, n), got {shape}"
                    )
                out[_qualified(prefix, str(name))] = w
    return out


def matrix_defect(w: Tensor) -> Tensor:
    """``max`` over leading dimensions of ``|W^T W - I|_F`` (``|W W^T - I|_F`` for wide ``W``).

    Complex matrices use the conjugate transpose (unitarity).

    Example::

        >>> import torch
        >>> float(matrix_defect(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])))
        0.0
    """
    w = w.detach()
    if w.shape[-2] < w.shape[-1]:
        w = w.mH if w.is_complex() else w.mT
    if w.is_complex():
        gram = w.mH @ w
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        d = torch.linalg.matrix_norm(gram - eye)
    else:
        d = orthogonality_defect(w)
    return d.reshape(-1).max() if d.numel() else torch.zeros((), device=w.device)


def _is_orthogonal_flow(func: Any) -> bool:
    from ode_reg.dynamics import OrthogonalFlow

    return isinstance(func, OrthogonalFlow) or bool(getattr(func, "weights_orthogonal", False))


class OrthogonalityMonitor(PreStepMonitor):
    r"""Logs the orthogonality defect ``|W^T W - I|_F`` of every orthogonal matrix of the model.

    Monitored, at each due training step, before the optimizer step (``on_before_optimizer_step``:
    the matrices that produced the step's trajectories; see
    :class:`~ode_reg.callbacks._logging.PreStepMonitor`):

    - tensors parametrized with ``torch.nn.utils.parametrizations.orthogonal`` (any depth);
    - matrices declared through the :class:`HasOrthogonalWeights` protocol (a module method
      ``orthogonal_weights() -> {name: tensor}``);
    - the weights ``W_k`` an orthogonal flow (:class:`~ode_reg.dynamics.OrthogonalFlow`, or a
      field with ``weights_orthogonal = True``) carried along the last training step's
      trajectories (``pl_module.ode_step``; needs a :class:`~ode_reg.RegularizedODEModule`).
      An ``OrthogonalFlow(step="rk4")`` is included on purpose although its flag is ``False``:
      its drift off the orthogonal group is what one wants to see.

    Logged keys (scalars; the values depend on the parameters only, so they are equal on all
    DDP ranks and need no reduction):

    - ``orthogonality/<name>``: each parametrized or declared matrix, ``<name>`` its
      qualified name as in ``named_parameters`` (e.g. ``orthogonality/encoder.weight``);
      with ``per_matrix=False`` only the aggregates;
    - ``orthogonality/flow_max``: max over the flow weights ``W_k`` of the last step;
    - ``orthogonality/max``: max of all the above at this step;
    - ``orthogonality/running_max``: max since the start of training (kept in the
      checkpoint through :meth:`state_dict`);
    - ``orthogonality/epoch_max``: a :class:`~ode_reg.metrics.MaxOrthogonalityDefect`,
      logged ``on_epoch`` (max over the epoch's due steps, max-reduced across ranks; its state
      is in the checkpoint, so a run resumed mid-epoch logs the uninterrupted value).

    Args:
        every_n_steps: log every n training batches (``>= 1``); ``None`` follows
            ``Trainer(log_every_n_steps=...)``.
        modules: monitor parametrized and declared module matrices.
        flows: monitor flow weights ``W_k`` of the last training step.
        per_matrix: also log each module matrix under its own key.
        prog_bar: show ``orthogonality/max`` in the progress bar.

    Raises:
        ValueError: if ``every_n_steps < 1``, a flag is not a bool, or both ``modules`` and
            ``flows`` are off.

    Example::

        >>> import lightning as L
        >>> from ode_reg.callbacks import OrthogonalityMonitor
        >>> trainer = L.Trainer(callbacks=[OrthogonalityMonitor(every_n_steps=10)])
    """

    #: ``orthogonality/running_max``: the largest defect since the start (a ``MaxMetric``;
    #: a NaN defect propagates).
    running_max = RunningMax(0.0)

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        modules: bool = True,
        flows: bool = True,
        per_matrix: bool = True,
        prog_bar: bool = False,
    ) -> None:
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, 1)
        for name, flag in (
            ("modules", modules),
            ("flows", flows),
            ("per_matrix", per_matrix),
            ("prog_bar", prog_bar),
        ):
            check_bool(name, flag)
        if not (modules or flows):
            raise ValueError("`modules` and `flows` cannot both be False: nothing to monitor")
        self.every_n_steps = every_n_steps
        self.modules = modules
        self.flows = flows
        self.per_matrix = per_matrix
        self.prog_bar = prog_bar
        self.epoch_max = MaxOrthogonalityDefect()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, modules=self.modules, flows=self.flows
        )

    @property
    def needs(self) -> Need:  # type: ignore[override]
        """The trajectories (flow weights) when ``flows``; nothing for the module matrices."""
        return Need(stats=True, chains=True) if self.flows else Need()

    def measure(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The defects now: ``{key: value}`` with the keys this monitor logs (no aggregates).

        Module matrices under ``orthogonality/<name>``, the flow's max under
        ``orthogonality/flow_max`` (when the last step carried flow weights).
        """
        values: dict[str, Tensor] = {}
        with torch.no_grad():
            if self.modules:
                for name, w in find_orthogonal_matrices(pl_module).items():
                    values[f"orthogonality/{name}"] = matrix_defect(w)
            record = getattr(pl_module, "ode_step", None)
            if self.flows and record is not None:
                flow = [
                    matrix_defect(tr.weight_matrices)
                    for tr in record.trajectories
                    if tr.weights is not None and _is_orthogonal_flow(tr.func)
                ]
                if flow:
                    values["orthogonality/flow_max"] = torch.stack(flow).max()
        return values

    @override
    def epoch_metrics(self) -> dict[str, Metric]:
        return {"epoch_max": self.epoch_max}

    @override
    def measure_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_due(trainer, resolve_every_n(trainer, self.every_n_steps)):
            return
        values = self.measure(pl_module)
        if not values:
            return
        current = torch.stack([v.float().cpu() for v in values.values()]).max()
        type(self).running_max.fold(self, current.detach().cpu())
        self.epoch_max.update(current.to(self.epoch_max.max_defect.device))
        metrics: dict[str, Tensor | float] = {}
        if self.per_matrix:
            metrics.update(values)
        elif "orthogonality/flow_max" in values:
            metrics["orthogonality/flow_max"] = values["orthogonality/flow_max"]
        metrics["orthogonality/max"] = current
        metrics["orthogonality/running_max"] = self.running_max
        log_scalars(
            trainer, pl_module, metrics, prog_bar=("orthogonality/max",) if self.prog_bar else ()
        )
        pl_module.log(
            "orthogonality/epoch_max",
            self.epoch_max,
            on_step=False,
            on_epoch=True,
            metric_attribute="_ode_reg_orthogonality_epoch_max",
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.epoch_max = self.epoch_max.to(pl_module.device)
        if stage != "fit":
            return
        has_matrices = self.modules and bool(find_orthogonal_matrices(pl_module))
        flows = self.flows and any(_is_orthogonal_flow(m) for m in pl_module.modules())
        if flows and not hasattr(pl_module, "ode_step"):
            rank_zero_warn(
                f"OrthogonalityMonitor: {type(pl_module).__name__} is not a RegularizedODEModule "
                "(no `ode_step`): an OrthogonalFlow's W_k cannot be read, no "
                "orthogonality/flow_max is logged (use ode_reg.RegularizedODEModule)"
            )
        elif not has_matrices and not flows:
            rank_zero_warn(
                f"OrthogonalityMonitor: {type(pl_module).__name__} holds no orthogonal "
                "parametrization, declares no `orthogonal_weights()` and has no OrthogonalFlow: "
                "nothing to log (remove the monitor or declare the matrices)"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "running_max": self.running_max,
            "epoch": self.save_epoch_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.running_max = float(state_dict["running_max"])
        self.load_epoch_state(state_dict.get("epoch"))
