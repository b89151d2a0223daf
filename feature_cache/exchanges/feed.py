"""The books a venue reader keeps, their sync state, and what a replay saw.

A reader (Binance, Kraken, CSV) parses a message into :class:`Level` changes and hands
them to its :class:`BookFeed`, which applies them to the symbol's :class:`Book` and
returns the canonical event to publish, or None while the book is not in sync.

A book is in sync from a snapshot until the venue's sequence breaks (a gap), its
checksum fails, or it crosses (best bid at or above best ask). Out of sync, nothing of
the symbol is published, trades included, so its features in Redis age and the
decision server answers from the ladder with "features stale"; the next snapshot brings
it back. Every such event is counted per symbol in :class:`ReplaySummary`.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from sortedcontainers import SortedDict

from feature_cache.events import Aggressor, BookDelta, BookSide, BookSnapshot, Trade
from feature_cache.exchanges.recording import price as parse_price
from feature_cache.exchanges.recording import size as parse_size
from feature_cache.exchanges.symbols import SymbolKeys

MALFORMED_EXAMPLES = 5


class Level(NamedTuple):
    """One price level as the venue wrote it; size 0 removes the level."""

    side: BookSide
    price: float
    size: float
    price_text: str
    size_text: str

    @classmethod
    def parse(cls, side: BookSide, price_text: object, size_text: object) -> Level:
        price, size = parse_price(price_text), parse_size(size_text)
        return cls(side, price, size, str(price_text), str(size_text))


class OutOfSync(enum.Enum):
    GAP = "gap"
    CHECKSUM = "checksum failure"
    CROSSED = "crossed book"


@dataclass(slots=True)
class SymbolSummary:
    snapshots: int = 0
    deltas: int = 0
    trades: int = 0
    gaps: int = 0
    checksum_failures: int = 0
    crossed: int = 0
    dropped: int = 0  # events not published: no book yet, or out of sync
    # Receive time less the venue's event time: how old the venue's data was on arrival.
    receive_lag_max_ms: float = 0.0
    receive_lag_total_ms: float = 0.0
    timed_events: int = 0

    def saw_lag(self, lag_ms: float) -> None:
        self.receive_lag_max_ms = max(self.receive_lag_max_ms, lag_ms)
        self.receive_lag_total_ms += lag_ms
        self.timed_events += 1


@dataclass(slots=True)
class ReplaySummary:
    """What one replay's readers saw, per symbol key and per line."""

    lines: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    symbols: dict[str, SymbolSummary] = field(default_factory=dict)
    keys: SymbolKeys = field(default_factory=SymbolKeys)

    def malformed_line(self, where: str, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < MALFORMED_EXAMPLES:
            self.malformed_examples.append(f"{where}: {reason}")

    def symbol(self, key: str) -> SymbolSummary:
        found = self.symbols.get(key)
        if found is None:
            found = self.symbols[key] = SymbolSummary()
        return found

    def table(self) -> str:
        header = (
            "| symbol | snapshots | deltas | trades | gaps | checksum failures | crossed"
            " | not published | receive lag mean / max ms |\n|---|" + "---:|" * 8
        )
        rows = []
        for key in sorted(self.symbols):
            s = self.symbols[key]
            lag = "-"  # a source that keeps no receive time
            if s.timed_events:
                lag = f"{s.receive_lag_total_ms / s.timed_events:.0f} / {s.receive_lag_max_ms:.0f}"
            rows.append(
                f"| {key} | {s.snapshots} | {s.deltas} | {s.trades} | {s.gaps}"
                f" | {s.checksum_failures} | {s.crossed} | {s.dropped} | {lag} |"
            )
        skipped = ", ".join(f"{kind} {n}" for kind, n in self.skipped.most_common())
        lines = [
            header,
            *rows,
            f"lines {self.lines:,}; skipped: {skipped or 'none'}; malformed {self.malformed}",
        ]
        lines += [f"  malformed {example}" for example in self.malformed_examples]
        lines += [
            f"  {native} not replayed: {key} belongs to another symbol of the venue"
            for native, key in self.keys.refused.items()
        ]
        return "\n".join(lines)


class Book:
    """One symbol's levels, best first on either side, with the venue's own texts (a
    checksum is computed over them)."""

    def __init__(self) -> None:
        self.bids: SortedDict[float, tuple[str, str]] = SortedDict()
        self.asks: SortedDict[float, tuple[str, str]] = SortedDict()

    def side(self, side: BookSide) -> SortedDict[float, tuple[str, str]]:
        return self.bids if side is BookSide.BID else self.asks

    def set(self, level: Level) -> None:
        levels = self.side(level.side)
        if level.size > 0:
            levels[level.price] = (level.price_text, level.size_text)
        else:
            levels.pop(level.price, None)

    def truncate(self, depth: int) -> list[Level]:
        """Removes the levels past ``depth`` on each side (a venue that keeps a book to a
        depth sends no removal for a level that falls out of it); returns the removals."""
        removed = []
        for side, levels, worst in ((BookSide.BID, self.bids, 0), (BookSide.ASK, self.asks, -1)):
            while len(levels) > depth:
                price, (price_text, _) = levels.popitem(worst)
                removed.append(Level(side, price, 0.0, price_text, "0"))
        return removed

    def crossed(self) -> bool:
        if not self.bids or not self.asks:
            return False
        return bool(self.bids.peekitem(-1)[0] >= self.asks.peekitem(0)[0])

    def best(self, side: BookSide, count: int) -> list[tuple[str, str]]:
        """The venue's texts of the ``count`` best levels of ``side``, best first."""
        levels = self.side(side)
        prices = reversed(levels.keys()) if side is BookSide.BID else iter(levels.keys())
        result: list[tuple[str, str]] = []
        for price in prices:
            if len(result) == count:
                break
            result.append(levels[price])
        return result


class BookFeed:
    """A venue reader's books: applies levels, keeps sync, numbers and counts events."""

    def __init__(self, venue: str, summary: ReplaySummary) -> None:
        self.venue = venue
        self.summary = summary
        self._books: dict[str, Book | None] = {}  # None: out of sync, or no snapshot yet
        self._sequences: dict[str, int] = {}

    def key(self, native: str) -> str | None:
        """The symbol key for the venue's symbol, or None if another symbol holds it."""
        return self.summary.keys.key(self.venue, native)

    def in_sync(self, key: str) -> bool:
        return self._books.get(key) is not None

    def out_of_sync(self, key: str, why: OutOfSync) -> None:
        summary = self.summary.symbol(key)
        if why is OutOfSync.GAP:
            summary.gaps += 1
        elif why is OutOfSync.CHECKSUM:
            summary.checksum_failures += 1
        else:
            summary.crossed += 1
        self._books[key] = None

    def dropped(self, key: str) -> None:
        self.summary.symbol(key).dropped += 1

    def snapshot(
        self,
        key: str,
        time_us: int,
        receive_us: int,
        levels: Sequence[Level],
        *,
        depth: int | None = None,
    ) -> BookSnapshot | None:
        """A new book for ``key``: in sync again unless it is crossed."""
        book = Book()
        for level in levels:
            book.set(level)
        if depth is not None:
            book.truncate(depth)
        summary = self.summary.symbol(key)
        if book.crossed():
            self.out_of_sync(key, OutOfSync.CROSSED)
            return None
        self._books[key] = book
        summary.snapshots += 1
        summary.saw_lag((receive_us - time_us) / 1000)
        return BookSnapshot(
            key,
            time_us,
            self._next_sequence(key),
            tuple((p, float(s)) for p, (_, s) in book.bids.items()),
            tuple((p, float(s)) for p, (_, s) in book.asks.items()),
        )

    def delta(
        self,
        key: str,
        time_us: int,
        receive_us: int,
        levels: Sequence[Level],
        *,
        depth: int | None = None,
        verify: Callable[[Book], bool] | None = None,
    ) -> BookDelta | None:
        """Applies ``levels`` in order, then truncates to ``depth``; None (and out of sync)
        if the book crossed or ``verify`` (a checksum) rejects it."""
        book = self._books.get(key)
        if book is None:
            self.dropped(key)
            return None
        changes = list(levels)
        for level in levels:
            book.set(level)
        if depth is not None:
            changes += book.truncate(depth)
        if book.crossed():
            self.out_of_sync(key, OutOfSync.CROSSED)
            return None
        if verify is not None and not verify(book):
            self.out_of_sync(key, OutOfSync.CHECKSUM)
            return None
        summary = self.summary.symbol(key)
        summary.deltas += 1
        summary.saw_lag((receive_us - time_us) / 1000)
        return BookDelta(
            key,
            time_us,
            self._next_sequence(key),
            tuple((c.side, c.price, c.size) for c in changes),
        )

    def trade(
        self,
        key: str,
        time_us: int,
        receive_us: int,
        price: float,
        size: float,
        aggressor: Aggressor,
    ) -> Trade | None:
        if self._books.get(key) is None:
            self.dropped(key)
            return None
        summary = self.summary.symbol(key)
        summary.trades += 1
        summary.saw_lag((receive_us - time_us) / 1000)
        return Trade(key, time_us, self._next_sequence(key), price, size, aggressor)

    def _next_sequence(self, key: str) -> int:
        sequence = self._sequences.get(key, 0) + 1
        self._sequences[key] = sequence
        return sequence
