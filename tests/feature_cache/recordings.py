"""Venue recordings written from canonical events, for the readers' round-trip and
replay tests: each writer renders a stream (the generator's) in one venue's wire format,
so what a reader gives back can be compared with what went in."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from feature_cache.events import Aggressor, BookDelta, BookSide, BookSnapshot, MarketEvent, Trade
from feature_cache.exchanges.feed import Book, Level
from feature_cache.exchanges.kraken import checksum

BINANCE_SYMBOLS = {"BTC-USD": "BTCUSDT", "ETH-USD": "ETHUSDT", "SOL-USD": "SOLUSDT"}
KRAKEN_PAIRS = {"BTC-USD": "XBT/USD", "ETH-USD": "ETH/USD", "SOL-USD": "SOL/USD"}
KRAKEN_DEPTH = 1000  # deeper than the generator's books: no truncation


def text(value: float) -> str:
    return f"{value:.8f}"


def seconds(time_us: int) -> str:
    return f"{time_us // 1_000_000}.{time_us % 1_000_000:06d}"


def write_binance(folder: Path, events: Sequence[MarketEvent]) -> None:
    """Websocket frames in BINANCE.ws.1.0 and REST snapshots in BINANCE.http.0.0."""
    ws, rest = [], []
    last_id = {symbol: 1000 for symbol in BINANCE_SYMBOLS}
    for event in events:
        native = BINANCE_SYMBOLS[event.symbol]
        at = seconds(event.exchange_time_us)
        if isinstance(event, BookSnapshot):
            body = {
                "lastUpdateId": last_id[event.symbol],
                "bids": [[text(p), text(s)] for p, s in event.bids],
                "asks": [[text(p), text(s)] for p, s in event.asks],
            }
            url = f"https://api.binance.com/api/v3/depth?symbol={native}&limit=1000"
            rest.append(f"{url} -> {at}: {json.dumps(body)}")
        elif isinstance(event, BookDelta):
            first = last_id[event.symbol] + 1
            last_id[event.symbol] += len(event.changes)
            data = {
                "e": "depthUpdate",
                "E": event.exchange_time_us // 1000,
                "s": native,
                "U": first,
                "u": last_id[event.symbol],
                "b": [[text(p), text(s)] for side, p, s in event.changes if side is BookSide.BID],
                "a": [[text(p), text(s)] for side, p, s in event.changes if side is BookSide.ASK],
            }
            stream = {"stream": f"{native.lower()}@depth@100ms", "data": data}
            ws.append(f"{at}: {json.dumps(stream)}")
        else:
            assert isinstance(event, Trade)
            data = {
                "e": "aggTrade", "E": event.exchange_time_us // 1000, "s": native,
                "p": text(event.price), "q": text(event.size),
                "T": event.exchange_time_us // 1000, "m": event.aggressor is Aggressor.SELL,
            }  # fmt: skip
            ws.append(f"{at}: {json.dumps({'stream': f'{native.lower()}@aggTrade', 'data': data})}")
    connect = "wss://stream.binance.com:9443/stream?streams=btcusdt@depth <-> 1700000000.0"
    (folder / "BINANCE.ws.1.0").write_text("\n".join([connect, *ws]) + "\n")
    (folder / "BINANCE.http.0.0").write_text("\n".join(rest) + "\n")


def write_kraken(path: Path, events: Sequence[MarketEvent]) -> None:
    lines = ["wss://ws.kraken.com <-> 1700000000.0", '1700000000.0: {"event":"heartbeat"}']
    books: dict[str, Book] = {}
    for event in events:
        pair = KRAKEN_PAIRS[event.symbol]
        at = seconds(event.exchange_time_us)
        channel = f"book-{KRAKEN_DEPTH}"
        if isinstance(event, BookSnapshot):
            book = books[event.symbol] = Book()
            for side, levels in ((BookSide.BID, event.bids), (BookSide.ASK, event.asks)):
                for p, s in levels:
                    book.set(Level(side, p, s, text(p), text(s)))
            payload = {
                "as": [[text(p), text(s), at] for p, s in event.asks],
                "bs": [[text(p), text(s), at] for p, s in event.bids],
            }
            message: list[object] = [42, payload, channel, pair]
        elif isinstance(event, BookDelta):
            book = books[event.symbol]
            asks = [[text(p), text(s), at] for side, p, s in event.changes if side is BookSide.ASK]
            bids = [[text(p), text(s), at] for side, p, s in event.changes if side is BookSide.BID]
            for side, p, s in event.changes:
                book.set(Level(side, p, s, text(p), text(s)))
            payloads: list[dict[str, object]] = []
            if asks:
                payloads.append({"a": asks})
            if bids:
                payloads.append({"b": bids})
            payloads[-1]["c"] = str(checksum(book))
            message = [42, *payloads, channel, pair]
        else:
            assert isinstance(event, Trade)
            taker = "b" if event.aggressor is Aggressor.BUY else "s"
            trade = [text(event.price), text(event.size), at, taker, "l", ""]
            message = [43, [trade], "trade", pair]
        lines.append(f"{at}: {json.dumps(message)}")
    path.write_text("\n".join(lines) + "\n")


def write_csv(folder: Path, events: Sequence[MarketEvent], exchange: str = "coinbase") -> None:
    """incremental_book_L2.csv and trades.csv, received 40 us after each event."""
    book = ["exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount"]
    trades = ["exchange,symbol,timestamp,local_timestamp,id,side,price,amount"]
    for number, event in enumerate(events):
        t, local = event.exchange_time_us, event.exchange_time_us + 40
        head = f"{exchange},{event.symbol},{t},{local}"
        if isinstance(event, BookSnapshot):
            for side, levels in (("bid", event.bids), ("ask", event.asks)):
                book += [f"{head},true,{side},{text(p)},{text(s)}" for p, s in levels]
        elif isinstance(event, BookDelta):
            book += [
                f"{head},false,{side.value},{text(p)},{text(s)}" for side, p, s in event.changes
            ]
        else:
            assert isinstance(event, Trade)
            trades.append(
                f"{head},{number},{event.aggressor.value},{text(event.price)},{text(event.size)}"
            )
    (folder / "incremental_book_L2.csv").write_text("\n".join(book) + "\n")
    (folder / "trades.csv").write_text("\n".join(trades) + "\n")
