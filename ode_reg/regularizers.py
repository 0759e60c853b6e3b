"""Loss terms for :class:`~ode_reg.RegularizedODEModule`: thin shells over ``ode_reg.functional``.

Each regularizer is configuration: a ``weight``, a cadence ``every_n_steps`` (the one rule
:func:`ode_reg.plan.due`) and a linear weight warm-up ``warmup_steps``. It is an ``nn.Module``
for its API only: :class:`~ode_reg.RegularizedODEModule` does not register it as a submodule,
so it is not in the model's ``state_dict``; its run state (the skip counter, a probe seed)
travels in the checkpoint under the module's own key (:meth:`Regularizer.run_state`).

A subclass implements :meth:`Regularizer.compute` (the unweighted term on one chain, from
the :class:`~ode_reg.terms.ChainContext`), sets the class flags that say what it needs
(``needs_adjoints``, ``needs_field_evaluations``, ``needs_skew_probes``), validates its own
arguments in ``__init__`` (before calling ``super().__init__(weight, **kwargs)``) and keeps
them as attributes of the same name (so the checkpoint can rebuild it); extra run state goes
in :meth:`Regularizer.run_state` / :meth:`Regularizer.load_run_state`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ode_reg._checks import check_bool, check_gamma, check_int, check_range
from ode_reg.functional import (
    adjoint_magnitude_penalty,
    directional_penalty,
    sensitivity_magnitude_penalty,
    spectral_penalty,
)
from ode_reg.plan import Need, due
from ode_reg.trajectory import DEFAULT_CHECKPOINTS

if TYPE_CHECKING:
    from ode_reg.terms import ChainContext


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


#: Accepted range of a term's ``reference`` checkpoint index: the indices of the default
#: checkpoint grid (``DEFAULT_CHECKPOINTS + 1`` checkpoints, MATH.md Notation); ``-1`` is the
#: last reached checkpoint ``k*``.
REFERENCE_RANGE = (-(DEFAULT_CHECKPOINTS + 1), DEFAULT_CHECKPOINTS)


def check_reference(reference: int) -> int:
    """``reference`` if it is an integer in :data:`REFERENCE_RANGE`, else a ``ValueError``."""
    lo, hi = REFERENCE_RANGE
    if isinstance(reference, bool) or not isinstance(reference, int) or not lo <= reference <= hi:
        raise ValueError(
            f"`reference` must be an integer in [{lo}, {hi}] (a checkpoint index; -1 is the last "
            f"reached checkpoint), got {reference!r}"
        )
    return reference


def check_flags(**flags: bool) -> None:
    """Each keyword must be ``True`` or ``False`` (a ``ValueError`` naming it otherwise)."""
    for name, value in flags.items():
        check_bool(name, value)


class Regularizer(nn.Module):
    """Base class of the loss terms.

    Args:
        weight: multiplier of the term, ``>= 0``.
        every_n_steps: apply the term on every n-th training step (``>= 1``).
        warmup_steps: ramp the weight linearly from 0 over this many steps (``>= 0``).
        name: key of the term in the logs (``reg/<name>``; the loggers get ``reg/<name>_step`` and
            ``reg/<name>_epoch``).

    Raises:
        ValueError: on a negative weight, ``every_n_steps < 1`` or ``warmup_steps < 0``.
    """

    #: Needs the adjoints ``a_k`` of the step.
    needs_adjoints: bool = False
    #: Needs the field evaluated at the checkpoints during the solve (sensitivity density).
    needs_field_evaluations: bool = False
    #: Needs the skew-Jacobian probes drawn during the solve.
    needs_skew_probes: bool = False
    #: The term reduces over the batch (``y_k`` sums over samples): under DDP it is computed
    #: from the mean over ranks at checkpoint times common to all ranks (MATH.md, Under DDP).
    reduces_over_batch: bool = False
    #: The term is a sum of squares, so a value of exactly 0 has a gradient of exactly 0:
    #: on such a step :class:`~ode_reg.RegularizedODEModule` adds the value without its graph
    #: (an inactive hinge, such as a satisfied :class:`DirectionalConstraint`, then costs no
    #: double backward). ``False`` for a subclass unless it sets it.
    zero_value_has_zero_gradient: bool = False
    default_name: str = "regularizer"

    def __init__(
        self,
        weight: float = 0.1,
        every_n_steps: int = 1,
        warmup_steps: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        check_range("weight", weight, 0.0)
        check_int("every_n_steps", every_n_steps, 1)
        check_int("warmup_steps", warmup_steps, 0)
        self.weight = float(weight)
        self.every_n_steps = every_n_steps
        self.warmup_steps = warmup_steps
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"`name` must be a non-empty string or None, got {name!r}")
        self.name = name or self.default_name
        #: Steps on which the term was not finite and was dropped (``nonfinite="skip"``).
        self.skipped = 0

    @property
    def needs_differentiable_adjoints(self) -> bool:
        """Trains on ``a_k`` as a differentiable function of the parameters: a double backward
        through the trajectory, and no ``odeint_adjoint``."""
        return self.needs_adjoints and not getattr(self, "detach_adjoints", False)

    def active(self, step: int) -> bool:
        """Whether the term is applied at global step ``step`` (:func:`ode_reg.plan.due`: the
        ``every_n_steps``-th, ``2 * every_n_steps``-th, ... step)."""
        return self.weight > 0 and due(step, self.every_n_steps)

    def need(self, step: int) -> Need | None:
        """What global step ``step`` must record for this term (``None``: not due)."""
        if not self.active(step):
            return None
        return Need(
            stats=True,
            chains=True,
            adjoints=self.needs_adjoints,
            field_evaluations=self.needs_field_evaluations,
            probes=self.needs_skew_probes,
        )

    def run_state(self) -> dict[str, Any]:
        """The term's run state as plain values (saved in the checkpoint by the module): the
        skip counter, and any buffer a subclass registers (``buffer.<name>``, as a number or
        nested list), so that a subclass keeping a counter or seed as a buffer still has it
        saved although the term is not a submodule of the model."""
        state: dict[str, Any] = {"skipped": int(self.skipped)}
        for name, buf in self.named_buffers():
            state[f"buffer.{name}"] = buf.detach().cpu().tolist()
        return state

    def load_run_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`run_state` (keys it does not know are ignored)."""
        if "skipped" in state:
            self.skipped = int(state["skipped"])
        buffers = dict(self.named_buffers())
        for key, value in state.items():
            if key.startswith("buffer.") and key[7:] in buffers:
                buf = buffers[key[7:]]
                buf.copy_(torch.as_tensor(value, dtype=buf.dtype).reshape(buf.shape))

    def scheduled_weight(self, step: int) -> float:
        """The weight at global step ``step`` (after warm-up)."""
        if self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, (step + 1) / self.warmup_steps)

    def compute(self, ctx: ChainContext) -> Tensor:  # pragma: no cover - abstract
        """The unweighted term on one chain of this step."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}, every_n_steps={self.every_n_steps}, warmup_steps={self.warmup_steps}"


class AdjointMagnitude(Regularizer):
    """Holds ``|a(t)|`` constant per sample: :func:`~ode_reg.functional.adjoint_magnitude_penalty`.

    Args:
        weight: multiplier, ``>= 0``.
        reference: checkpoint index of the reference adjoint (default the final time).
        subsample: ``None`` (default): the exact term, the mean over the batch's reached
            samples. An integer ``m >= 1``: an estimator of it (MATH.md, Sub-batch estimator):
            each step draws ``m`` of the reached samples uniformly without replacement (seeded
            by (``seed``, DDP rank, global step), so a resumed run redraws the same ones),
            re-solves only those ``m`` from their ``z_0`` with the batch solve's method and
            keywords, and takes the mean of their per-sample terms. The batch's own backward
            then needs no graph (no double backward over the whole batch); the re-solve costs
            per row, so it pays on large batches (on a small, overhead-bound one it costs
            about as much as the exact term: ``python -m benchmarks.subsample_spread
            --cost``). Unbiased for the batch mean up to the re-solve's discretisation: a
            fixed-grid solver takes the batch's steps and checkpoints (exactly unbiased, value
            and gradient); an adaptive one picks its own steps and checkpoints for the
            sub-batch, a discretisation difference that vanishes with the tolerances (measure
            it on your shape: ``python -m benchmarks.subsample_spread``). ``m >= B`` (the batch
            size) is the exact term, computed as with ``None``. Needs a chain of one
            ``ode_reg.odeint`` solve of a tensor state whose last output the loss reads.
        seed: base seed of the draws (``None``: drawn from torch's global generator when the
            term is built, as for :class:`SkewJacobianPenalty`); only with ``subsample``.
        **kwargs: ``every_n_steps``, ``warmup_steps``, ``name`` (see :class:`Regularizer`).

    Raises:
        ValueError: on a negative weight, bad cadence, a ``reference`` that is not an
            integer in ``[-9, 8]`` (:data:`REFERENCE_RANGE`), ``subsample`` not ``None`` or an
            integer ``>= 1``, ``seed < 0``; at a step, if ``subsample < B`` meets a chain it
            cannot re-solve (named).

    Example::

        >>> from ode_reg import AdjointMagnitude
        >>> AdjointMagnitude(weight=0.1)
        AdjointMagnitude(weight=0.1, every_n_steps=1, warmup_steps=0)
        >>> AdjointMagnitude(weight=0.1, subsample=16, seed=0).subsample
        16
    """

    needs_adjoints = True
    default_name = "adjoint_magnitude"
    zero_value_has_zero_gradient = True

    def __init__(
        self,
        weight: float = 0.1,
        reference: int = -1,
        subsample: int | None = None,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        check_reference(reference)
        if subsample is not None:
            check_int("subsample", subsample, 1)
        if seed is not None:
            check_int("seed", seed, 0)
        super().__init__(weight, **kwargs)
        self.reference = reference
        self.subsample = subsample
        self.seed = seed
        # Drawn only for an estimator, so that the exact term leaves torch's generator alone.
        self.base_seed = _base_seed(seed) if subsample is not None else 0

    def subsampled(self, batch: int) -> bool:
        """Whether a step with ``batch`` samples uses the sub-batch estimator (``m < B``)."""
        return self.subsample is not None and self.subsample < batch

    def run_state(self) -> dict[str, Any]:
        state = super().run_state()
        if self.subsample is not None:
            state["base_seed"] = int(self.base_seed)
        return state

    def load_run_state(self, state: dict[str, Any]) -> None:
        super().load_run_state(state)
        if "base_seed" in state:
            self.base_seed = int(state["base_seed"])

    def compute(self, ctx: ChainContext) -> Tensor:
        if self.subsample is not None and (
            not ctx.has_adjoints or self.subsample < ctx.batch_size()
        ):
            gen = _seeded_generator(self.base_seed, ctx.step, torch.device("cpu"))
            flow = ctx.subsampled_flow_adjoints(self.subsample, gen)
            return adjoint_magnitude_penalty(flow, reference=self.reference)
        if ctx.kstar() < 1:  # no checkpoint before the last reached one
            return ctx.adjoints().sum() * 0.0
        flow = ctx.flow_adjoints()
        return adjoint_magnitude_penalty(flow[:, ctx.reached_samples()], reference=self.reference)


class _SensitivityTerm(Regularizer):
    """A term of the sensitivity densities ``y_k`` (:meth:`ChainContext.sensitivities`), with a
    reference checkpoint and the two stop-gradient options; :meth:`penalty` is the term."""

    needs_adjoints = True
    needs_field_evaluations = True
    reduces_over_batch = True
    zero_value_has_zero_gradient = True

    def __init__(
        self,
        weight: float,
        reference: int,
        detach_states: bool,
        detach_adjoints: bool,
        **kwargs,
    ) -> None:
        check_reference(reference)
        check_flags(detach_states=detach_states, detach_adjoints=detach_adjoints)
        super().__init__(weight, **kwargs)
        self.reference = reference
        self.detach_states = detach_states
        self.detach_adjoints = detach_adjoints

    def penalty(self, sens: Tensor) -> Tensor:
        raise NotImplementedError

    def compute(self, ctx: ChainContext) -> Tensor:
        sens = ctx.sensitivities(self.detach_states, self.detach_adjoints)
        if sens.shape[0] < 2:
            return sens.sum() * 0.0
        return self.penalty(sens)


class SensitivityMagnitude(_SensitivityTerm):
    """Holds ``|y(t)|`` constant: :func:`~ode_reg.functional.sensitivity_magnitude_penalty`.

    Args:
        weight: multiplier, ``>= 0``.
        reference: checkpoint index of the reference (default the final time).
        detach_states: treat ``z_k`` as constants inside ``y_k``: a stop-gradient, an
            approximation of the full derivative, off by default. With the batched
            sensitivities the path through ``z_k`` costs little (BENCHMARKS.md: the exact
            terms and this option alone cost about the same, both dominated by the adjoints'
            double backward).
        detach_adjoints: treat ``a_k`` as constants inside ``y_k`` too: the term then trains
            only on how ``df/dtheta`` itself depends on the parameters, at the step's adjoints
            and states. A stronger approximation, off by default, and the cheap one: with
            ``detach_states`` as well, no second backward through the trajectory is needed
            (the adjoints and the task gradient come from one plain backward; its cost against
            the exact term's is in BENCHMARKS.md). ``recipes/ablation.py``
            reports its effect beside the exact term.
        **kwargs: ``every_n_steps``, ``warmup_steps``, ``name``.

    Raises:
        ValueError: on a negative weight or bad cadence.

    Example::

        >>> from ode_reg import SensitivityMagnitude
        >>> SensitivityMagnitude(weight=0.1).name
        'sensitivity_magnitude'
    """

    default_name = "sensitivity_magnitude"

    def __init__(
        self,
        weight: float = 0.1,
        reference: int = -1,
        detach_states: bool = False,
        detach_adjoints: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(weight, reference, detach_states, detach_adjoints, **kwargs)

    def penalty(self, sens: Tensor) -> Tensor:
        return sensitivity_magnitude_penalty(sens, reference=self.reference)


class DirectionalConstraint(_SensitivityTerm):
    """Keeps ``y_k . y_* >= gamma |y_*|^2``: :func:`~ode_reg.functional.directional_penalty`.

    Args:
        gamma: constraint level in ``[-1, 1]``.
        weight: multiplier, ``>= 0``.
        reference: checkpoint index ``k*`` (default the final time).
        detach_states: as for :class:`SensitivityMagnitude`.
        detach_adjoints: as for :class:`SensitivityMagnitude`.
        **kwargs: ``every_n_steps``, ``warmup_steps``, ``name``.

    Raises:
        ValueError: if ``gamma`` is outside ``[-1, 1]``, on a negative weight or bad cadence.

    Example::

        >>> from ode_reg import DirectionalConstraint
        >>> DirectionalConstraint(gamma=0.5, weight=0.1).gamma
        0.5
    """

    default_name = "directional"

    def __init__(
        self,
        gamma: float = 0.0,
        weight: float = 0.1,
        reference: int = -1,
        detach_states: bool = False,
        detach_adjoints: bool = False,
        **kwargs,
    ) -> None:
        check_gamma(gamma)
        super().__init__(weight, reference, detach_states, detach_adjoints, **kwargs)
        self.gamma = float(gamma)

    def penalty(self, sens: Tensor) -> Tensor:
        return directional_penalty(sens, gamma=self.gamma, reference=self.reference)


class SpectralConstraint(Regularizer):
    """Keeps ``Re lambda(W_k^T W_*) >= gamma`` along an orthogonal flow (eqs. 33-34).

    Needs a trajectory that carries orthogonal weights (an
    :class:`~ode_reg.OrthogonalFlow`).

    Args:
        gamma: level in ``[-1, 1]``.
        weight: multiplier, ``>= 0``.
        reference: checkpoint index of ``W_*`` (default the final time).
        **kwargs: ``every_n_steps``, ``warmup_steps``, ``name``.

    Raises:
        ValueError: if ``gamma`` is outside ``[-1, 1]``, on a negative weight or bad cadence;
            at the first step, if no trajectory carries orthogonal weights.

    Example::

        >>> from ode_reg import SpectralConstraint
        >>> SpectralConstraint(gamma=0.0, weight=0.1).name
        'spectral'
    """

    default_name = "spectral"
    zero_value_has_zero_gradient = True

    def __init__(self, gamma: float = 0.0, weight: float = 0.1, reference: int = -1, **kwargs):
        check_gamma(gamma)
        check_reference(reference)
        super().__init__(weight, **kwargs)
        self.gamma = float(gamma)
        self.reference = reference

    def compute(self, ctx: ChainContext) -> Tensor:
        w = ctx.trajectory.weight_matrices
        if w is None or not getattr(ctx.trajectory.func, "weights_orthogonal", False):
            raise ValueError(
                "SpectralConstraint needs a trajectory with orthogonal weights W_k "
                "(integrate an OrthogonalFlow); this step's field "
                f"{type(ctx.trajectory.func).__name__} carries none"
            )
        return spectral_penalty(w, gamma=self.gamma, reference=self.reference)


def _base_seed(seed: int | None) -> int:
    """A probe term's base seed: ``seed``, or one drawn from torch's global generator."""
    return int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed


def _seeded_generator(
    base_seed: int, step: int, device: torch.device, micro: int = 0
) -> torch.Generator:
    """A generator seeded by (base seed, DDP rank, global step, micro-batch): ranks draw
    independently, and a resumed run redraws what the uninterrupted one drew."""
    rank = dist.get_rank() if _distributed() else 0
    gen = torch.Generator(device=device)
    gen.manual_seed(hash((int(base_seed), rank, step, micro)) % (2**63 - 1))
    return gen


class _SeededProbes:
    """Rademacher probes seeded by (base seed, DDP rank, global step, micro-batch), so a resumed
    run redraws the probes of the uninterrupted one; ``base_seed`` is run state (saved in the
    checkpoint by the module). Mixed into the probe terms before :class:`Regularizer`."""

    base_seed: int

    def run_state(self) -> dict[str, Any]:
        return {**super().run_state(), "base_seed": int(self.base_seed)}  # type: ignore[misc]

    def load_run_state(self, state: dict[str, Any]) -> None:
        super().load_run_state(state)  # type: ignore[misc]
        if "base_seed" in state:
            self.base_seed = int(state["base_seed"])

    @staticmethod
    def _check_probes(probes: int, seed: int | None) -> None:
        """Refuse bad ``probes`` / ``seed`` by name (before any other work of ``__init__``)."""
        check_int("probes", probes, 1)
        if seed is not None:
            check_int("seed", seed, 0)

    def _set_probes(self, probes: int, seed: int | None) -> None:
        self.probes = probes
        self.base_seed = _base_seed(seed)

    def generator(self, step: int, device: torch.device, micro: int = 0) -> torch.Generator:
        """The probe generator of global step ``step`` and micro-batch ``micro`` on this rank."""
        return _seeded_generator(self.base_seed, step, device, micro)


class SkewJacobianPenalty(_SeededProbes, Regularizer):
    """Penalizes the symmetric part of ``df/dz`` at the checkpoint states (Hutchinson).

    The cheap stand-in for :class:`AdjointMagnitude`: no adjoint and no second backward
    through the trajectory.

    Args:
        weight: multiplier, ``>= 0``.
        probes: Rademacher probes per state, ``>= 1``.
        max_states: evaluate at most this many checkpoint states, evenly spaced (``None``: all).
        seed: base seed of the probes (``None``: drawn from torch's global generator when the
            term is built, so ``seed_everything`` fixes it). The probes of a step are drawn from
            a generator seeded by (base seed, DDP rank, global step): ranks draw independent
            probes (the all-rank mean is unbiased and less noisy), and a resumed run draws the
            same probes as an uninterrupted one (the base seed is saved in the checkpoint).
        **kwargs: ``every_n_steps``, ``warmup_steps``, ``name``.

    Raises:
        ValueError: if ``probes < 1``, ``max_states < 1``, ``seed < 0``, on a negative weight or
            bad cadence.

    Example::

        >>> from ode_reg import SkewJacobianPenalty
        >>> SkewJacobianPenalty(weight=0.01, probes=1).probes
        1
    """

    default_name = "skew_jacobian"
    needs_skew_probes = True
    zero_value_has_zero_gradient = True

    def __init__(
        self,
        weight: float = 0.01,
        probes: int = 1,
        max_states: int | None = None,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        if max_states is not None:
            check_int("max_states", max_states, 1)
        self._check_probes(probes, seed)
        super().__init__(weight, **kwargs)
        self._set_probes(probes, seed)
        self.max_states = max_states

    def compute(self, ctx: ChainContext) -> Tensor:
        return ctx.skew()


# --------------------------------------------------------------------------- RNODE's terms
class _FieldNormTerm(Regularizer):
    """A term integrated from the field at the recorded checkpoints (evaluated during the
    solve, :class:`~ode_reg.recording.FieldNormPlan`): per sample, the trapezoid rule over the
    checkpoint times, then the batch mean. Needs no adjoint."""

    zero_value_has_zero_gradient = True
    #: Evaluates the field at the checkpoints during the solve (:meth:`plan`).
    needs_field_norms = True
    kind = ""

    def __init__(self, weight: float = 0.01, dims: int | None = None, **kwargs) -> None:
        if dims is not None:
            check_int("dims", dims, 1)
        super().__init__(weight, **kwargs)
        self.dims = dims

    def plan(self, step: int, device: torch.device, micro: int = 0):  # noqa: ANN201
        """What the recorder evaluates for this term during the step's solves."""
        from ode_reg.recording import FieldNormPlan

        return FieldNormPlan(self.name, self.kind, self.dims)

    def compute(self, ctx: ChainContext) -> Tensor:
        return ctx.field_norm(self.name)


class KineticEnergy(_FieldNormTerm):
    """RNODE's kinetic energy ``R_K = mean_i int |f(t, z_i(t))|^2 dt`` (Finlay et al. 2020).

    The field is evaluated at the recorded checkpoints during the solve and integrated by the
    trapezoid rule over the checkpoint times (:func:`~ode_reg.functional.kinetic_energy_penalty`,
    MATH.md); per sample, then the batch mean. It needs no adjoint, so it works with
    ``odeint`` and ``odeint_adjoint`` (whose recorded states are constants: the term's
    gradient is then the one in the parameters at those states).

    Args:
        weight: multiplier, ``>= 0`` (RNODE's published value: 0.01).
        dims: read only each sample's first ``dims`` coordinates (``None``: all); for a CNF's
            tuple state ``(z, log p)`` with ``z`` of width ``d``, ``dims=d`` leaves
            ``d log p / dt`` out, as RNODE does.
        **kwargs: ``every_n_steps``, ``warmup_steps``, ``name`` (see :class:`Regularizer`).

    Raises:
        ValueError: on a negative weight, bad cadence or ``dims < 1``.

    Example::

        >>> from ode_reg import KineticEnergy
        >>> KineticEnergy(weight=0.01)
        KineticEnergy(weight=0.01, every_n_steps=1, warmup_steps=0)
    """

    default_name = "kinetic_energy"
    kind = "kinetic"


class JacobianFrobenius(_SeededProbes, _FieldNormTerm):
    """RNODE's Jacobian term ``R_F = mean_i int |df/dz(t, z_i(t))|_F^2 dt`` (Hutchinson).

    At each recorded checkpoint ``|J_i|_F^2`` is estimated by ``mean_p |J_i^T v_p|^2`` with
    Rademacher probes (the skew-Jacobian term's probes and seeding), then integrated by the
    trapezoid rule (:func:`~ode_reg.functional.jacobian_frobenius_penalty`, MATH.md). One
    vector-Jacobian product per probe and checkpoint; no adjoint.

    Args:
        weight: multiplier, ``>= 0`` (RNODE's published value: 0.01).
        probes: Rademacher probes per checkpoint state, ``>= 1``.
        dims: as for :class:`KineticEnergy` (the block ``df_{:d}/dz_{:d}``).
        seed: base seed of the probes, as for :class:`SkewJacobianPenalty` (``None``: drawn
            from torch's global generator when the term is built).
        **kwargs: ``every_n_steps``, ``warmup_steps``, ``name``.

    Raises:
        ValueError: if ``probes < 1``, ``dims < 1``, ``seed < 0``, on a negative weight or bad
            cadence.

    Example::

        >>> from ode_reg import JacobianFrobenius
        >>> JacobianFrobenius(weight=0.01, probes=2).probes
        2
    """

    default_name = "jacobian_frobenius"
    kind = "frobenius"

    def __init__(
        self,
        weight: float = 0.01,
        probes: int = 1,
        dims: int | None = None,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        self._check_probes(probes, seed)
        super().__init__(weight, dims=dims, **kwargs)
        self._set_probes(probes, seed)

    def plan(self, step: int, device: torch.device, micro: int = 0):  # noqa: ANN201
        """What the recorder evaluates for this term during the step's solves."""
        from ode_reg.recording import FieldNormPlan

        gen = self.generator(step, device, micro)
        return FieldNormPlan(self.name, self.kind, self.dims, self.probes, gen)
