"""Drop-in cost: a converted training step against torchdiffeq's, side by side in one run.

Per training step (forward + backward of ``loss``), for dopri5 on ``t = [0, 1]``, dopri5 with
100 output times, and rk4 (step 1/16): field evaluations (deterministic, counted by a forward
pre-hook on the field) and wall-time ratios, for the plain torchdiffeq module, the converted
module with no active term, with ``AdjointMagnitude``, and with the headline exact terms
(adjoint + sensitivity + directional).

NFE counts calls of the field's ``forward``: the sensitivity terms' evaluation of the field at
all checkpoints of a solve is one vectorized call. Run: ``python -m benchmarks.dropin
[--rounds 15]`` (about 2-4 minutes; writes ``benchmarks/results/dropin.md``).
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torchdiffeq
from torch import nn

import ode_reg
from benchmarks._timing import alternate
from ode_reg import AdjointMagnitude, DirectionalConstraint, SensitivityMagnitude

D, B = 64, 128


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(z))


def make(solve, regularizers, case: str):
    torch.manual_seed(0)
    field = Field()
    kw = {"method": "rk4", "options": {"step_size": 1 / 16}} if case == "rk4" else {}
    t = torch.linspace(0, 1, 100) if case == "dopri5_100" else torch.tensor([0.0, 1.0])
    x = torch.randn(B, D)
    target = torch.randn(len(t), B, D)

    class Model(ode_reg.RegularizedODEModule):
        def __init__(self) -> None:
            super().__init__(regularizers=regularizers)
            self.field = field

        def training_step(self, batch, batch_idx):
            zs = solve(self.field, batch, t, **kw)
            if case == "dopri5_100":
                return (zs - target).pow(2).mean()
            return (zs[-1] - target[-1]).pow(2).mean()

    model = Model()
    calls = [0]
    field.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    def step() -> int:
        calls[0] = 0
        model.zero_grad()
        model.training_step(x, 0).backward()
        return calls[0]

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/dropin.md", help="markdown table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*self.trainer. reference is not registered")
    lines = [
        "| case | variant | NFE per step | NFE / torchdiffeq | time / torchdiffeq |",
        "|---|---|---|---|---|",
    ]
    for case in ("dopri5", "dopri5_100", "rk4"):
        variants = {
            "torchdiffeq": make(torchdiffeq.odeint, [], case),
            "converted, no term": make(ode_reg.odeint, [], case),
            "AdjointMagnitude": make(ode_reg.odeint, [AdjointMagnitude(0.1)], case),
            "adj+sens+dir (exact)": make(
                ode_reg.odeint,
                [
                    AdjointMagnitude(0.1),
                    SensitivityMagnitude(0.1),
                    DirectionalConstraint(0.5, 0.1),
                ],
                case,
            ),
        }
        nfe = {name: fn() for name, fn in variants.items()}
        times = alternate(variants, args.rounds, baseline="torchdiffeq")
        for name in variants:
            lines.append(
                f"| {case} | {name} | {nfe[name]} | {nfe[name] / nfe['torchdiffeq']:.3f} | "
                f"{times[name]['paired']:.3f} |"
            )
            print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
