"""The composition root: builds every component from ``Settings`` and runs their lifecycle.

Small builders make the parts (the Redis clients in ``redis_clients``, the replicas in
``replicas``, the decision engine, the gRPC front); ``DecisionApp`` wires them and runs
them on an ``AsyncExitStack``, so that stop is start in reverse, whatever failed.

Start order: ports bound → audit trail (journal opened and repaired, the shipper's
process started and its first try of the store awaited, at most 10 s; an earlier
process's leftovers ship first) → feature mirror (live after its first load) → model
clients → shared control state → metrics →
gRPC servers (NOT_SERVING) → SERVING once Redis answers. Stop runs in reverse:
NOT_SERVING, both gRPC servers stop accepting and let in-flight RPCs finish within the
grace period (together), pending shadow calls and cached-score writes, the canary
monitor, the shared state, model clients, Redis, metrics, then the audit trail (journal
synced and closed, backlog shipped within the drain time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType

import redis.asyncio as aioredis

from core.deadline import StoreReads
from core.loop_lag import LoopLag
from core.metrics_http import MetricsServer
from core.tasks import cancel_and_wait
from fallback.chain import FallbackChain
from fallback.score_cache import HELD_MS as CACHED_SCORE_HELD_MS
from fallback.score_cache import WRITE_INTERVAL_MS as CACHED_SCORE_WRITE_INTERVAL_MS
from fallback.score_cache import ScoreCache, ScoreWriter
from feature_cache.mirror import FeatureMirror
from feature_cache.store import FeatureReader
from server.admin.control_plane import ControlPlane
from server.admin.servicer import AdminServicer
from server.admission import AdmissionLimit
from server.audit.store import create_store_engine
from server.audit.trail import AuditTrail, UnrecordedDecisions
from server.breaker_probe import BreakerProbe
from server.control.canary import CanaryMonitor
from server.control.changes import AuditedChanges, CanaryRollback
from server.control.durable import ControlStore
from server.control.flags import flag_specs
from server.control.fleet import FleetMember, FleetRegistration, fleet_members, reachable
from server.control.shared import SharedControl
from server.drift import DriftMonitor, ModelReferences
from server.engine import DecisionEngine
from server.features import FeatureSource
from server.front import GrpcFront
from server.readiness import until_ready
from server.redis_clients import SOCKET_TIMEOUT_S, decision_redis, side_redis
from server.replicas import Replicas, traffic
from server.rpc_metrics import RpcMetrics, RpcMetricsInterceptor
from server.servicer import DecisionServicer
from server.settings import Settings
from server.shadow import ShadowScorer
from server.stopping import STOP_SLACK_S, bounded
from server.telemetry import server_registry
from server.tracing import Tracing
from server.undelivered import UndeliveredAnswers

log = logging.getLogger(__name__)

# Cached scores live a few times their useful age: a ladder read finds a stale one (and
# says how stale) rather than none.
SCORE_TTL_FACTOR = 4


class DecisionApp:
    """The decision server and everything it owns."""

    def __init__(
        self,
        settings: Settings,
        *,
        adopted_journals: Sequence[Path] = (),
        tracing: Tracing | None = None,
    ) -> None:
        """``adopted_journals``: journal folders no worker writes now, shipped beside this
        server's own (``server.workers``). ``tracing``: instead of the one the settings
        make (tests: an in-memory exporter)."""
        self.settings = settings
        self.tracing = tracing or Tracing.from_environment()
        prefix = settings.redis.key_prefix
        plan = settings.deadline.plan()
        self.redis = decision_redis(settings)
        self.status_redis = side_redis(settings)
        self.loop_lag = LoopLag()
        replicas = Replicas.build(settings, self.loop_lag, self.tracing)
        self.replicas = replicas.champions
        self.challenger = replicas.challenger
        self._all_replicas = replicas.all
        self.shared = SharedControl(
            settings.redis.url,
            store=ControlStore(
                create_store_engine(settings.audit.database_url),
                migrate=settings.audit.migrate_on_start,
            ),
            key_prefix=prefix,
            flags=flag_specs(settings.control),
        )
        self.audit = AuditTrail(
            settings.audit,
            server_id=settings.audit.server_id,
            adopted=adopted_journals,
            log_level=settings.server.log_level,
            log_format=settings.server.log_format,
        )
        recorder: AuditTrail | UnrecordedDecisions = (
            self.audit if settings.audit.enabled else UnrecordedDecisions()
        )
        changes = AuditedChanges(self.shared)
        self.canary = CanaryMonitor(settings.canary, CanaryRollback(changes))
        self.shadow = (
            ShadowScorer(self.challenger, audit=recorder, threshold=settings.decision.threshold)
            if self.challenger is not None
            else None
        )
        self.drift = (
            DriftMonitor(settings.drift, ModelReferences(Path(settings.drift.model_store)))
            if settings.drift.model_store
            else None
        )
        self.mirror = (
            FeatureMirror(
                settings.redis.url, key_prefix=prefix, connect_timeout_ms=SOCKET_TIMEOUT_S * 1000
            )
            if settings.features.mirror
            else None
        )
        self.control_plane = ControlPlane(
            changes=changes,
            replicas=replicas.all,
            addresses=replicas.addresses,
            canary=self.canary,
            server_id=lambda: self.audit.server_id,
            features=FeatureReader(self.status_redis, key_prefix=prefix),
            mirror=self.mirror,
            audit=self.audit if settings.audit.enabled else None,
            drift=self.drift,
            fleet=lambda: fleet_members(self.status_redis, prefix),
        )
        score_cache = ScoreCache(
            self.redis,
            key_prefix=prefix,
            ttl_ms=int(settings.fallback.cached_score_max_age_ms * SCORE_TTL_FACTOR),
            held_ms=CACHED_SCORE_HELD_MS,
        )
        # One bound for the features and the cached scores: both read the same Redis pool.
        redis_reads = StoreReads(cap_ms=plan.store_read_ms)
        self.features = FeatureSource(
            FeatureReader(self.redis, key_prefix=prefix),
            redis_reads,
            max_age_ms=settings.features.max_age_ms,
            mirror=self.mirror,
        )
        self.engine = DecisionEngine(
            features=self.features,
            traffic=traffic(plan, replicas, self.canary),
            ladder=FallbackChain.from_settings(
                settings.fallback,
                score_cache,
                model_threshold=settings.decision.threshold,
                redis_reads=redis_reads,
            ),
            scores=ScoreWriter(score_cache, write_interval_ms=CACHED_SCORE_WRITE_INTERVAL_MS),
            audit=recorder,
            decision=settings.decision,
            control=lambda: self.shared.state,
            admission=AdmissionLimit(
                max_in_flight=settings.decision.max_in_flight,
                min_in_flight=settings.decision.min_in_flight,
                max_busy_share=settings.decision.max_loop_busy_share,
                lag=self.loop_lag,
            ),
            shadow=self.shadow,
            drift=self.drift,
            tracer=self.tracing.tracer,
        )
        self.breaker_probe = BreakerProbe(
            replicas.all,
            call_timeout_ms=plan.model_call_ms,
            control=lambda: self.shared.state,
        )
        self.undelivered = UndeliveredAnswers()
        registry = server_registry(
            engine=self.engine,
            replicas=replicas.all,
            undelivered=self.undelivered,
            features=self.features,
            mirror=self.mirror,
            canary=self.canary,
            control=lambda: self.shared.state,
            control_status=self.shared.status,
            audit=self.audit if settings.audit.enabled else None,
            shadow=self.shadow,
            drift=self.drift,
        )
        rpc_metrics = RpcMetrics(registry)
        self.metrics = MetricsServer(
            registry, settings.telemetry.metrics_host, settings.telemetry.metrics_port
        )
        self.front = GrpcFront(
            settings,
            DecisionServicer(
                self.engine,
                plan=plan,
                max_batch_size=settings.server.max_batch_size,
            ),
            (
                AdminServicer(
                    self.control_plane, self.audit.store if settings.audit.enabled else None
                )
                if settings.admin.enabled
                else None
            ),
            # Tracing's first: it wraps each call's handler anew, and the metrics
            # interceptor keeps one wrapper per method (the handler it is given). With no
            # endpoint to read them, request metrics are not kept (bench_latency's path M).
            interceptors=[
                *self.tracing.server_interceptors(),
                *([RpcMetricsInterceptor(rpc_metrics)] if settings.telemetry.metrics_port else []),
            ],
        )
        # A client of its own: on-call's status reads share status_redis's two connections,
        # and a full pool fails rather than waits; the entry must be written every second.
        self.fleet_redis = side_redis(settings)
        self.fleet = FleetRegistration(self.fleet_redis, key_prefix=prefix, member=self._member)
        self._started_at_us = time.time_ns() // 1000
        self._serving = False
        self._stack = contextlib.AsyncExitStack()
        self._ready_task: asyncio.Task[None] | None = None
        self._started = self._stopped = False

    @property
    def port(self) -> int:
        return self.front.port

    @property
    def admin_port(self) -> int:
        return self.front.admin_port

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            await self._start(self._stack)
        except BaseException:
            await self._stack.aclose()  # undo what did start: the journal above all
            raise

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """Starts each component and pushes its stop: the stack stops them in reverse,
        each within ``stop_s`` (the longest a stop may need: the gRPC grace, the
        shipper's drain, and slack)."""
        settings = self.settings
        stop_s = settings.server.grace_period_s + settings.audit.shutdown_drain_s + STOP_SLACK_S

        def on_stop(name: str, stop: Callable[[], Awaitable[object]]) -> None:
            stack.push_async_callback(bounded(name, stop, stop_s))

        self.front.bind()
        # Stopped last: the spans of everything else's stop are exported too.
        on_stop("tracing", lambda: asyncio.to_thread(self.tracing.shutdown))
        self.undelivered.install()
        stack.callback(self.undelivered.remove)
        if self.settings.audit.enabled:
            if not self.audit.server_id:
                self.audit.server_id = f"{socket.gethostname()}:{self.port}"
            await self.audit.start()
            on_stop("audit trail", self.audit.stop)
        self.metrics.start()
        stack.callback(self.metrics.stop)
        self.loop_lag.start()
        on_stop("loop-lag probe", self.loop_lag.stop)
        on_stop("Redis client", self.redis.aclose)
        on_stop("status Redis client", self.status_redis.aclose)
        on_stop("fleet Redis client", self.fleet_redis.aclose)
        if self.mirror is not None:
            await self.mirror.start()
            on_stop("feature mirror", self.mirror.stop)
        for replica in self._all_replicas:
            await replica.client.start()
            on_stop(f"{replica.name} client", replica.client.stop)
        await self.shared.start()
        on_stop("shared control state", self.shared.stop)
        self.breaker_probe.start()
        on_stop("breaker probe", self.breaker_probe.stop)
        self.fleet.start()
        on_stop("fleet registration", self.fleet.stop)
        on_stop("canary monitor", self.canary.stop)
        if self.drift is not None:
            self.drift.start()
            on_stop("drift monitor", self.drift.stop)
        on_stop("decision engine", self.engine.stop)
        await self.front.start()
        on_stop("gRPC servers", self.front.stop)
        # Runs before the servers' stop (the stack unwinds in reverse): the fleet list
        # says NOT serving for the whole grace period, as health does.
        on_stop("fleet entry", self._leave_serving)
        if self.settings.audit.enabled:
            stack.push_async_callback(
                cancel_and_wait,
                asyncio.create_task(self.audit.report_store(self.front.set_audit_serving)),
            )
        self._ready_task = asyncio.create_task(self._become_ready())
        stack.push_async_callback(cancel_and_wait, self._ready_task)

    async def _become_ready(self) -> None:
        await until_ready(self._all_replicas, self.redis, self.shared, self.settings.redis.url)
        await self.front.set_serving(True)
        self._serving = True
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self.fleet.refresh()  # listed as SERVING before it says it is ready
        log.info("ready: health SERVING")

    async def _leave_serving(self) -> None:
        self._serving = False
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self.fleet.refresh()

    def _member(self) -> FleetMember:
        """This server as its fleet entry says."""
        host = socket.gethostname()
        admin = self.settings.admin
        advertised = admin.advertise_address or reachable(admin.host, self.admin_port, host)
        tally = self.engine.tally()
        shadow_scored, shadow_agreed = self.shadow.agreement() if self.shadow else (0, 0)
        return FleetMember(
            server_id=self.audit.server_id or f"{host}:{self.port}",
            admin_address=advertised if admin.enabled else "",
            decision_address=reachable(self.settings.server.host, self.port, host),
            host=host,
            pid=os.getpid(),
            started_at_us=self._started_at_us,
            serving=self._serving,
            in_flight=self.engine.in_flight,
            decisions=tally.decisions,
            breakers={r.name: r.breaker.state for r in self._all_replicas},
            decisions_by_source=tally.by_source,
            fallbacks=tally.fallbacks,
            shadow_scored=shadow_scored,
            shadow_agreed=shadow_agreed,
            latency_counts=tally.latency_counts,
        )

    async def wait_ready(self) -> None:
        if self._ready_task is not None:
            await self._ready_task

    async def stop(self) -> None:
        """Idempotent graceful stop, in reverse start order."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        await self._stack.aclose()
        log.info("stopped")

    async def __aenter__(self) -> DecisionApp:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
