"""Venue symbols to one key form (pure logic)."""

from __future__ import annotations

import pytest

from feature_cache.exchanges.symbols import SymbolKeys, pair, venue_key


@pytest.mark.parametrize(
    ("native", "expected"),
    [
        ("XBT/USD", "BTC-USD"),
        ("XDG/EUR", "DOGE-EUR"),
        ("ETH/XBT", "ETH-BTC"),
        ("BTCUSDT", "BTC-USD"),
        ("btcusdt", "BTC-USD"),
        ("XMRBTC", "XMR-BTC"),
        ("ETHFDUSD", "ETH-FDUSD"),
        ("BTC-USD", "BTC-USD"),
        ("BTC-USDT", "BTC-USD"),
        ("FOOBAR", "FOOBAR"),
        ("USDT", "USDT"),  # only a quote: kept whole
    ],
)
def test_venue_symbols_map_to_one_form(native: str, expected: str) -> None:
    assert pair(native) == expected


def test_the_venue_is_part_of_the_key() -> None:
    assert venue_key("binance", "BTCUSDT") == "BINANCE:BTC-USD"
    assert venue_key("kraken", "XBT/USD") == "KRAKEN:BTC-USD"
    assert venue_key("binance", "BTCUSDT") != venue_key("kraken", "XBT/USDT")


def test_two_symbols_of_one_venue_never_share_a_key() -> None:
    keys = SymbolKeys()
    assert keys.key("binance", "BTCUSDT") == "BINANCE:BTC-USD"
    assert keys.key("binance", "BTCUSD") is None  # would mix two books
    assert keys.key("binance", "BTCUSDT") == "BINANCE:BTC-USD"
    assert keys.key("kraken", "XBT/USD") == "KRAKEN:BTC-USD"  # another venue: its own
    assert keys.refused == {"BINANCE:BTCUSD": "BINANCE:BTC-USD"}
