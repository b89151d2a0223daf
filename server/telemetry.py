"""Prometheus metrics over HTTP, from a registry of the app's own (no global registry).

Collectors read the components' status when scraped, so the hot path does no metrics
work for them. Served by ``core.metrics_http.MetricsServer``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from feature_cache.mirror import FeatureMirror
from feature_cache.schema import FEATURE_NAMES
from server.audit.trail import AuditTrail
from server.batching import BatchingClient
from server.control.canary import CanaryMonitor
from server.control.shared import SyncStatus
from server.control.state import ControlState
from server.drift import DriftMonitor
from server.engine import DecisionEngine
from server.features import FeatureSource
from server.model_client import GrpcModelClient, ModelClient
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
        fallbacks = CounterMetricFamily(
            "decision_fallbacks",
            "Decisions the model did not answer, by who decided and why (a bounded set of "
            "reasons: kill_switch, no_features, features_stale, features_unusable, "
            "feature_store, overloaded, model_breaker_open, model_timeout, model_busy, "
            "model_unavailable, model_error, model_no_time, model_retry_budget, model_input).",
            labels=["source", "reason"],
        )
        for (source, reason), count in sorted(self._engine.fallbacks.items()):
            fallbacks.add_metric([source.name.lower(), reason], count)
        yield fallbacks
        latency = HistogramMetricFamily(
            "decision_latency_seconds",
            "Time the engine spent deciding (features, model, ladder; not the journal append "
            "nor gRPC), in seconds, by who decided; a DecideBatch's rows each count the "
            "batch's time.",
            labels=["source"],
        )
        for source, buckets in self._engine.latency.items():
            latency.add_metric([source.name.lower()], buckets.cumulative(), sum_value=buckets.total)
        yield latency
        age = self._engine.feature_age
        yield HistogramMetricFamily(
            "decision_feature_age_seconds",
            "Age of the features a decision read (now less their event time), in seconds; "
            "decisions that found no features are not counted.",
            buckets=age.cumulative(),
            sum_value=age.total,
        )
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
            "out_of_time": CounterMetricFamily(
                "decision_model_queue_out_of_time",
                "Requests that left the replica's queue unsent: its calls stayed out until "
                "too little of their time was left (the next replica or the ladder answered; "
                "not counted against the breaker).",
                labels=["replica"],
            ),
        }
        for client in self._batching:
            stats = client.stats()
            families["calls"].add_metric([client.name], stats.calls)
            families["rows"].add_metric([client.name], stats.rows)
            families["out_of_time"].add_metric([client.name], stats.out_of_time)
        yield from families.values()
        outstanding = GaugeMetricFamily(
            "decision_model_abandoned_outstanding",
            "Model calls whose callers stopped waiting, still running on the wire (never "
            "cancelled: TorchServe can lose the worker answering a cancelled call).",
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
    """The control state's copies as this server sees them, and Redis's losses."""

    def __init__(self, status: Callable[[], SyncStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        lost = CounterMetricFamily(
            "decision_control_state_lost",
            "Times this server found a copy of the control state (kill switches, breaker "
            "overrides, flags, canary) had lost data, and wrote it back: Redis's, or the "
            "audit store's (went back).",
            labels=["copy"],
        )
        for copy, count in sorted(status.losses.items()):
            lost.add_metric([copy], count)
        yield lost
        readable = GaugeMetricFamily(
            "decision_control_state_readable",
            "1 while the last read of this copy of the control state succeeded.",
            labels=["copy"],
        )
        readable.add_metric(["redis"], float(status.in_sync))
        readable.add_metric(["durable"], float(status.durable_ok))
        yield readable
        yield GaugeMetricFamily(
            "decision_control_state_version",
            "Version of the control state this server applies (-1: not read yet, every "
            "symbol stopped).",
            value=status.version,
        )


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
        latency = HistogramMetricFamily(
            "decision_model_call_seconds",
            "Model calls' latency in seconds by replica and outcome, as the server waited "
            "for them (a failed call's is how long it waited before it gave up).",
            labels=["replica", "outcome"],
        )
        for replica in self._replicas:
            current = replica.breaker.state
            for name in BREAKER_STATES:
                state.add_metric([replica.name, name], 1.0 if current == name else 0.0)
            for outcome, buckets in (
                ("ok", replica.recent.ok_latency),
                ("failed", replica.recent.failed_latency),
            ):
                calls.add_metric([replica.name, outcome], buckets.count)
                latency.add_metric(
                    [replica.name, outcome], buckets.cumulative(), sum_value=buckets.total
                )
        yield from (state, calls, latency)
