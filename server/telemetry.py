"""Prometheus metrics over HTTP, from a registry of the app's own (no global registry).

Collectors read the components' status when scraped, so the hot path does no metrics
work for them. Served by prometheus_client's HTTP server on a thread of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from feature_cache.mirror import FeatureMirror
from server.audit.trail import AuditTrail
from server.batching import BatchingClient
from server.engine import DecisionEngine
from server.features import FeatureSource
from server.model_client import GrpcModelClient, ModelClient
from server.replica import Replica
from server.shadow import DIFF_BUCKETS, ShadowScorer
from server.undelivered import UndeliveredAnswers

log = logging.getLogger(__name__)


class AuditCollector(Collector):
    """The audit trail's journal and shipper, as on-call alerts on them."""

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    def collect(self) -> Iterator[Metric]:
        status = self._trail.status()
        shipper = status.shipper
        yield CounterMetricFamily(
            "decision_audit_journal_records",
            "Decision and admin records appended to the audit journal.",
            value=status.journal_records,
        )
        yield CounterMetricFamily(
            "decision_audit_journal_write_failures",
            "Appends the journal refused (those decisions were not returned).",
            value=status.journal_write_failures,
        )
        yield CounterMetricFamily(
            "decision_audit_refused_decisions",
            "Decisions refused (UNAVAILABLE) while the journal's backlog was at its cap.",
            value=status.refused_decisions,
        )
        yield GaugeMetricFamily(
            "decision_audit_journal_full",
            "1 while the journal's backlog is at DECISION_AUDIT__MAX_BACKLOG_BYTES and new "
            "decisions are refused, else 0.",
            value=1.0 if shipper.full else 0.0,
        )
        yield CounterMetricFamily(
            "decision_audit_shipped_records",
            "Journal records inserted into the audit store.",
            value=shipper.shipped_records,
        )
        yield CounterMetricFamily(
            "decision_audit_skipped_records",
            "Unreadable journal records passed over by the shipper (logged).",
            value=shipper.skipped_records,
        )
        yield CounterMetricFamily(
            "decision_audit_rejected_records",
            "Records the audit store refused (kept in the journal folder's rejected.jsonl).",
            value=shipper.rejected_records,
        )
        yield GaugeMetricFamily(
            "decision_audit_backlog_bytes",
            "Journal bytes not yet in the audit store.",
            value=shipper.backlog_bytes,
        )
        yield GaugeMetricFamily(
            "decision_audit_store_up",
            "1 when the last attempt to reach the audit store succeeded, else 0.",
            value=1.0 if shipper.store_ok else 0.0,
        )
        yield GaugeMetricFamily(
            "decision_audit_last_shipped_timestamp_seconds",
            "Wall-clock time of the last successful insert (0: none yet).",
            value=shipper.last_shipped_at_us / 1e6,
        )


class FeatureCollector(Collector):
    """Where Decide's features came from: the in-process mirror or a Redis read."""

    def __init__(self, source: FeatureSource, mirror: FeatureMirror | None) -> None:
        self._source = source
        self._mirror = mirror

    def collect(self) -> Iterator[Metric]:
        reads = CounterMetricFamily(
            "decision_feature_reads",
            "Decide calls' feature reads, by where they were answered.",
            labels=["via"],
        )
        reads.add_metric(["mirror"], self._source.mirror_reads)
        reads.add_metric(["redis"], self._source.store_reads)
        yield reads
        if self._mirror is None:
            return
        status = self._mirror.status()
        yield GaugeMetricFamily(
            "decision_feature_mirror_live",
            "1 while the feature mirror answers (loaded, subscription up); 0: Redis is read.",
            value=1.0 if status.live else 0.0,
        )
        yield GaugeMetricFamily(
            "decision_feature_mirror_symbols", "Symbols the mirror holds.", value=status.symbols
        )
        yield CounterMetricFamily(
            "decision_feature_mirror_losses",
            "Times the mirror's subscription was lost (it reloads when it is back).",
            value=status.losses,
        )


class ShadowCollector(Collector):
    """The challenger's shadow scores against the champion's decisions."""

    def __init__(self, shadow: ShadowScorer) -> None:
        self._shadow = shadow

    def collect(self) -> Iterator[Metric]:
        stats = self._shadow.stats()
        calls = CounterMetricFamily(
            "decision_shadow_decisions",
            "Decisions sampled for shadow scoring, by outcome.",
            labels=["outcome"],
        )
        calls.add_metric(["scored"], stats.scored)
        calls.add_metric(["dropped"], stats.dropped)
        calls.add_metric(["failed"], stats.failed)
        yield calls
        yield CounterMetricFamily(
            "decision_shadow_agreements",
            "Shadow-scored decisions the challenger would have decided the same way.",
            value=stats.agreed,
        )
        yield GaugeMetricFamily(
            "decision_shadow_agreement_ratio",
            "Share of shadow-scored decisions the challenger agreed with (0 before any).",
            value=stats.agreed / stats.scored if stats.scored else 0.0,
        )
        yield HistogramMetricFamily(
            "decision_shadow_score_difference",
            "|challenger score - champion score| per shadow-scored decision.",
            buckets=[
                *(
                    (str(bound), count)
                    for bound, count in zip(DIFF_BUCKETS, stats.diff_counts, strict=True)
                ),
                ("+Inf", stats.scored),
            ],
            sum_value=stats.diff_sum,
        )
        yield GaugeMetricFamily(
            "decision_shadow_score_psi",
            "PSI of the challenger's scores against the champion's over the recent pairs.",
            value=stats.score_psi,
        )
        yield GaugeMetricFamily(
            "decision_shadow_in_flight",
            "Sampled decisions gathered for a shadow call or in one.",
            value=stats.in_flight,
        )


class LoadCollector(Collector):
    """Load shedding and micro-batching: what the server did with the load it got."""

    def __init__(
        self,
        engine: DecisionEngine,
        clients: Sequence[ModelClient],
        undelivered: UndeliveredAnswers | None = None,
    ) -> None:
        self._engine = engine
        self._undelivered = undelivered
        self._batching = [c for c in clients if isinstance(c, BatchingClient)]
        unwrapped = [c.inner if isinstance(c, BatchingClient) else c for c in clients]
        self._wire = [c for c in unwrapped if isinstance(c, GrpcModelClient)]

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "decision_shed",
            "Decisions shed for overload: rejected, or decided without a model call.",
            value=self._engine.shed,
        )
        yield GaugeMetricFamily(
            "decision_in_flight", "Decisions being made now.", value=self._engine.in_flight
        )
        decided = CounterMetricFamily(
            "decision_decisions",
            "Decisions answered (recorded in the audit journal), by who decided and what.",
            labels=["source", "decision"],
        )
        for (source, decision), count in sorted(self._engine.decided.items()):
            decided.add_metric([source.name.lower(), decision.name.lower()], count)
        yield decided
        if self._undelivered is not None:
            yield CounterMetricFamily(
                "decision_answers_undelivered",
                "Answers gRPC could not send: the caller's deadline had passed, or it went"
                " away, before the answer was ready.",
                value=self._undelivered.count,
            )
        families = {
            "calls": CounterMetricFamily(
                "decision_model_batch_calls", "Micro-batched model calls.", labels=["replica"]
            ),
            "rows": CounterMetricFamily(
                "decision_model_batch_rows", "Rows those calls carried.", labels=["replica"]
            ),
            "sent_alone": CounterMetricFamily(
                "decision_model_sent_alone",
                "Requests sent alone: their deadline came near while the replica was busy.",
                labels=["replica"],
            ),
        }
        for client in self._batching:
            stats = client.stats()
            families["calls"].add_metric([client.name], stats.calls)
            families["rows"].add_metric([client.name], stats.rows)
            families["sent_alone"].add_metric([client.name], stats.sent_alone)
        yield from families.values()
        outstanding = GaugeMetricFamily(
            "decision_model_abandoned_outstanding",
            "Model calls whose callers stopped waiting, still running on the wire (never "
            "cancelled: TorchServe restarts a worker whose call is cancelled).",
            labels=["replica"],
        )
        abandoned = CounterMetricFamily(
            "decision_model_abandoned",
            "Model calls abandoned to finish on the wire after their callers stopped waiting.",
            labels=["replica"],
        )
        refused = CounterMetricFamily(
            "decision_model_refused_busy",
            "Model calls not sent because the replica had max_abandoned_calls still out.",
            labels=["replica"],
        )
        for wire in self._wire:
            calls = wire.abandoned()
            outstanding.add_metric([wire.name], calls.outstanding)
            abandoned.add_metric([wire.name], calls.total)
            refused.add_metric([wire.name], calls.refused)
        yield from (outstanding, abandoned, refused)


BREAKER_STATES = ("closed", "open", "half-open")


class ReplicaCollector(Collector):
    """Each replica's breaker state and its calls' outcomes, as this process sees them."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self._replicas = list(replicas)

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "decision_breaker_state",
            "1 for the replica's breaker state in this process (closed, open, half-open), "
            "0 for the others.",
            labels=["replica", "state"],
        )
        calls = CounterMetricFamily(
            "decision_model_calls",
            "Model calls to the replica by outcome (failed: error, timeout or refusal "
            "by the replica; a breaker's refusal makes no call).",
            labels=["replica", "outcome"],
        )
        for replica in self._replicas:
            current = replica.breaker.state
            for name in BREAKER_STATES:
                state.add_metric([replica.name, name], 1.0 if current == name else 0.0)
            calls.add_metric([replica.name, "ok"], replica.recent.total_ok)
            calls.add_metric([replica.name, "failed"], replica.recent.total_failed)
        yield state
        yield calls


class MetricsServer:
    """The /metrics endpoint; ``port`` 0 in settings turns it off."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self._host = host
        self._requested_port = port
        self.port = 0
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def start(self) -> None:
        if self._requested_port == 0 or self._server is not None:
            return
        self._server, self._thread = start_http_server(
            self._requested_port, self._host, self.registry
        )
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
