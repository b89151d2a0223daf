"""The audit trail as the server sees it: append before answering, ship in the background.

``AuditTrail.record_decisions`` builds one record per decision and appends them to the
journal in one write; it raises ``AuditUnavailable`` when the journal cannot take them,
so the engine never returns a decision that was not recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.backoff import Backoff
from core.domain import CallInfo, DecisionResult, OrderRequest
from core.settings import TelemetrySettings
from feature_cache.schema import FEATURE_NAMES, SCHEMA_VERSION
from server.audit.journal import SEGMENT_MAX_BYTES, Journal, JournalLocked, JournalWriteError
from server.audit.record import CallTallyRecord, DecisionRecord, ShadowRecord, encode
from server.audit.settings import AuditSettings
from server.audit.ship_process import ShipperProcess
from server.audit.shipper import ShipperStatus
from server.audit.store import AuditStore, create_store_engine
from server.errors import AuditUnavailable

log = logging.getLogger(__name__)

# How long a starting server waits for a journal folder another process still holds.
LOCK_WAIT_S = 15.0
# How long a starting server waits for its shippers' first try of the store: the
# children import and migrate in that time, a CPU burst better spent before the server
# answers than beside its first decisions (and the store's tables exist for history).
SHIPPER_START_WAIT_S = 10.0
# How often the store's health is looked at for the server's health service.
STORE_HEALTH_INTERVAL_S = 0.5


class DecisionAudit(Protocol):
    def record_decisions(
        self,
        call: CallInfo,
        orders: Sequence[OrderRequest],
        features: Sequence[Sequence[float] | None],
        results: Sequence[DecisionResult],
    ) -> None: ...


class UnrecordedDecisions:
    """``audit.enabled=false``: nothing is recorded (only to measure what the audit costs)."""

    def record_shadow(self, records: Sequence[ShadowRecord]) -> None:
        return None

    def record_decisions(
        self,
        call: CallInfo,
        orders: Sequence[OrderRequest],
        features: Sequence[Sequence[float] | None],
        results: Sequence[DecisionResult],
    ) -> None:
        return None


def decision_record(
    server_id: str,
    call: CallInfo,
    order: OrderRequest,
    features: Sequence[float] | None,
    result: DecisionResult,
) -> DecisionRecord:
    return DecisionRecord(
        decision_id=result.decision_id,
        request_id=result.request_id,
        trace_id=call.trace_id,
        client_id=order.client_id,
        caller=call.caller,
        server_id=server_id,
        received_at_us=call.received_at_ns // 1000,
        decided_at_us=result.decided_at_ns // 1000,
        symbol=order.symbol,
        side=order.side.name,
        quantity=order.quantity,
        limit_price=order.limit_price,
        decision=result.decision.name,
        score=result.score,
        threshold=result.threshold,
        source=result.source.name,
        model_name=result.model_name,
        model_version=result.model_version,
        feature_schema_version=SCHEMA_VERSION,
        features=None if features is None else dict(zip(FEATURE_NAMES, features, strict=True)),
        feature_overrides=dict(order.feature_overrides),
        feature_age_ms=result.feature_age_ms,
        reason=result.reason,
        features_us=result.features_us,
        model_us=result.model_us,
        total_us=result.total_us,
        feature_time_us=result.feature_time_us or None,
        reason_code=result.reason_code.label,
    )


@dataclass(frozen=True, slots=True)
class AuditStatus:
    journal_records: int  # appended since start
    journal_write_failures: int
    refused_decisions: int  # refused unrecorded while the backlog was at its cap
    shipper: ShipperStatus


async def _open(journal: Journal) -> None:
    """Opens the journal, waiting up to ``LOCK_WAIT_S`` for a process that still holds
    it: the worker this one replaces may still be shipping its last records."""
    backoff = Backoff(initial_s=0.05, max_s=1.0)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            await asyncio.to_thread(journal.open)
            return
        except JournalLocked:
            if time.monotonic() > deadline:
                raise
            log.warning("journal %s still held by another process; waiting", journal.directory)
            await asyncio.sleep(backoff.next_s())


class AuditTrail:
    """Journal, store and shipper, with the same start/stop lifecycle as the rest."""

    def __init__(
        self,
        settings: AuditSettings,
        telemetry: TelemetrySettings | None = None,
        *,
        adopted: Sequence[Path] = (),
    ) -> None:
        """``adopted``: journal folders no running server writes (an earlier run had more
        workers): shipped to the store beside this server's own, never written. The
        shippers' processes log as ``telemetry`` says, as the server does."""
        self.server_id = settings.server_id  # "" until the server knows its port
        self._settings = settings
        self._telemetry = telemetry or TelemetrySettings()
        self.journal = self._journal(Path(settings.journal_dir))
        self.store = AuditStore(create_store_engine(settings.database_url))
        self.shipper = self._shipper(self.journal, migrate=settings.migrate_on_start)
        self._adopted = [self._journal(folder) for folder in adopted]
        self._adopted_shippers = [
            self._shipper(journal, migrate=False) for journal in self._adopted
        ]
        self._started = False
        self._stopped = False
        self.refused_decisions = 0

    def _journal(self, folder: Path) -> Journal:
        settings = self._settings
        return Journal(
            folder,
            segment_max_bytes=SEGMENT_MAX_BYTES,
            fsync_interval_ms=settings.fsync_interval_ms,
        )

    def _shipper(self, journal: Journal, *, migrate: bool) -> ShipperProcess:
        return ShipperProcess(
            journal,
            self._settings,
            migrate=migrate,
            log_level=self._telemetry.log_level,
            log_format=self._telemetry.log_format,
        )

    async def start(self) -> None:
        """Opens the journal (repairing a torn tail) and starts shipping, the earlier
        process's leftovers first. The store may be down: shipping then waits for it."""
        if self._started:
            return
        self._started = True
        await _open(self.journal)
        self.shipper.start()
        for journal, shipper in zip(self._adopted, self._adopted_shippers, strict=True):
            log.info("shipping what is left in %s (no worker writes it now)", journal.directory)
            await _open(journal)
            shipper.start()
        for shipper in (self.shipper, *self._adopted_shippers):
            if not await asyncio.to_thread(shipper.wait_tried, SHIPPER_START_WAIT_S):
                log.warning(
                    "audit shipper process has not tried the store after %.0f s; starting"
                    " anyway (the journal keeps every decision meanwhile)",
                    SHIPPER_START_WAIT_S,
                )

    async def stop(self) -> None:
        """Idempotent: syncs and closes the journal, then ships what is left (bounded)."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        for journal in (self.journal, *self._adopted):
            journal.close()
        shippers = (self.shipper, *self._adopted_shippers)
        for shipper in shippers:  # all drain at once, within one drain's time
            shipper.begin_stop()
        for shipper in shippers:
            shipper.stop(self._settings.shutdown_drain_s)
        self.store.dispose()

    def record_decisions(
        self,
        call: CallInfo,
        orders: Sequence[OrderRequest],
        features: Sequence[Sequence[float] | None],
        results: Sequence[DecisionResult],
    ) -> None:
        if self.shipper.full:
            # Refused before it is written: the journal's volume must not fill up, for a
            # pod over its volume's size is evicted with every record not yet shipped.
            self.refused_decisions += len(orders)
            raise AuditUnavailable(
                "audit journal backlog at its cap (DECISION_AUDIT__MAX_BACKLOG_BYTES): the"
                " audit store is unreachable or takes records slower than they come;"
                " decisions are refused until it catches up"
            )
        records = [
            encode(decision_record(self.server_id, call, order, values, result))
            for order, values, result in zip(orders, features, results, strict=True)
        ]
        self._append(records)

    def record_shadow(self, records: Sequence[ShadowRecord]) -> None:
        self._append([encode(r) for r in records])

    def record_calls(self, record: CallTallyRecord) -> None:
        """Raises ``JournalWriteError`` when the journal cannot take it."""
        self.journal.append([encode(record)])

    def _append(self, payloads: list[bytes]) -> None:
        try:
            self.journal.append(payloads)
        except JournalWriteError as exc:
            log.error("%s", exc)
            raise AuditUnavailable(str(exc)) from exc

    async def report_store(self, report: Callable[[bool], Awaitable[None]]) -> None:
        """Tells ``report`` whether the store is reached, at once and on every change,
        until cancelled (the server's ``decision.audit`` health)."""
        reached: bool | None = None
        while True:
            ok = self.shipper.store_ok
            if ok != reached:
                reached = ok
                await report(ok)
            await asyncio.sleep(STORE_HEALTH_INTERVAL_S)

    def status(self) -> AuditStatus:
        return AuditStatus(
            journal_records=self.journal.appended_records,
            journal_write_failures=self.journal.write_failures,
            refused_decisions=self.refused_decisions,
            shipper=self.shipper.status(),
        )
