"""One fetched batch applied to its partitions' symbol states, with no I/O.

Each record is decoded and folded into its symbol's ``SymbolState``; a record that cannot
be decoded or applied becomes a dead letter, and the rest of the batch goes on. The result
says what the consumer then writes: the touched symbols' feature records, the dead
letters, and per partition the states a checkpoint must now include; and what it counts:
the events the states ignored (a re-delivery, an earlier session's) and the symbols
whose feed started over.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import TopicPartition

from feature_cache.codec import MalformedMessage, decode
from feature_cache.features import Applied, SymbolState
from feature_cache.store import FeatureRecord

log = logging.getLogger(__name__)

# An event stamped further ahead than this is refused: Redis keeps a symbol's newest
# record, so one far-future event would block every later write for the symbol. (Replays
# at full speed therefore stamp their events to end now: see feature_cache.replay.)
MAX_CLOCK_SKEW_US = 60_000_000


class Record(Protocol):
    """What the consumer reads of an aiokafka ``ConsumerRecord``."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # create time, ms since the epoch
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class AppliedBatch:
    # The touched symbols' records, each with the offset of its symbol's last event.
    features: list[FeatureRecord]
    dead: list[tuple[Record, str]]  # the records not applied, each with the reason
    # Per partition of the batch: the states its records changed.
    changed: dict[TopicPartition, dict[str, SymbolState]]
    # Events ignored (a re-delivery, an earlier session's), by symbol and why.
    ignored: Counter[tuple[str, Applied]] = field(default_factory=Counter)
    # Symbols whose feed started over in this batch, with the new session.
    restarted: dict[str, int] = field(default_factory=dict)


def apply_batch(
    states: Mapping[TopicPartition, dict[str, SymbolState]],
    batches: Mapping[TopicPartition, Sequence[Record]],
) -> AppliedBatch:
    """Folds each partition's records into its symbols' states (new symbols get a fresh
    one); ``states`` holds every partition of ``batches``."""
    touched: dict[str, SymbolState] = {}
    changed_by_tp: dict[TopicPartition, dict[str, SymbolState]] = {}
    last_offset: dict[str, int] = {}
    dead: list[tuple[Record, str]] = []
    ignored: Counter[tuple[str, Applied]] = Counter()
    restarted: dict[str, int] = {}
    latest_us = time.time_ns() // 1000 + MAX_CLOCK_SKEW_US
    for tp, records in batches.items():
        partition_states = states[tp]
        changed = changed_by_tp.setdefault(tp, {})
        for record in records:
            try:
                event = decode(record.value)
                if event.exchange_time_us > latest_us:
                    # It would block the symbol's later writes (Redis keeps the newest).
                    raise MalformedMessage("exchange time more than 60 s in the future")
                state = partition_states.get(event.symbol)
                if state is None:
                    state = partition_states[event.symbol] = SymbolState()
                applied = state.apply(event)
            except MalformedMessage as exc:
                dead.append((record, str(exc)))
                continue
            except Exception as exc:  # one bad event must not stop the feed
                log.exception("could not apply %s/%d", tp, record.offset)
                dead.append((record, f"could not apply: {exc!r}"))
                continue
            if applied.ignored:
                ignored[event.symbol, applied] += 1
                continue
            if applied is Applied.RESTARTED:
                restarted[event.symbol] = event.session
            touched[event.symbol] = changed[event.symbol] = state
            last_offset[event.symbol] = record.offset
    features = []
    for symbol, state in touched.items():
        try:
            values = state.features()
        except Exception:  # a state gone wrong must not stop the other symbols
            log.exception("could not compute features for %s", symbol)
            continue
        if values is not None:
            features.append(
                FeatureRecord(symbol, values, state.last_event_time_us, last_offset[symbol])
            )
    return AppliedBatch(features, dead, changed_by_tp, ignored, restarted)
