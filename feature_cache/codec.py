"""MarketEvent <-> Kafka message value (protobuf ``marketdata.v1.MarketEvent``)."""

from __future__ import annotations

import math

from google.protobuf.message import DecodeError

from feature_cache.events import (
    Aggressor,
    BookDelta,
    BookSide,
    BookSnapshot,
    MarketEvent,
    Trade,
)
from proto.marketdata.v1 import marketdata_pb2 as pb

_SIDE_TO_PB = {BookSide.BID: pb.BOOK_SIDE_BID, BookSide.ASK: pb.BOOK_SIDE_ASK}
_SIDE_FROM_PB = {v: k for k, v in _SIDE_TO_PB.items()}
_AGGRESSOR_TO_PB = {Aggressor.BUY: pb.AGGRESSOR_BUY, Aggressor.SELL: pb.AGGRESSOR_SELL}
_AGGRESSOR_FROM_PB = {v: k for k, v in _AGGRESSOR_TO_PB.items()}


class MalformedMessage(ValueError):
    """A message value that is not a usable MarketEvent; the text says why."""


def encode(event: MarketEvent) -> bytes:
    msg = pb.MarketEvent(
        symbol=event.symbol,
        exchange_time_us=event.exchange_time_us,
        sequence=event.sequence,
        session=event.session,
    )
    if isinstance(event, BookSnapshot):
        msg.snapshot.bids.extend(pb.PriceLevel(price=p, size=s) for p, s in event.bids)
        msg.snapshot.asks.extend(pb.PriceLevel(price=p, size=s) for p, s in event.asks)
    elif isinstance(event, BookDelta):
        msg.delta.changes.extend(
            pb.LevelChange(side=_SIDE_TO_PB[side], price=p, size=s) for side, p, s in event.changes
        )
    else:
        msg.trade.price = event.price
        msg.trade.size = event.size
        msg.trade.aggressor = _AGGRESSOR_TO_PB[event.aggressor]
    return msg.SerializeToString()


def _level(price: float, size: float) -> tuple[float, float]:
    if not (math.isfinite(price) and price > 0 and math.isfinite(size) and size >= 0):
        raise MalformedMessage(f"bad price level ({price}, {size})")
    return price, size


def decode(value: bytes | None) -> MarketEvent:
    """Raises ``MalformedMessage`` for anything but a complete, sane MarketEvent."""
    if not value:
        raise MalformedMessage("empty message")
    try:
        msg = pb.MarketEvent.FromString(value)
    except DecodeError as exc:
        raise MalformedMessage(f"not a marketdata.v1.MarketEvent: {exc}") from None
    if not msg.symbol:
        raise MalformedMessage("no symbol")
    if msg.exchange_time_us <= 0:
        raise MalformedMessage("no exchange time")
    kind = msg.WhichOneof("event")
    if kind == "snapshot":
        return BookSnapshot(
            msg.symbol,
            msg.exchange_time_us,
            msg.sequence,
            tuple(_level(lv.price, lv.size) for lv in msg.snapshot.bids),
            tuple(_level(lv.price, lv.size) for lv in msg.snapshot.asks),
            msg.session,
        )
    if kind == "delta":
        changes = []
        for change in msg.delta.changes:
            side = _SIDE_FROM_PB.get(change.side)
            if side is None:
                raise MalformedMessage(f"unknown book side {change.side}")
            changes.append((side, *_level(change.price, change.size)))
        return BookDelta(
            msg.symbol, msg.exchange_time_us, msg.sequence, tuple(changes), msg.session
        )
    if kind == "trade":
        aggressor = _AGGRESSOR_FROM_PB.get(msg.trade.aggressor)
        if aggressor is None:
            raise MalformedMessage(f"unknown aggressor {msg.trade.aggressor}")
        price, size = _level(msg.trade.price, msg.trade.size)
        return Trade(
            msg.symbol, msg.exchange_time_us, msg.sequence, price, size, aggressor, msg.session
        )
    raise MalformedMessage("no event in the message")
