"""AdminService over gRPC: converts protobuf to ``ControlPlane`` calls and back.

Authentication and roles are the interceptor's (``server.admin.auth``); the servicer
reads the admitted principal to name the actor of each change.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import orjson
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from core.histogram import LATENCY_BOUNDS_S
from core.reports import LabelProgress
from decision_client.v1 import admin_pb2, admin_pb2_grpc
from server.admin.auth import Role, current_principal
from server.admin.control_plane import ControlPlane
from server.admin.views import DriftView, FlagView
from server.audit.record import AdminRecord
from server.audit.shipper import describe
from server.audit.store import AdminActionQuery, AuditStore
from server.control.canary import WindowSummary
from server.control.fleet import FleetMember
from server.control.state import BreakerMode, Change
from server.errors import FailedPrecondition, InvalidArgument, StoreUnavailable, grpc_errors

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# What each method needs; every other method of the admin server needs operator.
READ_METHODS = {
    f"/{ADMIN_SERVICE}/GetStatus": Role.VIEWER,
    f"/{ADMIN_SERVICE}/ListFlags": Role.VIEWER,
    f"/{ADMIN_SERVICE}/ListAdminActions": Role.VIEWER,
    f"/{ADMIN_SERVICE}/ListServers": Role.VIEWER,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.VIEWER,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Role.VIEWER,
}

Context = grpc.aio.ServicerContext[Any, Any]


def _timestamp(us: int) -> Timestamp | None:
    if us <= 0:
        return None
    ts = Timestamp()
    ts.FromMicroseconds(us)
    return ts


def change_to_pb(change: Change | None) -> admin_pb2.ChangeInfo | None:
    if change is None:
        return None
    return admin_pb2.ChangeInfo(
        changed_by=change.changed_by,
        reason=change.reason,
        changed_at=_timestamp(change.changed_at_us),
        expires_at=_timestamp(change.expires_at_us),
    )


def flag_to_pb(flag: FlagView) -> admin_pb2.Flag:
    return admin_pb2.Flag(
        name=flag.name,
        value=flag.value,
        default_value=flag.default,
        description=flag.description,
        change=change_to_pb(flag.change),
    )


def window_to_pb(window: WindowSummary) -> admin_pb2.CanaryWindow:
    return admin_pb2.CanaryWindow(
        decisions=window.decisions,
        error_rate=window.error_rate,
        p99_ms=window.p99_ms,
        fallback_rate=window.fallback_rate,
    )


def breaker_mode(value: int) -> BreakerMode:
    try:
        return BreakerMode(value)
    except ValueError:
        raise InvalidArgument(
            "mode",
            "must be BREAKER_MODE_AUTO, BREAKER_MODE_FORCE_OPEN or BREAKER_MODE_FORCE_CLOSED",
        ) from None


DEFAULT_HISTORY_LIMIT = 100
MAX_HISTORY_LIMIT = 1000
HISTORY_READ_TIMEOUT_S = 5.0


def history_query(request: admin_pb2.ListAdminActionsRequest) -> AdminActionQuery:
    """The store query of a ListAdminActions request; INVALID_ARGUMENT naming the field."""
    if not 0 <= request.limit <= MAX_HISTORY_LIMIT:
        raise InvalidArgument(
            "limit", f"must be 0 (for {DEFAULT_HISTORY_LIMIT}) to {MAX_HISTORY_LIMIT}"
        )
    since_us = request.since.ToMicroseconds() if request.HasField("since") else 0
    until_us = request.until.ToMicroseconds() if request.HasField("until") else 0
    if since_us and until_us and until_us <= since_us:
        raise InvalidArgument("until", "must be after since")
    return AdminActionQuery(
        since_us=since_us,
        until_us=until_us,
        actor=request.actor,
        target=request.target,
        limit=request.limit or DEFAULT_HISTORY_LIMIT,
    )


def action_to_pb(record: AdminRecord) -> admin_pb2.AdminAction:
    return admin_pb2.AdminAction(
        action_id=record.action_id,
        at=_timestamp(record.at_us),
        actor=record.actor,
        action=record.action,
        target=record.target,
        before_json=orjson.dumps(record.before, option=orjson.OPT_SORT_KEYS).decode(),
        after_json=orjson.dumps(record.after, option=orjson.OPT_SORT_KEYS).decode(),
        reason=record.reason,
    )


def server_to_pb(member: FleetMember) -> admin_pb2.ServerInfo:
    return admin_pb2.ServerInfo(
        server_id=member.server_id,
        admin_address=member.admin_address,
        decision_address=member.decision_address,
        host=member.host,
        pid=member.pid,
        started_at=_timestamp(member.started_at_us),
        seen_at=_timestamp(member.seen_at_us),
        serving=member.serving,
        in_flight=member.in_flight,
        decisions=member.decisions,
        breakers=dict(member.breakers),
        decisions_by_source=dict(member.decisions_by_source),
        fallbacks=dict(member.fallbacks),
        shadow_scored=member.shadow_scored,
        shadow_agreed=member.shadow_agreed,
        latency={
            source: admin_pb2.LatencyCounts(counts=counts)
            for source, counts in member.latency_counts.items()
        },
        latency_bounds_s=LATENCY_BOUNDS_S,
    )


def labels_to_pb(labels: LabelProgress | None, error: str) -> admin_pb2.LabelStatus:
    if labels is None:
        return admin_pb2.LabelStatus(reported=False, error=error)
    return admin_pb2.LabelStatus(
        reported=True,
        behind_s=labels.behind_s,
        stopped=labels.stopped,
        newest_decision=_timestamp(labels.newest_decision_us)
        if labels.newest_decision_us
        else None,
        newest_labelled=_timestamp(labels.newest_labelled_us)
        if labels.newest_labelled_us
        else None,
        reported_at=_timestamp(labels.at_us),
    )


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, plane: ControlPlane, store: AuditStore | None = None) -> None:
        """``store``: the audit store the admin history is read from (None: audit off)."""
        self._plane = plane
        self._store = store
        # One history read at a time: a hung store holds one worker thread and one of the
        # shipper's pool connections, not one per viewer polling it.
        self._reading = asyncio.Lock()

    @grpc_errors
    async def ListAdminActions(
        self, request: admin_pb2.ListAdminActionsRequest, context: Context
    ) -> admin_pb2.ListAdminActionsResponse:
        query = history_query(request)
        if self._store is None:
            raise FailedPrecondition("the audit trail is off on this server: no admin history")
        try:
            async with asyncio.timeout(HISTORY_READ_TIMEOUT_S), self._reading:
                # A SQL read: off the event loop, which keeps deciding meanwhile.
                records = await asyncio.to_thread(self._store.admin_actions, query)
        except TimeoutError as exc:
            raise StoreUnavailable(f"no answer within {HISTORY_READ_TIMEOUT_S:.0f} s") from exc
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(describe(exc)) from exc
        return admin_pb2.ListAdminActionsResponse(actions=[action_to_pb(r) for r in records])

    @grpc_errors
    async def ListServers(
        self, request: admin_pb2.ListServersRequest, context: Context
    ) -> admin_pb2.ListServersResponse:
        return admin_pb2.ListServersResponse(
            servers=[server_to_pb(m) for m in await self._plane.servers()]
        )

    @grpc_errors
    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: Context
    ) -> admin_pb2.GetStatusResponse:
        status = await self._plane.status()
        canary = status.canary
        comparison = canary.comparison
        loss = status.sync.last_loss
        response = admin_pb2.GetStatusResponse(
            server_id=status.server_id,
            replicas=[
                admin_pb2.ReplicaStatus(
                    name=r.name,
                    address=r.address,
                    breaker_state=r.breaker_state,
                    mode=admin_pb2.BreakerMode.ValueType(r.mode),
                    override=change_to_pb(r.change),
                    recent_calls=r.recent.calls,
                    recent_failures=r.recent.failures,
                    recent_p50_ms=r.recent.p50_ms,
                    recent_p99_ms=r.recent.p99_ms,
                    model_version=r.model_version,
                    breaker_failure_rate=r.rates.failure_rate,
                    breaker_slow_call_rate=r.rates.slow_rate,
                )
                for r in status.replicas
            ],
            flags=[flag_to_pb(f) for f in status.flags],
            kill_switches=[
                admin_pb2.KillSwitchState(scope=scope, change=change_to_pb(change))
                for scope, change in sorted(status.kill_switches.items())
            ],
            canary=admin_pb2.CanaryStatus(
                weight=canary.weight,
                change=change_to_pb(canary.change),
                auto_rollback=canary.auto_rollback,
                canary=window_to_pb(comparison.canary) if comparison else None,
                champion=window_to_pb(comparison.champion) if comparison else None,
                score_psi=(comparison.score_psi or 0.0) if comparison else 0.0,
                promotion_refused=canary.promotion_refused or "",
                score_psi_evaluated=comparison is not None and comparison.score_psi is not None,
                waiting_for=canary.waiting,
            ),
            features=[
                admin_pb2.SymbolFreshness(symbol=symbol, age_ms=age)
                for symbol, age in status.feature_ages_ms.items()
            ],
            shared_state=admin_pb2.SharedStateStatus(
                in_sync=status.sync.listening,
                synced_at=_timestamp(status.sync.read_at_us),
                error=status.sync.listen_error,
                version=max(status.sync.version, 0),
                durable_ok=status.sync.durable_ok,
                durable_error=status.sync.durable_error,
                losses=status.sync.losses,
                last_loss_at=_timestamp(loss.at_us) if loss else None,
                last_loss=loss.what if loss else "",
            ),
            model_versions={r.name: r.model_version for r in status.replicas if r.model_version},
        )
        mirror = status.mirror
        response.feature_mirror.CopyFrom(
            admin_pb2.FeatureMirrorStatus(enabled=False)
            if mirror is None
            else admin_pb2.FeatureMirrorStatus(
                live=mirror.live,
                enabled=True,
                symbols=mirror.symbols,
                since=_timestamp(mirror.since_us),
                error=mirror.error,
                losses=mirror.losses,
            )
        )
        response.ignored_feeds.extend(
            admin_pb2.IgnoredFeed(
                symbol=feed.symbol,
                since=_timestamp(feed.since_us),
                events=feed.events,
                reason=feed.reason,
            )
            for feed in status.ignored_feeds
        )
        response.labels.CopyFrom(labels_to_pb(status.labels, status.reports_error))
        if status.drift is not None:
            response.drift.CopyFrom(drift_to_pb(status.drift))
        if status.audit is not None:
            response.audit.CopyFrom(
                admin_pb2.AuditBacklog(
                    store_ok=status.audit.store_ok,
                    backlog_bytes=status.audit.backlog_bytes,
                    last_error=status.audit.last_error,
                    full=status.audit.full,
                )
            )
        return response

    @grpc_errors
    async def SetBreaker(
        self, request: admin_pb2.SetBreakerRequest, context: Context
    ) -> admin_pb2.SetBreakerResponse:
        before, after, expires_at_us = await self._plane.set_breaker(
            current_principal().name,
            request.replica,
            breaker_mode(request.mode),
            request.reason,
            request.ttl_s,
        )
        return admin_pb2.SetBreakerResponse(
            before=admin_pb2.BreakerMode.ValueType(before),
            after=admin_pb2.BreakerMode.ValueType(after),
            expires_at=_timestamp(expires_at_us),
        )

    @grpc_errors
    async def SetFlag(
        self, request: admin_pb2.SetFlagRequest, context: Context
    ) -> admin_pb2.SetFlagResponse:
        before, after = await self._plane.set_flag(
            current_principal().name,
            request.name,
            request.value,
            reset=request.reset,
            reason=request.reason,
            ttl_s=request.ttl_s,
        )
        return admin_pb2.SetFlagResponse(before=flag_to_pb(before), after=flag_to_pb(after))

    @grpc_errors
    async def ListFlags(
        self, request: admin_pb2.ListFlagsRequest, context: Context
    ) -> admin_pb2.ListFlagsResponse:
        return admin_pb2.ListFlagsResponse(flags=[flag_to_pb(f) for f in self._plane.list_flags()])

    @grpc_errors
    async def SetCanary(
        self, request: admin_pb2.SetCanaryRequest, context: Context
    ) -> admin_pb2.SetCanaryResponse:
        before, after = await self._plane.set_canary(
            current_principal().name, request.weight, request.reason, force=request.force
        )
        return admin_pb2.SetCanaryResponse(before=before, after=after)

    @grpc_errors
    async def KillSwitch(
        self, request: admin_pb2.KillSwitchRequest, context: Context
    ) -> admin_pb2.KillSwitchResponse:
        before, after, expires_at_us = await self._plane.kill_switch(
            current_principal().name, request.scope, request.engaged, request.reason, request.ttl_s
        )
        return admin_pb2.KillSwitchResponse(
            before=before, after=after, expires_at=_timestamp(expires_at_us)
        )


def drift_to_pb(view: DriftView) -> admin_pb2.DriftStatus:
    drift = view.status
    return admin_pb2.DriftStatus(
        enabled=True,
        model_version=drift.model_version,
        samples=drift.samples,
        scores=drift.scores,
        features=[
            admin_pb2.FeatureDrift(feature=name, psi=value)
            for name, value in drift.feature_psi.items()
        ],
        score_psi=drift.score_psi,
        computed_at=_timestamp(drift.computed_at_us),
        problem=drift.problem,
        watch_psi=view.watch_psi,
        act_psi=view.act_psi,
    )
