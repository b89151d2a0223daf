"""Audited changes to the shared control state, and the canary's automatic rollback.

``AuditedChanges`` is the one way a setting changes for every server: the setting and
its admin audit row (the effective value before and after) are written in one
transaction of the durable store, then distributed. On-call's levers
(``server.admin.control_plane``) and the canary monitor's rollback (``CanaryRollback``)
both go through it, so neither needs the other.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from server.audit.record import AdminRecord
from server.control.flags import CANARY_AUTO_ROLLBACK
from server.control.shared import SharedControl
from server.control.state import CANARY_FIELD, Change, ControlState, Entry

log = logging.getLogger(__name__)

AUTO_ROLLBACK_ACTOR = "auto-rollback"


class Unchanged(Exception):
    """A conditional change found the value it would change already changed."""


def now_us() -> int:
    return time.time_ns() // 1000


def change_dict(change: Change | None) -> dict[str, Any]:
    """A change as an audit row's before/after shows it."""
    if change is None:
        return {}
    return {
        "changed_by": change.changed_by,
        "reason": change.reason,
        "changed_at_us": change.changed_at_us,
        "expires_at_us": change.expires_at_us,
    }


class AuditedChanges:
    def __init__(self, shared: SharedControl) -> None:
        self.shared = shared

    async def apply(
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
    ) -> ControlState:
        """Writes ``entry`` with its audit row; ``before`` describes the entry it
        replaced (read in the write's transaction, so the row is right however stale
        this server's copy was). Returns that state; raises ``Unchanged`` when
        ``only_if`` refused it, ``SharedStateUnavailable`` when the store did not take it."""

        def record_for(replaced: Entry | None) -> AdminRecord | None:
            state = self.shared.snapshot({} if replaced is None else {field_name: replaced})
            if only_if is not None and not only_if(state):
                return None
            return AdminRecord(
                action_id=str(uuid.uuid4()),
                at_us=now_us(),
                actor=actor,
                action=action,
                target=target,
                before=dict(before(state)),
                after=dict(after),
                reason=reason,
            )

        written = await self.shared.change(field_name, entry, record_for)
        if written is None:
            raise Unchanged
        log.info("admin: %s %s by %s -> %s (%s)", action, target, actor, dict(after), reason)
        replaced = written.before
        return self.shared.snapshot({} if replaced is None else {field_name: replaced})

    async def set_canary(
        self,
        actor: str,
        weight: float,
        why: str,
        *,
        only_if: Callable[[ControlState], bool] | None = None,
        forced: bool = False,
    ) -> tuple[float, float]:
        """The canary weight on every server; the weight before and after. ``forced``:
        a promotion made without the canary's judgement, said so in the audit record."""
        at_us = now_us()

        def describe(state: ControlState) -> dict[str, Any]:
            before, before_change = state.canary(at_us)
            return {"weight": before, **change_dict(before_change)}

        previous = await self.apply(
            actor=actor,
            action="set_canary",
            target="challenger",
            field_name=CANARY_FIELD,
            entry=Entry(weight, Change(actor, why, at_us)),
            before=describe,
            after={"weight": weight, "forced": True} if forced else {"weight": weight},
            reason=why,
            only_if=only_if,
        )
        # Every server's canary monitor starts its windows afresh when it sees the change.
        return previous.canary(at_us)[0], weight


def auto_rollback_on(state: ControlState, at_us: int) -> bool:
    """The flag ``canary_auto_rollback``: whether a breach rolls the canary back."""
    return bool(state.flag_value(CANARY_AUTO_ROLLBACK, at_us))


class CanaryRollback:
    """What the canary monitor may do about the canary: read its setting, see whether
    on-call lets it roll back by itself, and roll it back."""

    def __init__(self, changes: AuditedChanges) -> None:
        self._changes = changes

    def setting(self) -> object:
        """The canary setting in effect (the monitor's windows start afresh on a change)."""
        return self._changes.shared.state.entries.get(CANARY_FIELD)

    def enabled(self) -> bool:
        return auto_rollback_on(self._changes.shared.state, now_us())

    async def roll_back(self, breach: str) -> bool:
        """Weight 0 on every server, audited once however many servers see the breach
        (the first one's write wins, the others find 0 and return False)."""
        try:
            await self._changes.set_canary(
                AUTO_ROLLBACK_ACTOR,
                0.0,
                f"automatic rollback: {breach}",
                only_if=lambda state: state.canary(now_us())[0] > 0,
            )
        except Unchanged:
            return False
        return True
