"""The ``ablation`` section of ``python -m benchmarks``: the headline step with each fast path
switched back to the direct implementation."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks._models import VARIANTS
from benchmarks._timing import alternate
from benchmarks.bench_steps import HEADLINE, _step_fns

# --------------------------------------------------------------------------- ablation


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("fast path disabled by the benchmark")


#: Fast paths switched off one at a time (module attribute -> replacement).
ABLATIONS: dict[str, dict[str, Any]] = {
    "all fast paths": {},
    "sensitivities: per checkpoint (no vmap)": {
        "ode_reg.recording.StepRecorder._batched": lambda *a: None
    },
    "adjoint term: always the extra VJP": {
        "ode_reg.terms.ChainContext._reads_only_the_end": lambda *a: False
    },
    "shared backward on (opt-in)": {
        "ode_reg.module._use_shared_backward": lambda module, active: (
            module.automatic_optimization
            and any(r.needs_adjoints for r in active)
            and not any(r.needs_differentiable_adjoints for r in active)
        )
    },
}
#: All of the above at once: the direct implementation.
ABLATIONS["all fast paths off (direct)"] = {
    path: value
    for name, patch in ABLATIONS.items()
    if name != "shared backward on (opt-in)"
    for path, value in patch.items()
}


@contextlib.contextmanager
def _patched(replacements: dict[str, Any]):
    saved = []
    try:
        for path, value in replacements.items():
            module, name = path.rsplit(".", 1)
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError:  # a class attribute: module.Class.name
                parent, cls = module.rsplit(".", 1)
                mod = getattr(importlib.import_module(parent), cls)
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def _ablation_row(variant: str, ablation: str, r: dict, base: dict) -> dict:
    """One row of the fast-path table from the timings of a variant and of the baseline."""
    return {
        "variant": variant,
        "ablation": ablation,
        "ms": 1e3 * r["wall"],
        "ratio": r["paired"],
        "ratio_of_medians": r["wall"] / base["wall"],
        "cpu_ms": 1e3 * r["cpu"],
        "cpu_ratio": r["cpu"] / base["cpu"],
    }


def bench_ablation(rounds: int, log) -> list[dict]:
    """The headline step with one fast path at a time switched back to the direct one."""
    d, b, k = HEADLINE
    cases = [
        ("plain", "all fast paths"),
        ("plain", "integrate: odeint per interval"),
        ("plain", "all fast paths off (direct)"),
        ("all(+skew)", "all fast paths"),
        ("all(+skew)", "all fast paths off (direct)"),
        ("exact(adj+sens+dir)", "all fast paths"),
        ("exact(adj+sens+dir)", "integrate: odeint per interval"),
        ("exact(adj+sens+dir)", "sensitivities: direct (_through_state)"),
        ("exact(adj+sens+dir)", "sensitivities: aliases, loop over k"),
        ("adjoint", "all fast paths"),
        ("adjoint", "integrate: odeint per interval"),
        ("skew", "all fast paths"),
        ("skew", "skew: loop over k"),
        ("sens+dir(stop-grad)", "all fast paths"),
        ("sens+dir(stop-grad)", "shared backward off (two backwards)"),
    ]
    steps = _step_fns(d, b, k, sorted({v for v, _ in cases}))
    fns = {}
    for variant, ablation in cases:

        def run(step=steps[variant], patch=ABLATIONS[ablation]) -> None:
            with _patched(patch):
                step()

        fns[f"{variant} | {ablation}"] = run
    res = alternate(fns, rounds, baseline="plain | all fast paths")
    base = res["plain | all fast paths"]
    rows = []
    for variant, ablation in cases:
        rows.append(_ablation_row(variant, ablation, res[f"{variant} | {ablation}"], base))
        log(
            f"  {variant:20s} {ablation:40s} {rows[-1]['ms']:7.1f} ms  "
            f"{rows[-1]['ratio']:.2f} x plain (fast)"
        )
    rows += _ablation_ode_rnn(rounds, log)
    return rows


def _ablation_ode_rnn(rounds: int, log, steps: int = 28) -> list[dict]:
    """The same switches on an ODE-RNN (``SequenceModel``, hidden 64, batch 64, ``steps``
    Euler solves chained: ``steps + 1`` checkpoints, each step holding its own input)."""
    from ode_reg.models import SequenceModel

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, steps, 1, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    cases = [
        ("plain", "all fast paths"),
        ("plain", "all fast paths off (direct)"),
        ("exact(adj+sens+dir)", "all fast paths"),
        ("exact(adj+sens+dir)", "all fast paths off (direct)"),
        ("skew", "all fast paths"),
        ("skew", "all fast paths off (direct)"),
    ]
    fns = {}
    for variant, ablation in cases:
        torch.manual_seed(0)
        model = SequenceModel(1, 10, hidden_dim=64, regularizers=VARIANTS[variant]())

        def run(model=model, patch=ABLATIONS[ablation]) -> None:
            with _patched(patch):
                model.training_step((x, y), 0).backward()
            model.zero_grad(set_to_none=True)

        fns[f"{variant} | {ablation}"] = run
    res = alternate(fns, rounds, baseline="plain | all fast paths")
    base = res["plain | all fast paths"]
    rows = []
    for variant, ablation in cases:
        r = res[f"{variant} | {ablation}"]
        rows.append(_ablation_row(f"ODE-RNN T={steps}: {variant}", ablation, r, base))
        log(
            f"  {rows[-1]['variant']:36s} {ablation:30s} {rows[-1]['ms']:7.1f} ms  "
            f"{rows[-1]['ratio']:.2f} x plain (fast)"
        )
    return rows
