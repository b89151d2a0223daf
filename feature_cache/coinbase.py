"""Coinbase Pro websocket recordings -> canonical market events (``feature_cache.events``).

Reads the raw-data recorder's lines in file order: level2 ``snapshot`` and ``l2update``,
and ``match``; other message types are skipped and counted in :class:`ParseStats`. Times
are µs since the epoch; ``sequence`` is this module's own per-product counter (1, 2, 3,
...), never Coinbase's. A line that does not follow the format raises
:class:`RecordingFormatError` with its 1-based line number; :func:`read_recording` can
count and skip such lines instead.
Formats: docs/market-data.md#coinbase
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from feature_cache.events import Aggressor, BookDelta, BookSide, BookSnapshot, MarketEvent, Trade
from feature_cache.exchanges.recording import MalformedLine, price, seconds_to_us, size, text_field

__all__ = [
    "CoinbaseParser",
    "ParseStats",
    "RecordingFormatError",
    "read_recording",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_BOOK_SIDES = {"buy": BookSide.BID, "sell": BookSide.ASK}
# The match's `side` is the resting (maker) order's side; the taker is the other one.
_AGGRESSOR_FROM_MAKER_SIDE = {"sell": Aggressor.BUY, "buy": Aggressor.SELL}


class RecordingFormatError(ValueError):
    """A recording line that does not follow the format.

    ``line_number`` is 1-based (the n-th line given to the parser); ``reason`` says what
    was wrong.
    """

    def __init__(self, line_number: int, reason: str) -> None:
        super().__init__(f"line {line_number}: {reason}")
        self.line_number = line_number
        self.reason = reason


@dataclass(slots=True)
class ParseStats:
    """What a parser has seen so far; mutated as lines are parsed."""

    lines: int = 0
    """Lines given to the parser, blank and skipped ones included."""
    events: Counter[str] = field(default_factory=Counter)
    """Events emitted, by event class name (``BookSnapshot``, ``BookDelta``, ``Trade``)."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Lines that are not market data, by kind: ``blank``, ``connection`` or the message type."""
    malformed: int = 0
    """Malformed lines skipped by ``read_recording(..., skip_malformed=True)``."""


class CoinbaseParser:
    """Turns recording lines, given in file order, into canonical events.

    Holds the per-product sequence counters and the line count, so one parser must see
    one recording's lines in order. Not thread-safe.
    """

    def __init__(self) -> None:
        self.stats = ParseStats()
        self._last_sequence: dict[str, int] = {}

    def parse(self, line: str) -> MarketEvent | None:
        """Convert the next line; ``None`` for a line that is not market data.

        Raises :class:`RecordingFormatError` for a malformed line. A malformed line takes
        no sequence number, so skipping it leaves the numbering gap-free.
        """
        self.stats.lines += 1
        try:
            event = self._parse(line)
        except MalformedLine as exc:
            raise RecordingFormatError(self.stats.lines, str(exc)) from None
        if event is not None:
            self.stats.events[type(event).__name__] += 1
        return event

    def _parse(self, line: str) -> MarketEvent | None:
        text = line.rstrip("\r\n")
        if not text.strip():
            self.stats.skipped["blank"] += 1
            return None
        head, sep, body = text.partition(": ")
        if "://" in head.split(" ", 1)[0]:
            # The recorder's own records of what it connected to and sent.
            self.stats.skipped["connection"] += 1
            return None
        if not sep:
            raise MalformedLine("expected 'RECEIVE_TIME: JSON'")
        receive_time_us = seconds_to_us(head)
        try:
            message = json.loads(body)
        except json.JSONDecodeError as exc:
            raise MalformedLine(f"bad JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(message, dict):
            raise MalformedLine("message is not a JSON object")
        kind = text_field(message, "type")
        if kind == "snapshot":
            return self._snapshot(message, receive_time_us)
        if kind == "l2update":
            return self._delta(message)
        if kind == "match":
            return self._trade(message)
        # Everything else is skipped; ``last_match`` on purpose: the product's last trade
        # before the subscription, sent on subscribing with a time before the snapshot's
        # and the recording's, it would put a stale trade ahead of the book.
        self.stats.skipped[kind] += 1
        return None

    def _snapshot(self, message: dict[str, object], receive_time_us: int) -> BookSnapshot:
        symbol = text_field(message, "product_id")
        # Coinbase's level2 snapshot has no `time`; take the exchange's if a feed adds one.
        time_us = _time_us(message) if "time" in message else receive_time_us
        bids = _levels(message, "bids")
        asks = _levels(message, "asks")
        return BookSnapshot(symbol, time_us, self._next_sequence(symbol), bids, asks)

    def _delta(self, message: dict[str, object]) -> BookDelta:
        symbol = text_field(message, "product_id")
        time_us = _time_us(message)
        raw_changes = message.get("changes")
        if not isinstance(raw_changes, list) or not raw_changes:
            raise MalformedLine("'changes' is not a non-empty list")
        changes: list[tuple[BookSide, float, float]] = []
        for change in raw_changes:
            if not isinstance(change, list) or len(change) != 3:
                raise MalformedLine(f"change {change!r} is not [side, price, size]")
            side = _BOOK_SIDES.get(change[0]) if isinstance(change[0], str) else None
            if side is None:
                raise MalformedLine(f"change side {change[0]!r} is not 'buy' or 'sell'")
            changes.append((side, price(change[1]), size(change[2])))
        return BookDelta(symbol, time_us, self._next_sequence(symbol), tuple(changes))

    def _trade(self, message: dict[str, object]) -> Trade:
        symbol = text_field(message, "product_id")
        time_us = _time_us(message)
        maker_side = text_field(message, "side")
        aggressor = _AGGRESSOR_FROM_MAKER_SIDE.get(maker_side)
        if aggressor is None:
            raise MalformedLine(f"match side {maker_side!r} is not 'buy' or 'sell'")
        trade_price = price(message.get("price"))
        trade_size = size(message.get("size"))
        return Trade(
            symbol, time_us, self._next_sequence(symbol), trade_price, trade_size, aggressor
        )

    def _next_sequence(self, symbol: str) -> int:
        # Called last, after every field has been validated (see parse()). Our own
        # counter, not Coinbase's ``sequence``: only matches carry one, so no mix of the
        # two could be sure to increase per product.
        sequence = self._last_sequence.get(symbol, 0) + 1
        self._last_sequence[symbol] = sequence
        return sequence


def read_recording(
    path: Path, *, skip_malformed: bool = False, parser: CoinbaseParser | None = None
) -> Iterator[MarketEvent]:
    """Stream the recording's events in file order, reading one line at a time.

    With ``skip_malformed`` a malformed line is counted in ``parser.stats.malformed`` and
    skipped; otherwise the first one raises :class:`RecordingFormatError`. Pass a fresh
    ``parser`` to read its :class:`ParseStats` during or after the iteration.
    """
    if parser is None:
        parser = CoinbaseParser()
    # newline="" keeps a "\r" inside a line from being taken as a line end, so line
    # numbers match what `wc -l` and editors show.
    with path.open(encoding="utf-8", newline="") as lines:
        for line in lines:
            try:
                event = parser.parse(line)
            except RecordingFormatError:
                if not skip_malformed:
                    raise
                parser.stats.malformed += 1
                continue
            if event is not None:
                yield event


def _time_us(message: dict[str, object]) -> int:
    text = text_field(message, "time")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise MalformedLine(f"time {text!r} is not ISO-8601") from None
    if moment.tzinfo is None:
        # Coinbase always sends "Z"; a naive time would be read in the local zone.
        raise MalformedLine(f"time {text!r} has no UTC offset")
    # timedelta // timedelta is exact integer arithmetic, no float rounding.
    return (moment - _EPOCH) // _ONE_US


def _levels(message: dict[str, object], key: str) -> tuple[tuple[float, float], ...]:
    raw = message.get(key)
    if not isinstance(raw, list):
        raise MalformedLine(f"field {key!r} is missing or not a list")
    levels: list[tuple[float, float]] = []
    for level in raw:
        if not isinstance(level, list) or len(level) != 2:
            raise MalformedLine(f"{key} level {level!r} is not [price, size]")
        levels.append((price(level[0]), size(level[1])))
    return tuple(levels)
