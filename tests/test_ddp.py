"""DDP exactness on 2 CPU ranks (gloo): N ranks give the one-process result for the whole batch.

The scenarios run in ``_ddp_worker.py``, in a subprocess with a timeout (a hang fails the test
instead of blocking the session); inside it, Lightning's ``ddp_fork`` strategy. Each rank takes an
interleaved half of every global batch of 16; the reference is one process with the whole batch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ode_reg.plan import due

WORKER = Path(__file__).with_name("_ddp_worker.py")
SCENARIOS = (
    "parity",
    "spectral",
    "every_n",
    "skew",
    "parity_local",
    "stopgrad",
    "rnode",
    "unequal",
)
WORKER_TIMEOUT_S = 240
PARAM_TOL = 1e-5


def run_worker(out: Path, scenarios: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Run the scenarios in a fresh process (killed with its ranks on timeout); load results."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), *scenarios],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the forked ranks die with it
        env=env,
    )
    try:
        log, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log = f"TIMED OUT after {WORKER_TIMEOUT_S} s\n{log}"
    results: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        res: dict[str, Any] = {"log": log[-4000:]}
        for mode in ("single", "ddp"):
            status = out / f"{scenario}-{mode}.status"
            if status.exists():
                elapsed, _, msg = status.read_text().partition("\n")
                res[f"{mode}_status"], res[f"{mode}_elapsed"] = msg.strip(), float(elapsed)
            files = sorted(out.glob(f"{scenario}-{mode}-rank*.pt"))
            res[mode] = [torch.load(f, weights_only=False) for f in files]
        results[scenario] = res
    return results


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return run_worker(tmp_path_factory.mktemp("ddp"), SCENARIOS)


def finished(res: dict[str, Any], modes: tuple[str, ...] = ("single", "ddp")) -> None:
    for mode in modes:
        assert res.get(f"{mode}_status") == "ok", res.get(f"{mode}_status") or res["log"]
    if "ddp" in modes:
        assert len(res["ddp"]) == 2, res["log"]
        assert all(r["world_size"] == 2 for r in res["ddp"])
    if "single" in modes:
        assert len(res["single"]) == 1 and res["single"][0]["world_size"] == 1


def param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_metrics_equal(single: list[dict], ddp: list[dict], rel: float = 1e-5) -> None:
    """Per step, the same keys and values (``sync_dist`` means over ranks) as in one process."""
    assert len(single) == len(ddp)
    for step, (s, d) in enumerate(zip(single, ddp)):
        assert s.keys() == d.keys(), step
        for k in s:
            assert d[k] == pytest.approx(s[k], rel=rel, abs=1e-7), (step, k)


def check_parity(res: dict[str, Any]) -> float:
    finished(res)
    (single,), (r0, r1) = res["single"], res["ddp"]
    assert single["steps"] == r0["steps"] == r1["steps"] > 0
    # DDP keeps the ranks identical ...
    assert param_diff(r0["params"], r1["params"]) == 0.0
    # ... and equal to one process with the whole batch
    diff = param_diff(single["params"], r0["params"])
    assert diff < PARAM_TOL
    assert all(torch.isfinite(p).all() for p in r0["params"].values())
    # the logged reg/* (and the task loss), synchronized across ranks, are the one-process values
    assert_metrics_equal(single["synced"], r0["synced"])
    assert_metrics_equal(single["synced"], r1["synced"])
    assert single["skipped"] == r0["skipped"] == r1["skipped"]
    assert set(single["skipped"].values()) == {0}
    return diff


def test_parameters_and_logged_terms_equal_one_process(ddp) -> None:
    res = ddp["parity"]
    check_parity(res)
    # every term contributed: each is non-zero on some step
    synced = res["single"][0]["synced"]
    for name in ("adjoint_magnitude", "sensitivity_magnitude", "directional"):
        assert max(row[f"reg/{name}"] for row in synced) > 1e-5
    # the per-rank values of the per-sample adjoint term differ; their mean is the logged one
    r0, r1 = res["ddp"]
    for step, row in enumerate(r0["synced"]):
        local = (
            r0["logged"][step]["reg/adjoint_magnitude"],
            r1["logged"][step]["reg/adjoint_magnitude"],
        )
        assert local[0] != local[1]
        assert row["reg/adjoint_magnitude"] == pytest.approx(sum(local) / 2, rel=1e-5)
        # y_k is all-reduced: the sensitivity terms are the same on both ranks
        assert r0["logged"][step]["reg/sensitivity_magnitude"] == pytest.approx(
            r1["logged"][step]["reg/sensitivity_magnitude"], rel=1e-6
        )


def test_parity_needs_the_all_reduce_of_the_sensitivity_density(ddp) -> None:
    """The test above has teeth: with y_k left rank-local, DDP drifts from one process."""
    mutant = ddp["parity_local"]
    finished(mutant, ("ddp",))
    single = ddp["parity"]["single"][0]
    assert param_diff(single["params"], mutant["ddp"][0]["params"]) > 100 * PARAM_TOL


def test_stop_gradient_terms_with_shared_backward_equal_one_process(ddp) -> None:
    """detach_adjoints: the task gradient comes from the adjoints' backward inside DDP's
    forward, the regularizer's through Lightning's backward: DDP still averages both."""
    check_parity(ddp["stopgrad"])
    synced = ddp["stopgrad"]["single"][0]["synced"]
    for name in ("sensitivity_magnitude", "directional"):
        assert max(row[f"reg/{name}"] for row in synced) > 1e-5


def test_spectral_constraint_on_orthogonal_flow_equals_one_process(ddp) -> None:
    check_parity(ddp["spectral"])
    synced = ddp["spectral"]["single"][0]["synced"]
    assert max(row["reg/spectral"] for row in synced) > 1e-3


def test_every_n_steps_under_ddp_does_not_hang_and_stays_exact(ddp) -> None:
    res = ddp["every_n"]
    check_parity(res)
    # finished well inside the gloo timeout (30 s) that a mismatched collective would hit
    assert res["ddp_elapsed"] < 20.0
    for rank in res["ddp"]:
        assert rank["steps"] == 8
        for step, logged in enumerate(rank["logged"]):
            names = {k[4:] for k in logged if k.startswith("reg/")} - {"total", "skipped"}
            # the one cadence rule (ode_reg.due): (step + 1) % every_n_steps == 0
            want = {"sensitivity_magnitude", "directional"} if (step + 1) % 2 == 0 else set()
            if (step + 1) % 3 == 0:
                want.add("adjoint_magnitude")
            assert names == want, step  # only the scheduled terms, on both ranks


def test_skew_jacobian_estimate_is_unbiased_across_ranks(ddp) -> None:
    """The Hutchinson estimate, averaged over ranks, converges to the exact whole-batch value.

    The field is frozen (lr = 0); per step, the synchronized estimate (16 probes per state, mean
    of the two ranks' half-batch estimates) is compared with ``mean_{k,i} |sym(J)|_F^2`` over the
    whole batch, computed with full Jacobians in the one-process run.
    """
    res = ddp["skew"]
    finished(res)
    exact = torch.tensor(res["single"][0]["exact"])
    r0, r1 = res["ddp"]
    est = torch.tensor([row["reg/skew_jacobian"] for row in r0["synced"]])
    local = torch.tensor(
        [[r["logged"][s]["reg/skew_jacobian"] for s in range(len(exact))] for r in (r0, r1)]
    )
    assert len(exact) == len(est) == 4 and bool((exact > 0).all())
    # the logged value is the mean of the ranks' estimates (each of its own half batch)
    torch.testing.assert_close(est, local.mean(0), rtol=1e-5, atol=0)
    # unbiased: within 10 % per step (16 probes; measured <= 3.6 %), 5 % over the 4 steps
    rel = (est - exact).abs() / exact
    assert float(rel.max()) < 0.10, rel
    assert float((est.mean() - exact.mean()).abs() / exact.mean()) < 0.05
    # the one-process estimate agrees as well
    single = torch.tensor([row["reg/skew_jacobian"] for row in res["single"][0]["synced"]])
    assert float(((single - exact).abs() / exact).max()) < 0.10


def test_ranks_with_unequal_adaptive_steps_agree_on_common_checkpoint_times(ddp) -> None:
    """dopri5, rank 1's half batch three times larger (stiffer under ``- z^3``): the ranks take
    different numbers of steps, every term and every monitor runs (this aborted with a gloo size
    mismatch when each rank all-reduced ``y_k`` at its own step states), and the logged values
    are those of one process with the whole batch at the same (explicit) checkpoint times, to
    the solver's tolerance (MATH.md, Under DDP)."""
    from ode_reg.trajectory import DEFAULT_CHECKPOINTS

    res = ddp["unequal"]
    finished(res)
    (single,), (r0, r1) = res["single"], res["ddp"]
    assert single["steps"] == r0["steps"] == r1["steps"] == 4
    common = torch.linspace(0.0, 1.0, DEFAULT_CHECKPOINTS + 1)
    for a, b in zip(r0["solves"], r1["solves"]):
        assert b["accepted"] > a["accepted"] + 5  # the stiff rank takes many more steps
        # ... and both have their checkpoints at the common times
        torch.testing.assert_close(torch.tensor(a["times"]), common)
        torch.testing.assert_close(torch.tensor(b["times"]), common)
    assert param_diff(r0["params"], r1["params"]) == 0.0
    assert param_diff(single["params"], r0["params"]) < 1e-3
    terms = ("adjoint_magnitude", "sensitivity_magnitude", "directional")
    keys = [f"reg/{n}" for n in terms] + [
        "task",
        "grad/total_norm",
        "adjoint/ratio_max_min",
        "adjoint/norm_first",
        "adjoint/norm_last",
        "sensitivity/bound_ratio",
        "sensitivity/cancellation_ratio",
    ]
    for step, (s, d0, d1) in enumerate(zip(single["synced"], r0["synced"], r1["synced"])):
        for k in keys:
            assert d0[k] == pytest.approx(s[k], rel=2e-3), (step, k)
            assert d1[k] == d0[k], (step, k)
        for n in terms:
            assert s[f"reg/{n}"] > 1e-3
        # the batch-reducing terms are the same on both ranks (y_k all-reduced)
        for n in ("sensitivity_magnitude", "directional"):
            assert r0["logged"][step][f"reg/{n}"] == pytest.approx(
                r1["logged"][step][f"reg/{n}"], rel=1e-6
            )
        # the per-sample and probe terms: the logged value is the mean of the ranks' own
        for n in ("adjoint_magnitude", "skew_jacobian"):
            local = [r["logged"][step][f"reg/{n}"] for r in (r0, r1)]
            assert d0[f"reg/{n}"] == pytest.approx(sum(local) / 2, rel=1e-5)
        # the solver monitor sums the ranks' own field evaluations
        nfe = r0["solves"][step]["nfe"] + r1["solves"][step]["nfe"]
        assert d0["solver/nfe"] == nfe
        assert {"spectrum/abscissa", "spectrum/radius"} <= d0.keys()
    # rank zero's loggers got the monitors' figures of every step
    logged = {k for _, row in r0["captured"] for k in row}
    assert {"solver/nfe", "solver/dt_min", "spectrum/abscissa", "adjoint/ratio_max_min"} <= logged


def test_rnode_terms_equal_one_process(ddp) -> None:
    """KineticEnergy and JacobianFrobenius (cadence 2, warm-up 3) under DDP: the parameters and
    the logged terms equal one process with the whole batch (per sample, then the batch mean:
    the mean of the ranks' half-batch values). The field's Jacobian is diagonal, so the
    Hutchinson estimate is exact and both runs see the same values."""
    res = ddp["rnode"]
    check_parity(res)
    r0, r1 = res["ddp"]
    synced = res["single"][0]["synced"]
    assert max(row["reg/kinetic_energy"] for row in synced) > 1e-3
    assert max(row.get("reg/jacobian_frobenius", 0.0) for row in synced) > 1e-3
    for step, row in enumerate(r0["synced"]):
        names = {k[4:] for k in r0["logged"][step] if k.startswith("reg/")} - {"total", "skipped"}
        assert names == (
            {"kinetic_energy", "jacobian_frobenius"} if due(step, 2) else {"kinetic_energy"}
        )
        for name in names:
            local = (r0["logged"][step][f"reg/{name}"], r1["logged"][step][f"reg/{name}"])
            assert local[0] != local[1]  # each rank's own half batch ...
            assert row[f"reg/{name}"] == pytest.approx(sum(local) / 2, rel=1e-5)  # ... averaged
