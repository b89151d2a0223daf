"""The replayer's recorded sources: ``KIND:PATH``, PATH a file or a folder of them.

KIND is ``coinbase``, ``binance``, ``kraken`` (from a folder, its files ``KIND.*`` and
``KIND-*``, in upper case) or ``csv`` (``*.csv``, ``*.csv.gz``). The files of one source
are read as one stream in receive-time order; what the readers saw (per symbol:
snapshots, deltas, trades, gaps, checksum failures; skipped and malformed lines) is
counted in the :class:`ReplaySummary` given.
Kinds: docs/market-data.md#publishing-market-data
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from feature_cache.coinbase import CoinbaseParser, RecordingFormatError
from feature_cache.events import BookDelta, BookSnapshot, MarketEvent
from feature_cache.exchanges.binance import BinanceReader
from feature_cache.exchanges.csv_l2 import read_csv
from feature_cache.exchanges.feed import ReplaySummary
from feature_cache.exchanges.kraken import KrakenReader
from feature_cache.exchanges.recording import (
    MalformedLine,
    RecordedLine,
    Skipped,
    classify,
    merged_lines,
)

KINDS = ("coinbase", "binance", "kraken", "csv")


class RecordingReader(Protocol):
    def read(self, line: RecordedLine) -> list[MarketEvent]: ...

    def finish(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Source:
    kind: str
    path: Path

    @classmethod
    def parse(cls, spec: str) -> Source:
        """``KIND:PATH``; raises ValueError saying what is wrong."""
        kind, sep, path = spec.partition(":")
        if not sep or kind not in KINDS or not path:
            raise ValueError(f"a source is KIND:PATH with KIND one of {', '.join(KINDS)}: {spec!r}")
        source = cls(kind, Path(path))
        if not source.files():
            raise ValueError(f"no {kind} recording at {path}")
        return source

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if p.is_file() and self._takes(p.name))

    def _takes(self, name: str) -> bool:
        if self.kind == "csv":
            return name.endswith((".csv", ".csv.gz"))
        venue = self.kind.upper()
        return name.startswith((f"{venue}.", f"{venue}-"))

    def events(self, summary: ReplaySummary) -> Iterator[MarketEvent]:
        """The source's events in order; malformed lines are counted and skipped."""
        files = self.files()
        if self.kind == "csv":
            return read_csv(files, summary)
        if self.kind == "coinbase":
            return _coinbase_events(merged_lines(files), summary)
        reader: RecordingReader = (
            BinanceReader(summary) if self.kind == "binance" else KrakenReader(summary)
        )
        return _recorded_events(merged_lines(files), reader, summary)


def _recorded_events(
    lines: Iterator[tuple[str, str]], reader: RecordingReader, summary: ReplaySummary
) -> Iterator[MarketEvent]:
    for where, text in lines:
        summary.lines += 1
        try:
            found = classify(text)
            if isinstance(found, Skipped):
                summary.skipped[found.kind] += 1
                continue
            yield from reader.read(found)
        except MalformedLine as exc:
            summary.malformed_line(where, str(exc))
    reader.finish()


def _coinbase_events(
    lines: Iterator[tuple[str, str]], summary: ReplaySummary
) -> Iterator[MarketEvent]:
    parser = CoinbaseParser()
    for where, text in lines:
        summary.lines += 1
        try:
            event = parser.parse(text)
        except RecordingFormatError as exc:
            summary.malformed_line(where, exc.reason)
            continue
        if event is None:
            continue
        counts = summary.symbol(event.symbol)
        if isinstance(event, BookSnapshot):
            counts.snapshots += 1
        elif isinstance(event, BookDelta):
            counts.deltas += 1
        else:
            counts.trades += 1
        yield event
    summary.skipped.update(parser.stats.skipped)
