"""Idempotent producers: their ids, and the sequence numbers each wrote to a partition.

Kafka's rules for a batch stamped with a producer id (``ProducerStateManager``):

- A batch whose sequence range matches one of the producer's last five batches on the
  partition is a duplicate (a retry of a batch whose answer was lost): it is answered
  with the offset it got then, and not written again.
- Same epoch: the first sequence must follow the last one written, wrapping at 2**31 - 1;
  otherwise OUT_OF_ORDER_SEQUENCE_NUMBER.
- An older epoch is INVALID_PRODUCER_EPOCH; a newer one must start at sequence 0.
- A producer the partition does not know (new, or its batches deleted before a restart)
  may start at any sequence.

- A batch stamped with a producer id but no epoch or sequence is INVALID_RECORD.

The state is rebuilt from the batch headers in the log when the broker starts (Kafka
keeps snapshots; a local log is read whole at start anyway), so a retry that crosses a
restart is still recognised. It is kept until the broker stops: Kafka forgets a producer
after a day without a write, a local broker's run is shorter. Producer ids are never
handed out twice: the next one is kept in ``<data dir>/producer-ids``, and is never
below an id the logs hold.
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
    """What each idempotent producer has written to one partition."""

    def __init__(self) -> None:
        self._producers: dict[int, _Producer] = {}

    def check(self, batch: BatchInfo) -> int | None:
        """The offset a duplicate batch got, or None for a batch to write.

        Raises ``KafkaApiError`` for a batch out of sequence or from a fenced epoch.
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
    """Hands out producer ids, each once, across restarts too."""

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
