"""Symbols the Decide request accepts (pure logic)."""

from __future__ import annotations

import pytest

from server.errors import InvalidArgument
from server.validation import check_symbol


@pytest.mark.parametrize("symbol", ["BTC-USD", "BINANCE:BTC-USD", "KRAKEN:BTC-USD", "ES.Z6", "X"])
def test_plain_and_venue_keyed_symbols_are_accepted(symbol: str) -> None:
    assert check_symbol("symbol", symbol) == symbol


@pytest.mark.parametrize("symbol", ["", "btc-usd", ":BTC-USD", "A" * 33, "BTC USD"])
def test_other_symbols_are_refused_naming_the_field(symbol: str) -> None:
    with pytest.raises(InvalidArgument, match="symbol"):
        check_symbol("requests[2].symbol", symbol)
