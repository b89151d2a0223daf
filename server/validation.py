"""Request validation: protobuf in, domain objects out, INVALID_ARGUMENT naming the field;
and the answer back to protobuf."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from core.domain import DecisionResult, OrderRequest, Side
from decision_client.v1 import decision_pb2
from feature_cache.schema import FEATURE_INDEX, representable
from server.errors import FieldViolation, InvalidArgument

T = TypeVar("T")

MAX_ID_LENGTH = 128
# ':' for a venue's key (``BINANCE:BTC-USD``, see feature_cache.exchanges.symbols).
SYMBOL_PATTERN = re.compile(r"[A-Z0-9][A-Z0-9._/:-]{0,31}")
_SIDES = {decision_pb2.SIDE_BUY: Side.BUY, decision_pb2.SIDE_SELL: Side.SELL}


def _identifier(value: str, field: str) -> str:
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(field, f"longer than {MAX_ID_LENGTH} characters")
    if not value.isprintable():
        raise InvalidArgument(field, "contains non-printable characters")
    return value


def _positive_finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be finite, got {value}")
    if value <= 0.0:
        raise InvalidArgument(field, f"must be greater than zero, got {value}")
    return value


def check_symbol(field: str, symbol: str) -> str:
    if not symbol:
        raise InvalidArgument(field, "is required")
    if not SYMBOL_PATTERN.fullmatch(symbol):
        raise InvalidArgument(
            field,
            "must be 1 to 32 characters of A-Z, 0-9, '.', '_', '/', ':', '-',"
            f" starting with A-Z or 0-9, got {symbol[:40]!r}",
        )
    return symbol


def order_from_pb(request: decision_pb2.DecideRequest, field_prefix: str = "") -> OrderRequest:
    """Validates one request; ``field_prefix`` names its place in a batch (``requests[3].``).
    Raises ``InvalidArgument`` naming every bad field, not only the first."""
    violations: list[FieldViolation] = []

    def checked(check: Callable[[], T], instead: T) -> T:
        """The check's value, or ``instead`` with its violations kept for the error."""
        try:
            return check()
        except InvalidArgument as exc:
            violations.extend(exc.violations)
            return instead

    symbol = checked(lambda: check_symbol(f"{field_prefix}symbol", request.symbol), "")
    side = _SIDES.get(request.side, Side.BUY)
    if request.side not in _SIDES:
        violations.append(
            FieldViolation(
                f"{field_prefix}side", f"must be SIDE_BUY or SIDE_SELL, got {request.side}"
            )
        )
    quantity = checked(lambda: _positive_finite(request.quantity, f"{field_prefix}quantity"), 0.0)
    limit_price = None
    if request.HasField("limit_price"):
        limit_price = checked(
            lambda: _positive_finite(request.limit_price, f"{field_prefix}limit_price"), None
        )
    overrides: dict[str, float] = {}
    for name, value in request.feature_overrides.items():
        field = f"{field_prefix}feature_overrides[{name[:64]!r}]"
        if name not in FEATURE_INDEX:
            violations.append(FieldViolation(field, "unknown feature name"))
        elif not representable(value):
            violations.append(
                FieldViolation(
                    field, f"must be finite and within float32 range (|x| <= 3.4e38), got {value}"
                )
            )
        else:
            overrides[name] = value
    request_id = checked(lambda: _identifier(request.request_id, f"{field_prefix}request_id"), "")
    client_id = checked(lambda: _identifier(request.client_id, f"{field_prefix}client_id"), "")
    if violations:
        raise InvalidArgument.of(violations)
    return OrderRequest(
        request_id=request_id or uuid.uuid4().hex,
        symbol=symbol,
        side=side,
        quantity=quantity,
        limit_price=limit_price,
        feature_overrides=overrides,
        client_id=client_id,
    )


# Most requests one DecideBatch may carry: an execution system's basket, and the largest
# call the server sends a model replica (Triton's repository allows as many rows).
MAX_BATCH_REQUESTS = 256


def orders_from_batch_pb(request: decision_pb2.DecideBatchRequest) -> list[OrderRequest]:
    count = len(request.requests)
    if count == 0:
        raise InvalidArgument("requests", "must hold at least one request")
    if count > MAX_BATCH_REQUESTS:
        raise InvalidArgument("requests", f"holds {count} requests; at most {MAX_BATCH_REQUESTS}")
    orders: list[OrderRequest] = []
    violations: list[FieldViolation] = []
    for i, one in enumerate(request.requests):
        try:
            orders.append(order_from_pb(one, f"requests[{i}]."))
        except InvalidArgument as exc:  # every bad request is reported, with its index
            violations.extend(exc.violations)
    if violations:
        raise InvalidArgument.of(violations)
    return orders


def response_to_pb(result: DecisionResult) -> decision_pb2.DecideResponse:
    decided_at = Timestamp()
    decided_at.FromNanoseconds(result.decided_at_ns)
    return decision_pb2.DecideResponse(
        request_id=result.request_id,
        decision_id=result.decision_id,
        decision=decision_pb2.Decision.ValueType(result.decision),
        score=result.score,
        threshold=result.threshold,
        source=decision_pb2.Source.ValueType(result.source),
        model_name=result.model_name,
        model_version=result.model_version,
        reason=result.reason,
        reason_code=decision_pb2.ReasonCode.ValueType(result.reason_code),
        feature_age_ms=result.feature_age_ms,
        timings=decision_pb2.DecideTimings(
            features_us=result.features_us,
            model_us=result.model_us,
            total_us=result.total_us,
        ),
        decided_at=decided_at,
    )
