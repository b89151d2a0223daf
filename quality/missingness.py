"""``make data-quality``: where the recorded decisions lacked market data, as a heatmap.

    python -m quality.missingness --since 2026-11-30T00:00 --until 2026-12-01 --step 1h

Reads the decisions of ``[since, until)`` through the one reader (the audit store, then
the archive for days that left it) and, per symbol and step: for each feature, the share
of decisions whose value was missing (no features read at all, or that one not a
number); and the share the ladder made for want of features (reason codes
``no_features``, ``features_stale``, ``features_unusable``, ``feature_store``). Draws
them as one heatmap (a row per symbol and feature, a column per step; blank: no
decision) to ``--out`` and prints the worst cells. Exits 0, or 2 when nothing was
recorded in that time. docs/data-quality.md shows one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.cli_args import parse_duration, parse_time
from core.settings import settings_from_environment
from feature_cache.schema import FEATURE_NAMES
from quality.settings import QualitySettings
from server.audit.archive import Archive
from server.audit.reader import DecisionReader
from server.audit.store import create_store_engine

FEATURE_REASONS = ("no_features", "features_stale", "features_unusable", "feature_store")
LADDER_ROW = "ladder: features"  # the row of decisions the ladder made for want of them
DEFAULT_SPAN = dt.timedelta(hours=24)
WORST_SHOWN = 10


@dataclass
class Grid:
    """Shares by (symbol, row) and step start; ``decisions``: how many a cell's share is of."""

    step: dt.timedelta
    starts: list[dt.datetime] = field(default_factory=list)
    rows: list[tuple[str, str]] = field(default_factory=list)
    shares: dict[tuple[tuple[str, str], dt.datetime], float] = field(default_factory=dict)
    decisions: dict[tuple[str, dt.datetime], int] = field(default_factory=dict)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def missingness(decisions: Iterable[Mapping[str, Any]], step: dt.timedelta) -> Grid:
    """The grid of ``decisions`` (rows of the decisions table) in steps of ``step``."""
    seconds = step.total_seconds()
    counts: dict[tuple[str, dt.datetime], list[int]] = defaultdict(
        lambda: [0] * (len(FEATURE_NAMES) + 2)
    )  # per feature missing, ladder, decisions
    for row in decisions:
        at = row["decided_at"]
        start = dt.datetime.fromtimestamp(at.timestamp() // seconds * seconds, dt.UTC)
        cell = counts[row["symbol"], start]
        features = row["features"] or {}
        for i, name in enumerate(FEATURE_NAMES):
            cell[i] += _missing(features.get(name))
        cell[-2] += row.get("reason_code") in FEATURE_REASONS
        cell[-1] += 1
    grid = Grid(step)
    symbols = sorted({symbol for symbol, _ in counts})
    if not counts:
        return grid
    first, last = min(s for _, s in counts), max(s for _, s in counts)
    grid.starts = [first + n * step for n in range(int((last - first) / step) + 1)]
    grid.rows = [(s, name) for s in symbols for name in (*FEATURE_NAMES, LADDER_ROW)]
    for (symbol, start), cell in counts.items():
        total = cell[-1]
        grid.decisions[symbol, start] = total
        for i, name in enumerate((*FEATURE_NAMES, LADDER_ROW)):
            grid.shares[(symbol, name), start] = cell[i] / total
    return grid


def worst(grid: Grid, count: int = WORST_SHOWN) -> list[str]:
    """The symbol-steps where most was missing, in words: the ladder's share and the
    feature missing most often."""
    cells = []
    for (symbol, start), total in grid.decisions.items():
        ladder = grid.shares[(symbol, LADDER_ROW), start]
        feature, missing = max(
            ((name, grid.shares[(symbol, name), start]) for name in FEATURE_NAMES),
            key=lambda item: item[1],
        )
        if ladder or missing:
            cells.append((max(ladder, missing), start, symbol, total, ladder, feature, missing))
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [
        f"{start:%Y-%m-%d %H:%M:%S} {symbol}: {total:,} decisions, {ladder:.0%} on the "
        f"ladder for want of features, {feature} missing in {missing:.0%}"
        for _, start, symbol, total, ladder, feature, missing in cells[:count]
    ]


def draw(grid: Grid, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.full((len(grid.rows), len(grid.starts)), np.nan)
    for (row, start), share in grid.shares.items():
        values[grid.rows.index(row), grid.starts.index(start)] = share
    height = 1.5 + 0.18 * len(grid.rows)
    figure, axes = plt.subplots(figsize=(min(4 + 0.35 * len(grid.starts), 16), height))
    image = axes.imshow(values, aspect="auto", cmap="Reds", vmin=0.0, vmax=1.0,
                        interpolation="nearest")  # fmt: skip
    axes.set_yticks(range(len(grid.rows)), [f"{s}  {n}" for s, n in grid.rows], fontsize=7)
    every = max(1, len(grid.starts) // 12)
    ticks = list(range(0, len(grid.starts), every))
    if grid.step < dt.timedelta(minutes=1):
        label = "%H:%M:%S"
    else:
        label = "%H:%M" if grid.step < dt.timedelta(days=1) else "%m-%d"
    axes.set_xticks(
        ticks, [grid.starts[i].strftime(label) for i in ticks], fontsize=7, rotation=45, ha="right"
    )
    axes.set_xlabel(f"UTC, steps of {grid.step}")
    for boundary in range(len(FEATURE_NAMES) + 1, len(grid.rows), len(FEATURE_NAMES) + 1):
        axes.axhline(boundary - 0.5, color="black", linewidth=0.8)
    figure.colorbar(image, ax=axes, label="share of the decisions", fraction=0.03)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quality.missingness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--since", type=parse_time, help="from (default 24 h before --until)")
    parser.add_argument("--until", type=parse_time, help="to, exclusive (default now)")
    parser.add_argument("--step", type=parse_duration, default=3600.0, help="1h, 10m (default 1h)")
    parser.add_argument("--limit", type=int, default=2_000_000, help="most decisions read")
    parser.add_argument("--out", type=Path, default=Path("docs/img/missingness.png"))
    parser.add_argument("--database-url", help="default DECISION_AUDIT__DATABASE_URL")
    parser.add_argument("--archive-url", help="default DECISION_AUDIT__ARCHIVE_URL")
    args = parser.parse_args(argv)
    audit = settings_from_environment(QualitySettings, parser.prog).audit
    until = args.until or dt.datetime.now(dt.UTC)
    since = args.since or until - DEFAULT_SPAN
    engine = create_store_engine(args.database_url or audit.database_url)
    try:
        reader = DecisionReader(engine, Archive(args.archive_url or audit.archive_url))
        decisions = reader.between(since, until, args.limit)
    finally:
        engine.dispose()
    if not decisions:
        print("data-quality: no recorded decision in that time", file=sys.stderr)
        return 2
    if len(decisions) == args.limit:
        print(f"data-quality: the first --limit {args.limit:,} decisions only (raise it, or "
              "narrow --since/--until)", file=sys.stderr)  # fmt: skip
    grid = missingness(decisions, dt.timedelta(seconds=args.step))
    title = (
        f"Missing features and ladder decisions for want of them, {since:%Y-%m-%d %H:%M} to "
        f"{until:%Y-%m-%d %H:%M} UTC ({len(decisions):,} decisions)"
    )
    draw(grid, args.out, title)
    print(f"{len(decisions):,} decisions, {len(grid.starts)} steps; wrote {args.out}")
    for line in worst(grid):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
