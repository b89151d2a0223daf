"""``python -m feature_cache`` / ``feature-cache``: run the consumer until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import redis.asyncio as aioredis
import uvloop

from feature_cache.consumer import FeatureConsumer
from server.settings import Settings

log = logging.getLogger("feature_cache")

STATS_INTERVAL_S = 10.0


async def consume(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    redis = aioredis.Redis.from_url(settings.redis.url)
    try:
        async with FeatureConsumer(
            settings.kafka, redis, key_prefix=settings.redis.key_prefix
        ) as consumer:
            log.info("consuming %s as group %s", settings.kafka.topic, settings.kafka.group_id)
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), STATS_INTERVAL_S)
                except TimeoutError:
                    stats = consumer.stats
                    log.info(
                        "events %d, malformed %d, batches %d, records written %d",
                        stats.events,
                        stats.malformed,
                        stats.batches,
                        stats.records_written,
                    )
            log.info("signal received: stopping")
    finally:
        await redis.aclose()
    log.info("stopped")


def main() -> None:
    settings = Settings()
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvloop.run(consume(settings))


if __name__ == "__main__":
    main()
