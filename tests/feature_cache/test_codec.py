"""MarketEvent <-> protobuf (pure logic)."""

from __future__ import annotations

import pytest

from feature_cache.codec import MalformedMessage, decode, encode
from feature_cache.events import Aggressor, BookDelta, BookSide, BookSnapshot, Trade
from proto.marketdata.v1 import marketdata_pb2 as pb

T0 = 1_700_000_000_000_000
EVENTS = [
    BookSnapshot("BTC-USD", T0 + 1, 1, ((100.0, 2.0), (99.5, 1.0)), ((100.5, 3.0),)),
    BookDelta("BTC-USD", T0 + 2, 2, ((BookSide.BID, 100.0, 0.0), (BookSide.ASK, 100.25, 4.0))),
    Trade("BTC-USD", T0 + 3, 3, 100.25, 0.5, Aggressor.BUY),
]


@pytest.mark.parametrize("event", EVENTS)
def test_round_trip(event):
    assert decode(encode(event)) == event


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty message"),
        (b"\x0a\xffgarbage", "not a marketdata.v1.MarketEvent"),
        (pb.MarketEvent(exchange_time_us=1, sequence=1).SerializeToString(), "no symbol"),
        (pb.MarketEvent(symbol="X", sequence=1).SerializeToString(), "no exchange time"),
        (pb.MarketEvent(symbol="X", exchange_time_us=1).SerializeToString(), "no event"),
        (
            pb.MarketEvent(
                symbol="X",
                exchange_time_us=1,
                trade=pb.Trade(price=-1, size=1, aggressor=pb.AGGRESSOR_BUY),
            ).SerializeToString(),
            "bad price level",
        ),
        (
            pb.MarketEvent(
                symbol="X", exchange_time_us=1, trade=pb.Trade(price=1, size=1)
            ).SerializeToString(),
            "unknown aggressor",
        ),
        (
            pb.MarketEvent(
                symbol="X",
                exchange_time_us=1,
                delta=pb.BookDelta(changes=[pb.LevelChange(price=1, size=1)]),
            ).SerializeToString(),
            "unknown book side",
        ),
    ],
)
def test_malformed_values_say_why(value, reason):
    with pytest.raises(MalformedMessage, match=reason):
        decode(value)
