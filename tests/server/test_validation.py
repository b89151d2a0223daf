"""Symbols the Decide request accepts (pure logic)."""

from __future__ import annotations

import pytest

from core.domain import Side
from decision_client.v1 import decision_pb2
from server.errors import InvalidArgument
from server.validation import check_symbol, order_from_pb


@pytest.mark.parametrize("symbol", ["BTC-USD", "BINANCE:BTC-USD", "KRAKEN:BTC-USD", "ES.Z6", "X"])
def test_plain_and_venue_keyed_symbols_are_accepted(symbol: str) -> None:
    assert check_symbol("symbol", symbol) == symbol


@pytest.mark.parametrize("symbol", ["", "btc-usd", ":BTC-USD", "A" * 33, "BTC USD"])
def test_other_symbols_are_refused_naming_the_field(symbol: str) -> None:
    with pytest.raises(InvalidArgument, match="symbol"):
        check_symbol("requests[2].symbol", symbol)


def test_a_refused_symbol_is_echoed_shortened() -> None:
    with pytest.raises(InvalidArgument, match="got 'btc-usd'"):
        check_symbol("symbol", "btc-usd")
    with pytest.raises(InvalidArgument) as err:
        check_symbol("symbol", "a" * 1000)
    assert f"got {'a' * 40!r}" in str(err.value)
    assert "a" * 41 not in str(err.value)


def test_a_request_with_several_bad_fields_names_them_all() -> None:
    request = decision_pb2.DecideRequest(symbol="", side=decision_pb2.SIDE_SELL, quantity=-1.0)
    request.client_id = "\x07"
    with pytest.raises(InvalidArgument) as err:
        order_from_pb(request)
    assert [v.field for v in err.value.violations] == ["symbol", "quantity", "client_id"]
    assert err.value.field == "symbol"  # the first, for callers that read one
    assert str(err.value).count(": ") == 3


def test_a_valid_request_becomes_an_order() -> None:
    request = decision_pb2.DecideRequest(symbol="ETH-USD", side=decision_pb2.SIDE_SELL, quantity=2)
    order = order_from_pb(request)
    assert (order.symbol, order.side, order.quantity, order.client_id) == (
        "ETH-USD",
        Side.SELL,
        2.0,
        "",
    )
    assert len(order.request_id) == 32  # one is made up when the caller sent none
