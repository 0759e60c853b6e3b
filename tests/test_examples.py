"""The runnable programs in ``examples/``, each run small with a real outcome checked."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ode_rnn_on_irregular_times_with_masks_learns_and_counts_its_solves() -> None:
    ex = example("ode_rnn_irregular")
    times, values, masks, _ = ex.irregular_sines(64, length=12)
    assert (times.diff(dim=1) >= 0).all() and not torch.equal(times[0], times[1])  # own times
    assert (values[..., 0][masks == 0] == 0).all() and 0 < masks.mean() < 1
    out = ex.main(["--steps", "24", "--batch", "32", "--length", "8"])
    assert out["loss_after"] < 0.7 * out["loss_before"]
    assert out["acc_after"] > 0.75 > out["acc_before"]
    # One solve per observation time (8), each 2 rk4 steps of 4 evaluations.
    assert out["solves_per_step"] == 8 and out["nfe_per_step"] == 8 * 2 * 4
    assert math.isfinite(out["reg_adjoint_magnitude"]) and out["reg_adjoint_magnitude"] > 0


def test_cnf_with_hutchinson_divergence_and_odeint_adjoint_trains() -> None:
    ex = example("cnf_hutchinson")
    out = ex.main(["--steps", "10", "--batch", "64", "--method", "rk4"])
    assert out["nll_after"] < out["nll_before"] - 0.1
    assert out["trace_rel_err"] < 1e-5  # the mean over all sign patterns is the exact trace
    assert math.isfinite(out["reg_skew_jacobian"]) and out["reg_skew_jacobian"] > 0


def test_classifier_with_an_ode_block_in_a_submodule() -> None:
    ex = example("ode_block_classifier")
    # No term: the converted model trains exactly as the torchdiffeq one (dopri5, adaptive).
    plain = ex.main(["--steps", "4", "--adjoint_weight", "0", "--solver", "torchdiffeq"])
    converted = ex.main(["--steps", "4", "--adjoint_weight", "0"])
    for (name, p), q in zip(
        converted["model"].named_parameters(), plain["model"].parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    # With AdjointMagnitude on the submodule's solve: recorded, regularized, and it learns.
    out = ex.main(["--steps", "20"])
    assert out["reg_adjoint_magnitude"] is not None and out["reg_adjoint_magnitude"] > 0
    assert out["acc_after"] > 0.5 > out["acc_before"] + 0.3


@pytest.mark.parametrize("name", ["ode_rnn_irregular", "cnf_hutchinson", "ode_block_classifier"])
def test_examples_have_a_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        example(name).main(["--help"])
    assert info.value.code == 0 and "--steps" in capsys.readouterr().out
