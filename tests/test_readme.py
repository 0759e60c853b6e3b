"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
    match = re.fullmatch(r"loss ([\d.]+)  R_adj ([\d.e+-]+)  \|y_k\| max/min ([\d.]+)", line)
    assert match, line
    loss, r_adj, ratio = map(float, match.groups())
    # The figures the README quotes (same seed; CPU float32 may differ in the last digits).
    quoted = re.search(r"prints `(loss [^`]*)`", (ROOT / "README.md").read_text())
    assert quoted
    q = re.fullmatch(r"loss ([\d.]+)  R_adj ([\d.e+-]+)  \|y_k\| max/min ([\d.]+)", quoted.group(1))
    assert q
    for got, want in zip((loss, r_adj, ratio), map(float, q.groups())):
        assert abs(got - want) <= 0.02 * abs(want) + 1e-3
    assert ratio >= 1.0


def test_every_python_block_at_least_compiles() -> None:
    for block in _python_blocks():
        compile(block, "README.md", "exec")
