"""What the benches and the soak write for people: markdown tables, and the generated
blocks of the docs they keep current (between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->``), so a doc's figures come from a run, not from a hand."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from loadtest.loadgen import LoadResult, Mode

REPO = Path(__file__).resolve().parents[1]
MODEL_SOURCES = frozenset({"SOURCE_PRIMARY", "SOURCE_SECONDARY", "SOURCE_CANARY"})
"""The Decide sources that are a model's answer (the rest are the fallback ladder's)."""


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; a column whose header starts with ``>`` (the mark dropped) is
    aligned right, for figures."""
    names = [name.removeprefix(">") for name in header]
    rule = ["---:" if name.startswith(">") else "---" for name in header]
    lines = [names, rule, *([str(cell) for cell in row] for row in rows)]
    return "\n".join(f"| {' | '.join(line)} |" for line in lines)


def replace_generated(path: Path, name: str, body: str) -> None:
    """Puts ``body`` between the ``name`` block's markers in ``path``; a ValueError naming
    the markers when the file lacks them (nothing written)."""
    begin, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    text = path.read_text()
    head, found, rest = text.partition(begin)
    _, found_end, tail = rest.partition(end)
    if not found or not found_end:
        raise ValueError(f"{path}: no {begin} ... {end} block to replace")
    path.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")


def generated_names(path: Path) -> list[str]:
    """The names of ``path``'s generated blocks, in order."""
    return re.findall(r"<!-- generated:([\w-]+) -->", path.read_text())


def load_text(mode: Mode, load: float) -> str:
    return f"c={load:g}" if mode == "closed" else f"{load:g}/s"


def answered_by(result: LoadResult) -> str:
    shares = sorted(result.answers.items(), key=lambda item: -item[1])
    return ", ".join(
        f"{source.removeprefix('SOURCE_').lower()} {100 * n / result.ok:.0f} %"
        for source, n in shares
    )


def modelled(result: LoadResult) -> int:
    """The answers a model replica gave (not the fallback ladder)."""
    return sum(n for s, n in result.answers.items() if s in MODEL_SOURCES)


def model_share(result: LoadResult) -> float:
    """The share of OK answers a model replica gave."""
    return modelled(result) / max(result.ok, 1)


def model_share_of_calls(result: LoadResult) -> float:
    """The share of all calls, refused and late ones included, a model replica answered."""
    return modelled(result) / max(result.ok + result.error_count, 1)


def checkout_commit() -> str:
    """The checkout's commit, short, with ``-dirty`` when files differ from it; empty
    outside a git checkout."""
    return subprocess.run(
        # -dirty: the tree had changes not committed.
        ["git", "describe", "--always", "--dirty", "--abbrev=7"],  # noqa: S607 - git from PATH
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def tables_at_the_end(lines: Sequence[str]) -> list[str]:
    """A bench's output from its first markdown table on, with the title line (ending in
    ``:``) and the blank line before that table; empty when it printed none."""
    first = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if first is None:
        return []
    if first >= 2 and not lines[first - 1].strip() and lines[first - 2].endswith(":"):
        first -= 2
    return list(lines[first:])


def main(argv: Sequence[str] | None = None) -> None:
    """``BENCH | python -m loadtest.report DOC NAME``: passes a bench's output through and
    puts its tables in DOC's generated NAME block, saying when and at which commit."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("doc", type=Path)
    parser.add_argument("name")
    args = parser.parse_args(argv)
    lines = []
    for line in sys.stdin:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    tables = tables_at_the_end(lines)
    if not tables:
        raise SystemExit(f"no table in the input: {args.doc}'s {args.name} block left as it was")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    caption = f"{when} at {checkout_commit()}, {len(os.sched_getaffinity(0))} cores."
    replace_generated(args.doc, args.name, "\n".join([caption, "", *tables]))


if __name__ == "__main__":
    main()
