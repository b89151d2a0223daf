"""Prometheus metrics over HTTP, from a registry of the app's own (no global registry).

Collectors read the components' status when scraped, so the hot path does no metrics
work for them. Served by ``core.metrics_http.MetricsServer``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from feature_cache.mirror import FeatureMirror
from feature_cache.schema import FEATURE_NAMES
from server.admission import CallerShares
from server.audit.trail import AuditTrail
from server.control.canary import CanaryMonitor
from server.control.shared import SyncStatus
from server.control.state import ControlState
from server.drift import DriftMonitor
from server.engine import DecisionEngine
from server.features import FeatureSource
from server.load_metrics import CoreCalls, LoadCollector, ReplicaCollector, core_calls
from server.replica import Replica
from server.shadow import ShadowScorer
from server.undelivered import UndeliveredAnswers


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

    def __init__(self, source: FeatureSource, mirror: FeatureMirror) -> None:
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
            buckets=list(stats.score_difference),
            sum_value=stats.score_difference_sum,
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


class DriftCollector(Collector):
    """PSI of the live features and champion scores against the serving model's
    training reference (NaN until computed: too few decisions, or no reference)."""

    def __init__(self, drift: DriftMonitor) -> None:
        self._drift = drift

    def collect(self) -> Iterator[Metric]:
        status = self._drift.status()
        features = GaugeMetricFamily(
            "decision_drift_psi",
            "PSI of each feature over the recent decisions against the serving model's "
            "training reference (0.1: drifting, 0.25: shifted); NaN until computed.",
            labels=["feature"],
        )
        for name in FEATURE_NAMES:
            features.add_metric([name], status.feature_psi.get(name, math.nan))
        yield features
        yield GaugeMetricFamily(
            "decision_drift_score_psi",
            "PSI of the champion's recent scores against its training-period scores; NaN "
            "until computed.",
            value=math.nan if status.score_psi is None else status.score_psi,
        )
        yield GaugeMetricFamily(
            "decision_drift_samples",
            "Recent decisions with features the drift is computed over.",
            value=status.samples,
        )
        reference = GaugeMetricFamily(
            "decision_drift_reference",
            "1 for the model version whose training reference the drift is against.",
            labels=["model_version"],
        )
        if status.model_version:
            reference.add_metric([status.model_version], 1.0)
        yield reference


class CanaryCollector(Collector):
    """The canary's weight in effect and the automatic rollbacks this server made."""

    def __init__(self, canary: CanaryMonitor, state: Callable[[], ControlState]) -> None:
        self._canary = canary
        self._state = state

    def collect(self) -> Iterator[Metric]:
        weight, _ = self._state().canary(time.time_ns() // 1000)
        yield GaugeMetricFamily(
            "decision_canary_weight",
            "Share of decisions routed to the challenger as a canary (0: no canary).",
            value=weight,
        )
        yield CounterMetricFamily(
            "decision_canary_rollbacks",
            "Automatic canary rollbacks this server made on a breach (another server that "
            "saw the same breach first made it instead).",
            value=self._canary.rollbacks,
        )


class ControlStateCollector(Collector):
    """The control state as this server follows it: the store's reads, announcements."""

    def __init__(self, status: Callable[[], SyncStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        yield CounterMetricFamily(
            "decision_control_state_lost",
            "Times this server found the audit store's control state (kill switches, "
            "breaker overrides, flags, canary) had gone back, and wrote its own back.",
            value=status.losses,
        )
        yield GaugeMetricFamily(
            "decision_control_state_readable",
            "1 while the last read of the control state from the audit store succeeded.",
            value=float(status.durable_ok),
        )
        yield GaugeMetricFamily(
            "decision_control_announcements_followed",
            "1 while subscribed to change announcements (Redis pub/sub): a change applies "
            "at once; 0: within a second, from the poll of the store.",
            value=float(status.listening),
        )
        yield GaugeMetricFamily(
            "decision_control_state_version",
            "Version of the control state this server applies (-1: not read yet, every "
            "symbol stopped).",
            value=status.version,
        )


def server_registry(
    *,
    engine: DecisionEngine,
    shares: CallerShares,
    replicas: Sequence[Replica],
    undelivered: UndeliveredAnswers,
    features: FeatureSource,
    mirror: FeatureMirror,
    canary: CanaryMonitor,
    control: Callable[[], ControlState],
    control_status: Callable[[], SyncStatus],
    audit: AuditTrail | None,
    shadow: ShadowScorer | None,
    drift: DriftMonitor | None,
    calls: Callable[[], CoreCalls] = core_calls,
) -> CollectorRegistry:
    """A registry of the server's own: the process (CPU, memory, file descriptors, GC,
    version) and every component's collector."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    collectors: list[Collector] = [
        ReplicaCollector(replicas),
        LoadCollector(engine, [r.client for r in replicas], undelivered, calls, shares),
        FeatureCollector(features, mirror),
        CanaryCollector(canary, control),
        ControlStateCollector(control_status),
    ]
    collectors += [AuditCollector(audit)] if audit is not None else []
    collectors += [ShadowCollector(shadow)] if shadow is not None else []
    collectors += [DriftCollector(drift)] if drift is not None else []
    for collector in collectors:
        registry.register(collector)
    return registry
