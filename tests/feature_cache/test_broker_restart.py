"""The consumer across a restart of the broker itself, under replay (localkafka is
durable: records and committed offsets survive it)."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.processes import free_port, listening
from feature_cache.consumer import FeatureConsumer
from feature_cache.generator import MarketGenerator
from feature_cache.replay import Progress, replay
from feature_cache.settings import KafkaSettings
from feature_cache.store import FeatureReader
from localstack.kafka_broker import create_topics, kafka_broker
from tests.feature_cache.conftest import PARTITIONS, wait_for_features
from tests.feature_cache.test_consumer import SYMBOLS

EVENTS = 6000
EVENTS_PER_S = 1500  # the replay takes about 4 s: the restart falls in its middle

pytestmark = [pytest.mark.integration, pytest.mark.timed]


async def test_consumer_resumes_from_committed_offsets_after_a_broker_restart_under_replay(
    redis_client, key_prefix, tmp_path
):
    port = free_port()
    broker = kafka_broker(port, tmp_path / "kafka")
    broker.start()
    try:
        await asyncio.to_thread(broker.wait_ready, listening(port), 20.0)
        settings = KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{port}",
            topic="md-restart",
            group_id="g-restart",
        )
        await create_topics(
            settings.bootstrap_servers, {settings.topic: PARTITIONS, settings.dead_letter_topic: 1}
        )
        generator = MarketGenerator(
            SYMBOLS, seed=5, start_time_us=1_700_000_000_000_000, events_per_second=EVENTS_PER_S
        )
        events = list(generator.events(EVENTS))
        reader = FeatureReader(redis_client, key_prefix=key_prefix)
        consumer = FeatureConsumer(
            settings, redis_client, key_prefix=key_prefix, max_batch=200, checkpoint_interval_s=0.2
        )
        await consumer.start()
    except BaseException:
        broker.stop()
        raise
    try:
        replaying = asyncio.create_task(
            replay(
                events,
                bootstrap=settings.bootstrap_servers,
                topic=settings.topic,
                speed=1.0,
                progress=Progress(len(events)),
            )
        )
        deadline = time.monotonic() + 30
        while consumer.stats.events < 1000:
            assert time.monotonic() < deadline, consumer.stats
            await asyncio.sleep(0.05)
        assert not replaying.done(), "the replay ended before the restart: too fast"
        await asyncio.to_thread(broker.stop)  # SIGTERM: flushes and exits
        stopped_at = consumer.stats.events
        await asyncio.sleep(1.0)
        broker.start()
        await asyncio.to_thread(broker.wait_ready, listening(port), 20.0)

        await asyncio.wait_for(replaying, 60)
        # Every event reached Redis's features: nothing lost across the restart, and
        # nothing consumed twice moved a symbol's features back (they equal the offline
        # features of the whole stream).
        await wait_for_features(reader, events, timeout_s=60)
        assert stopped_at < len(events)
        assert consumer.stats.events >= len(events)
    finally:
        await consumer.stop()
        broker.stop()
