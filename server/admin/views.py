"""What ``ControlPlane.status`` and the flag calls return: plain views, transport-agnostic
(AdminService turns them into messages, ``decisionctl`` into tables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.reports import IgnoredFeed, LabelProgress
from feature_cache.mirror import MirrorStatus
from server.breaker import Rates
from server.control.canary import CanaryComparison
from server.control.recent import CallSummary
from server.control.shared import SyncStatus
from server.control.state import BreakerMode, Change
from server.drift import DriftStatus


@dataclass(frozen=True, slots=True)
class ReplicaView:
    name: str
    address: str
    breaker_state: str
    mode: BreakerMode
    change: Change | None
    recent: CallSummary
    model_version: str
    rates: Rates


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
    promotion_refused: str | None  # why a promotion would be refused now; None: taken
    waiting: list[str]  # while a canary runs: the limits not evaluated yet, and why


@dataclass(frozen=True, slots=True)
class AuditView:
    store_ok: bool
    backlog_bytes: int
    last_error: str
    full: bool  # the backlog is at its cap: decisions are refused


@dataclass(frozen=True, slots=True)
class DriftView:
    status: DriftStatus
    watch_psi: float
    act_psi: float


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
    mirror: MirrorStatus | None = None  # None: no feature mirror
    drift: DriftView | None = None  # None: no drift computed (no model store)
    ignored_feeds: list[IgnoredFeed] = field(default_factory=list)
    labels: LabelProgress | None = None  # None: no labeler reported lately (or an error)
    reports_error: str = ""  # why the reports could not be read
