"""Render recorded tables into BENCHMARKS.md and the README.

Issue 21's performance table sits between ``<!-- issue-table:begin record=PATH -->`` and
``<!-- issue-table:end -->``; the block's body is :func:`benchmarks.issue_table.markdown` of the
JSON record at ``PATH`` (written by ``python -m benchmarks`` / ``python -m
benchmarks.issue_table``). A study's table sits between
``<!-- result-table:begin source=PATH -->`` and ``<!-- result-table:end -->``; its body is the
first markdown table of the file at ``PATH`` (``results/ablation.md``, written by the study's
script). Nothing in a block is typed by hand.

Usage::

    python scripts/render_benchmarks.py           # rewrite the blocks
    python scripts/render_benchmarks.py --check   # exit 1 if a block differs from its record
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.issue_table import markdown  # noqa: E402

DOCS = ("BENCHMARKS.md", "README.md")
BLOCK = re.compile(
    r"(<!-- issue-table:begin record=(?P<record>\S+) -->\n)(?P<body>.*?)(<!-- issue-table:end -->)",
    flags=re.S,
)
RESULT_BLOCK = re.compile(
    r"(<!-- result-table:begin source=(?P<source>\S+) -->\n)(?P<body>.*?)(<!-- result-table:end -->)",
    flags=re.S,
)


def first_table(markdown_text: str) -> str:
    """The first markdown table of ``markdown_text`` (its consecutive ``|`` lines).

    Raises:
        ValueError: if the text holds no table.

    Example::

        >>> first_table("# t\n\n| a |\n|---|\n| 1 |\n\nafter")
        '| a |\n|---|\n| 1 |'
    """
    lines, rows = markdown_text.splitlines(), []
    for line in lines:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    if not rows:
        raise ValueError("no markdown table in the source")
    return "\n".join(rows)


def render_results(text: str, read: Any = None) -> str:
    """``text`` with every result-table block's body replaced by its source's first table.

    Args:
        text: a document.
        read: ``path -> text`` (default: read the file under the repository root).
    """
    read = read or (lambda path: (ROOT / path).read_text())

    def fill(m: re.Match[str]) -> str:
        return m.group(1) + first_table(read(m.group("source"))) + "\n" + m.group(4)

    return RESULT_BLOCK.sub(fill, text)


def render(text: str, load: Any = None) -> str:
    """``text`` with every issue-table block's body replaced by its record's table.

    Args:
        text: a document.
        load: ``path -> record`` (default: read the JSON file under the repository root).

    Raises:
        ValueError: if ``text`` has no issue-table block.

    Example::

        >>> rec = {"meta": {"command": "c", "torch": "t", "threads": 1, "cpus": 2, "load": "0",
        ...        "device": "CPU", "seconds": 1.0}, "measured": {"rounds": 1, "repeats": 1},
        ...        "table": {"rows": [{"case": "x", "measured": "1.00×", "spread": "",
        ...        "target": "≤ 2×", "met": "met"}]}}
        >>> out = render("<!-- issue-table:begin record=r -->\\n<!-- issue-table:end -->", {"r": rec}.get)
        >>> "| x | 1.00× |  | ≤ 2× | met |" in out
        True
    """
    load = load or (lambda path: json.loads((ROOT / path).read_text()))
    if not BLOCK.search(text):
        raise ValueError("no <!-- issue-table:begin record=... --> block")

    def fill(m: re.Match[str]) -> str:
        return m.group(1) + markdown(load(m.group("record"))) + "\n" + m.group(4)

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a change")
    args = parser.parse_args(argv)
    stale = []
    for name in DOCS:
        path = ROOT / name
        text = path.read_text()
        new = render_results(render(text))
        if new != text:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"out of date (run scripts/render_benchmarks.py): {', '.join(stale)}")
        return 1
    print(("rendered: " if not args.check else "up to date: ") + ", ".join(DOCS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
