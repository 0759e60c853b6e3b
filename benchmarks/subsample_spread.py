"""Spread and bias of ``AdjointMagnitude(subsample=m)`` against the exact term, on the
headline drop-in case (``benchmarks/dropin.py``: d = 64, B = 128, dopri5 on ``[0, 1]``; and
its rk4 case, step 1/16).

For one batch, the exact term (``subsample=None``) and the estimator at ``--draws`` global
steps (each step its own seeded draw of ``m`` samples): ``spread`` is the standard deviation of
the estimates over the draws divided by the exact term, ``bias`` the mean of the estimates
divided by the exact term minus 1, with the standard error of that mean (``se``, same unit).
Run: ``python -m benchmarks.subsample_spread [--m 16] [--draws 40]``. ``--cost B1 B2 ...``
also times the dopri5 drop-in step at those batch sizes (exact term and estimator, each
against torchdiffeq's plain step, interleaved: :func:`benchmarks._timing.alternate`), to show
where the estimator pays (its cost is per row; a small batch is overhead-bound).
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torchdiffeq

import ode_reg
from benchmarks import dropin
from benchmarks._timing import alternate
from benchmarks.dropin import B, D, Field
from ode_reg import AdjointMagnitude
from ode_reg.recording import StepRecorder
from ode_reg.terms import step_terms


def spread(case: str, m: int, draws: int) -> dict[str, float]:
    """The exact term and the estimator's relative spread, bias and its SE on ``case``."""
    torch.manual_seed(0)
    field = Field()
    x, target = torch.randn(B, D), torch.randn(B, D)
    kw = {"method": "rk4", "options": {"step_size": 1 / 16}} if case == "rk4" else {}
    rec = StepRecorder(adjoint_inputs=True)
    with rec.active():
        zs = ode_reg.odeint(field, x, torch.tensor([0.0, 1.0]), **kw)
        loss = (zs[-1] - target).pow(2).mean()
    params = list(field.parameters())

    def value(term: AdjointMagnitude, step: int) -> float:
        out = step_terms(loss, rec.records, [term], step=step, params=params)
        return float(out.values[term.name].detach())

    exact = value(AdjointMagnitude(0.1), 0)
    est = AdjointMagnitude(0.1, subsample=m, seed=0)
    xs = torch.tensor([value(est, s) for s in range(draws)], dtype=torch.float64)
    return {
        "exact": exact,
        "spread": float(xs.std() / exact),
        "bias": float(xs.mean() / exact - 1),
        "se": float(xs.std() / draws**0.5 / exact),
    }


def cost(batch: int, m: int, rounds: int = 5) -> dict[str, float]:
    """Paired time ratios to torchdiffeq's step of the exact term and the estimator, dopri5
    drop-in case at batch size ``batch``."""
    saved = dropin.B
    dropin.B = batch  # dropin.make reads its batch size from the module
    try:
        fns = {
            "torchdiffeq": dropin.make(torchdiffeq.odeint, [], "dopri5"),
            "exact": dropin.make(ode_reg.odeint, [AdjointMagnitude(0.1)], "dopri5"),
            "subsample": dropin.make(
                ode_reg.odeint, [AdjointMagnitude(0.1, subsample=m, seed=0)], "dopri5"
            ),
        }
        out = alternate(fns, rounds, baseline="torchdiffeq")
    finally:
        dropin.B = saved
    return {n: out[n]["paired"] for n in ("exact", "subsample")} | {
        "ms": 1e3 * out["torchdiffeq"]["wall"]
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--cost", type=int, nargs="*", default=[], help="batch sizes to time")
    parser.add_argument("--no-spread", action="store_true", help="only the --cost timings")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.cost:
        print(
            "| dopri5, batch | torchdiffeq step | exact / torchdiffeq | subsample=m / torchdiffeq |"
        )
        print("|---|---:|---:|---:|")
        for batch in args.cost:
            c = cost(batch, args.m)
            print(
                f"| {batch} (m = {args.m}) | {c['ms']:.0f} ms | {c['exact']:.2f}× | {c['subsample']:.2f}× |"
            )
    if args.no_spread:
        return
    print("| case | m of B | exact term | spread (std / exact) | bias (mean / exact - 1) ± SE |")
    print("|---|---|---:|---:|---:|")
    for case in ("dopri5", "rk4"):
        r = spread(case, args.m, args.draws)
        print(
            f"| {case} | {args.m} of {B} | {r['exact']:.4g} | {r['spread']:.3f} | "
            f"{r['bias']:+.3f} ± {r['se']:.3f} |"
        )


if __name__ == "__main__":
    main()
