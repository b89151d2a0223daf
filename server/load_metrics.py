"""The decision path's load and the replicas, for Prometheus: the calls gRPC's core took
and ended, micro-batching, abandoned model calls, each replica's breaker and its calls
(read when scraped)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from grpc_channelz.v1 import channelz, channelz_pb2
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server.admission import CallerShares
from server.batching import BatchingClient
from server.engine import DecisionEngine
from server.model_client import GrpcModelClient, ModelClient
from server.replica import Replica
from server.undelivered import UndeliveredAnswers


class CoreCalls(NamedTuple):
    """Calls this process's gRPC servers started and finished, as gRPC's core counts them
    (channelz), since the servers were made. A call started and not finished is in flight,
    or was ended by the core before a handler ran: cancelled past the queue limit, or its
    deadline passed while it waited."""

    started: int
    succeeded: int  # finished OK
    failed: int  # finished with an error status


def core_calls() -> CoreCalls:
    request = channelz_pb2.GetServersRequest()
    servers = channelz.ChannelzServicer.GetServers(request, None).server
    return CoreCalls(
        sum(s.data.calls_started for s in servers),
        sum(s.data.calls_succeeded for s in servers),
        sum(s.data.calls_failed for s in servers),
    )


class StreamCalls:
    """DecideStream's messages counted as calls (docs/overload.md: a message is a call):
    ``calls`` is gRPC's core's count with each stream replaced by its messages, so the
    tally and the call metrics read one figure. A message answered with an error (a
    refusal too) has failed, as a unary call its handler refused; one that a stream's end
    left unanswered has failed (CANCELLED)."""

    __slots__ = ("answered", "failed", "messages", "streams", "streams_failed", "streams_ok")

    def __init__(self) -> None:
        self.streams = self.streams_ok = self.streams_failed = 0
        self.messages = self.answered = self.failed = 0

    def calls(self) -> CoreCalls:
        started, succeeded, failed = core_calls()
        return CoreCalls(
            started - self.streams + self.messages,
            succeeded - self.streams_ok + self.answered,
            failed - self.streams_failed + self.failed,
        )


class LoadCollector(Collector):
    """What the server did with the load it got: calls taken and refused, decisions in
    flight, micro-batching."""

    def __init__(
        self,
        engine: DecisionEngine,
        clients: Sequence[ModelClient],
        undelivered: UndeliveredAnswers | None = None,
        calls: Callable[[], CoreCalls] = core_calls,
        shares: CallerShares | None = None,
    ) -> None:
        self._engine = engine
        self._calls = calls
        self._shares = shares
        self._undelivered = undelivered
        self._batching = [c for c in clients if isinstance(c, BatchingClient)]
        unwrapped = [c.inner if isinstance(c, BatchingClient) else c for c in clients]
        self._wire = [c for c in unwrapped if isinstance(c, GrpcModelClient)]

    def collect(self) -> Iterator[Metric]:
        started, succeeded, failed = self._calls()
        yield CounterMetricFamily(
            "decision_grpc_calls_started",
            "gRPC calls this process's servers started (gRPC's core counts them; a "
            "DecideStream counts as its messages); those "
            "not finished were in flight, or ended before a handler ran (the queue full: "
            "the caller saw CANCELLED).",
            value=started,
        )
        finished = CounterMetricFamily(
            "decision_grpc_calls_finished",
            "gRPC calls this process's servers answered, by status: ok, or error.",
            labels=["status"],
        )
        finished.add_metric(["ok"], succeeded)
        finished.add_metric(["error"], failed)
        yield finished
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
        callers = CounterMetricFamily(
            "decision_caller_decisions",
            "Decisions asked for by callers whose client certificate was verified (mTLS on "
            "DecisionService), by its identity; past the first 50, as 'other'.",
            labels=["caller"],
        )
        for caller, count in sorted(self._engine.callers.items()):
            callers.add_metric([caller], count)
        yield callers
        refused = CounterMetricFamily(
            "decision_caller_refusals",
            "Calls refused (RESOURCE_EXHAUSTED) because their caller already had its share "
            "in flight (server.caller_share), by caller (past the first 50, as 'other') and "
            "whether its certificate was verified; a verified caller's refusals are its own "
            "doing, which the objective leaves out.",
            labels=["caller", "verified"],
        )
        for who, count in sorted(self._shares.refused.items() if self._shares else ()):
            refused.add_metric([who.key, str(who.verified).lower()], count)
        yield refused
        fallbacks = CounterMetricFamily(
            "decision_fallbacks",
            "Decisions the model did not answer, by who decided and why (a bounded set of "
            "reasons: kill_switch, no_features, features_stale, features_unusable, "
            "feature_store, model_breaker_open, model_timeout, model_busy, "
            "model_unavailable, model_error, model_no_time, model_retry_budget, model_input).",
            labels=["source", "reason"],
        )
        for (source, reason), count in sorted(self._engine.fallbacks.items()):
            fallbacks.add_metric([source.name.lower(), reason.label], count)
        yield fallbacks
        by_symbol = CounterMetricFamily(
            "decision_feature_fallbacks",
            "Decisions the ladder made for want of features, by symbol (past the first 50, "
            "as 'other') and why: no_features, features_stale, features_unusable, "
            "feature_store. Whose market data is missing or stale.",
            labels=["symbol", "reason"],
        )
        for (symbol, reason), count in sorted(self._engine.feature_fallbacks.items()):
            by_symbol.add_metric([symbol, reason.label], count)
        yield by_symbol
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
            "Model calls not sent because the replica had its bound of abandoned calls still out.",
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
        latency = HistogramMetricFamily(
            "decision_model_call_seconds",
            "Model calls' latency in seconds by replica and outcome, as the server waited "
            "for them (a failed call's is how long it waited before it gave up).",
            labels=["replica", "outcome"],
        )
        failure_rate = GaugeMetricFamily(
            "decision_breaker_failure_rate",
            "Share of the replica's calls in its closed breaker's window that failed.",
            labels=["replica"],
        )
        slow_rate = GaugeMetricFamily(
            "decision_breaker_slow_call_rate",
            "Share of the replica's calls in its closed breaker's window that were slow.",
            labels=["replica"],
        )
        for replica in self._replicas:
            current = replica.breaker.state
            for name in BREAKER_STATES:
                state.add_metric([replica.name, name], 1.0 if current == name else 0.0)
            rates = replica.breaker.rates()
            failure_rate.add_metric([replica.name], rates.failure_rate)
            slow_rate.add_metric([replica.name], rates.slow_rate)
            for outcome, buckets in (
                ("ok", replica.recent.ok_latency),
                ("failed", replica.recent.failed_latency),
            ):
                calls.add_metric([replica.name, outcome], buckets.count)
                latency.add_metric(
                    [replica.name, outcome], buckets.cumulative(), sum_value=buckets.total
                )
        yield from (state, failure_rate, slow_rate, calls, latency)
