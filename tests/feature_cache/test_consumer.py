"""The consumer against a real Kafka-protocol broker (localkafka) and a real redis-server."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from confluent_kafka import Producer

from feature_cache.checkpoint import StateCheckpoints
from feature_cache.codec import encode
from feature_cache.generator import MarketGenerator
from feature_cache.store import FeatureReader
from tests.feature_cache.conftest import (
    PARTITIONS,
    consumer_env,
    publish,
    read_all,
    wait_for_features,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ["BTC-USD", "ETH-USD", "SOL-USD", "ADA-USD", "XRP-USD", "DOT-USD"]


def generated(count: int, seed: int = 11):
    return list(
        MarketGenerator(SYMBOLS, seed=seed, start_time_us=1_700_000_000_000_000).events(count)
    )


async def test_replayed_events_become_the_offline_features(
    kafka_settings, start_consumer, redis_client, key_prefix
):
    events = generated(3000)
    await start_consumer()
    await publish(kafka_settings, events)
    await wait_for_features(FeatureReader(redis_client, key_prefix=key_prefix), events)


def publish_with_librdkafka(kafka_settings, events, codec: str) -> None:
    """As a producer outside the project publishes: librdkafka, idempotent (the default of
    the Java clients since Kafka 3.0), compressed, keyed by symbol like ``replay``."""
    producer = Producer(
        {
            "bootstrap.servers": kafka_settings.bootstrap_servers,
            "enable.idempotence": True,
            "compression.type": codec,
            "linger.ms": 5,
        }
    )
    failed = []

    def on_delivery(error, _message) -> None:
        if error is not None:
            failed.append(error)

    for event in events:
        producer.produce(
            kafka_settings.topic,
            key=event.symbol.encode(),
            value=encode(event),
            on_delivery=on_delivery,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert failed == []


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
async def test_market_data_from_librdkafka_becomes_the_same_features(
    kafka_settings, start_consumer, redis_client, key_prefix, codec
):
    events = generated(2000, seed=17)
    await start_consumer()
    await asyncio.to_thread(publish_with_librdkafka, kafka_settings, events, codec)
    await wait_for_features(FeatureReader(redis_client, key_prefix=key_prefix), events)


async def test_records_fetched_before_the_partitions_are_restored_are_not_lost(
    kafka_settings, start_consumer, redis_client, key_prefix, monkeypatch
):
    """aiokafka hands out the assignment before it calls the rebalance listener, so the
    first fetch can return records while the restore still reads the checkpoint: those
    records must be applied after the restore, not dropped by it."""
    events = generated(2000)
    await publish(kafka_settings, events[:1000])
    load = StateCheckpoints.load
    restored = 0

    async def slow_load(self, tp):
        nonlocal restored
        await asyncio.sleep(0.5)  # a busy Redis: the first fetch returns meanwhile
        loaded = await load(self, tp)
        restored += 1
        return loaded

    monkeypatch.setattr(StateCheckpoints, "load", slow_load)
    await start_consumer()
    deadline = time.monotonic() + 30
    while restored < PARTITIONS:
        assert time.monotonic() < deadline, "the partitions were never restored"
        await asyncio.sleep(0.1)
    # Applied to what the restore left: the states of the first half, not empty ones.
    await publish(kafka_settings, events[1000:])
    await wait_for_features(FeatureReader(redis_client, key_prefix=key_prefix), events)


async def test_replaying_the_same_range_again_changes_nothing(
    kafka_settings, start_consumer, redis_client, key_prefix
):
    events = generated(2000)
    reader = FeatureReader(redis_client, key_prefix=key_prefix)
    consumer = await start_consumer()
    await publish(kafka_settings, events)
    await wait_for_features(reader, events)
    before = await reader.read_many(SYMBOLS)

    await publish(kafka_settings, events)
    deadline = time.monotonic() + 30
    while consumer.stats.events + consumer.stats.ignored["duplicate"] < 2 * len(events):
        assert time.monotonic() < deadline, consumer.stats
        await asyncio.sleep(0.1)

    after = await reader.read_many(SYMBOLS)
    assert [(r.values, r.event_time_us) for r in after if r] == [
        (r.values, r.event_time_us) for r in before if r
    ]
    # Counted as ignored re-deliveries, not as applied events.
    assert (consumer.stats.events, consumer.stats.ignored["duplicate"]) == (2000, 2000)


async def test_a_second_consumer_splits_the_partitions_and_features_stay_right(
    kafka_settings, start_consumer, redis_client, key_prefix
):
    events = generated(4000)
    reader = FeatureReader(redis_client, key_prefix=key_prefix)
    first = await start_consumer()
    await publish(kafka_settings, events[:2000])
    await wait_for_features(reader, events[:2000])

    second = await start_consumer()

    def split() -> bool:
        ours, theirs = set(first.states), set(second.states)  # the partitions each restored
        return (
            bool(ours and theirs and ours.isdisjoint(theirs)) and len(ours | theirs) == PARTITIONS
        )

    deadline = time.monotonic() + 30
    while not split():  # during the rebalance the old assignment still shows
        assert time.monotonic() < deadline, (set(first.states), set(second.states))
        await asyncio.sleep(0.1)

    await publish(kafka_settings, events[2000:])
    await wait_for_features(reader, events)
    assert first.stats.events > 0 and second.stats.events > 0


async def test_killed_consumer_resumes_without_loss(
    kafka_settings, redis_instance, redis_client, key_prefix, tmp_path
):
    events = generated(4000)
    reader = FeatureReader(redis_client, key_prefix=key_prefix)
    env = consumer_env(
        kafka_settings,
        redis_instance.url,
        key_prefix,
        DECISION_FEATURE_CACHE__ALIVE_FILE=str(tmp_path / "alive"),
    )

    def alive_within(seconds: float) -> int:
        """The exit status of the container's liveness probe command."""
        argv = [sys.executable, "-m", "feature_cache", "--check-alive", str(seconds)]
        return subprocess.run(argv, cwd=REPO, env=env, check=False).returncode

    def start() -> subprocess.Popen[bytes]:
        log = (tmp_path / "consumer.log").open("ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "feature_cache"], cwd=REPO, env=env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        finally:
            log.close()

    proc = start()
    try:
        await publish(kafka_settings, events[:2000])
        await wait_for_features(reader, events[:2000])
        assert alive_within(30) == 0
        await publish(kafka_settings, events[2000:3000])
        proc.send_signal(signal.SIGKILL)  # mid-stream, without a chance to commit
        proc.wait()
        await asyncio.sleep(1.2)
        assert alive_within(1) == 1, "a killed consumer's alive file goes stale"

        await publish(kafka_settings, events[3000:])
        proc = start()
        await wait_for_features(reader, events)
    finally:
        proc.kill()
        proc.wait()


async def test_malformed_message_goes_to_the_dead_letter_topic_and_the_rest_is_processed(
    kafka_settings, start_consumer, redis_client, key_prefix
):
    events = generated(600)
    future = dataclasses.replace(
        events[-1], exchange_time_us=time.time_ns() // 1000 + 3_600_000_000
    )
    consumer = await start_consumer()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers)
    await producer.start()
    try:
        for i, event in enumerate(events):
            if i == 300:
                await producer.send_and_wait(
                    kafka_settings.topic, key=b"BTC-USD", value=b"\x0a\xffnot protobuf"
                )
                await producer.send_and_wait(
                    kafka_settings.topic, key=b"BTC-USD", value=encode(future)
                )
            await producer.send(
                kafka_settings.topic, key=event.symbol.encode(), value=encode(event)
            )
        await producer.flush()
    finally:
        await producer.stop()

    await wait_for_features(FeatureReader(redis_client, key_prefix=key_prefix), events)
    dead = await read_all(kafka_settings.bootstrap_servers, kafka_settings.dead_letter_topic, 2)
    assert [d.value for d in dead] == [b"\x0a\xffnot protobuf", encode(future)]
    errors = [dict(d.headers)["error"] for d in dead]
    assert errors[0].startswith(b"not a marketdata.v1.MarketEvent")
    assert errors[1] == b"exchange time more than 60 s in the future"
    assert all(dict(d.headers)["source"].startswith(kafka_settings.topic.encode()) for d in dead)
    assert consumer.stats.malformed == 2
