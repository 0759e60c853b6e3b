"""Issue 21's performance table: rendered from its record, and the many-outputs adjoint term."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import ode_reg
from benchmarks import issue_table
from ode_reg import AdjointMagnitude
from ode_reg.recording import StepRecorder
from ode_reg.terms import ChainContext, step_terms

ROOT = Path(__file__).resolve().parents[1]


def _render_script():
    spec = importlib.util.spec_from_file_location(
        "render_benchmarks", ROOT / "scripts" / "render_benchmarks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("doc", ["BENCHMARKS.md", "README.md"])
def test_docs_table_equals_the_record(doc: str) -> None:
    """The block in the document is exactly the record's table (nothing typed by hand)."""
    render = _render_script()
    text = (ROOT / doc).read_text()
    m = render.BLOCK.search(text)
    assert m, f"{doc} has no issue-table block"
    record = json.loads((ROOT / m.group("record")).read_text())
    assert m.group("body") == issue_table.markdown(record) + "\n"
    # Every row of the issue's table is in the record, measured or saying where it is from.
    cases = [r["case"] for r in record["table"]["rows"]]
    for label, _, _ in issue_table.ROWS:
        assert label in cases
    assert any(c.startswith("`SolverStatsMonitor`") for c in cases)
    assert not record["meta"]["quick"]


def _cases(**ratios: float) -> dict:
    out: dict = {}
    for key, r in ratios.items():
        case, variant = key.split("__")
        variant = {"none": "converted, no term", "adj": "AdjointMagnitude"}.get(variant, variant)
        out.setdefault(case, {})[variant] = {"ratio": r, "lo": r - 0.1, "hi": r + 0.1, "ms": 1.0}
    return out


def test_table_marks_met_and_missed_against_each_target() -> None:
    cases = _cases(dopri5__none=1.0, dopri5_100__none=1.04, rk4__none=1.06, dopri5_100__adj=2.4)
    rows = {r["case"]: r for r in issue_table.table({"cases": cases})["rows"]}
    first = rows[issue_table.ROWS[0][0]]
    assert first["measured"] == "1.00× / 1.04× / 1.06×"
    assert first["spread"] == "0.90–1.10 / 0.94–1.14 / 0.96–1.16"
    assert first["met"] == "**missed**"  # 1.06 > 1.05: one cell over the target
    assert rows[issue_table.ROWS[1][0]]["met"] == "met"  # 2.4 <= 2.5
    assert issue_table.ROWS[2][0] not in rows  # its case was not measured: no row
    job = {"wall_s": 590.0, "test_acc": 0.97, "source": "x.json"}
    rows = issue_table.table({"cases": {}, "main_job": job})["rows"]
    assert rows[-1]["met"].startswith("met")
    rows = issue_table.table({"cases": {}, "main_job": {**job, "test_acc": 0.96}})["rows"]
    assert rows[-1]["met"].startswith("**missed**")
    share = {"median": 0.0093, "mean": 0.012, "steps": 300, "load": 1.0}
    (row,) = issue_table.table({"cases": {}, "solver_stats": share})["rows"]
    assert (row["measured"], row["met"]) == ("+0.93 % a step", "met")
    (row,) = issue_table.table({"cases": {}, "solver_stats": {**share, "median": 0.0101}})["rows"]
    assert row["met"] == "**missed**"  # 1.01 % > 1 %
    assert issue_table.table({"cases": {}})["rows"] == []  # not measured: no row, no figure


def test_render_replaces_only_the_block() -> None:
    render = _render_script()
    record = json.loads((ROOT / issue_table.RECORD).read_text())
    text = "before\n<!-- issue-table:begin record=r -->\nold\n<!-- issue-table:end -->\nafter\n"
    out = render.render(text, {"r": record}.get)
    assert out.startswith("before\n") and out.endswith("<!-- issue-table:end -->\nafter\n")
    assert "old" not in out and issue_table.markdown(record) in out
    with pytest.raises(ValueError, match="issue-table"):
        render.render("no block", {"r": record}.get)


def _multi_output_terms(from_edge: bool = True, method: str = "dopri5"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 8, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 3, dtype=torch.float64),
    )
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.linspace(0, 1, 30, dtype=torch.float64)
    target = torch.randn(30, 5, 3, dtype=torch.float64)
    rec = StepRecorder(adjoint_inputs=True)
    saved = ChainContext._from_end_edge
    ChainContext._from_end_edge = from_edge
    try:
        with rec.active():
            zs = ode_reg.odeint(lambda t, z: net(z) * (1 + t), x, t, method=method)
            loss = (zs - target).pow(2).mean()
        params = list(net.parameters())
        out = step_terms(loss, rec.records, [AdjointMagnitude()], step=0, params=params)
        flow = out.chains[0].flow_adjoints()
    finally:
        ChainContext._from_end_edge = saved
    value = out.values["adjoint_magnitude"]
    grads = torch.autograd.grad(value, params, retain_graph=True)
    return out, rec.records[0].traj, value, flow, grads


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk4"])
def test_many_outputs_flow_adjoints_from_the_end_edge_equal_the_row_reference(method: str):
    """Loss over 30 outputs, float64: the flow-only adjoints from the value copied into the
    solution's last row, the term and its gradient equal those of the VJP from the row itself
    (the one-pass reference), and ``R_adj`` of MATH.md written out on those adjoints."""
    out, traj, value, flow, grads = _multi_output_terms(True, method)
    _, ref_traj, ref_value, ref_flow, ref_grads = _multi_output_terms(False, method)
    assert traj.end_edge is not None and not out.chains[0]._reads_only_the_end()
    torch.testing.assert_close(flow, ref_flow, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    ks = out.chains[0].kstar()
    logs = flow.detach().norm(dim=-1).log()
    hand = (logs[:ks] - logs[ks]).pow(2).mean()
    torch.testing.assert_close(value.detach(), hand, rtol=1e-12, atol=0)


def _reachable(t: torch.Tensor) -> set:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return seen


def test_many_outputs_term_graph_skips_the_total_adjoints_and_the_other_rows() -> None:
    """The term's graph does not reach the differentiable total adjoint ``a_1`` (the guard is
    taken on detached adjoints), and is smaller than the graph of the VJP from the solution's
    last row (which walks the buffer's other rows and their interpolations): the double
    backward walks less."""
    out, _, value, _, _ = _multi_output_terms(True)
    seen = _reachable(value)
    a1 = out.chains[0].raw_adjoints()[1]
    assert a1.grad_fn is not None and a1.grad_fn not in seen
    _, _, ref_value, _, _ = _multi_output_terms(False)
    assert len(seen) < 0.8 * len(_reachable(ref_value))


def test_guard_still_poisons_the_term_with_a_non_finite_adjoint() -> None:
    lin = torch.nn.Linear(2, 2)
    rec = StepRecorder(adjoint_inputs=True)
    with rec.active():
        zs = ode_reg.odeint(lambda t, z: lin(z), torch.ones(3, 2), torch.linspace(0, 1, 4))
        loss = zs[1].sum() * float("nan") + zs[-1].sum()
    out = step_terms(loss, rec.records, [AdjointMagnitude()], step=0, params=list(lin.parameters()))
    assert not torch.isfinite(out.values["adjoint_magnitude"])


def test_readme_result_tables_are_their_sources_tables() -> None:
    """A study's table in the README is the first table of its results file, nothing typed."""
    render = _render_script()
    text = (ROOT / "README.md").read_text()
    blocks = list(render.RESULT_BLOCK.finditer(text))
    assert blocks, "README has no result-table block"
    for m in blocks:
        source = (ROOT / m.group("source")).read_text()
        assert m.group("body") == render.first_table(source) + "\n"
        assert m.group("body").count("\n") >= 3  # header, rule and at least one row
    assert render.render_results(text) == text
    with pytest.raises(ValueError, match="no markdown table"):
        render.first_table("# a title\n\nno table here\n")
