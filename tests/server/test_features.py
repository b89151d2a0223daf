"""``FeatureSource`` with a feature mirror (pure logic, over fakes of the store and the
mirror): the mirror answers while it can, Redis otherwise, and the result is the same."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import pytest

from core.deadline import Budget
from core.domain import OrderRequest, Side
from core.store_reads import StoreReads
from feature_cache.mirror import FeatureMirror
from feature_cache.store import FeatureReader, FeatureRecord
from server.features import FeatureSource
from tests.server.test_engine import FakeFeatureStore, record

pytestmark = pytest.mark.timed  # budgets of a few ms, spent while the test runs


class FakeMirror:
    def __init__(self, records: dict[str, FeatureRecord] | None) -> None:
        self.records = records  # None: not live

    def lookup(self, symbols: Sequence[str]) -> list[FeatureRecord | None] | None:
        if self.records is None:
            return None
        return [self.records.get(symbol) for symbol in symbols]


def order(symbol: str) -> OrderRequest:
    return OrderRequest(request_id="r1", symbol=symbol, side=Side.BUY, quantity=1.0)


def source(store: FakeFeatureStore, mirror: FakeMirror) -> FeatureSource:
    return FeatureSource(
        cast(FeatureReader, store),
        StoreReads(cap_ms=10.0, max_abandoned=4),
        max_age_ms=1000.0,
        mirror=cast(FeatureMirror, mirror),
    )


async def test_a_live_mirror_answers_without_a_store_read() -> None:
    btc = record("BTC-USD")
    store = FakeFeatureStore({"BTC-USD": btc})
    features = source(store, FakeMirror({"BTC-USD": btc}))
    read = await features.read([order("BTC-USD"), order("ETH-USD")], Budget(40.0))
    assert read.snapshots[0].values == list(btc.values)
    assert read.snapshots[1].reason == "no features for ETH-USD"
    assert store.reads == []
    assert (features.mirror_reads, features.store_reads) == (1, 0)


async def test_a_mirror_that_cannot_answer_hands_the_call_to_the_store() -> None:
    btc = record("BTC-USD")
    store = FakeFeatureStore({"BTC-USD": btc})
    features = source(store, FakeMirror(None))
    read = await features.read([order("BTC-USD")], Budget(40.0))
    assert read.snapshots[0].values == list(btc.values)
    assert store.reads == [["BTC-USD"]]
    assert (features.mirror_reads, features.store_reads) == (0, 1)
