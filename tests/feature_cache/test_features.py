"""Feature definitions on hand-built books, re-delivery, and checkpoint round trips."""

from __future__ import annotations

import dataclasses
import json
import math
from itertools import pairwise

import pytest

from feature_cache.events import (
    Aggressor,
    BookDelta,
    BookSide,
    BookSnapshot,
    MarketEvent,
    Trade,
)
from feature_cache.features import Applied, SymbolState, compute_offline
from feature_cache.generator import MarketGenerator
from feature_cache.schema import FEATURE_INDEX, FEATURE_NAMES
from feature_cache.windows import RESUM_EVERY

SYM = "TEST-USD"
T0 = 1_700_000_000_000_000
S = 1_000_000  # one second in µs
BID, ASK = BookSide.BID, BookSide.ASK


def snapshot(seq: int, t: int, bids, asks) -> BookSnapshot:
    return BookSnapshot(SYM, t, seq, tuple(bids), tuple(asks))


def delta(seq: int, t: int, *changes: tuple[BookSide, float, float]) -> BookDelta:
    return BookDelta(SYM, t, seq, changes)


def trade(seq: int, t: int, size: float, aggressor: Aggressor, price: float = 100.0) -> Trade:
    return Trade(SYM, t, seq, price, size, aggressor)


def fed(*events: MarketEvent) -> SymbolState:
    state = SymbolState()
    for event in events:
        state.apply(event)
    return state


def values(state: SymbolState) -> dict[str, float]:
    got = state.features()
    assert got is not None
    assert len(got) == len(FEATURE_NAMES)
    return dict(zip(FEATURE_NAMES, got, strict=True))


def bits(features: tuple[float, ...] | None) -> list[str] | None:
    """Exact float bits: ``==`` would let 0.0 and -0.0 pass as equal."""
    return None if features is None else [v.hex() for v in features]


# Six levels a side, listed out of order; the sixth is outside the top five.
BIDS = [(97.0, 1.0), (100.0, 2.0), (99.0, 1.0), (95.0, 100.0), (98.0, 1.0), (96.0, 1.0)]
ASKS = [(106.0, 50.0), (101.0, 1.0), (102.0, 1.0), (103.0, 1.0), (104.0, 1.0), (105.0, 4.0)]


def test_spread_and_imbalances_on_a_small_book():
    f = values(fed(snapshot(1, T0, BIDS, ASKS)))
    assert f["spread_bps"] == pytest.approx(1.0 / 100.5 * 1e4, rel=1e-12)
    assert f["imbalance_l1"] == pytest.approx((2.0 - 1.0) / 3.0, rel=1e-12)
    # Top five: bids 2+1+1+1+1 = 6, asks 1+1+1+1+4 = 8; the 100 and 50 deeper are left out.
    assert f["imbalance_l5"] == pytest.approx((6.0 - 8.0) / 14.0, rel=1e-12)
    # One book, no history: nothing moved, nothing traded.
    for name in FEATURE_NAMES[3:]:
        assert f[name] == 0.0, name


def test_one_sided_or_empty_book_has_no_features():
    assert SymbolState().features() is None
    assert fed(snapshot(1, T0, BIDS, [])).features() is None
    state = fed(snapshot(1, T0, [(100.0, 1.0)], [(101.0, 1.0)]))
    assert state.features() is not None
    state.apply(delta(2, T0 + 1, (ASK, 101.0, 0.0)))
    assert state.features() is None
    assert state.mid is None


def test_removing_the_best_bid_moves_the_touch():
    state = fed(snapshot(1, T0, BIDS, ASKS))
    state.apply(delta(2, T0 + 1, (BID, 100.0, 0.0)))
    f = values(state)
    assert state.mid == 100.0  # (99 + 101) / 2
    assert f["spread_bps"] == pytest.approx(2.0 / 100.0 * 1e4, rel=1e-12)
    assert f["imbalance_l1"] == 0.0  # 1 against 1
    # OFI: the bid price fell, so the whole old best bid (2) left: e = -2, depth now 1.
    assert f["ofi_1s"] == pytest.approx(-2.0)


def test_order_flow_imbalance_over_its_windows():
    state = fed(
        snapshot(1, T0, [(100.0, 2.0)], [(101.0, 2.0)]),
        delta(2, T0 + 100_000, (BID, 100.0, 5.0)),  # same bid price, +3: e = 5 - 2 = +3
        delta(3, T0 + 200_000, (ASK, 100.5, 2.0)),  # better ask of 2: e = -2
    )
    depth = (5.0 + 2.0) / 2.0
    f = values(state)
    assert f["ofi_1s"] == pytest.approx(1.0 / depth)
    assert f["ofi_5s"] == pytest.approx(1.0 / depth)
    # A trade advances the clock: at 1.15 s the +3 at 0.1 s is out of the 1 s window.
    state.apply(trade(4, T0 + 1_150_000, 0.1, Aggressor.BUY))
    f = values(state)
    assert f["ofi_1s"] == pytest.approx(-2.0 / depth)
    assert f["ofi_5s"] == pytest.approx(1.0 / depth)
    # An ask that recedes with its old size adds +qa_old, a bid that rises adds +qb.
    state.apply(delta(5, T0 + 1_200_000, (ASK, 100.5, 0.0), (BID, 100.2, 1.0)))
    depth = (1.0 + 2.0) / 2.0  # now 100.2 x 1 against 101 x 2
    assert values(state)["ofi_5s"] == pytest.approx((3.0 - 2.0 + 2.0 + 1.0) / depth)


def test_mid_returns_and_realized_volatility():
    state = fed(
        snapshot(1, T0, [(100.0, 1.0)], [(102.0, 1.0)]),  # mid 101
        delta(2, T0 + S // 2, (ASK, 101.0, 1.0), (ASK, 102.0, 0.0)),  # mid 100.5
        delta(3, T0 + 3 * S, (BID, 100.5, 1.0)),  # mid 100.75
    )
    r1, r2 = math.log(100.5 / 101.0), math.log(100.75 / 100.5)
    f = values(state)
    assert f["mid_return_1s_bps"] == pytest.approx((100.75 / 100.5 - 1.0) * 1e4)  # mid at 2 s
    assert f["mid_return_5s_bps"] == pytest.approx((100.75 / 101.0 - 1.0) * 1e4)  # the oldest
    both = math.sqrt(r1 * r1 + r2 * r2) * 1e4
    assert f["realized_vol_5s_bps"] == pytest.approx(both)
    assert f["realized_vol_30s_bps"] == pytest.approx(both)

    state.apply(trade(4, T0 + 6 * S, 1.0, Aggressor.SELL))  # only the clock moves
    f = values(state)
    assert f["mid_return_1s_bps"] == 0.0  # the mid at 5 s is today's
    assert f["mid_return_5s_bps"] == pytest.approx((100.75 / 100.5 - 1.0) * 1e4)  # mid at 1 s
    assert f["realized_vol_5s_bps"] == pytest.approx(abs(r2) * 1e4)  # r1 at 0.5 s is out
    assert f["realized_vol_30s_bps"] == pytest.approx(both)


def test_trade_intensity_and_signed_volume():
    state = fed(
        snapshot(1, T0, [(100.0, 2.0)], [(101.0, 1.0)]),  # depth (2 + 1) / 2 = 1.5
        trade(2, T0 + 1 * S, 2.0, Aggressor.BUY),
        trade(3, T0 + 2 * S, 0.5, Aggressor.SELL),
        trade(4, T0 + 4 * S, 1.0, Aggressor.BUY),
    )
    f = values(state)
    assert f["trade_intensity_5s"] == pytest.approx(3 / 5)
    assert f["signed_volume_5s"] == pytest.approx((2.0 - 0.5 + 1.0) / 1.5)
    state.apply(trade(5, T0 + 6_500_000, 1.0, Aggressor.SELL))  # the trade at 1 s leaves
    f = values(state)
    assert f["trade_intensity_5s"] == pytest.approx(3 / 5)
    assert f["signed_volume_5s"] == pytest.approx((-0.5 + 1.0 - 1.0) / 1.5)
    # Exactly 5 s after the last trade it is out: windows hold time > now - 5 s.
    state.apply(trade(6, T0 + 11_500_000, 1.0, Aggressor.BUY))
    assert values(state)["trade_intensity_5s"] == pytest.approx(1 / 5)


def test_an_emptied_window_sums_to_exactly_zero():
    state = fed(
        snapshot(1, T0, [(100.0, 1.0)], [(101.0, 1.0)]),
        trade(2, T0, 0.1, Aggressor.BUY),
        trade(3, T0, 0.2, Aggressor.BUY),
        trade(4, T0, 0.3, Aggressor.BUY),
        delta(5, T0, (BID, 100.0, 1.1)),
        delta(6, T0, (BID, 100.0, 1.3)),
        delta(7, T0, (BID, 100.0, 1.6)),
    )
    assert values(state)["signed_volume_5s"] == pytest.approx(0.6 / 1.3)
    state.apply(delta(8, T0 + 6 * S, (BID, 99.0, 1.0)))  # behind the touch: no OFI
    f = values(state)
    # Running sums of 0.1 + 0.2 + 0.3 less the same would leave a rounding residue.
    assert (f["signed_volume_5s"], f["ofi_1s"], f["ofi_5s"]) == (0.0, 0.0, 0.0)


def test_redelivered_events_change_nothing():
    events: list[MarketEvent] = [
        snapshot(10, T0, BIDS, ASKS),
        delta(11, T0 + 1000, (BID, 100.0, 7.0)),
        trade(12, T0 + 2000, 1.0, Aggressor.BUY),
        delta(13, T0 + 3000, (ASK, 101.0, 0.0)),
    ]
    state = fed(*events)
    before, doc = bits(state.features()), json.dumps(state.to_checkpoint())
    for event in (*events, snapshot(5, T0 + 9 * S, [(1.0, 1.0)], [(2.0, 1.0)])):
        state.apply(event)  # all at or below sequence 13, one far in the future
    assert bits(state.features()) == before
    assert json.dumps(state.to_checkpoint()) == doc
    assert (state.last_sequence, state.last_event_time_us) == (13, T0 + 3000)


def in_session(session: int, events: list[MarketEvent]) -> list[MarketEvent]:
    return [dataclasses.replace(event, session=session) for event in events]


def test_a_feed_that_starts_over_is_followed_from_its_snapshot():
    """A replayer started again numbers its events from 1 again, in a later session: the
    state starts afresh, as a new symbol's, and its features are the new run's alone."""
    first = in_session(1, [
        snapshot(1, T0, BIDS, ASKS),
        delta(2, T0 + S, (BID, 100.0, 7.0)),
        trade(3, T0 + 2 * S, 1.0, Aggressor.BUY),
    ])  # fmt: skip
    again = in_session(2, [
        snapshot(1, T0 + 60 * S, [(50.0, 1.0)], [(51.0, 3.0)]),
        trade(2, T0 + 61 * S, 2.0, Aggressor.SELL, price=50.0),
    ])  # fmt: skip
    state = fed(*first)
    assert [state.apply(event) for event in again] == [Applied.RESTARTED, Applied.APPLIED]
    assert bits(state.features()) == bits(fed(*again).features())
    assert (state.session, state.last_sequence) == (2, 2)
    # The first run's events, re-delivered now, are an earlier session's: ignored.
    doc = json.dumps(state.to_checkpoint())
    assert {state.apply(event) for event in first} == {Applied.OLD_SESSION}
    assert json.dumps(state.to_checkpoint()) == doc


def test_within_a_session_a_re_delivery_is_still_ignored():
    events = in_session(7, [snapshot(1, T0, BIDS, ASKS), delta(2, T0 + 1000, (BID, 100.0, 7.0))])
    state = fed(*events)
    assert {state.apply(event) for event in events} == {Applied.DUPLICATE}
    assert Applied.DUPLICATE.ignored and Applied.OLD_SESSION.ignored
    assert not (Applied.APPLIED.ignored or Applied.RESTARTED.ignored)


def test_checkpoint_keeps_the_session_and_reads_one_written_without_it():
    state = fed(*in_session(5, [snapshot(1, T0, BIDS, ASKS)]))
    restored = SymbolState.from_checkpoint(json.loads(json.dumps(state.to_checkpoint())))
    assert restored.session == 5
    assert restored.apply(snapshot(1, T0 + S, BIDS, ASKS)) is Applied.OLD_SESSION
    older = {k: v for k, v in state.to_checkpoint().items() if k != "session"}
    assert SymbolState.from_checkpoint(older).session == 0


def test_an_event_stamped_in_the_past_does_not_rewind_the_clock():
    state = fed(snapshot(1, T0 + 5 * S, [(100.0, 1.0)], [(101.0, 1.0)]))
    state.apply(trade(2, T0, 1.0, Aggressor.BUY))  # later sequence, earlier stamp
    assert state.last_event_time_us == T0 + 5 * S
    assert values(state)["trade_intensity_5s"] == pytest.approx(1 / 5)


def generated(count: int, seed: int = 3) -> list[MarketEvent]:
    gen = MarketGenerator(["AAA-USD", "BBB-USD"], seed=seed, start_time_us=T0)
    return list(gen.events(count))


def test_checkpoint_round_trip_gives_bit_identical_features():
    events = generated(12_000)
    head, tail = events[:6_000], events[6_000:]
    uninterrupted: dict[str, SymbolState] = {}
    for event in head:
        uninterrupted.setdefault(event.symbol, SymbolState()).apply(event)
    restored = {
        symbol: SymbolState.from_checkpoint(json.loads(json.dumps(state.to_checkpoint())))
        for symbol, state in uninterrupted.items()
    }
    for symbol in uninterrupted:
        assert bits(restored[symbol].features()) == bits(uninterrupted[symbol].features())
    compared = 0
    for i, event in enumerate(tail):
        uninterrupted[event.symbol].apply(event)
        restored[event.symbol].apply(event)
        if i % 97 == 0:
            a, b = uninterrupted[event.symbol].features(), restored[event.symbol].features()
            assert a is not None
            assert bits(a) == bits(b)
            compared += 1
    assert compared > 50
    for symbol, state in uninterrupted.items():
        assert state.to_checkpoint() == restored[symbol].to_checkpoint()


def test_checkpoint_rejects_what_it_did_not_write():
    doc = fed(
        snapshot(1, T0, BIDS, ASKS),
        delta(2, T0 + 1000, (BID, 100.0, 7.0)),
        trade(3, T0 + 2000, 1.0, Aggressor.BUY),
    ).to_checkpoint()
    SymbolState.from_checkpoint(doc)  # the document itself is fine
    with pytest.raises(ValueError, match="format"):
        SymbolState.from_checkpoint({**doc, "format": 99})
    with pytest.raises(ValueError, match="format"):
        SymbolState.from_checkpoint({**doc, "format": 1})  # the old layout is not read
    with pytest.raises(ValueError, match="malformed"):
        SymbolState.from_checkpoint({k: v for k, v in doc.items() if k != "bids"})

    def with_window(name: str, **changes: object) -> dict[str, object]:
        windows = {**doc["windows"], name: {**doc["windows"][name], **changes}}
        return {**doc, "windows": windows}

    bad = [
        {**doc, "bids": "not base64!"},
        {**doc, "asks": doc["asks"][:-4]},  # a cut float array
        with_window("ofi", values=""),  # no value for its one time
        with_window("ofi", lengths=[3]),  # a shorter window longer than the longer one
        with_window("ofi", lengths=[]),
        with_window("trades", sums=[]),
        with_window("trades", sums=[[1.0, RESUM_EVERY]]),
        with_window("trades", time_gaps=None),
    ]
    for malformed in bad:
        with pytest.raises(ValueError, match="malformed"):
            SymbolState.from_checkpoint(malformed)


def test_features_do_not_depend_on_when_they_are_read():
    # Reading prunes the windows early; the running sums must come out bit for bit the
    # same as in a state read rarely (long enough for the 1 s and 5 s sums to re-sum).
    events = generated(20_000, seed=11)
    eager: dict[str, SymbolState] = {}
    rare: dict[str, SymbolState] = {}
    compared = 0
    for i, event in enumerate(events):
        if event.symbol not in eager:
            eager[event.symbol], rare[event.symbol] = SymbolState(), SymbolState()
        a, b = eager[event.symbol], rare[event.symbol]
        a.apply(event)
        b.apply(event)
        got = a.features()
        if i % 613 == 0:
            assert bits(b.features()) == bits(got)
            compared += 1
    assert compared > 30
    for symbol, state in eager.items():
        assert bits(state.features()) == bits(rare[symbol].features())


def test_a_re_sum_falls_on_the_same_removal_however_pruning_is_batched():
    # RESUM_EVERY + 4 trades 1 ms apart; a book event steps the clock to where the first
    # RESUM_EVERY have expired, and a last trade expires two more. Read at the step, the
    # trade window drops RESUM_EVERY and re-sums, then drops two at the last trade;
    # unread, it drops all RESUM_EVERY + 2 at once. The re-sum must fall on the same one.
    book = snapshot(1, T0, [(100.0, 1.0)], [(101.0, 1.0)])
    # A large first survivor makes a re-sum before or after its removal round differently.
    sizes = [1e8 / 3 if i == RESUM_EVERY else 0.1 + i / 7e3 for i in range(RESUM_EVERY + 4)]
    trades = [
        trade(2 + i, T0 + 1000 * i, size, Aggressor.BUY if i % 3 else Aggressor.SELL)
        for i, size in enumerate(sizes)
    ]
    seq = 2 + len(trades)
    step = delta(seq, T0 + 5 * S + 1000 * (RESUM_EVERY - 1), (BID, 100.0, 2.0))
    last = trade(seq + 1, T0 + 5 * S + 1000 * (RESUM_EVERY + 1), 1.0, Aggressor.BUY)
    read, unread = fed(book, *trades, step), fed(book, *trades, step)
    read.features()
    window = read._trades
    assert (window.total, window.removals) == (math.fsum(window.values), 0)  # re-summed
    read.apply(last)
    unread.apply(last)
    assert values(unread)["trade_intensity_5s"] == pytest.approx(3 / 5)  # two old, one new
    assert bits(read.features()) == bits(unread.features())


SUMMED = ("_ofi_1s", "_ofi_5s", "_sq_ret_5s", "_sq_ret_30s", "_trades")


def exact_features(state: SymbolState) -> tuple[float, ...] | None:
    """``features()`` from a copy whose running sums are replaced by exact sums."""
    copy = SymbolState.from_checkpoint(state.to_checkpoint())
    copy.features()  # prunes: the sums below are over what the windows then hold
    for name in SUMMED:
        window = getattr(copy, name)
        window.total = math.fsum(window.values)
    return copy.features()


def test_running_sums_stay_near_exact_and_restore_bit_identically():
    # 100,000 events per symbol: every window's sum is re-summed many times (every
    # RESUM_EVERY removals), and a checkpoint is taken between re-sums.
    gen = MarketGenerator(["AAA-USD", "BBB-USD"], seed=7, start_time_us=T0)
    states: dict[str, SymbolState] = {}
    restored: dict[str, SymbolState] = {}
    removals: dict[tuple[str, str], list[int]] = {}
    checked = 0
    for i, event in enumerate(gen.events(200_000)):
        state = states.get(event.symbol)
        if state is None:
            state = states[event.symbol] = SymbolState()
        state.apply(event)
        if restored:
            restored[event.symbol].apply(event)
        if i == 100_000:
            restored = {
                symbol: SymbolState.from_checkpoint(json.loads(json.dumps(s.to_checkpoint())))
                for symbol, s in states.items()
            }
        if i % 1009 != 0:
            continue
        got = state.features()
        assert got is not None
        assert got == pytest.approx(exact_features(state), rel=1e-9, abs=1e-12)
        for name in SUMMED:
            window = getattr(state, name)
            mass = math.fsum(abs(v) for v in window.values)
            assert abs(window.total - math.fsum(window.values)) <= 1e-11 * mass, name
            removals.setdefault((event.symbol, name), []).append(window.removals)
        if restored:
            assert bits(restored[event.symbol].features()) == bits(got)
        checked += 1
    assert checked > 150
    assert len(removals) == 2 * len(SUMMED)
    for key, counts in removals.items():  # each counter went back: re-sums happened
        assert any(later < earlier for earlier, later in pairwise(counts)), key
    for symbol, state in states.items():
        assert state.to_checkpoint() == restored[symbol].to_checkpoint()


def test_compute_offline_is_the_per_symbol_fold():
    events = generated(3_000, seed=5)
    offline = compute_offline(events)
    assert set(offline) == {"AAA-USD", "BBB-USD"}
    for symbol, got in offline.items():
        state = fed(*(e for e in events if e.symbol == symbol))
        assert bits(got) == bits(state.features())
        assert got is not None
        assert got[FEATURE_INDEX["spread_bps"]] > 0.0
        assert got[FEATURE_INDEX["trade_intensity_5s"]] > 0.0
    one_sided = BookSnapshot("ONE", T0, 1, ((1.0, 1.0),), ())
    assert compute_offline([one_sided]) == {"ONE": None}
