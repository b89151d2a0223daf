"""The feature-cache consumer's /metrics, scraped over HTTP from a real
``python -m feature_cache`` process fed through a real broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from core.processes import free_port
from feature_cache.codec import encode
from feature_cache.generator import MarketGenerator
from feature_cache.store import FeatureReader
from k8s.alert_rules import dashboard_expressions, rule_expressions
from k8s.render import OVERLAYS, render_overlay
from tests.feature_cache.conftest import PARTITIONS, consumer_env, wait_for_features
from tests.metrics import Samples, exported_names, names_in, scrape, value

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EVENTS = 800


async def scraped_when(port: int, done: str, at_least: float, timeout_s: float = 20.0) -> Samples:
    """The first scrape in which ``done`` reached ``at_least``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            samples = await asyncio.to_thread(scrape, port)
        except OSError:  # not serving yet
            samples = {}
        if value(samples, done) >= at_least:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{done} stayed below {at_least}: {value(samples, done)}")
        await asyncio.sleep(0.2)


def start_consumer(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "feature_cache"], cwd=REPO, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


async def test_the_consumer_counts_events_dead_letters_lag_and_write_latency(
    kafka_settings, redis_instance, redis_client, key_prefix, tmp_path
) -> None:
    port = free_port()
    env = consumer_env(
        kafka_settings,
        redis_instance.url,
        key_prefix,
        DECISION_FEATURE_CACHE__METRICS_PORT=str(port),
    )
    events = list(
        MarketGenerator(["BTC-USD", "ETH-USD", "SOL-USD"], seed=5, start_time_us=1).events(EVENTS)
    )
    proc = start_consumer(env, tmp_path / "consumer.log")
    try:
        before = await scraped_when(port, "feature_cache_up", 1)
        assert value(before, "feature_cache_events_total") == 0
        producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(kafka_settings.topic, key=b"BTC-USD", value=b"\xffjunk")
            for event in events:
                await producer.send(
                    kafka_settings.topic, key=event.symbol.encode(), value=encode(event)
                )
            await producer.flush()
        finally:
            await producer.stop()
        await wait_for_features(FeatureReader(redis_client, key_prefix=key_prefix), events)

        got = await scraped_when(port, "feature_cache_events_total", EVENTS)
        assert value(got, "feature_cache_events_total") == EVENTS
        assert value(got, "feature_cache_dead_letters_total") == 1
        assert value(got, "feature_cache_partitions") == PARTITIONS
        assert value(got, "feature_cache_records_written_total") > 0
        batches = value(got, "feature_cache_batches_total")
        assert (
            0 < value(got, "feature_cache_write_seconds_count") <= batches
        )  # not dead letters alone
        # Every handled message, the dead letter too, counts in the freshness histogram.
        assert value(got, "feature_cache_freshness_seconds_count") == EVENTS + 1
        topic = kafka_settings.topic
        partitions = [str(p) for p in range(PARTITIONS)]
        lag = [
            value(got, "feature_cache_consumer_lag", topic=topic, partition=p) for p in partitions
        ]
        assert lag == [0] * PARTITIONS, "everything published was handled"
        ages = [
            (
                "feature_cache_checkpoint_age_seconds",
                frozenset({"topic": topic, "partition": p}.items()),
            )
            for p in partitions
        ]
        assert all(age in got for age in ages)
        assert value(got, "process_resident_memory_bytes") > 0

        exported = await asyncio.to_thread(exported_names, port)
        for overlay in OVERLAYS:
            objects = render_overlay(overlay)
            for where, expressions in (
                ("rules", rule_expressions(objects)),
                ("dashboard", dashboard_expressions(objects)),
            ):
                used = names_in(expressions, ("feature_cache_",))
                assert used, f"{overlay} {where} show the consumer"
                assert used <= exported, f"{overlay} {where}: {sorted(used - exported)}"
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
