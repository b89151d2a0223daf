"""The canonical market event: what every source (generator, recording, Kafka) turns into.

Times are the exchange's event times in microseconds since the epoch; ``sequence`` is
the source's order (the exchange sequence, or the generator's counter), strictly
increasing per symbol. Prices and sizes are floats; a book change of size 0 removes
the level.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BookSide(enum.Enum):
    BID = "bid"
    ASK = "ask"


class Aggressor(enum.Enum):
    """The side that took liquidity: BUY lifted an ask, SELL hit a bid."""

    BUY = "buy"
    SELL = "sell"


@dataclass(frozen=True, slots=True)
class BookSnapshot:
    """The whole book: replaces whatever was known of the symbol's book."""

    symbol: str
    exchange_time_us: int
    sequence: int
    bids: tuple[tuple[float, float], ...]  # (price, size), any order
    asks: tuple[tuple[float, float], ...]


@dataclass(frozen=True, slots=True)
class BookDelta:
    """Level changes: each sets a price level's size; size 0 removes the level."""

    symbol: str
    exchange_time_us: int
    sequence: int
    changes: tuple[tuple[BookSide, float, float], ...]  # (side, price, new size)


@dataclass(frozen=True, slots=True)
class Trade:
    symbol: str
    exchange_time_us: int
    sequence: int
    price: float
    size: float
    aggressor: Aggressor


MarketEvent = BookSnapshot | BookDelta | Trade
