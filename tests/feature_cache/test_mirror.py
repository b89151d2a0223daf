"""The feature mirror against a real redis-server: loaded at start, kept by the writer's
messages (newer wins), not live while its subscription is lost, loaded again after."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from feature_cache.mirror import FeatureMirror
from feature_cache.schema import FEATURE_NAMES, SCHEMA_VERSION
from feature_cache.store import FeatureRecord, FeatureWriter
from tests.conftest import RedisInstance

pytestmark = pytest.mark.integration


def record(symbol: str, time_us: int, offset: int = 0, value: float = 1.0) -> FeatureRecord:
    return FeatureRecord(symbol, (value,) * len(FEATURE_NAMES), time_us, offset)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture
def writer(redis_client: aioredis.Redis, key_prefix: str) -> FeatureWriter:
    return FeatureWriter(redis_client, key_prefix=key_prefix, ttl_s=60)


@pytest.fixture
async def start_mirror(
    redis_instance: RedisInstance, key_prefix: str
) -> AsyncIterator[Callable[..., object]]:
    mirrors: list[FeatureMirror] = []

    async def _start(max_symbols: int = 100) -> FeatureMirror:
        mirror = FeatureMirror(
            redis_instance.url,
            key_prefix=key_prefix,
            max_symbols=max_symbols,
            connect_timeout_ms=500,
        )
        mirrors.append(mirror)
        await mirror.start()
        await until(lambda: mirror.live)
        return mirror

    try:
        yield _start
    finally:
        for mirror in mirrors:
            await mirror.stop()


async def test_records_written_before_and_after_the_start_are_held(writer, start_mirror) -> None:
    await writer.write_many([record("BTC-USD", 1_000)])
    mirror = await start_mirror()
    assert mirror.lookup(["BTC-USD"]) == [record("BTC-USD", 1_000)]
    await writer.write_many([record("BTC-USD", 2_000, value=2.0), record("ETH-USD", 1_500)])
    await until(lambda: mirror.lookup(["BTC-USD", "ETH-USD"]) == [
        record("BTC-USD", 2_000, value=2.0), record("ETH-USD", 1_500)
    ])  # fmt: skip
    assert mirror.lookup(["SOL-USD"]) == [None]  # live and not full: it has no record
    assert mirror.status().applied == 2


async def test_an_older_record_never_replaces_a_newer_one(
    writer, start_mirror, redis_client, key_prefix
) -> None:
    mirror = await start_mirror()
    await writer.write_many([record("BTC-USD", 2_000, offset=5)])
    await until(lambda: mirror.lookup(["BTC-USD"]) != [None])
    # The writer refuses an older record, so publish one straight to the channel.
    payload = json.dumps({"v": SCHEMA_VERSION, "t": 1000, "o": 9, "f": [7.0] * len(FEATURE_NAMES)})
    await redis_client.publish(f"{key_prefix}features:changed", f"BTC-USD\n{payload}")
    await redis_client.publish(f"{key_prefix}features:changed", "not a record")
    await writer.write_many([record("ETH-USD", 3_000)])  # after both, on the same channel
    await until(lambda: mirror.lookup(["ETH-USD"]) != [None])
    assert mirror.lookup(["BTC-USD"]) == [record("BTC-USD", 2_000, offset=5)]


async def test_a_lost_subscription_hands_reads_to_redis_until_the_mirror_reloads(
    writer, start_mirror, redis_client
) -> None:
    mirror = await start_mirror()
    await writer.write_many([record("BTC-USD", 1_000)])
    await until(lambda: mirror.lookup(["BTC-USD"]) != [None])
    await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    await until(lambda: not mirror.live or mirror.status().losses > 0)
    assert mirror.status().losses == 1
    await writer.write_many([record("BTC-USD", 5_000, value=5.0)])  # perhaps while down
    await until(lambda: mirror.live)
    await until(lambda: mirror.lookup(["BTC-USD"]) == [record("BTC-USD", 5_000, value=5.0)])


async def test_a_full_mirror_sends_symbols_it_does_not_hold_to_redis(writer, start_mirror) -> None:
    await writer.write_many([record("BTC-USD", 1_000), record("ETH-USD", 1_000)])
    mirror = await start_mirror(max_symbols=1)
    assert mirror.status().full
    held = "BTC-USD" if mirror.lookup(["BTC-USD"]) is not None else "ETH-USD"
    other = "ETH-USD" if held == "BTC-USD" else "BTC-USD"
    assert mirror.lookup([held]) == [record(held, 1_000)]
    assert mirror.lookup([other]) is None
    assert mirror.lookup(["SOL-USD"]) is None  # it may be in Redis
