"""The canonical market event: what every source (generator, recording, Kafka) turns into.

Times are the exchange's event times in microseconds since the epoch; ``sequence`` is
the source's order (the exchange sequence, or the generator's counter), strictly
increasing per symbol within a ``session``. A session is one run of a feed that numbers
its events afresh: the replayer or generator started again, a recording replayed again,
an exchange connection that resets its sequence. A feed that starts over takes a session
greater than the last (the replayer: its start time in µs since the epoch); 0 is the
session of a feed that never starts over. Events order by (session, sequence). Prices
and sizes are floats; a book change of size 0 removes the level.
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
    session: int = 0


@dataclass(frozen=True, slots=True)
class BookDelta:
    """Level changes: each sets a price level's size; size 0 removes the level."""

    symbol: str
    exchange_time_us: int
    sequence: int
    changes: tuple[tuple[BookSide, float, float], ...]  # (side, price, new size)
    session: int = 0


@dataclass(frozen=True, slots=True)
class Trade:
    symbol: str
    exchange_time_us: int
    sequence: int
    price: float
    size: float
    aggressor: Aggressor
    session: int = 0


MarketEvent = BookSnapshot | BookDelta | Trade
