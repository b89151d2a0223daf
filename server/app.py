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
from pathlib import Path
from types import TracebackType

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.deadline import StoreReads
from core.domain import Source
from fallback.chain import FallbackChain
from fallback.rules import RulesBaseline
from fallback.score_cache import ScoreCache
from feature_cache.store import FeatureReader
from proto.decision.v1 import admin_pb2, decision_pb2
from server.admin.auth import AdminAuthInterceptor, Role, TokenBook
from server.admin.control_plane import AuditView, ControlPlane
from server.admin.servicer import ADMIN_SERVICE, READ_METHODS, AdminServicer
from server.audit.trail import AuditTrail, UnrecordedDecisions
from server.batching import BatchingClient
from server.breaker import AsyncCircuitBreaker
from server.control.canary import CanaryMonitor
from server.control.flags import flag_specs
from server.control.shared import SharedControl
from server.control.state import CANARY_FIELD
from server.engine import DecisionEngine
from server.model_client import (
    ModelClient,
    OipClient,
    TorchServeClient,
    not_the_replicas_fault,
)
from server.router import Replica, ReplicaRouter
from server.servicer import DecisionServicer, add_decision_service, add_tolerant_service
from server.settings import Settings, TorchServeSettings
from server.shadow import ShadowScorer
from server.telemetry import AuditCollector, LoadCollector, MetricsServer, ShadowCollector

log = logging.getLogger(__name__)

DECISION_SERVICE = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
AUDIT_HEALTH = "decision.audit"
AUDIT_HEALTH_INTERVAL_S = 0.5
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_client(
    ts: TorchServeSettings,
    name: str,
    address: str,
    model_name: str | None = None,
    *,
    min_counted_timeout_ms: float = 0.0,
) -> ModelClient:
    """The replica's client for the configured inference protocol, micro-batching unless
    ``batch_max_rows`` is 1."""
    model = model_name or ts.model_name
    client: ModelClient
    if ts.protocol == "oip":
        client = OipClient(
            name,
            address,
            model,
            service=ts.oip_service,
            reconnect_backoff_ms=ts.reconnect_backoff_ms,
            wire_timeout_ms=ts.wire_timeout_ms,
            max_abandoned_calls=ts.max_abandoned_calls,
        )
    else:
        client = TorchServeClient(
            name,
            address,
            model,
            reconnect_backoff_ms=ts.reconnect_backoff_ms,
            wire_timeout_ms=ts.wire_timeout_ms,
            max_abandoned_calls=ts.max_abandoned_calls,
        )
    if ts.batch_max_rows <= 1:
        return client
    return BatchingClient(
        client,
        max_batch_rows=ts.batch_max_rows,
        max_concurrent_calls=ts.batch_max_concurrent_calls,
        min_counted_timeout_ms=min_counted_timeout_ms,
    )


def server_credentials(settings: Settings, *, client_ca_file: str = "") -> grpc.ServerCredentials:
    """TLS credentials from the settings' PEM files; with ``client_ca_file``, clients must
    present a certificate that CA signed (mTLS)."""
    server = settings.server
    key, chain = Path(server.tls_key_file).read_bytes(), Path(server.tls_cert_file).read_bytes()
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def add_port(
    server: grpc.aio.Server, address: str, settings: Settings, *, client_ca_file: str = ""
) -> int:
    if not settings.server.tls_cert_file:
        return server.add_insecure_port(address)
    credentials = server_credentials(settings, client_ca_file=client_ca_file)
    return server.add_secure_port(address, credentials)


class DecisionApp:
    """The decision server and everything it owns."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # A full pool makes a caller wait for a connection, for as long as its own
        # budget allows (every read runs under the request's timeout), instead of failing
        # at once, which would turn a burst into ABSTAINs. A read abandoned at its timeout
        # waits at most the socket timeout for a connection, then as long again for Redis.
        socket_timeout_s = settings.redis.socket_timeout_ms / 1000.0
        self.redis = aioredis.Redis.from_pool(
            aioredis.BlockingConnectionPool.from_url(
                settings.redis.url,
                max_connections=settings.redis.max_connections,
                timeout=socket_timeout_s,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                # A request's budget bounds every read; retrying inside it hides an outage.
                retry=Retry(NoBackoff(), 0),
            )
        )
        # GetStatus scans every feature key: on a client of its own, so that on-call
        # looking at status never takes a connection a Decide is waiting for.
        self.status_redis = aioredis.Redis.from_url(
            settings.redis.url,
            max_connections=2,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
        )
        ts = settings.torchserve

        def replica(name: str, address: str, source: Source, model: str | None = None) -> Replica:
            return Replica(
                model_client(
                    ts,
                    name,
                    address,
                    model,
                    min_counted_timeout_ms=settings.breaker.min_counted_timeout_ms,
                ),
                AsyncCircuitBreaker(
                    name,
                    fail_max=settings.breaker.fail_max,
                    reset_timeout_s=settings.breaker.reset_timeout_s,
                    success_threshold=settings.breaker.success_threshold,
                    ignore=not_the_replicas_fault,
                ),
                source,
            )

        self.replicas = [
            replica("primary", ts.primary_address, Source.PRIMARY),
            replica("secondary", ts.secondary_address, Source.SECONDARY),
        ]
        self.challenger = (
            replica("challenger", ts.challenger_address, Source.CANARY, ts.challenger_model_name)
            if ts.challenger_address
            else None
        )
        addresses = {"primary": ts.primary_address, "secondary": ts.secondary_address}
        if ts.challenger_address:
            addresses["challenger"] = ts.challenger_address
        self.shared = SharedControl(
            settings.redis.url,
            key_prefix=settings.redis.key_prefix,
            flags=flag_specs(settings.control),
            resync_interval_ms=settings.control.resync_interval_ms,
            redis_timeout_ms=settings.control.redis_timeout_ms,
        )
        score_cache = ScoreCache(
            self.redis,
            key_prefix=settings.redis.key_prefix,
            ttl_ms=int(settings.fallback.cached_score_max_age_ms * 4),
        )
        fb = settings.fallback
        self.audit = AuditTrail(settings.audit, server_id=settings.audit.server_id)
        recorder: AuditTrail | UnrecordedDecisions = (
            self.audit if settings.audit.enabled else UnrecordedDecisions()
        )
        features = FeatureReader(self.redis, key_prefix=settings.redis.key_prefix)
        self.canary = CanaryMonitor(
            settings.canary,
            on_breach=lambda breach: self.control_plane.rollback_canary(breach),
            auto_rollback=lambda: self.control_plane.auto_rollback(),
            setting=lambda: self.shared.state.entries.get(CANARY_FIELD),
        )
        self.shadow = (
            ShadowScorer(
                self.challenger,
                audit=recorder,
                max_in_flight=settings.shadow.max_in_flight,
                timeout_ms=settings.shadow.timeout_ms,
                threshold=settings.decision.threshold,
                psi_window=settings.shadow.psi_window,
                batch_window_ms=settings.shadow.batch_window_ms,
                batch_max_rows=settings.shadow.batch_max_rows,
            )
            if self.challenger is not None
            else None
        )
        self.control_plane = ControlPlane(
            shared=self.shared,
            replicas=[*self.replicas, *([self.challenger] if self.challenger else [])],
            addresses=addresses,
            audit=recorder,
            canary=self.canary,
            server_id=lambda: self.audit.server_id,
            features=FeatureReader(self.status_redis, key_prefix=settings.redis.key_prefix),
            audit_view=self._audit_view if settings.audit.enabled else lambda: None,
        )
        # One bound for the features and the cached scores: both read the same Redis pool.
        redis_reads = StoreReads(
            cap_ms=settings.redis.read_timeout_ms,
            max_abandoned=settings.redis.max_abandoned_reads,
        )
        self.engine = DecisionEngine(
            features=features,
            router=ReplicaRouter(
                self.replicas,
                torchserve=ts,
                decision=settings.decision,
                min_counted_timeout_ms=settings.breaker.min_counted_timeout_ms,
                challenger=self.challenger,
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
                redis_reads=redis_reads,
            ),
            score_cache=score_cache,
            audit=recorder,
            decision=settings.decision,
            feature_max_age_ms=settings.features.max_age_ms,
            redis_reads=redis_reads,
            score_write_interval_ms=fb.cached_score_write_interval_ms,
            control=lambda: self.shared.state,
            canary=self.canary if self.challenger is not None else None,
            shadow=self.shadow,
        )
        registry = CollectorRegistry()
        registry.register(LoadCollector(self.engine, [r.client for r in self._all_replicas()]))
        if settings.audit.enabled:
            registry.register(AuditCollector(self.audit))
        if self.shadow is not None:
            registry.register(ShadowCollector(self.shadow))
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
                response_margin_ms=settings.decision.response_margin_ms,
            ),
            self.server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (DECISION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.admin_server: grpc.aio.Server | None = None
        if settings.admin.enabled:
            tokens = TokenBook.load(
                file=settings.admin.tokens_file, inline=settings.admin.tokens.get_secret_value()
            )
            if not len(tokens):
                log.warning("AdminService has no tokens: every admin call will be refused")
            self.admin_server = grpc.aio.server(
                interceptors=[
                    AdminAuthInterceptor(tokens, READ_METHODS, default_role=Role.OPERATOR)
                ],
                options=[("grpc.so_reuseport", 0)],
            )
            add_tolerant_service(
                AdminServicer(self.control_plane),
                admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
                admin_pb2,
                self.admin_server,
            )
            reflection.enable_server_reflection(
                (ADMIN_SERVICE, reflection.SERVICE_NAME), self.admin_server
            )
        self.port = 0
        self.admin_port = 0
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
        settings = self.settings
        self.port = add_port(
            self.server, f"{settings.server.host}:{settings.server.port}", settings
        )
        if self.settings.audit.enabled:
            if not self.audit.server_id:
                self.audit.server_id = f"{socket.gethostname()}:{self.port}"
            await self.audit.start()
            self._audit_health_task = asyncio.create_task(self._watch_audit())
        for replica in self._all_replicas():
            await replica.client.start()
        await self.shared.start()
        await self._set_health(NOT_SERVING)
        self.metrics.start()
        await self.server.start()
        log.info("DecisionService listening on %s:%d", settings.server.host, self.port)
        if self.admin_server is not None:
            admin = settings.admin
            self.admin_port = add_port(
                self.admin_server,
                f"{admin.host}:{admin.port}",
                settings,
                client_ca_file=admin.tls_client_ca_file,
            )
            await self.admin_server.start()
            log.info("AdminService listening on %s:%d", admin.host, self.admin_port)
        self._ready_task = asyncio.create_task(self._become_ready())

    async def _become_ready(self) -> None:
        """SERVING once Redis answers and the shared control state is read: without them
        every answer would be a fallback, or ignore a kill switch.

        Replica connections are opened first, so the first decisions do not pay for the
        TCP and HTTP/2 handshakes; a replica that is not there does not delay readiness
        by more than the connect timeout (the breaker and the ladder deal with it).
        """
        connect_timeout_s = self.settings.torchserve.connect_timeout_ms / 1000.0
        replicas = self._all_replicas()
        connected = await asyncio.gather(*(r.client.connect(connect_timeout_s) for r in replicas))
        for replica, ok in zip(replicas, connected, strict=True):
            if not ok:
                log.warning("replica %s not reachable at start", replica.name)
        delay_s = 0.05
        while True:
            try:
                await self.redis.ping()
                # Never decide before the kill switches and overrides are known.
                if not self.shared.status().in_sync and not await self.shared.sync():
                    raise aioredis.ConnectionError(self.shared.status().error)
            except (aioredis.RedisError, OSError) as exc:
                log.warning("waiting for Redis at %s: %s", self.settings.redis.url, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)
                continue
            await self._set_health(SERVING)
            log.info("ready: health SERVING")
            return

    def _all_replicas(self) -> list[Replica]:
        return [*self.replicas, *([self.challenger] if self.challenger else [])]

    def _audit_view(self) -> AuditView:
        shipper = self.audit.shipper.status()
        return AuditView(shipper.store_ok, shipper.backlog_bytes, shipper.last_error)

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
            grace_s = self.settings.server.grace_period_s
            if self.admin_server is not None:
                await self.admin_server.stop(grace=grace_s)
            await self.server.stop(grace=grace_s)
            await self.engine.stop()
            await self.shared.stop()
            for replica in reversed(self._all_replicas()):
                await replica.client.stop()
            await self.redis.aclose()
            await self.status_redis.aclose()
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
