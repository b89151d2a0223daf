"""What the benches and the soak write for people: markdown tables, and the generated
blocks of the docs they keep current (between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->``), so a doc's figures come from a run, not from a hand."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path


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
