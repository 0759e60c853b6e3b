"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_plain_pytorch_example_runs_and_prints_what_the_readme_says(tmp_path: Path) -> None:
    blocks = [b for b in _python_blocks() if "ode_reg.integrate" in b]
    assert blocks, "README has no plain-PyTorch example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    pattern = r"loss ([\d.]+)  R_adj ([\d.e+-]+)  R_skew ([\d.e+-]+)  \|y_k\| max/min ([\d.]+)"
    match = re.fullmatch(pattern, line)
    assert match, line
    loss, r_adj, r_skew, ratio = map(float, match.groups())
    # The figures the README quotes (same seed; CPU float32 may differ in the last digits).
    quoted = re.search(r"prints `(loss [^`]*)`", (ROOT / "README.md").read_text())
    assert quoted
    q = re.fullmatch(pattern, quoted.group(1))
    assert q
    for got, want in zip((loss, r_adj, r_skew, ratio), map(float, q.groups())):
        assert abs(got - want) <= 0.02 * abs(want) + 1e-3
    assert ratio >= 1.0


def test_every_python_block_at_least_compiles() -> None:
    for block in _python_blocks():
        compile(block, "README.md", "exec")


# --------------------------------------------------------------------------- main-job figures


def _figures_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "readme_figures", ROOT / "scripts" / "readme_figures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_main_job_figures_equal_the_record_it_names() -> None:
    import json

    from ode_reg.summary import format_summary

    figs = _figures_script()
    readme = (ROOT / "README.md").read_text()
    record_file = figs.record_path(readme)
    assert record_file == ROOT / "results" / "main_job" / "summary.json"
    record = json.loads(record_file.read_text())
    assert figs.differences(readme, record) == [], (
        "README disagrees with its record: .venv/bin/python scripts/readme_figures.py write"
    )
    # The block is what `ode-reg` printed for that run, and the prose quotes the same run.
    block = figs.BLOCK.search(readme)["body"]
    assert block == "```\n" + format_summary(record) + "\n```\n"
    assert f"{record['test_acc']:.4f}" in block
    prose = {m["name"]: m["value"] for m in figs.FIG.finditer(readme)}
    assert {"adjoint_ratio", "first_last", "wall_s", "steps", "machine"} <= set(prose)
    ratio = float(prose["adjoint_ratio"])
    assert ratio == pytest.approx(record["adjoint_ratio_max_min"], rel=5e-3)
    # "the first pixel's adjoint is N x the last one's" cannot exceed the max/min ratio.
    assert float(prose["first_last"]) <= ratio * 1.05
    # The images beside the figures come from the same record's plots.
    for key, image in figs.IMAGES:
        assert key in record["latest_plots"] and (ROOT / image).read_bytes()[:4] == b"\x89PNG"


def test_readme_check_fails_on_a_figure_typed_by_hand() -> None:
    import json

    figs = _figures_script()
    readme = (ROOT / "README.md").read_text()
    record = json.loads(figs.record_path(readme).read_text())
    typed = re.sub(
        r"<!--fig:adjoint_ratio-->[^<]*<!--/fig-->",
        "<!--fig:adjoint_ratio-->19.85<!--/fig-->",
        readme,
    )
    assert any("adjoint_ratio" in d for d in figs.differences(typed, record))
    block = figs.BLOCK.search(readme)["body"]
    edited = readme.replace(block, block.replace(f"{record['test_acc']:.4f}", "0.9999"))
    assert any("summary block" in d for d in figs.differences(edited, record))


def test_readme_results_tables_match_the_records() -> None:
    """The README's results and sweep tables are what ``recipes/results.py --render`` makes of
    the committed records (``results/records/``, ``results/sweep/records/``)."""
    import sys

    sys.path.insert(0, str(ROOT / "recipes"))
    import results

    stale = results.update_readme(results.load_records(results.RESULTS), check=True)
    assert stale == [], f"run `python recipes/results.py --render`: {stale} are stale"
