"""What the benches and the soak write for people: markdown tables, and the generated
blocks of the docs they keep current (between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->``), so a doc's figures come from a run, not from a hand."""

from __future__ import annotations

import os
import re
import subprocess
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


def write_block(doc: Path, name: str, tables: str) -> None:
    """A bench's ``tables`` into ``doc``'s generated ``name`` block, saying when, at which
    commit and on how many cores."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    caption = f"{when} at {checkout_commit()}, {len(os.sched_getaffinity(0))} cores."
    replace_generated(doc, name, f"{caption}\n\n{tables}")
    print(f"{doc}: {name} written")
