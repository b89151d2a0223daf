"""Kraken (websocket API v1): a raw recording -> events.

``book-N`` snapshots and updates become snapshots and deltas of a book kept to depth N,
each update's CRC32 checksum verified; ``trade`` messages become trades, at the
exchange's times. A failed checksum or a crossed book puts the pair out of sync (nothing
of it published) until its next snapshot. Object messages (heartbeat, status) and other
channels are skipped and counted.
Messages and checksum: docs/market-data.md#kraken-websocket-api-v1
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable

from feature_cache.events import Aggressor, BookSide, MarketEvent
from feature_cache.exchanges.feed import Book, BookFeed, Level, ReplaySummary
from feature_cache.exchanges.recording import (
    MalformedLine,
    RecordedLine,
    price,
    seconds_to_us,
    size,
)

VENUE = "kraken"
CHECKSUM_LEVELS = 10
DEFAULT_DEPTH = 10  # Kraken's default subscription depth
_SIDES = {"as": BookSide.ASK, "bs": BookSide.BID, "a": BookSide.ASK, "b": BookSide.BID}
_AGGRESSORS = {"b": Aggressor.BUY, "s": Aggressor.SELL}


def checksum(book: Book) -> int:
    """Kraken's CRC32 over the top 10 levels of each side, from the venue's own texts."""
    text = "".join(
        _digits(price_text) + _digits(volume_text)
        for side in (BookSide.ASK, BookSide.BID)
        for price_text, volume_text in book.best(side, CHECKSUM_LEVELS)
    )
    return zlib.crc32(text.encode())


def _digits(text: str) -> str:
    return text.replace(".", "").lstrip("0")


class KrakenReader:
    def __init__(self, summary: ReplaySummary) -> None:
        self._feed = BookFeed(VENUE, summary)
        self._summary = summary

    def read(self, line: RecordedLine) -> list[MarketEvent]:
        try:
            message = json.loads(line.body)
        except json.JSONDecodeError as exc:
            raise MalformedLine(f"bad JSON: {exc.msg} at column {exc.colno}") from None
        if isinstance(message, dict):
            self._summary.skipped[str(message.get("event", "object"))] += 1
            return []
        if not isinstance(message, list) or len(message) < 4:
            raise MalformedLine("not [channelID, payload, channelName, pair]")
        channel, pair, payloads = message[-2], message[-1], message[1:-2]
        if not isinstance(channel, str) or not isinstance(pair, str):
            raise MalformedLine("channel name or pair is not a string")
        if channel.startswith("book"):
            return self._book(channel, pair, payloads, line.receive_time_us)
        if channel == "trade":
            return self._trades(pair, payloads, line.receive_time_us)
        self._summary.skipped[channel] += 1
        return []

    def finish(self) -> None:
        """Nothing is held back between messages."""

    def _book(
        self, channel: str, pair: str, payloads: list[object], receive_us: int
    ) -> list[MarketEvent]:
        _, _, depth_text = channel.partition("-")
        if depth_text and not depth_text.isdigit():
            raise MalformedLine(f"channel {channel!r} is not book-DEPTH")
        depth = int(depth_text) if depth_text else DEFAULT_DEPTH
        books = [p for p in payloads if isinstance(p, dict)]
        if not books or len(books) != len(payloads):
            raise MalformedLine("book payloads are not JSON objects")
        levels: list[Level] = []
        latest_us = 0
        expected: int | None = None
        for payload in books:
            for name, side in _SIDES.items():
                if name in payload:
                    found, time_us = _levels(payload[name], side)
                    levels += found
                    latest_us = max(latest_us, time_us)
            if "c" in payload:
                expected = _checksum_field(payload["c"])
        key = self._feed.key(pair)
        if key is None:
            self._summary.skipped["symbol key taken"] += 1
            return []
        event: MarketEvent | None
        if any("as" in p or "bs" in p for p in books):
            event = self._feed.snapshot(key, latest_us, receive_us, levels, depth=depth)
        else:
            verify = None if expected is None else _checksum_is(expected)
            event = self._feed.delta(key, latest_us, receive_us, levels, depth=depth, verify=verify)
        return [] if event is None else [event]

    def _trades(self, pair: str, payloads: list[object], receive_us: int) -> list[MarketEvent]:
        if len(payloads) != 1 or not isinstance(payloads[0], list):
            raise MalformedLine("trade payload is not a list of trades")
        parsed = []
        for raw in payloads[0]:
            if not isinstance(raw, list) or len(raw) < 4:
                raise MalformedLine(f"trade {raw!r} is not [price, volume, time, side, ...]")
            aggressor = _AGGRESSORS.get(raw[3]) if isinstance(raw[3], str) else None
            if aggressor is None:
                raise MalformedLine(f"trade side {raw[3]!r} is not 'b' or 's'")
            if not isinstance(raw[2], str):
                raise MalformedLine(f"trade time {raw[2]!r} is not a decimal string")
            parsed.append((seconds_to_us(raw[2]), price(raw[0]), size(raw[1]), aggressor))
        key = self._feed.key(pair)
        if key is None:
            self._summary.skipped["symbol key taken"] += 1
            return []
        events: list[MarketEvent] = []
        for time_us, trade_price, volume, aggressor in parsed:
            trade = self._feed.trade(key, time_us, receive_us, trade_price, volume, aggressor)
            if trade is not None:
                events.append(trade)
        return events


def _levels(raw: object, side: BookSide) -> tuple[list[Level], int]:
    """The levels of one side, and their latest timestamp (us)."""
    if not isinstance(raw, list):
        raise MalformedLine("book side is not a list")
    levels = []
    latest_us = 0
    for level in raw:
        if not isinstance(level, list) or len(level) < 3 or not isinstance(level[2], str):
            raise MalformedLine(f"level {level!r} is not [price, volume, timestamp]")
        levels.append(Level.parse(side, level[0], level[1]))
        latest_us = max(latest_us, seconds_to_us(level[2]))
    return levels, latest_us


def _checksum_is(expected: int) -> Callable[[Book], bool]:
    return lambda book: checksum(book) == expected


def _checksum_field(value: object) -> int:
    if not isinstance(value, str) or not value.isdigit():
        raise MalformedLine(f"checksum {value!r} is not a decimal string")
    return int(value)
