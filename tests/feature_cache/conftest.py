"""Topics and consumers of the test's own on the session's broker and redis-server."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from feature_cache.consumer import FeatureConsumer
from feature_cache.events import MarketEvent
from feature_cache.features import compute_offline, same_features
from feature_cache.replay import Progress, replay
from feature_cache.settings import KafkaSettings
from feature_cache.store import FeatureReader
from localstack.kafka_broker import create_topics
from tests.conftest import KafkaInstance

PARTITIONS = 4


@pytest.fixture
async def kafka_settings(kafka_instance: KafkaInstance, key_prefix: str) -> KafkaSettings:
    name = key_prefix.replace(":", "-").strip("-")[:60]
    settings = KafkaSettings(
        bootstrap_servers=kafka_instance.bootstrap,
        topic=f"md-{name}",
        group_id=f"g-{name}",
    )
    await create_topics(
        kafka_instance.bootstrap, {settings.topic: PARTITIONS, settings.dead_letter_topic: 1}
    )
    return settings


@pytest.fixture
async def start_consumer(
    kafka_settings: KafkaSettings, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[Callable[[], Any]]:
    consumers: list[FeatureConsumer] = []

    async def _start() -> FeatureConsumer:
        consumer = FeatureConsumer(
            kafka_settings, redis_client, key_prefix=key_prefix, max_batch=500
        )
        consumers.append(consumer)
        await consumer.start()
        return consumer

    try:
        yield _start
    finally:
        for consumer in consumers:
            await consumer.stop()


def consumer_env(
    kafka_settings: KafkaSettings, redis_url: str, key_prefix: str, **extra: str
) -> dict[str, str]:
    """The environment of a ``python -m feature_cache`` process on the test's topic and
    prefix, its metrics off unless ``extra`` sets them."""
    return {
        **os.environ,
        "DECISION_REDIS__URL": redis_url,
        "DECISION_REDIS__KEY_PREFIX": key_prefix,
        "DECISION_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "DECISION_KAFKA__TOPIC": kafka_settings.topic,
        "DECISION_KAFKA__GROUP_ID": kafka_settings.group_id,
        "DECISION_FEATURE_CACHE__METRICS_PORT": "0",
        **extra,
    }


async def publish(kafka_settings: KafkaSettings, events: Sequence[MarketEvent]) -> None:
    await replay(
        events,
        bootstrap=kafka_settings.bootstrap_servers,
        topic=kafka_settings.topic,
        speed=None,
        progress=Progress(len(events)),
    )


async def wait_for_features(
    reader: FeatureReader, events: Sequence[MarketEvent], timeout_s: float = 30.0
) -> dict[str, tuple[float, ...] | None]:
    """Waits until Redis holds, for every symbol, the features computed offline."""
    want = compute_offline(events)
    deadline = time.monotonic() + timeout_s
    while True:
        records = await reader.read_many(list(want))
        got = {s: (r.values if r else None) for s, r in zip(want, records, strict=True)}
        if all(same_features(got[s], want[s]) for s in want):
            return got
        if time.monotonic() > deadline:
            mismatched = [s for s in want if not same_features(got[s], want[s])]
            raise AssertionError(f"features differ for {mismatched}: {got} != {want}")
        await asyncio.sleep(0.1)


async def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records
