"""Binance spot: a raw websocket recording (with its REST depth snapshots) -> events.

Depth diffs are sequenced against the REST snapshot's ``lastUpdateId`` as Binance
documents for a local order book: diffs wait for a snapshot, and a gap puts the symbol
out of sync (nothing of it published) until the next snapshot, with diffs buffered again
to bridge to it. Trades come from ``aggTrade`` and ``trade``; other streams are skipped
and counted.
Messages and sequencing: docs/market-data.md#binance-spot
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from feature_cache.events import Aggressor, BookSide, MarketEvent
from feature_cache.exchanges.feed import BookFeed, Level, OutOfSync, ReplaySummary
from feature_cache.exchanges.recording import (
    MalformedLine,
    RecordedLine,
    int_field,
    price,
    size,
    text_field,
)

VENUE = "binance"
# Diffs kept per symbol while waiting for a snapshot; past it the oldest are dropped.
MAX_BUFFERED = 10_000


@dataclass(frozen=True, slots=True)
class _Diff:
    first_id: int  # U
    last_id: int  # u
    time_us: int
    receive_us: int
    levels: tuple[Level, ...]


@dataclass(slots=True)
class _Sequence:
    last_id: int | None = None  # u of the last applied diff (the snapshot's id at first)
    bridged: bool = False  # the first diff after the snapshot has been applied
    waiting: deque[_Diff] = field(default_factory=deque)  # diffs held until a snapshot


class BinanceReader:
    def __init__(self, summary: ReplaySummary) -> None:
        self._feed = BookFeed(VENUE, summary)
        self._summary = summary
        self._sequences: dict[str, _Sequence] = {}

    def read(self, line: RecordedLine) -> list[MarketEvent]:
        try:
            message = json.loads(line.body)
        except json.JSONDecodeError as exc:
            raise MalformedLine(f"bad JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(message, dict):
            raise MalformedLine("message is not a JSON object")
        if line.url is not None:
            return self._rest(line.url, message, line.receive_time_us)
        data = message.get("data") if "stream" in message else message
        if not isinstance(data, dict):
            raise MalformedLine("stream data is not a JSON object")
        kind = data.get("e")
        if kind == "depthUpdate":
            return self._diff(data, line.receive_time_us)
        if kind in ("aggTrade", "trade"):
            return self._trade(data, line.receive_time_us)
        stream = message.get("stream")
        label = kind if isinstance(kind, str) else str(stream).rpartition("@")[2] or "other"
        self._summary.skipped[label] += 1
        return []

    def finish(self) -> None:
        """Diffs still waiting for a snapshot at the end were never published."""
        for key, sequence in self._sequences.items():
            for _ in sequence.waiting:
                self._feed.dropped(key)
            sequence.waiting.clear()

    def _rest(self, url: str, message: dict[str, object], receive_us: int) -> list[MarketEvent]:
        parts = urlsplit(url)
        symbols = parse_qs(parts.query).get("symbol")
        if not parts.path.endswith("/depth") or not symbols or "lastUpdateId" not in message:
            self._summary.skipped["REST " + parts.path.rpartition("/")[2]] += 1
            return []
        key = self._feed.key(symbols[0])
        if key is None:
            self._summary.skipped["symbol key taken"] += 1
            return []
        snapshot_id = int_field(message, "lastUpdateId")
        levels = _levels(message, "bids", BookSide.BID) + _levels(message, "asks", BookSide.ASK)
        snapshot = self._feed.snapshot(key, receive_us, receive_us, levels)
        if snapshot is None:
            return []
        sequence = self._sequences.setdefault(key, _Sequence())
        sequence.last_id, sequence.bridged = snapshot_id, False
        events: list[MarketEvent] = [snapshot]
        waiting, sequence.waiting = list(sequence.waiting), deque()
        for diff in waiting:
            events += self._apply(key, sequence, diff)
        return events

    def _diff(self, data: dict[str, object], receive_us: int) -> list[MarketEvent]:
        key = self._feed.key(text_field(data, "s"))
        if key is None:
            self._summary.skipped["symbol key taken"] += 1
            return []
        diff = _Diff(
            int_field(data, "U"),
            int_field(data, "u"),
            int_field(data, "E") * 1000,
            receive_us,
            _levels(data, "b", BookSide.BID) + _levels(data, "a", BookSide.ASK),
        )
        return self._apply(key, self._sequences.setdefault(key, _Sequence()), diff)

    def _apply(self, key: str, sequence: _Sequence, diff: _Diff) -> list[MarketEvent]:
        if sequence.last_id is None:  # no snapshot yet, or out of sync: wait for one
            if len(sequence.waiting) == MAX_BUFFERED:
                sequence.waiting.popleft()
                self._feed.dropped(key)
            sequence.waiting.append(diff)
            return []
        if diff.last_id <= sequence.last_id:
            self._summary.skipped["depthUpdate older than the book"] += 1
            return []
        expected = sequence.last_id + 1
        follows = diff.first_id <= expected if not sequence.bridged else diff.first_id == expected
        if not follows:
            self._feed.out_of_sync(key, OutOfSync.GAP)
            sequence.last_id = None
            sequence.waiting.append(diff)  # it may bridge to the next snapshot
            return []
        sequence.last_id, sequence.bridged = diff.last_id, True
        delta = self._feed.delta(key, diff.time_us, diff.receive_us, diff.levels)
        if delta is None:  # the book crossed: out of sync
            sequence.last_id = None
            return []
        return [delta]

    def _trade(self, data: dict[str, object], receive_us: int) -> list[MarketEvent]:
        key = self._feed.key(text_field(data, "s"))
        if key is None:
            self._summary.skipped["symbol key taken"] += 1
            return []
        buyer_is_maker = data.get("m")
        if not isinstance(buyer_is_maker, bool):
            raise MalformedLine("field 'm' is missing or not a boolean")
        trade = self._feed.trade(
            key,
            int_field(data, "T") * 1000,
            receive_us,
            price(data.get("p")),
            size(data.get("q")),
            Aggressor.SELL if buyer_is_maker else Aggressor.BUY,
        )
        return [] if trade is None else [trade]


def _levels(message: dict[str, object], name: str, side: BookSide) -> tuple[Level, ...]:
    raw = message.get(name)
    if not isinstance(raw, list):
        raise MalformedLine(f"field {name!r} is missing or not a list")
    levels = []
    for level in raw:
        if not isinstance(level, list) or len(level) != 2:
            raise MalformedLine(f"{name} level {level!r} is not [price, quantity]")
        levels.append(Level.parse(side, level[0], level[1]))
    return tuple(levels)
