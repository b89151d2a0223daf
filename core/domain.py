"""Transport-agnostic types of a decision, and the model's threshold rule. Enum values equal
the proto's."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final


class Side(enum.IntEnum):
    BUY = 1
    SELL = 2

    @property
    def sign(self) -> float:
        """+1 for a buy, -1 for a sell: the model's ``side_sign`` input."""
        return 1.0 if self is Side.BUY else -1.0


class Decision(enum.IntEnum):
    TRADE = 1
    NO_TRADE = 2
    ABSTAIN = 3


# The model's operating threshold unless configured (DECISION_DECISION__THRESHOLD).
DEFAULT_TRADE_THRESHOLD: Final = 0.55


def model_decision(score: float, threshold: float) -> Decision:
    """The model's verdict on a score: TRADE when it reaches the threshold."""
    return Decision.TRADE if score >= threshold else Decision.NO_TRADE


def age_ms(stamped_at_us: int, now_us: int | None = None) -> float:
    """How old a wall-clock stamp (µs since the epoch) is, in ms; never negative (clocks
    of different hosts disagree a little)."""
    now = time.time_ns() // 1000 if now_us is None else now_us
    return max(0.0, (now - stamped_at_us) / 1000.0)


class Reason(enum.IntEnum):
    """Why a decision is what it is, as a bounded set: the proto's ``ReasonCode``, number
    for number (``decision.v1.ReasonCode``, ``REASON_CODE_`` + the name). ``label`` is
    its value in metrics (``decision_fallbacks_total{reason}``) and the audit record. A
    model failure is the last one of its lane; MODEL_BREAKER_OPEN only when no replica
    was called because every one was refused by its breaker or forced open by on-call
    (a refusal after a failure keeps the failure's reason: ``server.router``)."""

    MODEL_ANSWERED = 1
    KILL_SWITCH = 2
    NO_FEATURES = 3
    FEATURES_STALE = 4
    FEATURES_UNUSABLE = 5
    FEATURE_STORE = 6
    OVERLOADED = 7
    MODEL_BREAKER_OPEN = 8
    MODEL_TIMEOUT = 9
    MODEL_BUSY = 10
    MODEL_UNAVAILABLE = 11
    MODEL_ERROR = 12
    MODEL_NO_TIME = 13
    MODEL_RETRY_BUDGET = 14
    MODEL_INPUT = 15

    @property
    def label(self) -> str:
        return self.name.lower()


class Source(enum.IntEnum):
    PRIMARY = 1
    SECONDARY = 2
    CANARY = 3
    CACHED_SCORE = 4
    RULES = 5
    ABSTAIN = 6


@dataclass(frozen=True, slots=True)
class OrderRequest:
    """A validated request to decide one order."""

    request_id: str
    symbol: str
    side: Side
    quantity: float
    limit_price: float | None = None
    feature_overrides: Mapping[str, float] = field(default_factory=dict)
    client_id: str = ""


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What the transport knows about a call, for the audit record."""

    received_at_ns: int  # wall clock, ns since the epoch
    trace_id: str = ""  # W3C trace id (32 hex digits) when the caller sent a traceparent
    caller: str = ""  # the authenticated principal, else the transport's peer address
    verified: bool = False  # caller is the identity of a client certificate (mTLS)


@dataclass(frozen=True, slots=True)
class DecisionResult:
    request_id: str
    decision_id: str
    decision: Decision
    score: float | None
    threshold: float
    source: Source
    model_name: str
    model_version: str
    reason: str
    feature_age_ms: float  # -1 when no feature record was used
    features_us: int
    model_us: int
    total_us: int
    decided_at_ns: int  # wall clock, ns since the epoch
    # Exchange time of the features the decision used (µs since the epoch), 0 when none:
    # where the realized outcome is measured from.
    feature_time_us: int = 0
    # Why: MODEL_ANSWERED when the model answered, else why it did not.
    reason_code: Reason = Reason.MODEL_ANSWERED
