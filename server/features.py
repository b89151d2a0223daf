"""``FeatureSource``: each order's features as the model may use them, read once per call.

The records come from the process's ``FeatureMirror`` while it is live, else from one
Redis read for all the orders of a call, bounded by the request's budget; each order gets
a finished ``FeatureSnapshot``: the values with the order's overrides applied, or none
and why (no record, stale, unusable, the store failed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from core.deadline import Budget
from core.domain import OrderRequest, Reason
from core.store_reads import StoreReads
from feature_cache.mirror import FeatureMirror
from feature_cache.schema import FEATURE_INDEX, first_unrepresentable
from feature_cache.store import FeatureReader, FeatureRecord


@dataclass(frozen=True, slots=True)
class FeatureSnapshot:
    values: Sequence[float] | None  # fresh values with overrides applied; None if unusable
    age_ms: float = -1.0  # -1 when there was no record
    reason: str = ""  # why there are no values; "" when there are
    event_time_us: int = 0  # the record's exchange time when there are values, else 0
    fallback: Reason | None = None  # why there are no values


@dataclass(frozen=True, slots=True)
class FeatureRead:
    snapshots: tuple[FeatureSnapshot, ...]  # one per order, in order
    store_failure: str = ""  # why the store did not answer; "" when it did


class FeatureSource:
    def __init__(
        self,
        reader: FeatureReader,
        reads: StoreReads,
        *,
        max_age_ms: float,
        mirror: FeatureMirror | None = None,
    ) -> None:
        self._reader = reader
        self._reads = reads
        self._max_age_ms = max_age_ms
        self._mirror = mirror
        self.mirror_reads = 0  # calls answered from the mirror
        self.store_reads = 0  # calls that read Redis

    async def read(self, orders: Sequence[OrderRequest], budget: Budget) -> FeatureRead:
        if not orders:
            return FeatureRead(())
        symbols = [order.symbol for order in orders]
        records = self._mirror.lookup(symbols) if self._mirror is not None else None
        if records is not None:
            self.mirror_reads += 1
        else:
            self.store_reads += 1
            read = await self._reads.read(
                lambda: self._reader.read_many(symbols), budget, what="feature store"
            )
            if read.value is None:
                unread = FeatureSnapshot(None, reason=read.failure, fallback=Reason.FEATURE_STORE)
                return FeatureRead((unread,) * len(orders), read.failure)
            records = read.value
        now_us = time.time_ns() // 1000
        return FeatureRead(
            tuple(
                self._snapshot(order, record, now_us)
                for order, record in zip(orders, records, strict=True)
            )
        )

    def _snapshot(
        self, order: OrderRequest, record: FeatureRecord | None, now_us: int
    ) -> FeatureSnapshot:
        if record is None:
            return FeatureSnapshot(
                None, reason=f"no features for {order.symbol}", fallback=Reason.NO_FEATURES
            )
        age_ms = record.age_ms(now_us)
        if age_ms > self._max_age_ms:
            return FeatureSnapshot(
                None,
                age_ms,
                f"features stale: {age_ms:.0f} ms old (max {self._max_age_ms:.0f})",
                fallback=Reason.FEATURES_STALE,
            )
        values = list(record.values)
        for name, value in order.feature_overrides.items():
            values[FEATURE_INDEX[name]] = value
        problem = first_unrepresentable(values)
        if problem is not None:
            return FeatureSnapshot(
                None, age_ms, f"features unusable: {problem}", fallback=Reason.FEATURES_UNUSABLE
            )
        return FeatureSnapshot(values, age_ms, event_time_us=record.event_time_us)
