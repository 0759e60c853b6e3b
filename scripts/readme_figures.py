"""Keep the README's main-job figures equal to a recorded run.

The README quotes the main job (``bash scripts/main_job.sh``): its summary block and a few
numbers in the prose. None of them is typed by hand. They come from the record
``results/main_job/summary.json`` (the ``summary.json`` of one run, with the machine it ran
on), and the two plots beside them (``docs/img/``) from the same run's folder.

    .venv/bin/python scripts/readme_figures.py record   # newest main-job run -> record, README
    .venv/bin/python scripts/readme_figures.py write    # README from the record
    .venv/bin/python scripts/readme_figures.py check    # exit 1 if README and record differ

In the README, the block between ``<!-- main-job-summary:begin ... -->`` and
``<!-- main-job-summary:end -->`` is the summary as ``ode-reg`` printed it
(:func:`ode_reg.summary.format_summary` of the record), and every ``<!--fig:NAME-->...<!--/fig-->``
holds the figure ``NAME`` of :func:`figures`. ``tests/test_readme.py`` runs ``check``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECORD = ROOT / "results" / "main_job" / "summary.json"
RUNS = ROOT / "runs" / "digits"
#: README images copied from the recorded run: (plot key in the run folder, file in docs/img).
IMAGES = (
    ("adjoint/profile", "docs/img/adjoint_profile.png"),
    ("spectrum/eigenvalues", "docs/img/jacobian_eigenvalues.png"),
)
COMMAND = "bash scripts/main_job.sh"

BLOCK = re.compile(
    r"(<!-- main-job-summary:begin record=(?P<record>\S+) -->\n)(?P<body>.*?)"
    r"(<!-- main-job-summary:end -->)",
    flags=re.S,
)
FIG = re.compile(r"<!--fig:(?P<name>[a-z_]+)-->(?P<value>.*?)<!--/fig-->", flags=re.S)


def _g3(value: float) -> str:
    from ode_reg.summary import _g3 as g3

    return g3(value)


def figures(record: dict[str, Any]) -> dict[str, str]:
    """The numbers the README prose quotes, as text, from a record.

    Args:
        record: a loaded ``results/main_job/summary.json``.

    Returns:
        ``{name: text}`` for every ``<!--fig:name-->`` the README may hold.

    Raises:
        KeyError: if the record lacks a figure the README needs.

    Example::

        >>> f = figures({"test_acc": 0.9111, "test_n": 360, "adjoint_ratio_max_min": 22.06,
        ...     "adjoint_norm_first": 0.3, "adjoint_norm_last": 0.02, "wall_s": 184.2,
        ...     "epochs": 30, "steps": 1230, "recorded": {"machine": "x86_64"}})
        >>> f["test_acc_pct"], f["adjoint_ratio"], f["first_last"], f["wall_s"]
        ('91.1 %', '22.1', '15', '184 s')
    """
    first, last = record["adjoint_norm_first"], record["adjoint_norm_last"]
    out = {
        "test_acc": f"{record['test_acc']:.4f}",
        "test_acc_pct": f"{100 * record['test_acc']:.1f} %",
        "adjoint_ratio": _g3(record["adjoint_ratio_max_min"]),
        "first_last": f"{first / last:.2g}" if first / last < 100 else f"{first / last:.0f}",
        "wall_s": f"{record['wall_s']:.0f} s",
        "startup_s": (
            f"{record['process_s'] - record['wall_s']:.0f} s"
            if record.get("process_s") is not None
            else "a few seconds"
        ),
        "epochs": str(record["epochs"]),
        "steps": str(record["steps"]),
        "plot_cadence": str(record.get("plot_cadence")),
        # The monitors plot on the steps s with (s + 1) % cadence == 0 (Lightning's convention).
        "last_plot_step": (
            str(record["steps"] // record["plot_cadence"] * record["plot_cadence"] - 1)
            if record.get("plot_cadence")
            else "?"
        ),
        "machine": record.get("recorded", {}).get("machine", "unknown machine"),
        # SolverStatsMonitor's early warnings over the run (the false-alarm count).
        "solver_warnings": str((record.get("solver_nfe") or {}).get("warnings", "?")),
    }
    return out


def summary_block(record: dict[str, Any]) -> str:
    """The README's summary block: the summary ``ode-reg`` printed, in a code fence.

    Args:
        record: a loaded ``results/main_job/summary.json``.

    Returns:
        The fenced block, ending with a newline.

    Example::

        >>> print(summary_block({"epochs": 1, "steps": 2, "run_dir": "runs/x"}).splitlines()[1])
        ode_reg run summary
    """
    from ode_reg.summary import format_summary

    return "```\n" + format_summary(record) + "\n```\n"


def render(readme: str, record: dict[str, Any]) -> str:
    """``readme`` with its summary block and its ``fig`` markers filled from ``record``.

    Args:
        readme: the README text.
        record: a loaded record.

    Returns:
        The new README text.

    Raises:
        ValueError: if the README has no summary block or names an unknown figure.

    Example::

        >>> rec = {"test_acc": 0.5, "adjoint_ratio_max_min": 2.0, "adjoint_norm_first": 2.0,
        ...     "adjoint_norm_last": 1.0, "wall_s": 9.0, "epochs": 1, "steps": 41, "run_dir": "r"}
        >>> readme = "<!-- main-job-summary:begin record=x -->\n<!-- main-job-summary:end -->"
        >>> render(readme + " took <!--fig:steps-->0<!--/fig--> steps", rec)[-32:]
        'took <!--fig:steps-->41<!--/fig--> steps'
    """
    if not BLOCK.search(readme):
        raise ValueError("README has no <!-- main-job-summary:begin record=... --> block")
    values = figures(record)
    text = BLOCK.sub(lambda m: m.group(1) + summary_block(record) + m.group(4), readme)

    def fill(m: re.Match[str]) -> str:
        name = m["name"]
        if name not in values:
            raise ValueError(f"README names figure {name!r}, which is not one of {sorted(values)}")
        return f"<!--fig:{name}-->{values[name]}<!--/fig-->"

    return FIG.sub(fill, text)


def differences(readme: str, record: dict[str, Any]) -> list[str]:
    """Where ``readme`` disagrees with ``record`` (empty when it agrees).

    Args:
        readme: the README text.
        record: a loaded record.

    Returns:
        One line per difference.

    Example::

        >>> differences("no block", {})
        ['README has no <!-- main-job-summary:begin record=... --> block']
    """
    try:
        want = render(readme, record)
    except (ValueError, KeyError) as exc:
        return [str(exc).strip("'")]
    out = []
    got_block, want_block = BLOCK.search(readme), BLOCK.search(want)
    if got_block["body"] != want_block["body"]:
        out.append(f"summary block differs from the record; it should be:\n{want_block['body']}")
    for got, new in zip(FIG.finditer(readme), FIG.finditer(want), strict=True):
        if got["value"] != new["value"]:
            out.append(
                f"figure {got['name']}: README says {got['value']!r}, record {new['value']!r}"
            )
    return out


def record_path(readme: str) -> Path:
    """The record the README's summary block names (relative to the repository root).

    Raises:
        ValueError: if the README has no summary block.
    """
    m = BLOCK.search(readme)
    if not m:
        raise ValueError("README has no <!-- main-job-summary:begin record=... --> block")
    return ROOT / m["record"]


def _newest_run() -> Path:
    runs = [p.parent for p in RUNS.rglob("summary.json")]
    if not runs:
        raise SystemExit(f"no run with a summary.json under {RUNS}: run `{COMMAND}` first")
    return max(runs, key=lambda p: (p / "summary.json").stat().st_mtime)


def _machine() -> str:
    import torch

    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.environ.get('ODE_REG_NUM_THREADS', '1')} torch thread"
    )


def record(run: Path) -> dict[str, Any]:
    """Copy a run's ``summary.json`` to the record and its plots to ``docs/img``.

    Paths in the record are made relative to the repository root; ``recorded`` says what
    ran where.

    Args:
        run: the run folder (holding ``summary.json``).

    Returns:
        The record written.

    Raises:
        SystemExit: if the run has no summary or lacks a README image.
    """
    summary_file = run / "summary.json"
    if not summary_file.exists():
        raise SystemExit(f"{run} holds no summary.json")
    summary = json.loads(summary_file.read_text())
    if "latest_plots" not in summary:
        raise SystemExit(f"{summary_file} predates the current summary format: run `{COMMAND}`")

    def rel(p: str | None) -> str | None:
        if p is None:
            return None
        try:
            return str(Path(p).resolve().relative_to(ROOT))
        except ValueError:
            return p

    folder = run  # summary.json lies in the run folder
    for key, target in IMAGES:
        entry = summary["latest_plots"].get(key)
        if entry is None:
            raise SystemExit(f"{run} has no {key} plot for {target}")
        shutil.copyfile(folder / entry["path"], ROOT / target)
    summary["run_dir"] = rel(summary["run_dir"])
    summary["plots"] = [rel(p) for p in summary.get("plots", [])]
    if summary.get("checkpoints"):
        summary["checkpoints"] = {  # paths, plus the monitor's name and best score
            k: rel(v) if k not in ("monitor", "best_score") else v
            for k, v in summary["checkpoints"].items()
        }
    summary["recorded"] = {"command": COMMAND, "machine": _machine()}
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run ``record``, ``write`` or ``check`` (see the module docstring); returns the status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("record", "write", "check"))
    p.add_argument("run", nargs="?", type=Path, help="run folder for `record` (default: newest)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    readme = README.read_text()
    if args.action == "record":
        record(args.run or _newest_run())
    rec = json.loads(record_path(readme).read_text())
    if args.action == "check":
        diffs = differences(readme, rec)
        for d in diffs:
            print(d)
        if diffs:
            print(
                f"README disagrees with {record_path(readme).relative_to(ROOT)}: run "
                "`.venv/bin/python scripts/readme_figures.py write`"
            )
        return 1 if diffs else 0
    README.write_text(render(readme, rec))
    print(f"README figures written from {record_path(readme).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
