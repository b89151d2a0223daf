"""docs/metrics.md names every metric the feature-cache consumer exports."""

from __future__ import annotations

import re
from pathlib import Path

import redis.asyncio as aioredis

from core.processes import free_port
from feature_cache.consumer import FeatureConsumer
from feature_cache.metrics import ConsumerCollector
from feature_cache.settings import KafkaSettings

REPO = Path(__file__).resolve().parents[2]


async def test_docs_metrics_names_every_metric_of_the_consumer() -> None:
    redis = aioredis.Redis()  # never connected: collecting reads the consumer's own state
    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    consumer = FeatureConsumer(settings, redis, key_prefix="doc:")
    try:
        names = {
            family.name + ("_total" if family.type == "counter" else "")
            for family in ConsumerCollector(consumer).collect()
        }
    finally:
        await consumer.stop()  # never started: closes its clients
        await redis.aclose()
    docs = (REPO / "docs/metrics.md").read_text()
    assert len(names) > 10
    assert sorted(name for name in names if not re.search(rf"\b{name}\b", docs)) == []
