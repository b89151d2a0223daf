"""Binance spot recordings: messages written from Binance's API documentation (the
REST depth snapshot, the diff depth stream, aggTrade and trade), sequenced as its
"How to manage a local order book correctly" section says."""

from __future__ import annotations

import json
from typing import Any

import pytest

from feature_cache.events import Aggressor, BookDelta, BookSide, BookSnapshot, Trade
from feature_cache.exchanges.binance import BinanceReader
from feature_cache.exchanges.feed import ReplaySummary
from feature_cache.exchanges.recording import MalformedLine, RecordedLine

T0 = 1_700_000_000_000  # ms


def snapshot(last_update_id: int, *, at_ms: int = T0) -> RecordedLine:
    body = {
        "lastUpdateId": last_update_id,
        "bids": [["100.00", "2.0"], ["99.50", "1.0"]],
        "asks": [["100.50", "3.0"], ["101.00", "1.5"]],
    }
    url = "https://api.binance.com/api/v3/depth?symbol=BTCUSDT&limit=1000"
    return RecordedLine(at_ms * 1000, json.dumps(body), url)


def diff(first: int, last: int, *, bids=(), asks=(), at_ms: int = T0, combined=False):
    data = {
        "e": "depthUpdate",
        "E": at_ms,
        "s": "BTCUSDT",
        "U": first,
        "u": last,
        "b": [list(level) for level in bids],
        "a": [list(level) for level in asks],
    }
    message = {"stream": "btcusdt@depth@100ms", "data": data} if combined else data
    return RecordedLine((at_ms + 5) * 1000, json.dumps(message))


def agg_trade(*, buyer_is_maker: bool, at_ms: int = T0) -> RecordedLine:
    data = {
        "e": "aggTrade", "E": at_ms + 1, "s": "BTCUSDT", "a": 26129, "p": "100.25",
        "q": "0.5", "f": 100, "l": 105, "T": at_ms, "m": buyer_is_maker, "M": True,
    }  # fmt: skip
    return RecordedLine(
        (at_ms + 5) * 1000, json.dumps({"stream": "btcusdt@aggTrade", "data": data})
    )


def read_all(reader: BinanceReader, *lines: RecordedLine) -> list[Any]:
    return [event for line in lines for event in reader.read(line)]


def test_the_snapshot_is_the_book_keyed_by_venue_at_its_receive_time() -> None:
    (event,) = BinanceReader(ReplaySummary()).read(snapshot(10))
    assert isinstance(event, BookSnapshot)
    assert event.symbol == "BINANCE:BTC-USD"
    assert event.exchange_time_us == T0 * 1000
    assert sorted(event.bids) == [(99.5, 1.0), (100.0, 2.0)]
    assert sorted(event.asks) == [(100.5, 3.0), (101.0, 1.5)]


def test_diffs_before_the_snapshot_wait_and_those_it_covers_are_dropped() -> None:
    summary = ReplaySummary()
    reader = BinanceReader(summary)
    events = read_all(
        reader,
        diff(5, 8, bids=[("100.00", "9.0")]),  # u <= lastUpdateId: already in the snapshot
        diff(9, 12, bids=[("100.00", "4.0")]),  # U <= lastUpdateId + 1 <= u: the first
        snapshot(10),
        diff(13, 13, asks=[("100.50", "0")]),  # U == previous u + 1
    )
    assert [type(e) for e in events] == [BookSnapshot, BookDelta, BookDelta]
    assert events[1].changes == ((BookSide.BID, 100.0, 4.0),)
    assert events[2].changes == ((BookSide.ASK, 100.5, 0.0),)
    assert [e.sequence for e in events] == [1, 2, 3]
    assert summary.skipped["depthUpdate older than the book"] == 1
    assert summary.symbols["BINANCE:BTC-USD"].gaps == 0


def test_a_first_diff_that_starts_past_the_snapshot_is_a_gap() -> None:
    summary = ReplaySummary()
    reader = BinanceReader(summary)
    events = read_all(reader, snapshot(10), diff(12, 14, bids=[("100.00", "4.0")]))
    assert [type(e) for e in events] == [BookSnapshot]
    assert summary.symbols["BINANCE:BTC-USD"].gaps == 1


def test_a_gap_stops_the_symbol_until_the_next_snapshot_which_the_held_diffs_bridge() -> None:
    summary = ReplaySummary()
    reader = BinanceReader(summary)
    events = read_all(
        reader,
        snapshot(10),
        diff(11, 12, bids=[("100.00", "4.0")]),
        diff(15, 16, bids=[("100.00", "5.0")]),  # 13 and 14 never came: a gap
        agg_trade(buyer_is_maker=True),  # out of sync: not published either
        diff(17, 18, bids=[("100.00", "6.0")]),
        snapshot(16, at_ms=T0 + 100),  # the next snapshot: 17..18 follow it
        diff(19, 19, bids=[("100.00", "7.0")]),
    )
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["BookSnapshot", "BookDelta", "BookSnapshot", "BookDelta", "BookDelta"]
    assert [e.changes[0][2] for e in events if isinstance(e, BookDelta)] == [4.0, 6.0, 7.0]
    counts = summary.symbols["BINANCE:BTC-USD"]
    assert (counts.gaps, counts.dropped, counts.snapshots) == (1, 1, 2)
    assert summary.skipped["depthUpdate older than the book"] == 1  # 15..16, held then covered


def test_after_the_first_diff_an_overlap_is_a_gap_too() -> None:
    summary = ReplaySummary()
    events = read_all(BinanceReader(summary), snapshot(10), diff(9, 12), diff(12, 14))
    assert len(events) == 2
    assert summary.symbols["BINANCE:BTC-USD"].gaps == 1


def test_combined_stream_envelopes_are_unwrapped() -> None:
    reader = BinanceReader(ReplaySummary())
    events = read_all(reader, snapshot(10), diff(11, 11, asks=[("100.75", "1")], combined=True))
    assert events[-1].changes == ((BookSide.ASK, 100.75, 1.0),)


@pytest.mark.parametrize(
    ("buyer_is_maker", "aggressor"), [(True, Aggressor.SELL), (False, Aggressor.BUY)]
)
def test_a_trade_s_aggressor_is_the_side_that_was_not_the_maker(buyer_is_maker, aggressor) -> None:
    reader = BinanceReader(ReplaySummary())
    trade = read_all(reader, snapshot(10), agg_trade(buyer_is_maker=buyer_is_maker))[-1]
    assert isinstance(trade, Trade)
    assert (trade.price, trade.size, trade.aggressor) == (100.25, 0.5, aggressor)
    assert trade.exchange_time_us == T0 * 1000  # the trade time T


def test_other_streams_are_skipped_and_counted() -> None:
    summary = ReplaySummary()
    ticker = {"stream": "btcusdt@bookTicker", "data": {"u": 1, "s": "BTCUSDT", "b": "1"}}
    kline = {"stream": "btcusdt@kline_1m", "data": {"e": "kline", "s": "BTCUSDT"}}
    reader = BinanceReader(summary)
    assert (
        read_all(reader, RecordedLine(0, json.dumps(ticker)), RecordedLine(0, json.dumps(kline)))
        == []
    )
    assert summary.skipped == {"bookTicker": 1, "kline": 1}


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        json.dumps(
            {"e": "depthUpdate", "s": "BTCUSDT", "U": 1, "u": 2, "E": 1, "b": [["x", "1"]], "a": []}
        ),
        json.dumps(
            {"e": "depthUpdate", "s": "BTCUSDT", "U": "1", "u": 2, "E": 1, "b": [], "a": []}
        ),
        json.dumps({"e": "aggTrade", "s": "BTCUSDT", "p": "1", "q": "1", "T": 1}),
    ],
)
def test_a_malformed_message_raises_before_it_changes_anything(body: str) -> None:
    reader = BinanceReader(ReplaySummary())
    reader.read(snapshot(1))
    with pytest.raises(MalformedLine):
        reader.read(RecordedLine(0, body))
    (event,) = reader.read(diff(2, 2, bids=[("100.00", "1")]))  # still in sync
    assert isinstance(event, BookDelta)
