"""Idempotent producers: their ids, and the sequence numbers each wrote to a partition.

``ProducerState.check`` applies Kafka's rules (its ``ProducerStateManager``) to a batch
stamped with a producer id: a retry of one of the producer's last five batches is a
duplicate, answered with the offset it got then and not written again; a batch out of
sequence or from a fenced epoch is refused. The state is rebuilt from the log at start, so
a retry across a restart is still recognised. ``ProducerIds`` hands out each id once, across
restarts too. The rules in full: ``ProducerState.check``; clients' view: docs/kafka-apis.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from localkafka.errors import ErrorCode, KafkaApiError, LocalKafkaError
from localkafka.fsutil import write_atomic
from localkafka.records import BatchInfo

CACHED_BATCHES = 5  # Kafka keeps five: a producer has at most five requests in flight
_SEQUENCE_MODULUS = 2**31
IDS_FILE = "producer-ids"


@dataclass
class _Producer:
    epoch: int
    batches: deque[tuple[int, int, int]] = field(
        default_factory=lambda: deque(maxlen=CACHED_BATCHES)
    )
    """(first sequence, last sequence, base offset) of the latest batches, oldest first."""


class ProducerState:
    """What each idempotent producer has written to one partition.

    Rebuilt from the batch headers when the log opens (Kafka keeps snapshots; a local log is
    read whole at start anyway) and kept until the broker stops (Kafka forgets a producer
    after a day without a write; a local broker's run is shorter).
    """

    def __init__(self) -> None:
        self._producers: dict[int, _Producer] = {}

    def check(self, batch: BatchInfo) -> int | None:
        """The offset a duplicate batch got, or None for a batch to write.

        A duplicate matches the sequence range of one of the producer's last five batches
        (a retry of a batch whose answer was lost). Raises ``KafkaApiError``: no epoch or
        sequence, INVALID_RECORD; an older epoch, INVALID_PRODUCER_EPOCH; a newer epoch not
        at sequence 0, or in the same epoch a first sequence that does not follow the last
        one written (wrapping at 2**31 - 1), OUT_OF_ORDER_SEQUENCE_NUMBER. A producer the
        partition does not know (new, or its batches deleted before a restart) may start at
        any sequence.
        """
        if batch.producer_id < 0:
            return None
        if batch.producer_epoch < 0 or batch.base_sequence < 0:
            raise KafkaApiError(
                ErrorCode.INVALID_RECORD,
                f"producer {batch.producer_id}: epoch {batch.producer_epoch}, "
                f"sequence {batch.base_sequence}",
            )
        known = self._producers.get(batch.producer_id)
        if known is None:
            return None
        if batch.producer_epoch < known.epoch:
            raise KafkaApiError(
                ErrorCode.INVALID_PRODUCER_EPOCH,
                f"producer {batch.producer_id} epoch {batch.producer_epoch} is older than "
                f"{known.epoch}",
            )
        if batch.producer_epoch > known.epoch:
            if batch.base_sequence != 0:
                raise KafkaApiError(
                    ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER,
                    f"producer {batch.producer_id}: a new epoch starts at sequence 0, "
                    f"not {batch.base_sequence}",
                )
            return None
        for first, last, offset in known.batches:
            if (first, last) == (batch.base_sequence, batch.last_sequence):
                return offset
        expected = (known.batches[-1][1] + 1) % _SEQUENCE_MODULUS
        if batch.base_sequence != expected:
            raise KafkaApiError(
                ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER,
                f"producer {batch.producer_id}: sequence {batch.base_sequence}, "
                f"expected {expected}",
            )
        return None

    def record(self, batch: BatchInfo, base_offset: int) -> None:
        """Notes a batch written at ``base_offset``."""
        if batch.producer_id < 0:
            return
        known = self._producers.get(batch.producer_id)
        if known is None or known.epoch != batch.producer_epoch:
            known = self._producers[batch.producer_id] = _Producer(batch.producer_epoch)
        known.batches.append((batch.base_sequence, batch.last_sequence, base_offset))

    def highest_id(self) -> int:
        """The highest producer id written to the partition; -1 when none."""
        return max(self._producers, default=-1)


class ProducerIds:
    """Hands out producer ids, each once, across restarts too: the next one is kept in
    ``<data dir>/producer-ids``, and is never below an id the logs hold."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / IDS_FILE
        self._next = 0

    def open(self, at_least: int = 0) -> None:
        """Reads the next id; ``at_least``: one past the highest id the logs hold, so a
        lost file never hands out an id whose batches are still there."""
        stored = 0
        if self._path.exists():
            try:
                stored = int(self._path.read_text())
            except ValueError:
                raise LocalKafkaError(f"{self._path} does not hold a producer id") from None
        self._next = max(stored, at_least)

    def allocate(self) -> int:
        """A new id, written down before it is handed out."""
        allocated = self._next
        write_atomic(self._path, str(allocated + 1).encode())
        self._next = allocated + 1
        return allocated
