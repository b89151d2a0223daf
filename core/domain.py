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


# Why a decision was not the model's, as a bounded set of codes (metrics label them; the
# decision's reason text says the rest). A model failure is the last one of its lane;
# model_breaker_open only when no replica was called because every one was refused by its
# breaker or forced open by on-call (a refusal after a failure keeps the failure's code).
FALLBACK_REASONS: Final = (
    "kill_switch",
    "no_features",
    "features_stale",
    "features_unusable",
    "feature_store",
    "model_breaker_open",
    "model_timeout",
    "model_busy",
    "model_unavailable",
    "model_error",
    "model_no_time",
    "model_retry_budget",
    "model_input",
)


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
    # Why the model did not answer, one of FALLBACK_REASONS; "" when it did.
    fallback: str = ""
