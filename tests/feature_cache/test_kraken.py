"""Kraken websocket v1 recordings: messages written from Kraken's documentation of the
book and trade channels and of the book checksum."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest

from feature_cache.events import Aggressor, BookDelta, BookSide, BookSnapshot, Trade
from feature_cache.exchanges.feed import ReplaySummary
from feature_cache.exchanges.kraken import KrakenReader
from feature_cache.exchanges.recording import MalformedLine, RecordedLine

RECEIVED_US = 1_582_905_487_000_000
ASKS = [
    ["0.05005", "0.00000500", "1582905486.493008"],
    ["0.05010", "0.00001000", "1582905486.493034"],
]
BIDS = [
    ["0.05000", "0.00000500", "1582905486.493008"],
    ["0.04995", "0.00002000", "1582905486.493030"],
]


def line(message: object) -> RecordedLine:
    return RecordedLine(RECEIVED_US, json.dumps(message))


def book_snapshot(depth: int = 10) -> RecordedLine:
    return line([0, {"as": ASKS, "bs": BIDS}, f"book-{depth}", "XBT/USD"])


def update(*payloads: dict[str, Any], depth: int = 10) -> RecordedLine:
    return line([0, *payloads, f"book-{depth}", "XBT/USD"])


def crc(text: str) -> str:
    return str(zlib.crc32(text.encode()))


# The book above, by Kraken's rule: asks low to high, then bids high to low, each price
# and volume without "." and leading zeros.
BOOK_TEXT = "5005" + "500" + "5010" + "1000" + "5000" + "500" + "4995" + "2000"


def read_all(reader: KrakenReader, *lines: RecordedLine) -> list[Any]:
    return [event for recorded in lines for event in reader.read(recorded)]


def test_a_snapshot_is_the_book_at_its_latest_level_time() -> None:
    (event,) = KrakenReader(ReplaySummary()).read(book_snapshot())
    assert isinstance(event, BookSnapshot)
    assert event.symbol == "KRAKEN:BTC-USD"
    assert event.exchange_time_us == 1_582_905_486_493_034
    assert sorted(event.asks) == [(0.05005, 0.000005), (0.0501, 0.00001)]


def test_an_update_with_the_right_checksum_is_published() -> None:
    summary = ReplaySummary()
    new_bid = ["0.05001", "0.00000100", "1582905486.600000"]
    text = "5005" + "500" + "5010" + "1000" + "5001" + "100" + "5000" + "500" + "4995" + "2000"
    events = read_all(
        KrakenReader(summary), book_snapshot(), update({"b": [new_bid], "c": crc(text)})
    )
    assert isinstance(events[-1], BookDelta)
    assert events[-1].changes == ((BookSide.BID, 0.05001, 0.000001),)
    assert events[-1].exchange_time_us == 1_582_905_486_600_000
    assert summary.symbols["KRAKEN:BTC-USD"].checksum_failures == 0


def test_a_wrong_checksum_stops_the_pair_until_its_next_snapshot() -> None:
    summary = ReplaySummary()
    reader = KrakenReader(summary)
    unchanged = ["0.05000", "0.00000500", "1582905486.700000"]
    trade = line([0, [["0.05005", "0.1", "1582905486.800000", "b", "m", ""]], "trade", "XBT/USD"])
    events = read_all(
        reader,
        book_snapshot(),
        update({"b": [unchanged], "c": crc(BOOK_TEXT)}),  # right
        update({"b": [unchanged], "c": str(int(crc(BOOK_TEXT)) ^ 1)}),  # wrong
        update({"b": [unchanged], "c": crc(BOOK_TEXT)}),  # out of sync: not published
        trade,  # nor its trades
        book_snapshot(),
        trade,
    )
    assert [type(e) for e in events] == [BookSnapshot, BookDelta, BookSnapshot, Trade]
    counts = summary.symbols["KRAKEN:BTC-USD"]
    assert (counts.checksum_failures, counts.dropped) == (1, 2)


def test_both_sides_in_one_message_and_a_republished_level_are_applied_in_order() -> None:
    asks = {
        "a": [
            ["0.05005", "0.00000000", "1582905486.5"],
            ["0.05020", "0.00000700", "1582905486.5", "r"],
        ]
    }
    bids: dict[str, Any] = {"b": [["0.04995", "0.00003000", "1582905486.6"]]}
    text = "5010" + "1000" + "5020" + "700" + "5000" + "500" + "4995" + "3000"
    bids["c"] = crc(text)
    events = read_all(KrakenReader(ReplaySummary()), book_snapshot(), update(asks, bids))
    assert events[-1].changes == (
        (BookSide.ASK, 0.05005, 0.0),
        (BookSide.ASK, 0.0502, 0.000007),
        (BookSide.BID, 0.04995, 0.00003),
    )


def test_the_book_is_kept_to_the_subscribed_depth_and_the_delta_says_what_fell_out() -> None:
    better_bid = ["0.05002", "0.00000100", "1582905486.9"]
    text = "5005" + "500" + "5010" + "1000" + "5002" + "100" + "5000" + "500"
    events = read_all(
        KrakenReader(ReplaySummary()),
        book_snapshot(depth=2),
        update({"b": [better_bid], "c": crc(text)}, depth=2),
    )
    assert events[-1].changes == ((BookSide.BID, 0.05002, 0.000001), (BookSide.BID, 0.04995, 0.0))


def test_a_book_that_crosses_is_out_of_sync() -> None:
    summary = ReplaySummary()
    crossing = {"b": [["0.05010", "0.00000100", "1582905486.9"]]}
    assert read_all(KrakenReader(summary), book_snapshot(), update(crossing))[1:] == []
    assert summary.symbols["KRAKEN:BTC-USD"].crossed == 1


@pytest.mark.parametrize(("side", "aggressor"), [("b", Aggressor.BUY), ("s", Aggressor.SELL)])
def test_trades_carry_their_own_time_and_taker_side(side: str, aggressor: Aggressor) -> None:
    trades = [
        ["0.05005", "0.10000000", "1582905486.800000", side, "m", ""],
        ["0.05006", "0.20000000", "1582905486.900000", side, "l", ""],
    ]
    events = read_all(
        KrakenReader(ReplaySummary()), book_snapshot(), line([0, trades, "trade", "XBT/USD"])
    )
    assert [(t.price, t.size, t.aggressor, t.exchange_time_us) for t in events[1:]] == [
        (0.05005, 0.1, aggressor, 1_582_905_486_800_000),
        (0.05006, 0.2, aggressor, 1_582_905_486_900_000),
    ]


def test_status_messages_and_other_channels_are_skipped_and_counted() -> None:
    summary = ReplaySummary()
    reader = KrakenReader(summary)
    read_all(
        reader,
        line({"event": "heartbeat"}),
        line({"event": "systemStatus", "status": "online"}),
        line([0, ["5698.4", "5700.0", "1542057299.545897", "1.0", "2.0"], "spread", "XBT/USD"]),
    )
    assert summary.skipped == {"heartbeat": 1, "systemStatus": 1, "spread": 1}


@pytest.mark.parametrize(
    "message",
    [
        [0, {"a": [["x", "1", "1.0"]]}, "book-10", "XBT/USD"],
        [0, {"a": [["1.0", "1", "1.0"]], "c": "abc"}, "book-10", "XBT/USD"],
        [0, [["1.0", "1", "1.0", "x", "m", ""]], "trade", "XBT/USD"],
        [0, "book-10"],
    ],
)
def test_a_malformed_message_raises_before_it_changes_anything(message: object) -> None:
    reader = KrakenReader(ReplaySummary())
    reader.read(book_snapshot())
    with pytest.raises(MalformedLine):
        reader.read(line(message))
    unchanged = ["0.05000", "0.00000500", "1582905486.700000"]
    (event,) = reader.read(update({"b": [unchanged], "c": crc(BOOK_TEXT)}))
    assert isinstance(event, BookDelta)
