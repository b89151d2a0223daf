"""A seeded multi-symbol L2 market simulator that emits canonical ``MarketEvent``s.

For tests, benchmarks and the local stack when no recording is at hand. The same
arguments always give the same stream (one ``random.Random(seed)``, no global state), and
a symbol is the same instrument (price, tick, trade size) whatever the seed. Event gaps
are exponential, mean 1 / ``events_per_second``, in whole µs, so exchange time never
decreases (a trade and its delta share one time); sequences count from 1 per symbol.
The model: docs/market-data.md#the-generator
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

from feature_cache.events import Aggressor, BookDelta, BookSide, BookSnapshot, MarketEvent, Trade

LEVELS = 12  # quoted per side from the touch
# Ticks this fine keep spreads, returns and volatilities in bps independent of where the
# price sits within its power of ten, so a price that walks for hours does not read as drift.
TICK_BPS_MAX = 0.1  # a symbol's tick: the power of ten in (TICK_BPS_MAX / 10, TICK_BPS_MAX] bp
SNAPSHOT_EVERY = 1000  # events of a symbol between snapshots, as a feed's periodic resync
REGIME_MEAN_S = 15.0  # mean stay in a volatility regime, in exchange time
REGIME_VOL = (0.4, 1.0, 2.8)  # calm, normal, stressed multipliers of the base volatility
MOVE_PROB = 0.3  # share of book events that move the fair price and requote
BASE_SIGMA_BPS = 0.45  # per price move, before regime and GARCH
GARCH_ALPHA, GARCH_BETA = 0.08, 0.90  # on the normalised shock; omega keeps E[factor] = 1
# Trade probability: base + an excitation each trade raises by JUMP and each event of the
# symbol decays by DECAY, capped (a discrete Hawkes process: trades cluster).
HAWKES_BASE, HAWKES_JUMP, HAWKES_DECAY, HAWKES_CAP = 0.05, 0.05, 0.9, 0.6
FLOW_DECAY = 0.9  # per trade
FLOW_TILT = 0.15  # max shift of P(buy) away from 1/2 by the flow
FLOW_DRIFT_BPS = 0.01  # fair-price drift per price move per unit of flow
IMPACT_BPS = 0.5  # permanent impact of one mean-sized trade
SPREAD_PER_SIGMA = 1.5  # extra spread ticks per tick of per-move sigma


def _by_name(name: str, what: str) -> float:
    """A number in [0, 1) fixed by the symbol's name and what it is for: training days and
    the local stack's feed, whatever their seeds, trade the same instruments."""
    digest = hashlib.sha256(f"{what}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class _Symbol:
    """One symbol's latent state and its book (tick -> size)."""

    def __init__(self, name: str) -> None:
        self.name = name
        price = 10 ** (1.0 + 3.5 * _by_name(name, "price"))
        self.decimals = max(0, -math.floor(math.log10(price * TICK_BPS_MAX * 1e-4)))
        self.tick = 10.0**-self.decimals
        self.fair = price / self.tick  # in ticks
        self.sequence = 0
        self.since_snapshot = 0
        self.regime = 1
        self.garch = 1.0
        self.hawkes = 0.0
        self.flow = 0.0
        self.mean_trade = 0.5 + 1.5 * _by_name(name, "trade size")
        self.mean_level = self.mean_trade * 4.0
        self.bids: dict[int, float] = {}
        self.asks: dict[int, float] = {}
        # The touch ticks of the last requote, and whether a trade has since emptied a
        # level: together they bound where the book can differ from a fresh quote.
        self.quoted_bid = self.quoted_ask = 0
        self.bid_holes = self.ask_holes = True

    def sigma_ticks(self) -> float:
        sigma = BASE_SIGMA_BPS * 1e-4 * REGIME_VOL[self.regime] * math.sqrt(self.garch)
        return sigma * self.fair

    def price(self, tick: int) -> float:
        return round(tick * self.tick, self.decimals)

    def next_sequence(self) -> int:
        self.sequence += 1
        self.since_snapshot += 1
        return self.sequence


class MarketGenerator:
    """Interleaved events for ``symbols`` (the model: docs/market-data.md#the-generator)."""

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        seed: int,
        start_time_us: int,
        events_per_second: float = 200.0,
    ) -> None:
        if not symbols or events_per_second <= 0:
            raise ValueError("need at least one symbol and a positive event rate")
        self._rng = random.Random(seed)  # noqa: S311 - a simulation, not secrets
        self._symbols = [_Symbol(name) for name in symbols]
        self._time_us = start_time_us
        self._rate = events_per_second
        self._pending: deque[MarketEvent] = deque()
        for sym in self._symbols:
            self._requote(sym)  # builds the book; its first event is a snapshot
            self._pending.append(self._snapshot(sym))

    def events(self, count: int) -> Iterator[MarketEvent]:
        """The next ``count`` events; a later call continues the same stream."""
        pending = self._pending
        for _ in range(count):
            if not pending:
                self._step()
            yield pending.popleft()

    def _step(self) -> None:
        rng = self._rng
        sym = self._symbols[rng.randrange(len(self._symbols))]
        sym.hawkes *= HAWKES_DECAY
        if sym.since_snapshot >= SNAPSHOT_EVERY:
            kind = "snapshot"
        elif rng.random() < min(HAWKES_CAP, HAWKES_BASE + sym.hawkes):
            kind = "trade"
        else:
            kind = "book"
        # One exponential gap per event emitted (a trade emits two), so the stream runs
        # at events_per_second on average.
        gap_s = rng.expovariate(self._rate)
        if kind == "trade":
            gap_s += rng.expovariate(self._rate)
        self._time_us += int(gap_s * 1e6)
        now = self._time_us
        # Regime switches are a Poisson clock in exchange time, not a per-event coin.
        if rng.random() < -math.expm1(-gap_s * len(self._symbols) / REGIME_MEAN_S):
            sym.regime = rng.randrange(len(REGIME_VOL))
        if kind == "snapshot":
            self._pending.append(self._snapshot(sym))
        elif kind == "trade":
            self._trade(sym, now)
        else:
            self._pending.append(self._book_event(sym, now))

    def _snapshot(self, sym: _Symbol) -> BookSnapshot:
        sym.since_snapshot = 0
        return BookSnapshot(
            symbol=sym.name,
            exchange_time_us=self._time_us,
            sequence=sym.next_sequence(),
            bids=tuple((sym.price(t), s) for t, s in sorted(sym.bids.items(), reverse=True)),
            asks=tuple((sym.price(t), s) for t, s in sorted(sym.asks.items())),
        )

    def _trade(self, sym: _Symbol, now: int) -> None:
        rng = self._rng
        buy = rng.random() < 0.5 + FLOW_TILT * math.tanh(sym.flow)
        side, book = (BookSide.ASK, sym.asks) if buy else (BookSide.BID, sym.bids)
        touch = min(book) if buy else max(book)
        size = round(min(book[touch], rng.expovariate(1.0 / sym.mean_trade)), 6) or 1e-6
        left = round(book[touch] - size, 6)
        if left > 0.0:
            book[touch] = left
        else:
            del book[touch]
            if buy:
                sym.ask_holes = True
            else:
                sym.bid_holes = True
        sign = 1.0 if buy else -1.0
        units = size / sym.mean_trade
        sym.flow = FLOW_DECAY * sym.flow + (1.0 - FLOW_DECAY) * sign * units * 4.0
        sym.fair *= 1.0 + sign * IMPACT_BPS * 1e-4 * REGIME_VOL[sym.regime] * units
        sym.hawkes += HAWKES_JUMP
        price = sym.price(touch)
        aggressor = Aggressor.BUY if buy else Aggressor.SELL
        self._pending.append(Trade(sym.name, now, sym.next_sequence(), price, size, aggressor))
        change = ((side, price, max(left, 0.0)),)
        self._pending.append(BookDelta(sym.name, now, sym.next_sequence(), change))

    def _book_event(self, sym: _Symbol, now: int) -> BookDelta:
        rng = self._rng
        bid_changes: dict[int, float] = {}
        ask_changes: dict[int, float] = {}
        # Most book updates only resize levels; some move the fair price and the quotes.
        if rng.random() < MOVE_PROB:
            sigma = sym.sigma_ticks()
            shock = rng.gauss(0.0, 1.0)
            sym.fair *= math.exp(shock * sigma / sym.fair)
            sym.fair *= 1.0 + FLOW_DRIFT_BPS * 1e-4 * sym.flow
            sym.fair = max(sym.fair, 4.0 * LEVELS)  # prices > 0
            omega = 1.0 - GARCH_ALPHA - GARCH_BETA
            sym.garch = omega + GARCH_ALPHA * shock * shock + GARCH_BETA * sym.garch
            bid_changes, ask_changes = self._requote(sym)
        # One or two limit orders added or cancelled near the quotes; one at a level a
        # trade emptied is a new order there.
        for _ in range(1 + (rng.random() < 0.5)):
            on_bid = rng.random() < 0.5
            book, changes = (sym.bids, bid_changes) if on_bid else (sym.asks, ask_changes)
            depth = min(LEVELS - 1, int(rng.expovariate(0.3)))
            tick = sym.quoted_bid - depth if on_bid else sym.quoted_ask + depth
            size = book.get(tick) or sym.mean_level
            book[tick] = changes[tick] = round(size * rng.lognormvariate(0.0, 0.4), 6) or 1e-6
        price = sym.price
        return BookDelta(
            sym.name,
            now,
            sym.next_sequence(),
            (
                *[(BookSide.BID, price(tick), size) for tick, size in bid_changes.items()],
                *[(BookSide.ASK, price(tick), size) for tick, size in ask_changes.items()],
            ),
        )

    def _requote(self, sym: _Symbol) -> tuple[dict[int, float], dict[int, float]]:
        """Moves the quotes to the fair price, the spread widening with volatility; the
        bid and ask changes (tick -> size, 0 for a removed level)."""
        spread = round(1.0 + SPREAD_PER_SIGMA * sym.sigma_ticks() + self._rng.random() - 0.5)
        best_bid = math.floor(sym.fair - max(1, spread) / 2.0)
        best_ask = best_bid + max(1, spread)
        bids = self._quote_side(sym, sym.bids, sym.quoted_bid, best_bid, -1, sym.bid_holes)
        asks = self._quote_side(sym, sym.asks, sym.quoted_ask, best_ask, 1, sym.ask_holes)
        sym.quoted_bid, sym.quoted_ask = best_bid, best_ask
        sym.bid_holes = sym.ask_holes = False
        return bids, asks

    def _quote_side(
        self, sym: _Symbol, book: dict[int, float], old: int, touch: int, step: int, holes: bool
    ) -> dict[int, float]:
        """One side from touch ``old`` to ``touch`` (``step`` -1 for bids, +1 for asks).

        The book lies within ``LEVELS + 4`` ticks behind the old touch, so only the ticks
        the new touch crossed, or those now beyond the far end, need cancelling; levels
        are filled only if the touch moved or a trade emptied one.
        """
        changes: dict[int, float] = {}
        reach = LEVELS + 4
        doomed: Iterable[int]
        if abs(touch - old) > reach:  # the first quote, or a jump past the whole book
            doomed = list(book)
        elif (touch - old) * step > 0:  # receded: levels between the touches are crossed
            doomed = range(touch - step, old - step, -step)
        else:  # advanced (or stayed): levels beyond the new far end go
            doomed = range(old + step * reach, touch + step * reach, -step)
        for tick in doomed:
            if book.pop(tick, None) is not None:
                changes[tick] = 0.0
        if old != touch or holes:
            expovariate = self._rng.expovariate
            for i in range(LEVELS):
                tick = touch + step * i
                if tick not in book:
                    # Deeper levels hold more on average, as in most order books.
                    mean = sym.mean_level * (1.0 + 0.3 * i)
                    book[tick] = changes[tick] = round(expovariate(1.0 / mean), 6) or 1e-6
        return changes
