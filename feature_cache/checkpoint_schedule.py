"""Which owned partitions hold handled events not yet checkpointed, and which is due next.

Bookkeeping only: the consumer notes each written batch here, takes what is pending when
a checkpoint is due (or a rebalance or stop asks for one), writes those states to Redis
and commits the offsets. Partitions take turns, one per ``interval_s / pending``
seconds, so that no single batch pays for every partition's states at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import TopicPartition

from feature_cache.features import SymbolState


@dataclass(frozen=True, slots=True)
class PendingCheckpoint:
    # The last offset handled: the checkpoint includes it, the commit is the next one.
    offset: int
    changed: dict[str, SymbolState]  # changed since the partition's previous checkpoint


class CheckpointSchedule:
    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        # Since the last checkpoint: the states that changed, the last offset handled.
        self._changed: dict[TopicPartition, dict[str, SymbolState]] = {}
        self._uncommitted: dict[TopicPartition, int] = {}
        self._last_taken = time.monotonic()
        self._checkpointed_at: dict[TopicPartition, float] = {}
        self._owned_since: dict[TopicPartition, float] = {}  # monotonic s of its assignment

    def assigned(self, tp: TopicPartition) -> None:
        self._owned_since[tp] = time.monotonic()

    def revoked(self, tp: TopicPartition) -> None:
        self._owned_since.pop(tp, None)

    def handled(
        self, tp: TopicPartition, last_offset: int, changed: dict[str, SymbolState]
    ) -> None:
        """Notes a batch's records of ``tp`` as written: a checkpoint may now include them."""
        self._uncommitted[tp] = last_offset
        self._changed.setdefault(tp, {}).update(changed)

    def due(self) -> TopicPartition | None:
        """The partition whose turn it is, checkpointed longest ago; None before its turn."""
        if not self._uncommitted:
            return None
        step_s = self._interval_s / len(self._uncommitted)
        if time.monotonic() - self._last_taken < step_s:
            return None
        return min(self._uncommitted, key=lambda tp: self._checkpointed_at.get(tp, 0.0))

    def take(
        self, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, PendingCheckpoint]:
        """What ``partitions`` (all if None) hold that is not checkpointed yet, now counted
        as checkpointed: the caller writes it or the next owner replays it."""
        chosen = list(self._uncommitted if partitions is None else partitions)
        offsets = {tp: self._uncommitted.pop(tp) for tp in chosen if tp in self._uncommitted}
        pending = {
            tp: PendingCheckpoint(offset, self._changed.pop(tp, {}))
            for tp, offset in offsets.items()
        }
        self._last_taken = time.monotonic()
        for tp in pending:
            self._checkpointed_at[tp] = self._last_taken
        return pending

    def ages_s(self) -> dict[TopicPartition, float]:
        """Per owned partition: seconds since its last checkpoint (or its assignment)
        while it holds handled events not yet checkpointed, else 0: what a crash now would
        make the next owner replay."""
        now = time.monotonic()
        return {
            tp: now - max(self._checkpointed_at.get(tp, since), since)
            if tp in self._uncommitted
            else 0.0
            for tp, since in list(self._owned_since.items())
        }
