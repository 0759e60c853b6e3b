"""The size of each term at initialisation beside the task loss, on the recipes' models.

How the default weights were chosen (README, "Default weights"): a default term should be of
the order of the task loss at initialisation (a weight w with ``w * R(init) / L(init)`` between
about 0.01 and 1), so that it shapes training without swamping it. This prints, per recipe,
``L(init)`` and each term's unweighted ``R(init)`` (median over a few batches and seeds).

Run: ``python -m benchmarks.term_scales`` (about a minute; writes ``results/term_scales.md``).
"""

from __future__ import annotations

import statistics
import warnings

import torch
import yaml

from ode_reg import (
    AdjointMagnitude,
    DirectionalConstraint,
    SensitivityMagnitude,
    SkewJacobianPenalty,
)
from ode_reg.data import AddingDataModule, CopyingDataModule, DigitsDataModule, TwoMoonsDataModule
from ode_reg.models import FlowClassifier, SequenceModel

RECIPES = {
    "digits": (SequenceModel, DigitsDataModule),
    "adding": (SequenceModel, AddingDataModule),
    "copying": (SequenceModel, CopyingDataModule),
    "two_moons": (FlowClassifier, TwoMoonsDataModule),
}


def terms() -> list:
    return [
        AdjointMagnitude(1.0),
        SensitivityMagnitude(1.0),
        DirectionalConstraint(0.0, 1.0),
        SkewJacobianPenalty(1.0, seed=0),
    ]


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    lines = [
        "# Terms at initialisation beside the task loss (`python -m benchmarks.term_scales`)",
        "",
        "Unweighted values, median over 3 seeds, one training batch each; the last columns are",
        "the default-weighted terms as a fraction of the task loss.",
        "",
        "| recipe | task loss L | R_adj | R_sens | R_dir (γ=0) | R_skew | 0.1 R_adj / L | "
        "0.1 R_sens / L | 0.1 R_dir / L | 0.01 R_skew / L |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (model_cls, data_cls) in RECIPES.items():
        cfg = yaml.safe_load(open(f"recipes/{name}.yaml"))
        margs = dict(cfg["model"]["init_args"])
        margs.pop("regularizers", None)
        dargs = dict((cfg.get("data") or {}).get("init_args") or {})
        rows: dict[str, list[float]] = {}
        for seed in range(3):
            torch.manual_seed(seed)
            model = model_cls(**margs, regularizers=terms())
            logged: dict[str, float] = {}
            model.log = lambda n, v, **k: logged.__setitem__(n, float(v))  # noqa: B023
            data = data_cls(**dargs)
            data.prepare_data()
            data.setup("fit")
            batch = next(iter(data.train_dataloader()))
            model.training_step(batch, 0)
            for key, value in logged.items():
                rows.setdefault(key, []).append(value)
        med = {k: statistics.median(v) for k, v in rows.items()}
        loss = med.get("train/loss", float("nan"))
        adj, sens = med["reg/adjoint_magnitude"], med["reg/sensitivity_magnitude"]
        dirc, skew = med["reg/directional"], med["reg/skew_jacobian"]
        lines.append(
            f"| {name} | {loss:.3g} | {adj:.3g} | {sens:.3g} | {dirc:.3g} | {skew:.3g} | "
            f"{0.1 * adj / loss:.1%} | {0.1 * sens / loss:.1%} | {0.1 * dirc / loss:.1%} | "
            f"{0.01 * skew / loss:.1%} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open("results/term_scales.md", "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
