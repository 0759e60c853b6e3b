"""The note's open question (eqs. 18-19): the effect of the field scale alpha and of the initial
state's scale on accuracy, state norm and adjoint profile, measured on two moons.

Model: :class:`~ode_reg.models.FlowClassifier` (``logits = D z(T)``, ``z(0) = s E x``), flows

* ``skew_linear``: ``dz/dt = alpha (A - A^T) z`` (its ``alpha`` argument);
* ``antisymmetric``: ``dz/dt = alpha tanh((W - W^T) z + b)``. For an autonomous field, scaling
  it by alpha is exactly integrating the unscaled field over ``alpha T`` (and RK4 with step
  ``alpha h`` on ``f`` equals RK4 with step ``h`` on ``alpha f``), so alpha is realized as
  ``horizon = alpha * 2`` and ``step_size = alpha * 0.1``: the same 20 RK4 steps.

over ``alpha x init_scale``. For each run: test accuracy, the mean initial and final state
norms ``|z(0)|``, ``|z(T)|`` on the test set (equal for the skew-linear flow, which is
norm-preserving: ``|z(T)| = |z(0)|`` for every alpha), and the max/min ratio of the adjoint
norm over the 9 checkpoints on the test set, computed with :func:`ode_reg.adjoints`.

Writes ``results/alpha_sweep.json``, ``results/alpha_sweep.md`` and ``results/alpha_sweep.png``.

Usage::

    python recipes/alpha_sweep.py          # 30 short runs (12 epochs each), about 10 minutes on 2 busy cores
    python recipes/alpha_sweep.py --fast   # 2 steps per run on a 2 x 2 grid, into results/fast/
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    Timer,
    adjoint_profile,
    machine,
    md_table,
    profile_ratio,
    single_thread,
    write_json,
)

ALPHAS = (0.1, 0.5, 1.0, 2.0, 5.0)
SCALES = (0.1, 1.0, 10.0)
FLOWS = ("skew_linear", "antisymmetric")
HORIZON, STEP = 2.0, 0.1


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    single_thread()
    import lightning as L
    import torch

    from ode_reg.data import TwoMoonsDataModule
    from ode_reg.models import FlowClassifier

    L.seed_everything(job["seed"], verbose=False)
    dm = TwoMoonsDataModule(n_samples=1000, noise=0.1, batch_size=64, seed=job["seed"])
    alpha, flow = job["alpha"], job["flow"]
    if flow == "skew_linear":
        kw = dict(alpha=alpha, horizon=HORIZON, step_size=STEP)
    else:
        kw = dict(horizon=alpha * HORIZON, step_size=alpha * STEP, gamma=0.0)
    model = FlowClassifier(
        2, 2, flow=flow, hidden_dim=16, init_scale=job["init_scale"], lr=job["lr"], **kw
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=job["epochs"],
        max_steps=job["max_steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with Timer() as t:
        trainer.fit(model, datamodule=dm)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    x, y = dm.dataset("test").tensors
    model.eval()
    with torch.no_grad():
        z0 = model.hparams.init_scale * model.encoder(x)
        zs = model.odeint(
            model.field,
            z0,
            model.span,
            method="rk4",
            options={"step_size": model.hparams.step_size},
            checkpoints=model.hparams.checkpoints,
        )
    n0, nt = z0.norm(dim=-1), zs[-1].norm(dim=-1)
    profile = adjoint_profile(model, x, y)
    return {
        **job,
        "test_acc": float(test["test/acc"]),
        "z0_norm": float(n0.mean()),
        "zT_norm": float(nt.mean()),
        "norm_ratio": float((nt / n0).mean()),
        "adjoint_ratio_max_min": profile_ratio(profile),
        "adjoint_profile": profile.tolist(),
        "wall_s": t.seconds,
    }


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flows = sorted({r["flow"] for r in records}, key=FLOWS.index)
    fig, axes = plt.subplots(len(flows), 3, figsize=(14, 3.6 * len(flows)), squeeze=False)
    for row, flow in zip(axes, flows):
        for s in sorted({r["init_scale"] for r in records}):
            rs = sorted(
                (r for r in records if r["flow"] == flow and r["init_scale"] == s),
                key=lambda r: r["alpha"],
            )
            a = [r["alpha"] for r in rs]
            row[0].plot(a, [100 * r["test_acc"] for r in rs], "o-", label=f"init scale {s:g}")
            row[1].plot(a, [r["norm_ratio"] for r in rs], "o-", label=f"init scale {s:g}")
            row[2].plot(
                a, [r["adjoint_ratio_max_min"] for r in rs], "o-", label=f"init scale {s:g}"
            )
        row[0].set_ylabel(f"{flow}\ntest accuracy (%)")
        row[1].set_ylabel("mean |z(T)| / |z(0)|")
        row[2].set_ylabel("adjoint norm max/min")
        for ax in row:
            ax.set_xscale("log")
            ax.set_xlabel("alpha")
            ax.legend(fontsize=8)
        row[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--fast", action="store_true", help="2 steps per run on a 2 x 2 grid, into results/fast/"
    )
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--flows", nargs="*", default=list(FLOWS))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or (RESULTS / "fast" if args.fast else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    alphas, scales = ((0.5, 2.0), (0.1, 10.0)) if args.fast else (ALPHAS, SCALES)
    jobs = [
        dict(
            flow=f,
            alpha=a,
            init_scale=s,
            epochs=1 if args.fast else args.epochs,
            max_steps=2 if args.fast else -1,
            lr=args.lr,
            seed=args.seed,
        )
        for f in args.flows
        for s in scales
        for a in alphas
    ]
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            records = list(pool.map(train_one, jobs))
    else:
        records = [train_one(j) for j in jobs]
    write_json(
        out / "alpha_sweep.json",
        {"machine": machine(), "args": vars(args) | {"out": str(out)}, "runs": records},
    )
    rows = [
        [
            r["flow"],
            r["alpha"],
            r["init_scale"],
            f"{100 * r['test_acc']:.1f} %",
            f"{r['z0_norm']:.3g}",
            f"{r['zT_norm']:.3g}",
            f"{r['adjoint_ratio_max_min']:.3g}",
            f"{r['wall_s']:.0f} s",
        ]
        for r in records
    ]
    md = "\n".join(
        [
            "# Alpha sweep: field scale and initial-state scale (two moons)",
            "",
            f"FlowClassifier, hidden 16, horizon {HORIZON}, RK4 step {STEP} (scaled with alpha for the "
            f"antisymmetric flow), Adam lr {args.lr}, {1 if args.fast else args.epochs} epochs, seed {args.seed}. "
            "Norms are means over the test set; the adjoint ratio is max/min over the 9 checkpoints "
            f"of mean_i |dL/dz_k| on the test set. Measured on {machine()}. Command: "
            "`python recipes/alpha_sweep.py" + (" --fast" if args.fast else "") + "`.",
            "",
            md_table(
                [
                    "flow",
                    "alpha",
                    "init scale",
                    "test acc",
                    "mean |z(0)|",
                    "mean |z(T)|",
                    "adjoint max/min",
                    "train wall time",
                ],
                rows,
            ),
            "",
            "![alpha sweep](alpha_sweep.png)",
            "",
        ]
    )
    (out / "alpha_sweep.md").write_text(md)
    plot(records, out / "alpha_sweep.png")
    print(md)


if __name__ == "__main__":
    main()
