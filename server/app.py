"""The composition root: builds every component from ``Settings`` and runs their lifecycle.

Start order: audit trail (journal opened and repaired, shipping of an earlier process's
leftovers begins) → model clients → gRPC server (NOT_SERVING) → SERVING once Redis
answers. Stop runs in reverse: NOT_SERVING, stop accepting and let in-flight RPCs finish
within the grace period, pending cached-score writes, model clients, Redis, then the
audit trail (journal synced and closed, backlog shipped within the drain time).

Health: "" and ``decision.v1.DecisionService`` say whether decisions are served;
``decision.audit`` says whether the audit store is taking the journal (NOT_SERVING while
it is down: decisions go on, the journal grows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from types import TracebackType

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from fallback.chain import FallbackChain
from fallback.rules import RulesBaseline
from fallback.score_cache import ScoreCache
from feature_cache.store import FeatureReader
from proto.decision.v1 import decision_pb2
from server.audit.trail import AuditTrail, DecisionAudit, UnrecordedDecisions
from server.breaker import AsyncCircuitBreaker
from server.domain import Source
from server.engine import DecisionEngine
from server.model_client import (
    ModelClient,
    OipClient,
    TorchServeClient,
    not_the_replicas_fault,
)
from server.router import Replica, ReplicaRouter
from server.servicer import DecisionServicer, add_decision_service
from server.settings import Settings, TorchServeSettings
from server.telemetry import AuditCollector, MetricsServer

log = logging.getLogger(__name__)

DECISION_SERVICE = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
AUDIT_HEALTH = "decision.audit"
AUDIT_HEALTH_INTERVAL_S = 0.5
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_client(ts: TorchServeSettings, name: str, address: str) -> ModelClient:
    """The replica's client for the configured inference protocol."""
    if ts.protocol == "oip":
        return OipClient(
            name,
            address,
            ts.model_name,
            service=ts.oip_service,
            reconnect_backoff_ms=ts.reconnect_backoff_ms,
        )
    return TorchServeClient(
        name, address, ts.model_name, reconnect_backoff_ms=ts.reconnect_backoff_ms
    )


class DecisionApp:
    """The decision server and everything it owns."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # A full pool makes a caller wait for a connection, for as long as its own
        # budget allows (every read runs under the request's timeout), instead of failing
        # at once, which would turn a burst into ABSTAINs.
        socket_timeout_s = settings.redis.socket_timeout_ms / 1000.0
        self.redis = aioredis.Redis.from_pool(
            aioredis.BlockingConnectionPool.from_url(
                settings.redis.url,
                max_connections=settings.redis.max_connections,
                timeout=None,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                # A request's budget bounds every read; retrying inside it hides an outage.
                retry=Retry(NoBackoff(), 0),
            )
        )
        ts = settings.torchserve
        self.replicas = [
            Replica(
                model_client(ts, name, address),
                AsyncCircuitBreaker(
                    name,
                    fail_max=settings.breaker.fail_max,
                    reset_timeout_s=settings.breaker.reset_timeout_s,
                    success_threshold=settings.breaker.success_threshold,
                    ignore=not_the_replicas_fault,
                ),
                source,
            )
            for name, address, source in (
                ("primary", ts.primary_address, Source.PRIMARY),
                ("secondary", ts.secondary_address, Source.SECONDARY),
            )
        ]
        score_cache = ScoreCache(
            self.redis,
            key_prefix=settings.redis.key_prefix,
            ttl_ms=int(settings.fallback.cached_score_max_age_ms * 4),
        )
        fb = settings.fallback
        self.audit = AuditTrail(settings.audit, server_id=settings.audit.server_id)
        recorder: DecisionAudit = self.audit if settings.audit.enabled else UnrecordedDecisions()
        self.engine = DecisionEngine(
            features=FeatureReader(self.redis, key_prefix=settings.redis.key_prefix),
            router=ReplicaRouter(
                self.replicas,
                torchserve=ts,
                decision=settings.decision,
                min_counted_timeout_ms=settings.breaker.min_counted_timeout_ms,
            ),
            ladder=FallbackChain(
                score_cache,
                RulesBaseline(
                    max_spread_bps=fb.rules_max_spread_bps,
                    max_volatility_bps=fb.rules_max_volatility_bps,
                    min_imbalance=fb.rules_min_imbalance,
                ),
                cached_score_max_age_ms=fb.cached_score_max_age_ms,
                model_threshold=settings.decision.threshold,
                response_margin_ms=settings.decision.response_margin_ms,
            ),
            score_cache=score_cache,
            audit=recorder,
            decision=settings.decision,
            feature_max_age_ms=settings.features.max_age_ms,
            score_write_interval_ms=fb.cached_score_write_interval_ms,
        )
        registry = CollectorRegistry()
        if settings.audit.enabled:
            registry.register(AuditCollector(self.audit))
        self.metrics = MetricsServer(
            registry, settings.telemetry.metrics_host, settings.telemetry.metrics_port
        )
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
            options=[("grpc.so_reuseport", 0)],
        )
        add_decision_service(
            DecisionServicer(
                self.engine,
                default_budget_ms=settings.decision.default_budget_ms,
                max_batch_size=settings.server.max_batch_size,
            ),
            self.server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (DECISION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0
        self._ready_task: asyncio.Task[None] | None = None
        self._audit_health_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.stop()  # undo what did start: the journal above all
            raise

    async def _start(self) -> None:
        address = f"{self.settings.server.host}:{self.settings.server.port}"
        self.port = self.server.add_insecure_port(address)
        if self.settings.audit.enabled:
            if not self.audit.server_id:
                self.audit.server_id = f"{socket.gethostname()}:{self.port}"
            await self.audit.start()
            self._audit_health_task = asyncio.create_task(self._watch_audit())
        for replica in self.replicas:
            await replica.client.start()
        await self._set_health(NOT_SERVING)
        self.metrics.start()
        await self.server.start()
        log.info("DecisionService listening on %s:%d", self.settings.server.host, self.port)
        self._ready_task = asyncio.create_task(self._become_ready())

    async def _become_ready(self) -> None:
        """SERVING once Redis answers: without it every answer would be a fallback.

        Replica connections are opened first, so the first decisions do not pay for the
        TCP and HTTP/2 handshakes; a replica that is not there does not delay readiness
        by more than the connect timeout (the breaker and the ladder deal with it).
        """
        connect_timeout_s = self.settings.torchserve.connect_timeout_ms / 1000.0
        connected = await asyncio.gather(
            *(r.client.connect(connect_timeout_s) for r in self.replicas)
        )
        for replica, ok in zip(self.replicas, connected, strict=True):
            if not ok:
                log.warning("replica %s not reachable at start", replica.name)
        delay_s = 0.05
        while True:
            try:
                await self.redis.ping()
            except (aioredis.RedisError, OSError) as exc:
                log.warning("waiting for Redis at %s: %s", self.settings.redis.url, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)
                continue
            await self._set_health(SERVING)
            log.info("ready: health SERVING")
            return

    async def _watch_audit(self) -> None:
        healthy: bool | None = None
        while True:
            ok = self.audit.shipper.store_ok
            if ok != healthy:
                healthy = ok
                await self.health.set(AUDIT_HEALTH, SERVING if ok else NOT_SERVING)
            await asyncio.sleep(AUDIT_HEALTH_INTERVAL_S)

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for service in ("", DECISION_SERVICE):
            await self.health.set(service, status)

    async def wait_ready(self) -> None:
        if self._ready_task is not None:
            await self._ready_task

    async def stop(self) -> None:
        """Idempotent graceful stop, in reverse start order."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        for task in (self._ready_task, self._audit_health_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace=self.settings.server.grace_period_s)
            await self.engine.stop()
            for replica in reversed(self.replicas):
                await replica.client.stop()
            await self.redis.aclose()
            self.metrics.stop()
        finally:
            # Whatever failed above, the journal is synced, closed and shipped.
            await self.audit.stop()
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
