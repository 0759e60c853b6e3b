"""The ``integrate``, ``lie`` and ``memory`` sections of ``python -m benchmarks``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torchdiffeq

from benchmarks._models import STEP_SIZE, VARIANTS, TanhField, make_batch
from benchmarks._timing import alternate, peak_memory
from benchmarks.bench_steps import HEADLINE, _step_fns

# --------------------------------------------------------------------------- integrate


def bench_integrate(ks: tuple[int, ...], rounds: int, log) -> list[dict]:
    from ode_reg import integrate

    d, b, _ = HEADLINE
    torch.manual_seed(0)
    f = TanhField(d)
    x = make_batch(d, b)[0]
    t = torch.tensor([0.0, 1.0])
    opts = {"method": "rk4", "options": {"step_size": STEP_SIZE}}

    def solve(k: int | None) -> torch.Tensor:
        if k is None:
            return torchdiffeq.odeint(f, x, t, **opts)[-1]
        return integrate(f, x, t, checkpoints=k, **opts).ys[-1]

    def forward(k):
        return lambda: solve(k)

    def both(k):
        def run():
            solve(k).pow(2).mean().backward()
            f.zero_grad(set_to_none=True)

        return run

    rows = []
    for mode, make in (("forward", forward), ("forward+backward", both)):
        fns = {"odeint": make(None), **{f"K={k}": make(k) for k in ks}}
        res = alternate(fns, rounds, warmup=3, baseline="odeint")
        base = res["odeint"]
        for k in ks:
            name = f"K={k}"
            rows.append(
                {
                    "mode": mode,
                    "K": k,
                    "odeint_ms": 1e3 * base["wall"],
                    "integrate_ms": 1e3 * res[name]["wall"],
                    "ratio": res[name]["paired"],
                    "ratio_of_medians": res[name]["wall"] / base["wall"],
                    "cpu_ratio": res[name]["cpu"] / base["cpu"],
                }
            )
            log(
                f"  integrate {mode:16s} {name:5s} {rows[-1]['integrate_ms']:6.1f} ms vs odeint "
                f"{rows[-1]['odeint_ms']:6.1f} ms: {rows[-1]['ratio']:.2f}"
            )
    return rows


# --------------------------------------------------------------------------- Lie steps


def bench_lie(steps: tuple[int, ...], rounds: int, log, dim: int = 64) -> list[dict]:
    from ode_reg import OrthogonalFlow
    from ode_reg.functional.orthogonal import orthogonality_defect

    h = 0.01
    rows = []
    for dtype in (torch.float32, torch.float64):
        for rule in ("exp", "cayley", "rk4"):
            torch.manual_seed(0)
            flow = OrthogonalFlow(dim, step=rule, step_size=h, weight_dtype=dtype, b_std=1.0)
            w0 = flow.initial_weight(dtype).detach()
            ta = torch.tensor(0.0, dtype=dtype)
            for n in steps:
                tb = torch.tensor(n * h, dtype=dtype)
                with torch.no_grad():
                    run = functools.partial(flow._flow, ta, tb, w0, None, h)
                    if n == steps[0]:  # time per step from the shortest flow, repeated
                        per_step = alternate({"flow": run}, rounds, 1)["flow"]["wall"] / n
                    w, _ = run()
                rows.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "rule": rule,
                        "steps": n,
                        "defect": float(orthogonality_defect(w)),
                        "us_per_step": 1e6 * per_step,
                    }
                )
                log(
                    f"  {rows[-1]['dtype']:7s} {rule:6s} N={n:5d}: defect "
                    f"{rows[-1]['defect']:.2e}, {rows[-1]['us_per_step']:.0f} us/step"
                )
    return rows


# --------------------------------------------------------------------------- memory


def bench_memory(configs: list[tuple[int, int, int]], log) -> list[dict]:
    rows = []
    for d, b, k in configs:
        fns = _step_fns(d, b, k, list(VARIANTS))
        peaks = {}
        for v, fn in fns.items():
            fn()  # allocate the gradients and optimizer state outside the measurement
            peaks[v] = peak_memory(fn)
        row = {
            "d": d,
            "B": b,
            "K": k,
            "plain_MiB": peaks["plain"] / 2**20,
            "ratio": {v: peaks[v] / peaks["plain"] for v in peaks},
            "MiB": {v: peaks[v] / 2**20 for v in peaks},
        }
        rows.append(row)
        log(
            f"  memory d={d} B={b} K={k}: plain {row['plain_MiB']:.1f} MiB  "
            + "  ".join(f"{v} {row['ratio'][v]:.2f}" for v in list(VARIANTS)[1:])
        )
    return rows
