"""What the audit trail records: one ``DecisionRecord`` per decision, one ``AdminRecord``
per accepted admin change, one ``ShadowRecord`` per challenger score of a shadowed
decision, one ``CallTallyRecord`` per server a minute (the calls refused without a
decision, in aggregate). They travel through the journal as JSON (orjson: ~1 us a
record); ``kind`` tells the shipper where each lands: decisions, admin actions and call
tallies in their own tables, a shadow score in its decision's shadow columns (always
journalled after the decision).

Enum fields are stored by name ("TRADE", "PRIMARY") so that the rows read well to an
auditor without a lookup table; times are wall-clock microseconds since the epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

DECISION: Final = "decision"
ADMIN: Final = "admin"
SHADOW: Final = "shadow"
CALLS: Final = "calls"
KINDS: Final = frozenset({DECISION, ADMIN, SHADOW, CALLS})


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    decision_id: str
    request_id: str
    trace_id: str  # W3C trace id of the call when the caller sent one, else ""
    client_id: str  # what the caller says it is (DecideRequest.client_id)
    caller: str  # who the transport says it is: the authenticated principal, else the peer
    server_id: str
    received_at_us: int
    decided_at_us: int
    symbol: str
    side: str
    quantity: float
    limit_price: float | None
    decision: str
    score: float | None
    threshold: float
    source: str
    model_name: str
    model_version: str
    feature_schema_version: int
    # The feature values the decision used (record plus overrides), by name; None when
    # there was no usable record.
    features: Mapping[str, float] | None
    feature_overrides: Mapping[str, float]
    feature_age_ms: float
    reason: str
    features_us: int
    model_us: int
    total_us: int
    # Exchange time of the features (µs since the epoch); None when none were used, and in
    # records journalled before the field existed.
    feature_time_us: int | None = None
    # ``core.domain.Reason.label``: "model_answered", "kill_switch", "model_timeout", ...;
    # None in records journalled before the field existed.
    reason_code: str | None = None
    shadow_model_name: str | None = None
    shadow_model_version: str | None = None
    shadow_score: float | None = None
    kind: str = DECISION


@dataclass(frozen=True, slots=True)
class AdminRecord:
    action_id: str
    at_us: int
    actor: str
    action: str
    target: str
    before: Mapping[str, Any] = field(default_factory=dict)
    after: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""
    kind: str = ADMIN


@dataclass(frozen=True, slots=True)
class ShadowRecord:
    decision_id: str
    shadow_model_name: str
    shadow_model_version: str
    shadow_score: float
    kind: str = SHADOW


@dataclass(frozen=True, slots=True)
class CallTallyRecord:
    """The gRPC calls one server process's core saw from ``from_us`` to ``to_us``: Decide
    calls, and the few health, reflection and admin ones. A refused call (past the queue
    limit, gRPC's core cancelled it before any handler ran) made no decision and has no
    record of its own: it is counted here."""

    server_id: str
    from_us: int
    to_us: int
    calls_started: int
    calls_answered: int  # ended OK
    calls_failed: int  # ended with an error status from a handler
    # Started and neither answered nor failed, less the growth of the Decide calls in
    # flight: the calls gRPC's core ended before a handler ran (refused, or expired while
    # queued). Exact summed over a server's rows (server.call_tally says why not alone).
    calls_refused: int
    kind: str = CALLS


AuditRecord = DecisionRecord | AdminRecord | ShadowRecord | CallTallyRecord


def encode(record: AuditRecord) -> bytes:
    return orjson.dumps(record)


def decode(payload: bytes) -> dict[str, Any]:
    """The record as a dict (the shipper's input); raises ``orjson.JSONDecodeError``."""
    value = orjson.loads(payload)
    if not isinstance(value, dict) or value.get("kind") not in KINDS:
        raise ValueError("not an audit record")
    return value
