"""Per-symbol microstructure features: the one implementation of ``FEATURE_NAMES``.

A ``SymbolState`` folds one symbol's ``MarketEvent`` stream into its book and rolling
windows on exchange event time; ``features()`` reads the vector in schema order. The
consumer, the training pipeline and the tests all use this module. A value depends on the
events applied alone, never on when ``features()`` was called, and a state restored from
``to_checkpoint()`` gives bit-identical features (running sums: ``feature_cache.windows``).
Definitions: docs/market-data.md#features
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from typing import Any

from sortedcontainers import SortedDict

from feature_cache.checkpoint_format import (
    CHECKPOINT_FORMAT,
    load_book,
    load_window_group,
    pack_book,
    pack_window_group,
)
from feature_cache.events import Aggressor, BookDelta, BookSide, BookSnapshot, MarketEvent, Trade
from feature_cache.windows import AsOfWindow, SumWindow

_SECOND_US = 1_000_000
_BPS = 1e4
_TOP_LEVELS = 5
_TRADE_WINDOW_S = 5

_Touch = tuple[float, float, float, float]  # (bid price, bid size, ask price, ask size)


class Applied(enum.Enum):
    """What ``SymbolState.apply`` did with an event."""

    APPLIED = "applied"
    RESTARTED = "restarted"  # the first event of a later session: the state started afresh
    DUPLICATE = "duplicate"  # ignored: its session's sequence had passed it (a re-delivery)
    OLD_SESSION = "old_session"  # ignored: an earlier session's, after a later one began

    @property
    def ignored(self) -> bool:
        return self in (Applied.DUPLICATE, Applied.OLD_SESSION)


class SymbolState:
    """One symbol's book and rolling windows (features: docs/market-data.md#features).

    Not thread-safe. ``apply`` orders events by (``session``, ``sequence``): within a
    session it ignores an event whose sequence is not above ``last_sequence``, so a
    re-delivered event never moves the state back; an event of a later session (a feed
    that started over) starts the state afresh, book and windows, as a new symbol's; an
    event of an earlier session is ignored.
    """

    __slots__ = (
        "_asks",
        "_bids",
        "_last_mid",
        "_mid_1s",
        "_mid_5s",
        "_ofi_1s",
        "_ofi_5s",
        "_sq_ret_5s",
        "_sq_ret_30s",
        "_touch",
        "_trades",
        "last_event_time_us",
        "last_sequence",
        "session",
    )

    def __init__(self, session: int = 0) -> None:
        self._bids: SortedDict[float, float] = SortedDict()
        self._asks: SortedDict[float, float] = SortedDict()
        self._touch: _Touch | None = None
        self._last_mid: float | None = None  # last two-sided mid, for the next return
        # Each pair takes the same entries at the same times and is pruned at the same
        # times, so the shorter window is always a suffix of the longer one; the
        # checkpoint stores each pair's entries once.
        self._ofi_1s = SumWindow(1 * _SECOND_US)
        self._ofi_5s = SumWindow(5 * _SECOND_US)
        self._sq_ret_5s = SumWindow(5 * _SECOND_US)
        self._sq_ret_30s = SumWindow(30 * _SECOND_US)
        self._mid_1s = AsOfWindow(1 * _SECOND_US)
        self._mid_5s = AsOfWindow(5 * _SECOND_US)
        self._trades = SumWindow(_TRADE_WINDOW_S * _SECOND_US)  # signed sizes
        self.last_event_time_us = 0
        """Latest exchange time applied, in µs since the epoch; 0 before any event."""
        self.last_sequence: int | None = None
        """Sequence of the last applied event; None before any event."""
        self.session = session
        """Session of the events applied (see ``feature_cache.events``)."""

    @property
    def mid(self) -> float | None:
        """The current mid price, or None while the book has no bid or no ask."""
        touch = self._touch
        return None if touch is None else (touch[0] + touch[2]) * 0.5

    def apply(self, event: MarketEvent) -> Applied:
        """Folds one event in, or ignores it (see the class docstring); says which."""
        outcome = Applied.APPLIED
        if event.session != self.session:
            if event.session < self.session:
                return Applied.OLD_SESSION
            self.__init__(event.session)  # type: ignore[misc]  # the feed started over
            outcome = Applied.RESTARTED
        elif self.last_sequence is not None and event.sequence <= self.last_sequence:
            return Applied.DUPLICATE
        self.last_sequence = event.sequence
        now = self.last_event_time_us
        if event.exchange_time_us > now:
            now = self.last_event_time_us = event.exchange_time_us
        # Deltas dominate the feed, so they are tested first.
        if type(event) is BookDelta:
            bids, asks = self._bids, self._asks
            for side, price, size in event.changes:
                book = bids if side is BookSide.BID else asks
                if size > 0.0:
                    book[price] = size
                else:
                    book.pop(price, None)
            self._on_book(now)
        elif type(event) is Trade:
            self._trades.add(now, event.size if event.aggressor is Aggressor.BUY else -event.size)
        elif type(event) is BookSnapshot:
            self._bids = SortedDict((p, s) for p, s in event.bids if s > 0.0)
            self._asks = SortedDict((p, s) for p, s in event.asks if s > 0.0)
            self._on_book(now)
        else:
            raise TypeError(f"not a market event: {type(event).__name__}")
        return outcome

    def _on_book(self, now: int) -> None:
        """After a book change: the OFI contribution and, if the mid moved, its return."""
        bids, asks = self._bids, self._asks
        if not bids or not asks:
            self._touch = None
            return
        pb, qb = bids.peekitem(-1)
        pa, qa = asks.peekitem(0)
        before = self._touch
        self._touch = (pb, qb, pa, qa)
        if before is not None:
            pb0, qb0, pa0, qa0 = before
            e = (
                (qb if pb >= pb0 else 0.0)
                - (qb0 if pb <= pb0 else 0.0)
                - (qa if pa <= pa0 else 0.0)
                + (qa0 if pa >= pa0 else 0.0)
            )
            if e != 0.0:  # zeros add nothing to a sum; skipping them saves memory
                self._ofi_1s.add(now, e)
                self._ofi_5s.add(now, e)
        mid = (pb + pa) * 0.5
        last = self._last_mid
        if last == mid:
            return
        if last is not None and last > 0.0 and mid > 0.0:
            r = math.log(mid / last)
            self._sq_ret_5s.add(now, r * r)
            self._sq_ret_30s.add(now, r * r)
        self._mid_1s.add(now, mid)
        self._mid_5s.add(now, mid)
        self._last_mid = mid

    def features(self) -> tuple[float, ...] | None:
        """The vector in ``FEATURE_NAMES`` order, or None while the book has no bid or no
        ask (or, on a corrupt feed, a mid that is not positive).

        O(1) amortised: drops window entries that have expired as of
        ``last_event_time_us`` (that frees memory and changes no value, now or later)
        and reads the windows' running sums.
        """
        touch = self._touch
        if touch is None:
            return None
        pb, qb, pa, qa = touch
        mid = (pb + pa) * 0.5
        if mid <= 0.0:
            return None
        now = self.last_event_time_us
        ofi_1s, ofi_5s, trades = self._ofi_1s, self._ofi_5s, self._trades
        sq_5s, sq_30s = self._sq_ret_5s, self._sq_ret_30s
        # Pruning here changes no value: it drops the entries the next addition would
        # have dropped first, so the running sums see one order of operations.
        for window in (ofi_1s, ofi_5s, sq_5s, sq_30s, trades, self._mid_1s, self._mid_5s):
            window.prune(now)
        # Sizes of 0 or less remove a level, so depth > 0 here; the guards below only keep
        # a corrupt feed from raising.
        depth = (qb + qa) * 0.5
        bid5 = math.fsum(self._bids.values()[-_TOP_LEVELS:])
        ask5 = math.fsum(self._asks.values()[:_TOP_LEVELS])
        return (
            (pa - pb) / mid * _BPS,
            (qb - qa) / (qb + qa) if qb + qa > 0.0 else 0.0,
            (bid5 - ask5) / (bid5 + ask5) if bid5 + ask5 > 0.0 else 0.0,
            ofi_1s.total / depth if depth > 0.0 else 0.0,
            ofi_5s.total / depth if depth > 0.0 else 0.0,
            _root_bps(sq_5s.total),
            _root_bps(sq_30s.total),
            _return_bps(mid, self._mid_1s),
            _return_bps(mid, self._mid_5s),
            len(trades.times) / _TRADE_WINDOW_S,
            trades.total / depth if depth > 0.0 else 0.0,
        )

    def to_checkpoint(self) -> dict[str, Any]:
        """The whole state as plain JSON types; floats survive ``json`` round trips exactly.

        Books and windows are packed compactly (``feature_cache.checkpoint_format``); each
        pair of windows stores its entries once.
        """
        return {
            "format": CHECKPOINT_FORMAT,
            "session": self.session,
            "last_sequence": self.last_sequence,
            "last_event_time_us": self.last_event_time_us,
            "last_mid": self._last_mid,
            "bids": pack_book(self._bids),
            "asks": pack_book(self._asks),
            "windows": {
                name: pack_window_group([getattr(self, slot) for slot in slots])
                for name, slots in _WINDOW_GROUPS.items()
            },
        }

    @classmethod
    def from_checkpoint(cls, doc: dict[str, Any]) -> SymbolState:
        """The state ``to_checkpoint`` described; ValueError if the document is not one."""
        if doc.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {doc.get('format')!r}")
        state = cls()
        try:
            state.session = int(doc.get("session", 0))  # written since format 2's start
            seq = doc["last_sequence"]
            state.last_sequence = None if seq is None else int(seq)
            state.last_event_time_us = int(doc["last_event_time_us"])
            mid = doc["last_mid"]
            state._last_mid = None if mid is None else float(mid)
            state._bids = load_book(doc["bids"])
            state._asks = load_book(doc["asks"])
            windows = doc["windows"]
            for name, slots in _WINDOW_GROUPS.items():
                load_window_group([getattr(state, slot) for slot in slots], windows[name])
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed checkpoint: {exc!r}") from exc
        # The touch is a function of the book: trades never change it.
        if state._bids and state._asks:
            state._touch = (*state._bids.peekitem(-1), *state._asks.peekitem(0))
        return state


# Checkpoint name -> windows that take the same entries, shortest span first.
_WINDOW_GROUPS = {
    "ofi": ("_ofi_1s", "_ofi_5s"),
    "sq_ret": ("_sq_ret_5s", "_sq_ret_30s"),
    "mid": ("_mid_1s", "_mid_5s"),
    "trades": ("_trades",),
}


def _root_bps(sum_of_squares: float) -> float:
    # A running sum can round a hair below 0 when the window is all but empty.
    return math.sqrt(sum_of_squares) * _BPS if sum_of_squares > 0.0 else 0.0


def _return_bps(mid: float, history: AsOfWindow) -> float:
    then = history.values[0] if history.values else 0.0
    return (mid / then - 1.0) * _BPS if then > 0.0 else 0.0


def compute_offline(events: Iterable[MarketEvent]) -> dict[str, tuple[float, ...] | None]:
    """Each symbol's final features after applying ``events`` to fresh states, in order."""
    states: dict[str, SymbolState] = {}
    for event in events:
        state = states.get(event.symbol)
        if state is None:
            state = states[event.symbol] = SymbolState()
        state.apply(event)
    return {symbol: state.features() for symbol, state in states.items()}


def same_features(
    got: Sequence[float] | None, want: Sequence[float] | None, *, rel_tol: float = 1e-9
) -> bool:
    """Whether two feature vectors agree (both absent, or every value within ``rel_tol``).

    What the consumer wrote to Redis went through JSON; values agree to the last bits,
    the tolerance only absorbs the last-place rounding of a different summation order.
    """
    if got is None or want is None:
        return got is want
    return all(
        math.isclose(g, w, rel_tol=rel_tol, abs_tol=1e-12) for g, w in zip(got, want, strict=True)
    )
