"""The vendors' historical L2 CSV format (incremental_book_L2 and trades), with files
written here as those vendors document them."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

from feature_cache.events import Aggressor, BookDelta, BookSide, BookSnapshot, Trade
from feature_cache.exchanges.csv_l2 import read_csv
from feature_cache.exchanges.feed import ReplaySummary

BOOK_HEADER = "exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount"
TRADES_HEADER = "exchange,symbol,timestamp,local_timestamp,id,side,price,amount"
T = 1_700_000_000_000_000


def write(path: Path, header: str, rows: list[str]) -> Path:
    text = "\n".join([header, *rows]) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def book_rows() -> list[str]:
    return [
        f"binance,BTCUSDT,{T},{T + 50},true,ask,100.5,3",
        f"binance,BTCUSDT,{T},{T + 50},true,ask,101,1.5",
        f"binance,BTCUSDT,{T},{T + 50},true,bid,100,2",
        f"binance,BTCUSDT,{T},{T + 50},true,bid,99.5,1",
        f"binance,BTCUSDT,{T + 1000},{T + 1040},false,bid,100,0",  # one message: two rows
        f"binance,BTCUSDT,{T + 1000},{T + 1040},false,bid,99.75,4",
        f"binance,BTCUSDT,{T + 2000},{T + 2040},false,ask,100.5,2",
        f"binance,BTCUSDT,{T + 9000},{T + 9040},true,ask,102,1",  # a new snapshot run
        f"binance,BTCUSDT,{T + 9000},{T + 9040},true,bid,101,1",
    ]


def test_snapshot_runs_start_a_book_and_rows_of_one_message_make_one_delta(tmp_path) -> None:
    summary = ReplaySummary()
    events: list[Any] = list(
        read_csv([write(tmp_path / "book.csv.gz", BOOK_HEADER, book_rows())], summary)
    )
    assert [type(e) for e in events] == [BookSnapshot, BookDelta, BookDelta, BookSnapshot]
    first, removal, change, again = events
    assert first.symbol == "BINANCE:BTC-USD"
    assert first.exchange_time_us == T
    assert sorted(first.bids) == [(99.5, 1.0), (100.0, 2.0)]
    assert removal.changes == ((BookSide.BID, 100.0, 0.0), (BookSide.BID, 99.75, 4.0))
    assert change.changes == ((BookSide.ASK, 100.5, 2.0),)
    assert (again.bids, again.asks) == (((101.0, 1.0),), ((102.0, 1.0),))  # the old book gone
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert summary.symbols["BINANCE:BTC-USD"].receive_lag_max_ms == 0.05


def test_trades_merge_with_the_book_by_receive_time(tmp_path) -> None:
    trades = write(
        tmp_path / "trades.csv",
        TRADES_HEADER,
        [
            f"binance,BTCUSDT,{T + 1500},{T + 1510},7,buy,100.5,0.25",
            f"binance,BTCUSDT,{T + 2500},{T + 2510},8,sell,99.75,1",
            f"binance,BTCUSDT,{T + 2600},{T + 2610},9,unknown,99.75,1",
        ],
    )
    book = write(tmp_path / "book.csv", BOOK_HEADER, book_rows())
    summary = ReplaySummary()
    events: list[Any] = list(read_csv([trades, book], summary))
    names = [type(e).__name__ for e in events]
    assert names == ["BookSnapshot", "BookDelta", "Trade", "BookDelta", "Trade", "BookSnapshot"]
    buy, sell = (e for e in events if isinstance(e, Trade))
    assert (buy.price, buy.size, buy.aggressor, buy.exchange_time_us) == (
        100.5, 0.25, Aggressor.BUY, T + 1500
    )  # fmt: skip
    assert sell.aggressor is Aggressor.SELL
    assert summary.skipped["trade side 'unknown'"] == 1


def test_two_exchanges_in_one_file_keep_their_own_books(tmp_path) -> None:
    rows = [
        f"binance,BTCUSDT,{T},{T + 1},true,bid,100,1",
        f"binance,BTCUSDT,{T},{T + 1},true,ask,101,1",
        f"kraken,XBT/USD,{T},{T + 2},true,bid,200,1",
        f"kraken,XBT/USD,{T},{T + 2},true,ask,201,1",
    ]
    events: list[Any] = list(
        read_csv([write(tmp_path / "b.csv", BOOK_HEADER, rows)], ReplaySummary())
    )
    assert [(e.symbol, e.bids) for e in events] == [
        ("BINANCE:BTC-USD", ((100.0, 1.0),)),
        ("KRAKEN:BTC-USD", ((200.0, 1.0),)),
    ]


def test_a_delta_that_crosses_the_book_stops_the_symbol_until_the_next_snapshot(tmp_path) -> None:
    rows = [
        *book_rows()[:4],
        f"binance,BTCUSDT,{T + 5},{T + 6},false,bid,100.5,1",
        *book_rows()[4:],
    ]
    summary = ReplaySummary()
    events: list[Any] = list(read_csv([write(tmp_path / "b.csv", BOOK_HEADER, rows)], summary))
    assert [type(e) for e in events] == [BookSnapshot, BookSnapshot]
    counts = summary.symbols["BINANCE:BTC-USD"]
    assert (counts.crossed, counts.dropped) == (1, 2)


def test_malformed_rows_are_counted_and_skipped(tmp_path) -> None:
    rows = [
        *book_rows()[:4],
        f"binance,BTCUSDT,{T + 5},{T + 6},false,bid,not-a-price,1",
        f"binance,BTCUSDT,{T + 7},{T + 8},false",  # short
        f"binance,BTCUSDT,{T + 9},{T + 10},maybe,bid,100,1",
        *book_rows()[4:7],
    ]
    summary = ReplaySummary()
    events: list[Any] = list(read_csv([write(tmp_path / "b.csv", BOOK_HEADER, rows)], summary))
    assert [type(e) for e in events] == [BookSnapshot, BookDelta, BookDelta]
    assert summary.malformed == 3
    assert sorted(example.split(":")[1] for example in summary.malformed_examples) == [
        "6",
        "7",
        "8",
    ]
    assert any("b.csv:6: price 'not-a-price' is not" in e for e in summary.malformed_examples)


def test_a_file_that_is_neither_kind_is_skipped_and_named(tmp_path) -> None:
    other = write(tmp_path / "quotes.csv", "exchange,symbol,timestamp,bid_price", ["x,y,1,2"])
    summary = ReplaySummary()
    assert list(read_csv([other], summary)) == []
    assert summary.skipped == {"quotes.csv: not an incremental_book_L2 or trades file": 1}
