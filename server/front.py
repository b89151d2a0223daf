"""``GrpcFront``: the server's gRPC side. The DecisionService port with health and
reflection, the AdminService port (its own, token-checked), TLS on both (certificates
reloaded when their files change: ``server.tls``).

Ports are bound before anything else starts (a port in use fails the start at once),
the servers start last, and both stop together: concurrently, so a shutdown takes one
grace period, not one per server.

Health: "" and ``decision.v1.DecisionService`` say whether decisions are served;
``decision.audit`` says whether the audit store is taking the journal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from core.deadline import (
    CALL_SLOTS,
    CONNECTION_AGE_GRACE_MS,
    QUEUED_CALLS_MAX,
    QUEUED_CALLS_SHED,
)
from decision_client.v1 import admin_pb2, decision_pb2
from server.admin.auth import AdminAuthInterceptor, Role, TokenBook
from server.admin.servicer import ADMIN_SERVICE, READ_METHODS, AdminServicer
from server.intake import CallSlots
from server.servicer import DecisionServicer, add_decision_service, add_tolerant_service
from server.settings import Settings
from server.tls import CertificateFiles

log = logging.getLogger(__name__)

DECISION_SERVICE = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
AUDIT_HEALTH = "decision.audit"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """SO_REUSEPORT only for the workers of one server (``server.workers``): a server on
    its own must not silently share its port with another one started by mistake. Two
    limits that gRPC's core enforces before any Python runs: the per-connection stream
    cap (a call past it gets RST_STREAM(REFUSED_STREAM), or RESOURCE_EXHAUSTED at once
    from a client with ``CALLER_OPTIONS``) and the process's queue of calls the event
    loop has not taken yet (a call past it is cancelled: the caller sees CANCELLED; the
    call slots, ``server.intake``, take calls as they come, so it holds only what they
    cannot take). A maximum connection age when one is set."""
    server = settings.server
    options = [
        ("grpc.so_reuseport", 1 if server.workers > 1 else 0),
        ("grpc.max_concurrent_streams", server.max_concurrent_streams),
        ("grpc.server.max_pending_requests", QUEUED_CALLS_SHED),
        ("grpc.server.max_pending_requests_hard_limit", QUEUED_CALLS_MAX),
    ]
    if server.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", round(server.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_MS),
        ]
    return options


def add_port(
    server: grpc.aio.Server, address: str, settings: Settings, *, client_ca_file: str = ""
) -> int:
    """Binds ``address``: plaintext, or TLS from the settings' files, read again when they
    change (``server.tls``); with ``client_ca_file``, clients must present a certificate
    that CA signed (mTLS)."""
    server_settings = settings.server
    if not server_settings.tls_cert_file:
        return server.add_insecure_port(address)
    files = CertificateFiles(
        server_settings.tls_cert_file, server_settings.tls_key_file, client_ca_file
    )
    return server.add_secure_port(address, files.credentials())


def admin_server(
    settings: Settings,
    servicer: AdminServicer,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """AdminService behind token checks, with reflection, on a server of its own;
    ``interceptors`` run before the token check (a refused call is measured too)."""
    admin = settings.admin
    tokens = TokenBook.load(admin.tokens.get_secret_value())
    if not len(tokens):
        log.warning("AdminService has no tokens: every admin call will be refused")
    server = grpc.aio.server(
        interceptors=[
            *interceptors,
            AdminAuthInterceptor(tokens, READ_METHODS, default_role=Role.OPERATOR),
        ],
        options=server_options(settings),
    )
    add_tolerant_service(
        servicer, admin_pb2.DESCRIPTOR.services_by_name["AdminService"], admin_pb2, server
    )
    reflection.enable_server_reflection((ADMIN_SERVICE, reflection.SERVICE_NAME), server)
    return server


class GrpcFront:
    def __init__(
        self,
        settings: Settings,
        decisions: DecisionServicer,
        admin: AdminServicer,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        """``interceptors``: on both servers (request metrics)."""
        self._settings = settings
        self.health = health.aio.HealthServicer()
        self._server = grpc.aio.server(
            interceptors=list(interceptors),
            options=server_options(settings),
        )
        self.slots = CallSlots(
            self._server, add_decision_service(decisions, self._server), interceptors, CALL_SLOTS
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (DECISION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._admin = admin_server(settings, admin, interceptors)
        self.port = 0
        self.admin_port = 0

    def bind(self) -> None:
        """Binds both ports (port 0: any free one; see ``port``, ``admin_port``)."""
        settings = self._settings
        self.port = add_port(
            self._server,
            f"{settings.server.host}:{settings.server.port}",
            settings,
            client_ca_file=settings.server.tls_client_ca_file,
        )
        admin = settings.admin
        self.admin_port = add_port(
            self._admin,
            f"{admin.host}:{admin.port}",
            settings,
            client_ca_file=admin.tls_client_ca_file,
        )

    async def start(self) -> None:
        """Starts serving on the bound ports, health NOT_SERVING until ``set_serving``."""
        await self.set_serving(False)
        await self._server.start()
        self.slots.start()
        log.info("DecisionService listening on %s:%d", self._settings.server.host, self.port)
        await self._admin.start()
        log.info("AdminService listening on %s:%d", self._settings.admin.host, self.admin_port)

    async def set_serving(self, serving: bool) -> None:
        for service in ("", DECISION_SERVICE):
            await self.health.set(service, SERVING if serving else NOT_SERVING)

    async def set_decision_serving(self, serving: bool) -> None:
        """DecisionService's health alone (the readiness probe's; liveness asks "")."""
        await self.health.set(DECISION_SERVICE, SERVING if serving else NOT_SERVING)

    async def set_audit_serving(self, serving: bool) -> None:
        await self.health.set(AUDIT_HEALTH, SERVING if serving else NOT_SERVING)

    async def stop(self) -> None:
        """NOT_SERVING, then both servers stop taking calls and let those in flight
        finish within the grace period, together."""
        await self.health.enter_graceful_shutdown()
        grace_s = self._settings.server.grace_period_s
        await asyncio.gather(*(s.stop(grace=grace_s) for s in (self._server, self._admin)))
        await self.slots.stop()
