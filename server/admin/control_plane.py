"""``ControlPlane``: what AdminService does, transport-agnostic.

Each change is validated (``InvalidArgument`` names the field), then written through
``AuditedChanges``: the setting and its admin audit row (the effective value before and
after) in one transaction of the audit store's database, before the call answers; every
server applies it within a second. No change is ever made unaudited.
"""

from __future__ import annotations

import asyncio
import logging
import math
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import redis.exceptions

from core.drift import DRIFTING_PSI, SHIFTED_PSI
from core.reports import IgnoredFeed, LabelProgress
from feature_cache.mirror import FeatureMirror
from feature_cache.store import FeatureReader
from server.admin.views import (
    AuditView,
    CanaryView,
    DriftView,
    FlagView,
    ReplicaView,
    Status,
)
from server.audit.trail import AuditTrail
from server.control.canary import CanaryComparison, CanaryMonitor, waiting_for
from server.control.changes import AuditedChanges, auto_rollback_on, change_dict
from server.control.changes import now_us as _now_us
from server.control.fleet import FleetMember
from server.control.state import (
    BREAKER_PREFIX,
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
from server.drift import DriftMonitor
from server.errors import FailedPrecondition, FleetUnavailable, InvalidArgument
from server.replica import Replica
from server.validation import check_symbol

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 500
MAX_TTL_S = 7 * 24 * 3600.0


def _reason(reason: str) -> str:
    text = reason.strip()
    if not text:
        raise InvalidArgument("reason", "required: say why, for the audit trail")
    if len(text) > MAX_REASON_CHARS:
        raise InvalidArgument("reason", f"at most {MAX_REASON_CHARS} characters")
    if not text.isprintable():
        # Shown in status, history and Decide's reason: a line break, an escape sequence or
        # a bidirectional override there would forge or hide text.
        i, char = next((i, c) for i, c in enumerate(text) if not c.isprintable())
        raise InvalidArgument(
            "reason",
            f"must be one line of printable text: character {i + 1} is U+{ord(char):04X}"
            f" ({unicodedata.name(char, 'a control character')})",
        )
    return text


def _expiry(ttl_s: float, now_us: int) -> int:
    if not math.isfinite(ttl_s) or ttl_s < 0 or ttl_s > MAX_TTL_S:
        raise InvalidArgument("ttl_s", f"must be 0 (no expiry) to {MAX_TTL_S:.0f} seconds")
    return now_us + int(ttl_s * 1_000_000) if ttl_s > 0 else 0


class ControlPlane:
    def __init__(
        self,
        *,
        changes: AuditedChanges,
        replicas: Sequence[Replica],
        addresses: Mapping[str, str],
        canary: CanaryMonitor | None,
        server_id: Callable[[], str],
        features: FeatureReader,
        mirror: FeatureMirror | None = None,
        audit: AuditTrail | None = None,
        drift: DriftMonitor | None = None,
        fleet: Callable[[], Awaitable[list[FleetMember]]] | None = None,
    ) -> None:
        """``audit``, ``drift``: None when the server keeps none. ``fleet``: reads the
        registered servers (None: this server alone is known)."""
        self._fleet = fleet
        self._features = features
        self._mirror = mirror
        self._audit = audit
        self._drift = drift
        self._changes = changes
        self._shared = changes.shared
        self._replicas = {r.name: r for r in replicas}
        self._addresses = dict(addresses)
        self._canary = canary
        self._server_id = server_id

    @property
    def flags(self) -> Mapping[str, FlagSpec]:
        return self._shared.flags

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
            return {"mode": before_mode.name, **change_dict(before_change)}

        previous = await self._changes.apply(
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
            return {"value": view.value, **change_dict(view.change)}

        previous = await self._changes.apply(
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

    async def set_canary(
        self, actor: str, weight: float, reason: str, *, force: bool = False
    ) -> tuple[float, float]:
        """``force``: promote (weight 1) without this server's judgement of the canary."""
        if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
            raise InvalidArgument("weight", "must be a share in [0, 1]")
        if weight > 0 and "challenger" not in self._addresses:
            raise FailedPrecondition("no challenger replica is configured")
        why = _reason(reason)
        if weight == 1.0 and not force:
            refusal = self._promotion_refused(
                self._shared.state.canary(_now_us())[0],
                self._canary.compare() if self._canary is not None else None,
            )
            if refusal is not None:
                raise FailedPrecondition(
                    f"promotion refused: {refusal}; to promote anyway, set force"
                    " (decisionctl canary promote --force)"
                )
        return await self._changes.set_canary(actor, weight, why, forced=force and weight == 1.0)

    def _promotion_refused(self, weight: float, comparison: CanaryComparison | None) -> str | None:
        """Why a promotion from ``weight`` would be refused, given this server's canary
        comparison (None: it has no monitor), in words; None when it would be taken. At
        weight 1 no decision reaches the champion, so nothing is compared and nothing
        rolls back by itself: a promotion needs a canary judged at a lower weight first,
        on this server's window (each server judges its own decisions)."""
        if weight >= 1.0:
            return None  # already promoted: setting it again changes nothing
        if weight <= 0.0:
            return "no canary is running; run one at a weight below 1 first"
        if self._canary is None or comparison is None:
            return "this server does not judge the canary"
        return self._canary.why_not_promote(comparison)

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
            return {"engaged": before_change is not None, **change_dict(before_change)}

        previous = await self._changes.apply(
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

    async def _reports(
        self, timeout_s: float = 1.0
    ) -> tuple[list[IgnoredFeed], LabelProgress | None, str]:
        """The ignored feeds and the labels' progress, and why they are unknown if so."""
        try:
            async with asyncio.timeout(timeout_s):
                ignored, labels = await self._features.reports()
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            return [], None, f"not read: {exc!r}"
        return ignored, labels, ""

    async def servers(self) -> list[FleetMember]:
        """Every registered server; ``FleetUnavailable`` when the shared store fails."""
        if self._fleet is None:
            return []
        try:
            return await self._fleet()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise FleetUnavailable(str(exc) or type(exc).__name__) from exc

    async def status(self) -> Status:
        feature_ages, (ignored_feeds, labels, reports_error) = await asyncio.gather(
            self.feature_ages_ms(), self._reports()
        )
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
                    replica.breaker.rates(),
                )
            )
        weight, canary_change = state.canary(now_us)
        comparison = self._canary.compare() if self._canary is not None else None
        return Status(
            server_id=self._server_id(),
            replicas=replicas,
            flags=self.list_flags(),
            kill_switches=state.kill_switches(now_us),
            canary=CanaryView(
                weight,
                canary_change,
                auto_rollback_on(state, now_us),
                comparison,
                self._promotion_refused(weight, comparison),
                waiting_for(comparison) if comparison and 0.0 < weight < 1.0 else [],
            ),
            sync=self._shared.status(),
            feature_ages_ms=feature_ages,
            audit=self._audit_status(),
            mirror=self._mirror.status() if self._mirror is not None else None,
            drift=self._drift_status(),
            ignored_feeds=ignored_feeds,
            labels=labels,
            reports_error=reports_error,
        )

    def _audit_status(self) -> AuditView | None:
        if self._audit is None:
            return None
        shipper = self._audit.shipper.status()
        return AuditView(shipper.store_ok, shipper.backlog_bytes, shipper.last_error, shipper.full)

    def _drift_status(self) -> DriftView | None:
        if self._drift is None:
            return None
        return DriftView(self._drift.status(), DRIFTING_PSI, SHIFTED_PSI)
