"""The figures behind issue 21c (the recorded solve's rows stacked, no ``CopySlices``).

Run from a tree's root with that tree on the path (this file may be copied into an old tree)::

    PYTHONPATH=$PWD .venv/bin/python tests/_solution_rows_figures.py count dopri5_100 rk4
    PYTHONPATH=$PWD .venv/bin/python tests/_solution_rows_figures.py grads /tmp/grads_new.pt
    PYTHONPATH=$PWD .venv/bin/python tests/_solution_rows_figures.py compare /tmp/grads_old.pt /tmp/grads_new.pt

``count``: per training step of ``benchmarks.dropin`` (d = 64, B = 128), the field evaluations,
the number of ``aten::copy_`` calls and of ``CopySlices`` backward nodes run (torch.profiler),
and ``aten::copy_``'s share of the step's self CPU time. ``grads``: each term step's parameter
gradients saved; ``compare``: whether two trees' gradients are equal bit for bit.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torchdiffeq
from torch.profiler import ProfilerActivity, profile

import ode_reg
from benchmarks.dropin import make
from ode_reg import AdjointMagnitude, DirectionalConstraint, SensitivityMagnitude

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def _exact() -> list:
    return [AdjointMagnitude(0.1), SensitivityMagnitude(0.1), DirectionalConstraint(0.5, 0.1)]


VARIANTS = {
    "torchdiffeq": (torchdiffeq.odeint, list),
    "converted, no term": (ode_reg.odeint, list),
    "AdjointMagnitude": (ode_reg.odeint, lambda: [AdjointMagnitude(0.1)]),
    "adj+sens+dir": (ode_reg.odeint, _exact),
}


def count(cases: list[str]) -> None:
    for case in cases:
        for name, (solve, regs) in VARIANTS.items():
            step = make(solve, regs(), case)
            step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                nfe = step()
            ev = {e.key: e for e in prof.key_averages()}
            copies = ev["aten::copy_"].count if "aten::copy_" in ev else 0
            slices = sum(
                e.count
                for k, e in ev.items()
                if k.endswith("CopySlices") and not k.startswith("autograd::engine")
            )
            total = sum(e.self_cpu_time_total for e in ev.values())
            share = ev["aten::copy_"].self_cpu_time_total / total if copies else 0.0
            print(
                f"{case:11s} {name:20s} nfe {nfe:4d}  aten::copy_ {copies:5d}  "
                f"CopySlices {slices:4d}  copy_ share of self CPU {share:.0%}",
                flush=True,
            )


def grads(path: str) -> None:
    out = {}
    for case in ("dopri5_100", "rk4", "dopri5"):
        for name in ("AdjointMagnitude", "adj+sens+dir"):
            solve, regs = VARIANTS[name]
            step = make(solve, regs(), case)
            nfe = step()
            model = next(
                c.cell_contents
                for c in step.__closure__
                if isinstance(c.cell_contents, torch.nn.Module)
            )
            out[f"{case} {name}"] = (nfe, [p.grad.clone() for p in model.parameters()])
    torch.save(out, path)


def compare(old: str, new: str) -> None:
    a, b = torch.load(old), torch.load(new)
    for key, (nfe, ga) in a.items():
        nfe_b, gb = b[key]
        same = all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
        print(f"{key:30s} nfe {nfe} / {nfe_b}  gradients equal bit for bit: {same}")


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"count": lambda: count(rest), "grads": lambda: grads(rest[0])}.get(
        cmd, lambda: compare(*rest)
    )()
