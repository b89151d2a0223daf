"""Feature records in a real redis-server: monotonic writes, one-round-trip reads."""

from __future__ import annotations

import pytest

from feature_cache.schema import FEATURE_NAMES
from feature_cache.store import FeatureReader, FeatureRecord, FeatureWriter, feature_key

pytestmark = pytest.mark.integration


def record(symbol: str, t: int, offset: int, value: float) -> FeatureRecord:
    return FeatureRecord(symbol, (value,) * len(FEATURE_NAMES), t, offset)


async def test_older_records_never_overwrite_newer_ones(redis_client, key_prefix):
    writer = FeatureWriter(redis_client, key_prefix=key_prefix, ttl_s=60)
    reader = FeatureReader(redis_client, key_prefix=key_prefix)

    async def newer(record: FeatureRecord) -> bool:
        return await writer.write_many([record]) == 1

    assert await newer(record("BTC-USD", t=1000, offset=5, value=1.0))
    assert not await newer(record("BTC-USD", t=999, offset=9, value=2.0))  # older time
    assert not await newer(record("BTC-USD", t=1000, offset=5, value=3.0))  # redelivery
    assert await newer(record("BTC-USD", t=1000, offset=6, value=4.0))  # same time, later

    got = await reader.read("BTC-USD")
    assert got is not None
    assert (got.event_time_us, got.source_offset, got.values[0]) == (1000, 6, 4.0)


async def test_batch_read_is_in_symbol_order_with_gaps(redis_client, key_prefix):
    writer = FeatureWriter(redis_client, key_prefix=key_prefix, ttl_s=60)
    reader = FeatureReader(redis_client, key_prefix=key_prefix)
    written = await writer.write_many(
        [record("A", 1, 1, 1.0), record("B", 1, 1, 2.0), record("A", 0, 0, 9.0)]
    )
    assert written == 2
    got = await reader.read_many(["B", "MISSING", "A"])
    assert [r.values[0] if r else None for r in got] == [2.0, None, 1.0]


async def test_records_expire_and_other_schema_versions_read_as_missing(redis_client, key_prefix):
    writer = FeatureWriter(redis_client, key_prefix=key_prefix, ttl_s=60)
    reader = FeatureReader(redis_client, key_prefix=key_prefix)
    await writer.write_many([record("OLD", 1, 1, 1.0)])
    assert 0 < await redis_client.pttl(feature_key(key_prefix, "OLD")) <= 60_000
    await redis_client.hset(feature_key(key_prefix, "OLD"), "p", '{"v":0,"t":2,"o":2,"f":[1]}')
    assert await reader.read("OLD") is None


async def test_an_unreadable_checkpoint_reads_as_none(redis_client, key_prefix):
    from aiokafka import TopicPartition

    from feature_cache.checkpoint import StateCheckpoints

    checkpoints = StateCheckpoints(redis_client, key_prefix=key_prefix)
    tp = TopicPartition("md", 0)
    await redis_client.hset(
        checkpoints.key(tp), mapping={"__offset__": "41", "BTC-USD": '{"format": 1}'}
    )
    assert await checkpoints.load(tp) == (None, {})
