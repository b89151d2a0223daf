"""The feature-cache consumer's Prometheus metrics, read from the consumer when scraped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from feature_cache.consumer import FeatureConsumer
from feature_cache.features import Applied


class ConsumerCollector(Collector):
    def __init__(self, consumer: FeatureConsumer) -> None:
        self._consumer = consumer

    def collect(self) -> Iterator[Metric]:
        consumer = self._consumer
        stats = consumer.stats
        yield CounterMetricFamily(
            "feature_cache_events",
            "Market events applied to the features (dead letters and ignored events not counted).",
            value=stats.events,
        )
        ignored = CounterMetricFamily(
            "feature_cache_events_ignored",
            "Market events a symbol's state ignored: a re-delivery its session's sequence had "
            "passed (duplicate), or an event of an earlier session than its own (old_session).",
            labels=["reason"],
        )
        for reason in (Applied.DUPLICATE, Applied.OLD_SESSION):
            ignored.add_metric([reason.value], stats.ignored[reason.value])
        yield ignored
        yield CounterMetricFamily(
            "feature_cache_feed_restarts",
            "Times a symbol's feed started over (an event of a later session): its book and "
            "windows started afresh.",
            value=stats.restarts,
        )
        yield GaugeMetricFamily(
            "feature_cache_symbols_ignored",
            "Symbols whose every event has been ignored for 10 s or more: their features are "
            "frozen while their feed goes on.",
            value=consumer.ignored_symbols(),
        )
        yield CounterMetricFamily(
            "feature_cache_dead_letters",
            "Malformed events sent to the dead-letter topic (each is logged with its offset).",
            value=stats.malformed,
        )
        yield CounterMetricFamily(
            "feature_cache_batches", "Fetched batches handled.", value=stats.batches
        )
        yield CounterMetricFamily(
            "feature_cache_records_written",
            "Feature records written to Redis (one per symbol a batch changed).",
            value=stats.records_written,
        )
        yield HistogramMetricFamily(
            "feature_cache_write_seconds",
            "Seconds a batch's feature write to Redis took, retries while Redis was down included.",
            buckets=stats.write_latency.cumulative(),
            sum_value=stats.write_latency.total,
        )
        yield HistogramMetricFamily(
            "feature_cache_freshness_seconds",
            "Seconds from an event's Kafka create time to its features written in Redis.",
            buckets=stats.freshness.cumulative(),
            sum_value=stats.freshness.total,
        )
        lag = GaugeMetricFamily(
            "feature_cache_consumer_lag",
            "Events behind the end of each partition this consumer owns (the broker's high "
            "watermark at the last fetch less the next offset to handle).",
            labels=["topic", "partition"],
        )
        for tp, behind in sorted(consumer.lag().items()):
            lag.add_metric([tp.topic, str(tp.partition)], behind)
        yield lag
        age = GaugeMetricFamily(
            "feature_cache_checkpoint_age_seconds",
            "Seconds since the partition's last checkpoint while it holds handled events not "
            "yet checkpointed, else 0: what the next owner would replay after a crash.",
            labels=["topic", "partition"],
        )
        for tp, seconds in sorted(consumer.checkpoint_ages_s().items()):
            age.add_metric([tp.topic, str(tp.partition)], seconds)
        yield age
        yield GaugeMetricFamily(
            "feature_cache_partitions",
            "Partitions this consumer owns now.",
            value=len(consumer.states),
        )
        yield GaugeMetricFamily(
            "feature_cache_up",
            "1 while the consumer loop runs, 0 once it died (the process then exits 1).",
            value=0.0 if consumer.failed else 1.0,
        )
