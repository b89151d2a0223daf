"""``ControlPlane``: what AdminService does, transport-agnostic.

Each change is validated (``InvalidArgument`` names the field), written to the shared
state (every server applies it within a second) and then recorded as an admin audit row
with the effective value before and after. If the journal refuses the row, the change is
reverted and ``AuditUnavailable`` raised: no change stays unaudited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.exceptions

from feature_cache.store import FeatureReader
from server.audit.record import AdminRecord
from server.control.canary import CanaryComparison, CanaryMonitor
from server.control.flags import CANARY_AUTO_ROLLBACK
from server.control.recent import CallSummary
from server.control.shared import SharedControl, SyncStatus
from server.control.state import (
    BREAKER_PREFIX,
    CANARY_FIELD,
    FLAG_PREFIX,
    GLOBAL_SCOPE,
    KILL_PREFIX,
    BreakerMode,
    Change,
    ControlState,
    Entry,
    FlagSpec,
    flag_text,
)
from server.errors import (
    AuditUnavailable,
    FailedPrecondition,
    InvalidArgument,
    SharedStateUnavailable,
)
from server.router import Replica
from server.validation import check_symbol

log = logging.getLogger(__name__)

AUTO_ROLLBACK_ACTOR = "auto-rollback"
MAX_REASON_CHARS = 500
MAX_TTL_S = 7 * 24 * 3600.0


class Unchanged(Exception):
    """A conditional change found the value it would change already changed."""


class AdminAudit(Protocol):
    def record_admin_action(self, record: AdminRecord) -> None: ...


@dataclass(frozen=True, slots=True)
class ReplicaView:
    name: str
    address: str
    breaker_state: str
    mode: BreakerMode
    change: Change | None
    recent: CallSummary
    model_version: str


@dataclass(frozen=True, slots=True)
class FlagView:
    name: str
    value: str
    default: str
    description: str
    change: Change | None


@dataclass(frozen=True, slots=True)
class CanaryView:
    weight: float
    change: Change | None
    auto_rollback: bool
    comparison: CanaryComparison | None


@dataclass(frozen=True, slots=True)
class AuditView:
    store_ok: bool
    backlog_bytes: int
    last_error: str


@dataclass(frozen=True, slots=True)
class Status:
    server_id: str
    replicas: list[ReplicaView]
    flags: list[FlagView]
    kill_switches: dict[str, Change]
    canary: CanaryView
    sync: SyncStatus
    feature_ages_ms: dict[str, float]  # -1: no record
    audit: AuditView | None


def _now_us() -> int:
    return time.time_ns() // 1000


def _reason(reason: str) -> str:
    text = reason.strip()
    if not text:
        raise InvalidArgument("reason", "required: say why, for the audit trail")
    if len(text) > MAX_REASON_CHARS:
        raise InvalidArgument("reason", f"at most {MAX_REASON_CHARS} characters")
    return text


def _expiry(ttl_s: float, now_us: int) -> int:
    if not math.isfinite(ttl_s) or ttl_s < 0 or ttl_s > MAX_TTL_S:
        raise InvalidArgument("ttl_s", f"must be 0 (no expiry) to {MAX_TTL_S:.0f} seconds")
    return now_us + int(ttl_s * 1_000_000) if ttl_s > 0 else 0


def _change_dict(change: Change | None) -> dict[str, Any]:
    if change is None:
        return {}
    return {
        "changed_by": change.changed_by,
        "reason": change.reason,
        "changed_at_us": change.changed_at_us,
        "expires_at_us": change.expires_at_us,
    }


class ControlPlane:
    def __init__(
        self,
        *,
        shared: SharedControl,
        replicas: Sequence[Replica],
        addresses: Mapping[str, str],
        audit: AdminAudit,
        canary: CanaryMonitor | None,
        server_id: Callable[[], str],
        features: FeatureReader,
        audit_view: Callable[[], AuditView | None] = lambda: None,
    ) -> None:
        self._features = features
        self._audit_view = audit_view
        self._shared = shared
        self._replicas = {r.name: r for r in replicas}
        self._addresses = dict(addresses)
        self._audit = audit
        self._canary = canary
        self._server_id = server_id

    @property
    def flags(self) -> Mapping[str, FlagSpec]:
        return self._shared.flags

    async def _apply(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        field_name: str,
        entry: Entry | None,
        before: Callable[[ControlState], Mapping[str, Any]],
        after: Mapping[str, Any],
        reason: str,
        only_if: Callable[[ControlState], bool] | None = None,
        revert_unaudited: bool = True,
    ) -> ControlState:
        """Writes ``entry`` and its audit row; ``before`` describes the entry it replaced
        (read in the write's transaction, so the row is right however stale this
        server's copy was). Returns that state; raises ``Unchanged`` when ``only_if``
        refused it.
        ``revert_unaudited``: undo the change when the journal refuses its audit row;
        False for a safety change (a rollback), which stays and is logged instead."""
        put = await self._shared.put(field_name, entry, only_if=only_if)
        if not put.applied:
            raise Unchanged
        record = AdminRecord(
            action_id=str(uuid.uuid4()),
            at_us=_now_us(),
            actor=actor,
            action=action,
            target=target,
            before=dict(before(put.before)),
            after=dict(after),
            reason=reason,
        )
        try:
            self._audit.record_admin_action(record)
        except AuditUnavailable:
            if not revert_unaudited:
                log.error("admin change %s %s kept, not audited: %s", action, target, record)
                return put.before
            log.error("admin change %s %s not audited: reverting it", action, target)
            try:
                # Only if still ours: a later change (audited) must not be undone.
                await self._shared.put(
                    field_name,
                    put.before.entries.get(field_name),
                    only_if=lambda state: state.entries.get(field_name) == entry,
                )
            except SharedStateUnavailable:
                log.error("admin change %s %s kept, not audited: %s", action, target, record)
            raise
        log.info(
            "admin: %s %s by %s: %s -> %s (%s)",
            action,
            target,
            actor,
            record.before,
            record.after,
            reason,
        )
        return put.before

    def _replica(self, name: str) -> str:
        if name not in self._addresses:
            raise InvalidArgument(
                "replica", f"unknown replica {name!r}; one of {', '.join(sorted(self._addresses))}"
            )
        return name

    async def set_breaker(
        self, actor: str, replica: str, mode: BreakerMode, reason: str, ttl_s: float
    ) -> tuple[BreakerMode, BreakerMode, int]:
        """Returns the mode before and after, and when the override expires (0: never)."""
        name = self._replica(replica)
        why = _reason(reason)
        now_us = _now_us()
        expires_at_us = _expiry(ttl_s, now_us) if mode is not BreakerMode.AUTO else 0
        change = Change(actor, why, now_us, expires_at_us)

        def describe(state: ControlState) -> dict[str, Any]:
            before_mode, before_change = state.breaker(name, now_us)
            return {"mode": before_mode.name, **_change_dict(before_change)}

        previous = await self._apply(
            actor=actor,
            action="set_breaker",
            target=name,
            field_name=BREAKER_PREFIX + name,
            entry=None if mode is BreakerMode.AUTO else Entry(mode.name, change),
            before=describe,
            after={"mode": mode.name, "expires_at_us": expires_at_us},
            reason=why,
        )
        return previous.breaker_mode(name, now_us), mode, expires_at_us

    @staticmethod
    def _flag_view(state: ControlState, spec: FlagSpec, now_us: int) -> FlagView:
        value, change = state.flag(spec, now_us)
        return FlagView(spec.name, flag_text(value), spec.default, spec.description, change)

    def list_flags(self) -> list[FlagView]:
        now_us = _now_us()
        state = self._shared.state
        return [self._flag_view(state, spec, now_us) for spec in self.flags.values()]

    async def set_flag(
        self, actor: str, name: str, value: str, *, reset: bool, reason: str, ttl_s: float
    ) -> tuple[FlagView, FlagView]:
        spec = self.flags.get(name)
        if spec is None:
            raise InvalidArgument("name", f"unknown flag {name!r}; one of {', '.join(self.flags)}")
        why = _reason(reason)
        now_us = _now_us()
        entry = None
        if not reset:
            try:
                parsed = spec.parse(value)
            except ValueError as exc:
                raise InvalidArgument("value", str(exc)) from None
            entry = Entry(flag_text(parsed), Change(actor, why, now_us, _expiry(ttl_s, now_us)))

        def describe(state: ControlState) -> dict[str, Any]:
            view = self._flag_view(state, spec, now_us)
            return {"value": view.value, **_change_dict(view.change)}

        previous = await self._apply(
            actor=actor,
            action="reset_flag" if reset else "set_flag",
            target=name,
            field_name=FLAG_PREFIX + name,
            entry=entry,
            before=describe,
            after={
                "value": spec.default if entry is None else entry.value,
                "expires_at_us": 0 if entry is None else entry.change.expires_at_us,
            },
            reason=why,
        )
        now_us = _now_us()
        return (
            self._flag_view(previous, spec, now_us),
            self._flag_view(self._shared.state, spec, now_us),
        )

    async def set_canary(self, actor: str, weight: float, reason: str) -> tuple[float, float]:
        if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
            raise InvalidArgument("weight", "must be a share in [0, 1]")
        if weight > 0 and "challenger" not in self._addresses:
            raise FailedPrecondition("no challenger replica is configured")
        return await self._set_canary(actor, weight, _reason(reason))

    async def _set_canary(
        self,
        actor: str,
        weight: float,
        why: str,
        *,
        only_if: Callable[[ControlState], bool] | None = None,
        revert_unaudited: bool = True,
    ) -> tuple[float, float]:
        now_us = _now_us()

        def describe(state: ControlState) -> dict[str, Any]:
            before, before_change = state.canary(now_us)
            return {"weight": before, **_change_dict(before_change)}

        previous = await self._apply(
            actor=actor,
            action="set_canary",
            target="challenger",
            field_name=CANARY_FIELD,
            entry=Entry(weight, Change(actor, why, now_us)),
            before=describe,
            after={"weight": weight},
            reason=why,
            only_if=only_if,
            revert_unaudited=revert_unaudited,
        )
        # Every server's canary monitor starts its windows afresh when it sees the change.
        return previous.canary(now_us)[0], weight

    async def rollback_canary(self, breach: str) -> None:
        """The canary monitor's rollback: weight 0 on every server, audited once however
        many servers see the breach (the first one's write wins, the others find 0)."""
        with contextlib.suppress(Unchanged):
            await self._set_canary(
                AUTO_ROLLBACK_ACTOR,
                0.0,
                f"automatic rollback: {breach}",
                only_if=lambda state: state.canary(_now_us())[0] > 0,
                revert_unaudited=False,
            )

    def auto_rollback(self) -> bool:
        return bool(self._shared.state.flag_value(CANARY_AUTO_ROLLBACK, _now_us()))

    async def kill_switch(
        self, actor: str, scope: str, engaged: bool, reason: str, ttl_s: float
    ) -> tuple[bool, bool, int]:
        if scope != GLOBAL_SCOPE:
            check_symbol("scope", scope)
        why = _reason(reason)
        now_us = _now_us()
        expires_at_us = _expiry(ttl_s, now_us) if engaged else 0

        def describe(state: ControlState) -> dict[str, Any]:
            before_change = state.kill_switches(now_us).get(scope)
            return {"engaged": before_change is not None, **_change_dict(before_change)}

        previous = await self._apply(
            actor=actor,
            action="engage_kill_switch" if engaged else "release_kill_switch",
            target=scope,
            field_name=KILL_PREFIX + scope,
            entry=Entry(True, Change(actor, why, now_us, expires_at_us)) if engaged else None,
            before=describe,
            after={"engaged": engaged, "expires_at_us": expires_at_us},
            reason=why,
        )
        return scope in previous.kill_switches(now_us), engaged, expires_at_us

    async def feature_ages_ms(self, timeout_s: float = 1.0) -> dict[str, float]:
        """Age of each symbol's feature record; empty when Redis does not answer."""
        try:
            async with asyncio.timeout(timeout_s):
                symbols = await self._features.symbols()
                records = await self._features.read_many(symbols) if symbols else []
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            log.warning("status: feature ages unavailable: %r", exc)
            return {}
        now_us = _now_us()
        return {
            symbol: -1.0 if record is None else record.age_ms(now_us)
            for symbol, record in zip(symbols, records, strict=True)
        }

    async def status(self) -> Status:
        feature_ages = await self.feature_ages_ms()
        now_us = _now_us()
        state = self._shared.state
        replicas = []
        for name, address in self._addresses.items():
            replica = self._replicas[name]
            mode, change = state.breaker(name, now_us)
            replicas.append(
                ReplicaView(
                    name,
                    address,
                    replica.breaker.state,
                    mode,
                    change,
                    replica.recent.summary(),
                    replica.recent.last_version,
                )
            )
        weight, canary_change = state.canary(now_us)
        return Status(
            server_id=self._server_id(),
            replicas=replicas,
            flags=self.list_flags(),
            kill_switches=state.kill_switches(now_us),
            canary=CanaryView(
                weight,
                canary_change,
                self.auto_rollback(),
                self._canary.compare() if self._canary is not None else None,
            ),
            sync=self._shared.status(),
            feature_ages_ms=feature_ages,
            audit=self._audit_view(),
        )
