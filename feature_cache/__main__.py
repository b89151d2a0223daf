"""``python -m feature_cache`` / ``feature-cache``: run the consumer until SIGTERM or SIGINT.

Its Prometheus metrics are on ``DECISION_FEATURE_CACHE__METRICS_PORT`` (9480; 0: off).
``feature-cache --check-alive SECONDS`` instead exits 0 when the running consumer touched
its ``DECISION_FEATURE_CACHE__ALIVE_FILE`` within that many seconds, 1 otherwise: a
container's liveness probe (a live metrics thread says nothing of the consumer's loop).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis
import uvloop
from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector

from core.logs import configure_logging
from core.metrics_http import MetricsServer
from core.settings import settings_from_environment
from core.tasks import cancel_and_wait
from feature_cache.consumer import FeatureConsumer
from feature_cache.metrics import ConsumerCollector
from feature_cache.settings import FeatureCacheSettings

log = logging.getLogger("feature_cache")

STATS_INTERVAL_S = 10.0


async def consume(settings: FeatureCacheSettings) -> int:
    """Runs until a signal (exit status 0), until the consumer loop dies (status 1), or not
    at all when its metrics port cannot be served (status 2)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    redis = aioredis.Redis.from_url(settings.redis.url)
    consumer = FeatureConsumer(settings.kafka, redis, key_prefix=settings.redis.key_prefix)
    metrics = metrics_server(settings, consumer)
    try:
        metrics.start()
    except OSError as exc:
        process = settings.feature_cache
        log.error(
            "cannot serve metrics on %s:%d (DECISION_FEATURE_CACHE__METRICS_PORT; 0: off): %s",
            settings.telemetry.metrics_host,
            process.metrics_port,
            exc,
        )
        await redis.aclose()
        return 2
    try:
        # Kafka may be down at start: a signal must still end the retries.
        starting = asyncio.create_task(consumer.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            await cancel_and_wait(starting)
        else:
            log.info("consuming %s as group %s", settings.kafka.topic, settings.kafka.group_id)
        while not stop.is_set() and not consumer.failed:
            touch_alive(settings)
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
        stopping.cancel()
        log.info("stopping")
    finally:
        await consumer.stop()
        await redis.aclose()
        metrics.stop()
    log.info("stopped")
    return 1 if consumer.failed else 0


def metrics_server(settings: FeatureCacheSettings, consumer: FeatureConsumer) -> MetricsServer:
    """The consumer's /metrics (not started): its own figures, the process's and GC's."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(ConsumerCollector(consumer))
    return MetricsServer(
        registry, settings.telemetry.metrics_host, settings.feature_cache.metrics_port
    )


def touch_alive(settings: FeatureCacheSettings) -> None:
    """Marks the consumer's loop alive now: touches the alive file, making its folder if
    it is not there (a fresh emptyDir); nothing when no file is set."""
    if settings.feature_cache.alive_file:
        path = Path(settings.feature_cache.alive_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def alive_within(settings: FeatureCacheSettings, max_age_s: float) -> bool:
    """Whether the consumer's loop touched its alive file within ``max_age_s``."""
    if not settings.feature_cache.alive_file:
        raise SystemExit("--check-alive needs DECISION_FEATURE_CACHE__ALIVE_FILE")
    try:
        touched = Path(settings.feature_cache.alive_file).stat().st_mtime
    except FileNotFoundError:
        return False
    return time.time() - touched <= max_age_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="feature-cache", description=__doc__)
    parser.add_argument("--check-alive", type=float, metavar="SECONDS")
    args = parser.parse_args(argv)
    settings = settings_from_environment(FeatureCacheSettings, "feature-cache")
    if args.check_alive is not None:
        sys.exit(0 if alive_within(settings, args.check_alive) else 1)
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    sys.exit(uvloop.run(consume(settings)))


if __name__ == "__main__":
    main()
