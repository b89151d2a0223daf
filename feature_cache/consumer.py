"""The feature-cache consumer: Kafka market events → per-symbol state → Redis records.

One fetch is one batch: every event is applied to its symbol's ``SymbolState``, then
the touched symbols' feature records are written in one Redis pipeline (monotonic
writes). About once a second per partition (one partition at a time, spread over the
interval; and when partitions are revoked, and on stop) the states changed since the
partition's last checkpoint are written to Redis and only then is its offset committed,
so a partition's committed offset never runs ahead of its checkpoint. A batch counts for
a checkpoint only once its dead letters are sent and its features written, and a
rebalance's checkpoint waits for the batch in progress.
Checkpointing per batch would cost more than the batch (a state with its windows is
tens of kB of JSON). A malformed
message is counted, logged with its offset, sent to the dead-letter topic (before its
offset is committed) and skipped. Kafka or Redis down: retry with backoff; features age
meanwhile and the server sees them as stale; nothing is committed that is not written.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import ConsumerStoppedError, KafkaError
from redis.asyncio.client import Pipeline

from core.backoff import Backoff
from core.histogram import LATENCY_BOUNDS_S, Buckets
from feature_cache.checkpoint import StateCheckpoints
from feature_cache.codec import MalformedMessage, decode
from feature_cache.features import SymbolState
from feature_cache.settings import KafkaSettings
from feature_cache.store import FeatureRecord, FeatureWriter

log = logging.getLogger(__name__)

# An event stamped further ahead than this is refused: Redis keeps a symbol's newest
# record, so one far-future event would block every later write for the symbol. (Replays
# at full speed therefore stamp their events to end now: see feature_cache.replay.)
MAX_CLOCK_SKEW_US = 60_000_000

# How long one fetch waits for records before handing back an empty batch.
FETCH_TIMEOUT_MS = 50
# How long the broker may hold a fetch for more data: short keeps features fresh when the
# feed is quiet.
FETCH_MAX_WAIT_MS = 10
# The longest wait between retries while Kafka or Redis is down.
RETRY_BACKOFF_MAX_S = 5.0
# Most records one fetch hands the consumer: a batch is one Redis pipeline.
MAX_BATCH = 2000
# The TTL of the feature records written: a symbol whose feed stopped leaves no record
# behind for long (features.max_age_ms judges freshness, not this).
FEATURE_TTL_S = 60.0
# How often the states are checkpointed and offsets committed: a consumer taking over a
# partition replays at most about this much of it.
CHECKPOINT_INTERVAL_S = 1.0
# Seconds from an event's Kafka create time to its features written in Redis.
FRESHNESS_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0)


class Record(Protocol):
    """What the consumer reads of an aiokafka ``ConsumerRecord``."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # create time, ms since the epoch
    key: bytes | None
    value: bytes | None


@dataclass
class ConsumerStats:
    events: int = 0
    malformed: int = 0  # sent to the dead-letter topic
    batches: int = 0
    records_written: int = 0
    # Kafka create time -> Redis write done, ms, for the latest batches (bounded).
    freshness_ms: list[float] = field(default_factory=list)
    # The same since start, in seconds, for the metrics.
    freshness: Buckets = field(default_factory=lambda: Buckets(FRESHNESS_BOUNDS_S))
    # Seconds each batch's feature write to Redis took, its retries included.
    write_latency: Buckets = field(default_factory=lambda: Buckets(LATENCY_BOUNDS_S))

    def note_freshness(self, created_ms: Iterable[int], written_ms: float) -> None:
        for created in created_ms:
            self.freshness_ms.append(written_ms - created)
            self.freshness.observe((written_ms - created) / 1e3)
        if len(self.freshness_ms) > 200_000:
            del self.freshness_ms[:100_000]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: FeatureConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner.checkpoint(revoked)  # the next owner starts where this one ends
        for tp in revoked:
            self._owner.revoke(tp)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            await self._owner.restore(tp)


class FeatureConsumer:
    def __init__(
        self,
        settings: KafkaSettings,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        max_batch: int = MAX_BATCH,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
        feature_ttl_s: float = FEATURE_TTL_S,
    ) -> None:
        self._settings = settings
        self._max_batch = max_batch
        self._checkpoint_interval_s = checkpoint_interval_s
        self._redis = redis
        self._writer = FeatureWriter(redis, key_prefix=key_prefix, ttl_s=feature_ttl_s)
        self._checkpoints = StateCheckpoints(redis, key_prefix=key_prefix)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            client_id="feature-cache",
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, client_id="feature-cache-dlq"
        )
        self.states: dict[TopicPartition, dict[str, SymbolState]] = {}
        # Per owned partition: the first offset its states do not hold yet.
        self._next_offset: dict[TopicPartition, int] = {}
        # Since the last checkpoint: the states that changed, the last offset handled.
        self._dirty: dict[TopicPartition, dict[str, SymbolState]] = {}
        self._uncommitted: dict[TopicPartition, int] = {}
        self._last_checkpoint = time.monotonic()
        self._checkpointed_at: dict[TopicPartition, float] = {}
        self._owned_since: dict[TopicPartition, float] = {}  # monotonic s of its assignment
        self.stats = ConsumerStats()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = False
        # Held by a batch from its first event to its last write, and by checkpoints: a
        # rebalance's checkpoint never commits a batch that is half done.
        self._lock = asyncio.Lock()

    async def _retry(self, what: str, attempt: Callable[[], Awaitable[None]]) -> bool:
        """Retries ``attempt`` with backoff while Kafka fails; False if stopping first."""
        backoff = self._backoff(0.1)
        while not self._stopping:
            try:
                await attempt()
                return True
            except (KafkaError, OSError) as exc:
                delay = backoff.next_s()
                log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
                await asyncio.sleep(delay)
        return False

    def _backoff(self, initial_s: float) -> Backoff:
        return Backoff(initial_s=initial_s, max_s=RETRY_BACKOFF_MAX_S)

    async def start(self) -> None:
        if self._task is not None:
            return
        await self._retry("Kafka producer start", self._producer.start)
        self._consumer.subscribe([self._settings.topic], listener=_Rebalance(self))
        await self._retry("Kafka consumer start", self._consumer.start)
        self._task = asyncio.create_task(self._run())
        self._task.add_done_callback(self._task_done)

    async def stop(self) -> None:
        """Finishes the batch in hand (nothing half-written is committed), then stops."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except TimeoutError:
                log.warning("consumer loop did not finish in 10 s; cancelled it")
            except Exception:  # noqa: BLE001, S110 - logged by _task_done; stop the rest anyway
                pass
        self._stopping = False  # let the final checkpoint retry a Redis blip
        try:
            await asyncio.wait_for(self.checkpoint(), timeout=5)
        except TimeoutError:
            log.warning("final checkpoint not written in 5 s; the next owner replays more")
        await self._consumer.stop()
        await self._producer.stop()

    @property
    def failed(self) -> bool:
        """True when the loop died on an unexpected error: the process should exit."""
        task = self._task
        return (
            task is not None
            and task.done()
            and not task.cancelled()
            and (task.exception() is not None)
        )

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                "consumer loop died; nothing after its last checkpoint is committed", exc_info=exc
            )

    async def __aenter__(self) -> FeatureConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def restore(self, tp: TopicPartition) -> None:
        """Takes over a partition: its states as of its checkpoint, resuming right after it.

        Not under the batch lock: this runs in aiokafka's rebalance listener, during which
        no heartbeat goes out, and a batch retrying Redis could hold the lock past the
        session timeout. aiokafka hands out an assignment before it calls the listener
        (aio-libs/aiokafka#738), so a batch of the partition may be fetched meanwhile:
        ``_restored`` sorts it out. States and seek are set with no await between them.
        """
        backoff = self._backoff(0.05)
        while True:
            try:
                offset, states = await self._checkpoints.load(tp)
                break
            except (redis.exceptions.RedisError, OSError) as exc:
                if self._stopping:
                    raise
                log.warning("loading %s's checkpoint failed (%s); retrying", tp, exc)
                await asyncio.sleep(backoff.next_s())
        self.states[tp] = states
        self._next_offset[tp] = 0 if offset is None else offset + 1
        self._owned_since[tp] = time.monotonic()
        if offset is not None:
            self._consumer.seek(tp, offset + 1)
        log.info("assigned %s: %d symbols restored, checkpoint %s", tp, len(states), offset)

    def revoke(self, tp: TopicPartition) -> None:
        """Forgets a partition another consumer takes over (after its checkpoint)."""
        self.states.pop(tp, None)
        self._next_offset.pop(tp, None)
        self._owned_since.pop(tp, None)

    async def _run(self) -> None:
        backoff = self._backoff(0.1)
        while not self._stopping:
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=FETCH_TIMEOUT_MS,
                    max_records=self._max_batch,
                )
            except ConsumerStoppedError:
                return
            except KafkaError as exc:
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(backoff.next_s())
                continue
            backoff.reset()
            if batches:
                await self._handle(batches)

    async def _handle(self, batches: dict[TopicPartition, list[Record]]) -> None:
        async with self._lock:
            await self._handle_locked(batches)
            await self._checkpoint_due()

    async def _handle_locked(self, batches: dict[TopicPartition, list[Record]]) -> None:
        touched: dict[str, SymbolState] = {}
        dirty: dict[TopicPartition, dict[str, SymbolState]] = {}
        last_offset: dict[str, int] = {}
        dead: list[tuple[Record, str]] = []
        latest_us = time.time_ns() // 1000 + MAX_CLOCK_SKEW_US
        handled = self._restored(batches)
        for tp, records in handled.items():
            states = self.states[tp]
            changed = dirty.setdefault(tp, {})
            for record in records:
                try:
                    event = decode(record.value)
                    if event.exchange_time_us > latest_us:
                        # It would block the symbol's later writes (Redis keeps the newest).
                        raise MalformedMessage("exchange time more than 60 s in the future")
                    state = states.get(event.symbol)
                    if state is None:
                        state = states[event.symbol] = SymbolState()
                    state.apply(event)
                except MalformedMessage as exc:
                    dead.append((record, str(exc)))
                    continue
                except Exception as exc:  # one bad event must not stop the feed
                    log.exception("could not apply %s/%d", tp, record.offset)
                    dead.append((record, f"could not apply: {exc!r}"))
                    continue
                touched[event.symbol] = changed[event.symbol] = state
                last_offset[event.symbol] = record.offset
            self._next_offset[tp] = records[-1].offset + 1  # the states hold them now
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
        if dead and not await self._dead_letter(dead):
            return  # stopping before the dead letters were sent: nothing is committed
        write_started = time.perf_counter()
        if features and not await self._execute(
            functools.partial(self._writer.queue, records=features)
        ):
            return  # stopping before Redis came back: the next owner replays from the checkpoint
        if features:
            self.stats.write_latency.observe(time.perf_counter() - write_started)
        # Only now, with dead letters sent and features written, may a checkpoint commit them.
        for tp, records in handled.items():
            self._uncommitted[tp] = records[-1].offset
            self._dirty.setdefault(tp, {}).update(dirty[tp])
        self.stats.note_freshness(
            (r.timestamp for records in handled.values() for r in records), time.time() * 1000
        )
        self.stats.events += sum(len(records) for records in handled.values()) - len(dead)
        self.stats.batches += 1
        self.stats.records_written += len(features)

    def _restored(
        self, batches: dict[TopicPartition, list[Record]]
    ) -> dict[TopicPartition, list[Record]]:
        """The records to apply: those of restored partitions that their states do not
        hold yet. A fetch made before a restore's seek may start at an older committed
        offset, and the seek reads again what such a fetch applied; both are skipped. A
        partition assigned but not restored yet is read again from the batch's start once
        it is (its restore seeks to its checkpoint, if it has one); one revoked meanwhile
        is dropped."""
        handled = {}
        for tp, records in batches.items():
            if tp in self.states:
                next_offset = self._next_offset.get(tp, 0)
                if records[0].offset < next_offset:
                    log.info(
                        "%s: skipping records below offset %d, applied already", tp, next_offset
                    )
                    records = [r for r in records if r.offset >= next_offset]
                if records:
                    handled[tp] = records
            elif tp in self._consumer.assignment():
                log.info(
                    "%s: fetched before its restore; reading again from %d", tp, records[0].offset
                )
                self._consumer.seek(tp, records[0].offset)
        return handled

    def lag(self) -> dict[TopicPartition, int]:
        """Events behind the partition's end, per owned partition whose end is known (from
        the last fetch response): the broker's high watermark less the next offset to
        handle."""
        lag = {}
        for tp, next_offset in list(self._next_offset.items()):  # the scrape's thread
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                lag[tp] = max(0, highwater - next_offset)
        return lag

    def checkpoint_ages_s(self) -> dict[TopicPartition, float]:
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

    async def _checkpoint_due(self) -> None:
        """Checkpoints one partition at a time, spread over the interval, so that no
        single batch pays for every partition's states at once."""
        if not self._uncommitted:
            return
        now = time.monotonic()
        step_s = self._checkpoint_interval_s / len(self._uncommitted)
        if now - self._last_checkpoint < step_s:
            return
        oldest = min(self._uncommitted, key=lambda tp: self._checkpointed_at.get(tp, 0.0))
        await self._checkpoint_locked([oldest])

    async def checkpoint(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Writes the states changed since the last checkpoint, then commits their offsets.

        Only offsets whose states are in Redis are committed: a consumer that takes a
        partition over restores the checkpoint and resumes right after it. Waits for a
        batch in progress to finish first.
        """
        async with self._lock:
            await self._checkpoint_locked(partitions)

    async def _checkpoint_locked(self, partitions: Iterable[TopicPartition] | None) -> None:
        chosen = list(self._uncommitted if partitions is None else partitions)
        offsets = {tp: self._uncommitted.pop(tp) for tp in chosen if tp in self._uncommitted}
        dirty = {tp: self._dirty.pop(tp, {}) for tp in offsets}
        self._last_checkpoint = time.monotonic()
        for tp in offsets:
            self._checkpointed_at[tp] = self._last_checkpoint
        if not offsets:
            return

        def fill(pipe: Pipeline) -> None:
            for tp, offset in offsets.items():
                self._checkpoints.queue(pipe, tp, dirty[tp], offset)

        if not await self._execute(fill):
            return
        try:
            await self._consumer.commit({tp: offset + 1 for tp, offset in offsets.items()})
        except KafkaError as exc:  # a rebalance took the partitions: the checkpoint covers it
            log.warning("commit failed: %s", exc)

    async def _execute(self, fill: Callable[[Pipeline], None]) -> bool:
        """Runs one pipeline, retrying while Redis is down; False if stopping first."""
        backoff = self._backoff(0.05)
        while True:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    fill(pipe)
                    await pipe.execute()
                return True
            except (redis.exceptions.RedisError, OSError) as exc:
                if self._stopping:
                    return False
                delay = backoff.next_s()
                log.warning("Redis write failed (%s); retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)

    async def _dead_letter(self, dead: list[tuple[Record, str]]) -> bool:
        """Sends each malformed message to the dead-letter topic; False if stopping first."""
        for record, reason in dead:
            log.warning(
                "malformed message %s/%d@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                reason,
            )
            headers = [
                ("error", reason.encode()),
                ("source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
            ]

            async def send(
                record: Record = record, headers: list[tuple[str, bytes]] = headers
            ) -> None:
                await self._producer.send_and_wait(
                    self._settings.dead_letter_topic,
                    value=record.value,
                    key=record.key,
                    headers=headers,
                )

            if not await self._retry("dead-letter send", send):
                return False
            self.stats.malformed += 1
        return True
