"""Replay time rebasing (pure logic)."""

from __future__ import annotations

from feature_cache.events import Aggressor, Trade
from feature_cache.replay import rebased

EVENTS = [Trade("X", t, i, 1.0, 1.0, Aggressor.BUY) for i, t in enumerate((100, 150, 400), 1)]


def test_paced_replay_starts_now_and_full_speed_replay_ends_now():
    assert [e.exchange_time_us for e in rebased(EVENTS, 1000, end_now=False)] == [1000, 1050, 1300]
    assert [e.exchange_time_us for e in rebased(EVENTS, 1000, end_now=True)] == [700, 750, 1000]
    assert list(rebased([], 1000, end_now=True)) == list(rebased([], 1000, end_now=False)) == []
