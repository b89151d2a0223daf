"""The composition root: builds every component from ``Settings`` and runs their lifecycle.

``DecisionApp`` wires the parts and starts them on an ``AsyncExitStack``, so that stop is
start in reverse, whatever failed: ports bound → audit trail → feature mirror → model
clients → shared control state → call tally → gRPC servers (NOT_SERVING) → SERVING once
the replicas and Redis answer. The order and what each stop waits for:
docs/architecture.md, "Start and stop".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import redis.asyncio as aioredis

from core.deadline import SOCKET_TIMEOUT_S
from core.loop_lag import LoopLag
from core.metrics_http import MetricsServer
from core.store_reads import StoreReads
from core.tasks import cancel_and_wait
from fallback.chain import FallbackChain
from fallback.score_cache import ScoreCache, ScoreWriter
from feature_cache.mirror import FeatureMirror
from feature_cache.store import FeatureReader
from server.admin.control_plane import ControlPlane
from server.admin.servicer import AdminServicer
from server.admission import CallerShares
from server.audit.store import create_store_engine
from server.audit.trail import AuditTrail, UnrecordedDecisions
from server.breaker_probe import BreakerProbe
from server.call_tally import CallTally
from server.control.canary import CanaryMonitor
from server.control.changes import AuditedChanges, CanaryRollback
from server.control.durable import ControlStore
from server.control.flags import flag_specs
from server.control.fleet import FleetRegistration, fleet_members
from server.control.shared import SharedControl
from server.drift import DriftMonitor
from server.engine import DecisionEngine
from server.features import FeatureSource
from server.fleet_entry import FleetEntry
from server.front import GrpcFront
from server.load_metrics import StreamCalls
from server.readiness import follow_sidecar, until_ready, until_sidecar
from server.redis_clients import decision_redis, side_redis
from server.replicas import Replicas, traffic
from server.rpc_metrics import RpcMetrics, RpcMetricsInterceptor
from server.servicer import DECIDE_STREAM, DecisionServicer
from server.settings import Settings
from server.shadow import ShadowScorer
from server.stopping import STOP_SLACK_S, Lifecycle
from server.telemetry import server_registry
from server.tracing import Tracing
from server.undelivered import UndeliveredAnswers

log = logging.getLogger(__name__)


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
        replicas = Replicas.build(settings, self.tracing)
        self.replicas = replicas.champions
        self.challenger = replicas.challenger
        self._all_replicas = replicas.all
        # The control state's truth in the audit database, its copy in the feature Redis.
        engine = create_store_engine(settings.audit.database_url)
        store = ControlStore(engine, migrate=settings.audit.migrate_on_start)
        self.shared = SharedControl(
            settings.redis.url, store=store, key_prefix=prefix, flags=flag_specs()
        )
        self.audit = AuditTrail(settings.audit, settings.telemetry, adopted=adopted_journals)
        recorded = self.audit if settings.audit.enabled else None
        recorder = recorded or UnrecordedDecisions()
        changes = AuditedChanges(self.shared)
        self.canary = CanaryMonitor(settings.canary, CanaryRollback(changes))
        self.shadow = (
            ShadowScorer(self.challenger, audit=recorder, threshold=settings.decision.threshold)
            if self.challenger is not None
            else None
        )
        self.drift = DriftMonitor.for_server(settings.drift)
        self.mirror = FeatureMirror(
            settings.redis.url, key_prefix=prefix, connect_timeout_ms=SOCKET_TIMEOUT_S * 1000
        )
        self.control_plane = ControlPlane(
            changes=changes,
            replicas=replicas.all,
            addresses=replicas.addresses,
            canary=self.canary,
            server_id=lambda: self.audit.server_id,
            features=FeatureReader(self.status_redis, key_prefix=prefix),
            mirror=self.mirror,
            audit=recorded,
            drift=self.drift,
            fleet=lambda: fleet_members(self.status_redis, prefix),
        )
        score_cache = ScoreCache.for_ladder(
            self.redis, key_prefix=prefix, max_age_ms=settings.fallback.cached_score_max_age_ms
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
            scores=ScoreWriter(score_cache),
            audit=recorder,
            decision=settings.decision,
            control=lambda: self.shared.state,
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
        # DecideStream's messages count as calls in the tally and the call metrics.
        self.stream_calls = StreamCalls()
        self.call_tally = CallTally(
            self.audit, lambda: self.engine.calls_in_flight, core_calls=self.stream_calls.calls
        )
        self.shares = CallerShares(settings.server.caller_share, settings.server.caller_shares)
        registry = server_registry(
            engine=self.engine,
            shares=self.shares,
            replicas=replicas.all,
            undelivered=self.undelivered,
            features=self.features,
            mirror=self.mirror,
            canary=self.canary,
            control=lambda: self.shared.state,
            control_status=self.shared.status,
            audit=recorded,
            shadow=self.shadow,
            drift=self.drift,
            calls=self.stream_calls.calls,
        )
        rpc_metrics = RpcMetrics(registry)
        self.metrics = MetricsServer(
            registry, settings.telemetry.metrics_host, settings.server.metrics_port
        )
        decisions = DecisionServicer(
            self.engine,
            plan=plan,
            stream_calls=self.stream_calls,
            max_unanswered=settings.server.max_concurrent_streams,
            shares=self.shares,
        )
        if settings.server.metrics_port:
            decisions.observe_message = rpc_metrics.stream_messages(DECIDE_STREAM)
        self.front = GrpcFront(
            settings,
            decisions,
            AdminServicer(self.control_plane, recorded.store if recorded else None),
            # Tracing's first: it wraps each call's handler anew, and the metrics
            # interceptor keeps one wrapper per method (the handler it is given). With no
            # endpoint to read them, request metrics are not kept (`bench latency`, path M).
            interceptors=[
                *self.tracing.server_interceptors(),
                *([RpcMetricsInterceptor(rpc_metrics)] if settings.server.metrics_port else []),
            ],
        )
        # A client of its own: on-call's status reads share status_redis's two connections,
        # and a full pool fails rather than waits; the entry must be written every second.
        self.fleet_redis = side_redis(settings)
        self.fleet_entry = FleetEntry(
            hosts=(settings.server.host, settings.admin.host),
            ports=lambda: (self.port, self.admin_port),
            advertise_address=settings.admin.advertise_address,
            server_id=lambda: self.audit.server_id,
            engine=self.engine,
            replicas=replicas.all,
            shadow=self.shadow,
            control=lambda: self.shared.state,
        )
        self.fleet = FleetRegistration(
            self.fleet_redis, key_prefix=prefix, member=self.fleet_entry.member
        )
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
        """Starts each component and pushes its stop, each stop bounded by the longest one
        may need: the gRPC grace, the shipper's drain, and slack."""
        settings = self.settings
        stop_s = settings.server.grace_period_s + settings.audit.shutdown_drain_s + STOP_SLACK_S
        parts = Lifecycle(stack, stop_s)
        self.front.bind()
        # Stopped last: the spans of everything else's stop are exported too.
        parts.on_stop("tracing", lambda: asyncio.to_thread(self.tracing.shutdown))
        self.undelivered.install()
        stack.callback(self.undelivered.remove)
        if self.settings.audit.enabled:
            if not self.audit.server_id:
                self.audit.server_id = f"{socket.gethostname()}:{self.port}"
            await parts.start("audit trail", self.audit)
        self.metrics.start()
        stack.callback(self.metrics.stop)
        await parts.start("loop-lag probe", self.loop_lag)
        parts.on_stop("Redis client", self.redis.aclose)
        parts.on_stop("status Redis client", self.status_redis.aclose)
        parts.on_stop("fleet Redis client", self.fleet_redis.aclose)
        await parts.start("feature mirror", self.mirror)
        for replica in self._all_replicas:
            await parts.start(f"{replica.name} client", replica.client)
        await parts.start("shared control state", self.shared)
        await parts.start("breaker probe", self.breaker_probe)
        await parts.start("fleet registration", self.fleet)
        parts.on_stop("canary monitor", self.canary.stop)
        if self.drift is not None:
            await parts.start("drift monitor", self.drift)
        parts.on_stop("decision engine", self.engine.stop)
        if self.settings.audit.enabled:  # counts from before the servers' first call
            await parts.start("call tally", self.call_tally)
        await parts.start("gRPC servers", self.front)
        # Its last row before the servers stop (channelz forgets them); stop is idempotent.
        parts.on_stop("call tally", self.call_tally.stop)
        # Runs before the servers' stop (the stack unwinds in reverse): the fleet list
        # says NOT serving for the whole grace period, as health does.
        parts.on_stop("fleet entry", self._leave_serving)
        if self.settings.audit.enabled:
            stack.push_async_callback(
                cancel_and_wait,
                asyncio.create_task(self.audit.report_store(self.front.set_audit_serving)),
            )
        self._ready_task = asyncio.create_task(self._become_ready())
        stack.push_async_callback(cancel_and_wait, self._ready_task)
        if self.settings.torchserve.primary_is_sidecar:
            following = asyncio.create_task(self._follow_sidecar(self._ready_task))
            stack.push_async_callback(cancel_and_wait, following)

    async def _become_ready(self) -> None:
        await until_ready(self._all_replicas, self.redis, self.shared, self.settings.redis.url)
        if self.settings.torchserve.primary_is_sidecar:
            await until_sidecar(self.replicas[0].client)
        await self.front.set_serving(True)
        self.fleet_entry.serving = True
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self.fleet.refresh()  # listed as SERVING before it says it is ready
        log.info("ready: health SERVING")

    async def _follow_sidecar(self, ready: asyncio.Task[None]) -> None:
        await ready
        await follow_sidecar(self.replicas[0].client, self._set_sidecar_serving)

    async def _set_sidecar_serving(self, serving: bool) -> None:
        """Readiness and the fleet list (decisionctl status) say the same."""
        await self.front.set_decision_serving(serving)
        self.fleet_entry.serving = serving
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self.fleet.refresh()

    async def _leave_serving(self) -> None:
        self.fleet_entry.serving = False
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self.fleet.refresh()

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

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
