"""The feature schema: names, order and version, shared by every producer and consumer.

The server, the Kafka consumer and the training pipeline import this module; no other
module defines a feature name or its position. A change of names or order is a new
``SCHEMA_VERSION``, and records of another version are treated as missing.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Final

SCHEMA_VERSION: Final = 1

FEATURE_NAMES: Final[tuple[str, ...]] = (
    "spread_bps",  # (ask - bid) / mid, in basis points
    "imbalance_l1",  # (bid_size - ask_size) / (bid_size + ask_size) at the touch, in [-1, 1]
    "imbalance_l5",  # the same over the best five levels per side
    "ofi_1s",  # order-flow imbalance (Cont-Kukanov-Stoikov) over 1 s, normalised by depth
    "ofi_5s",  # the same over 5 s
    "realized_vol_5s_bps",  # realized volatility of mid returns over 5 s, in bps
    "realized_vol_30s_bps",  # the same over 30 s
    "mid_return_1s_bps",  # mid return over 1 s, in bps
    "mid_return_5s_bps",  # mid return over 5 s, in bps
    "trade_intensity_5s",  # trades per second over 5 s
    "signed_volume_5s",  # buy minus sell volume over 5 s, normalised by depth
)
FEATURE_INDEX: Final[Mapping[str, int]] = {name: i for i, name in enumerate(FEATURE_NAMES)}

# The model sees the side first (+1 buy, -1 sell), then the features in schema order.
MODEL_INPUT_NAMES: Final[tuple[str, ...]] = ("side_sign", *FEATURE_NAMES)
MODEL_INPUT_WIDTH: Final = len(MODEL_INPUT_NAMES)


def model_row(side_sign: float, features: Sequence[float]) -> list[float]:
    """The model's input row for one order: side sign then the features in schema order."""
    if len(features) != len(FEATURE_NAMES):
        raise ValueError(f"expected {len(FEATURE_NAMES)} features, got {len(features)}")
    return [side_sign, *features]


def pack_rows(rows: Sequence[Sequence[float]]) -> bytes:
    """Model rows as the replicas take them: little-endian float32, row after row (the
    handler's ``_packed_rows`` reads them back)."""
    flat = [v for row in rows for v in row]
    return struct.pack(f"<{len(flat)}f", *flat)


# The model computes in float32: a value beyond this cannot be sent to it.
FLOAT32_MAX: Final = 3.4028234663852886e38


def representable(value: float) -> bool:
    """Finite and within float32 range: a value the model can take."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def first_unrepresentable(values: Sequence[float]) -> str | None:
    """``name=value`` of the first feature the model cannot take, or None."""
    for name, value in zip(FEATURE_NAMES, values, strict=True):
        if not representable(value):
            return f"{name}={value!r}"
    return None
