"""``python -m quality`` / ``decision-labeler``: label audited decisions with what the market
did after them, and export the models' live quality, until SIGTERM or SIGINT.

Its Prometheus metrics are on ``DECISION_QUALITY__METRICS_PORT`` (9490; 0: off). It reads
the audit store at ``DECISION_AUDIT__DATABASE_URL`` (migrated by the decision server; until
its tables exist the labeler waits, saying so once), the market data at
``DECISION_KAFKA__BOOTSTRAP_SERVERS`` and the feature cache's checkpoints in
``DECISION_REDIS__URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import redis.asyncio as aioredis
import uvloop
from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector

from core.logs import configure_logging
from core.metrics_http import MetricsServer
from core.settings import settings_from_environment
from quality.labeler import Labeler
from quality.metrics import LabelerCollector
from quality.settings import QualitySettings
from quality.store import OutcomeStore
from server.audit.archive import Archive
from server.audit.store import create_store_engine

log = logging.getLogger("quality")


async def run(settings: QualitySettings) -> int:
    """Runs until a signal (exit status 0), or not at all when its metrics port cannot be
    served (status 2)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = create_store_engine(settings.audit.database_url)
    redis = aioredis.Redis.from_url(settings.redis.url)
    outcomes = OutcomeStore(
        engine,
        horizon_ms=settings.quality.horizon_ms,
        archive=Archive(settings.audit.archive_url),
    )
    labeler = Labeler(settings, redis, outcomes)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(LabelerCollector(labeler))
    metrics = MetricsServer(
        registry, settings.telemetry.metrics_host, settings.quality.metrics_port
    )
    try:
        metrics.start()
    except OSError as exc:
        log.error(
            "cannot serve metrics on %s:%d (DECISION_QUALITY__METRICS_PORT; 0: off): %s",
            settings.telemetry.metrics_host,
            settings.quality.metrics_port,
            exc,
        )
        await redis.aclose()
        engine.dispose()
        return 2
    log.info(
        "labelling decisions in %s, horizon %d ms",
        engine.url.render_as_string(hide_password=True),
        settings.quality.horizon_ms,
    )
    try:
        await asyncio.gather(
            labeler.follow(stop), labeler.label_until(stop), _report(labeler, stop)
        )
    finally:
        await redis.aclose()
        engine.dispose()
        metrics.stop()
    log.info("stopped")
    return 0


async def _report(labeler: Labeler, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 30.0)
        except TimeoutError:
            stats = labeler.stats
            log.info(
                "market events %d, labelled %d, unlabelled %s, waiting %d, store errors %d, "
                "labels behind decisions %.0f s",
                stats.events,
                stats.labelled,
                dict(stats.unlabelled) or 0,
                stats.pending,
                stats.store_errors,
                stats.labels_behind_s(),
            )


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="decision-labeler", description=__doc__).parse_args(argv)
    settings = settings_from_environment(QualitySettings, "decision-labeler")
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    sys.exit(uvloop.run(run(settings)))


if __name__ == "__main__":
    main()
