"""The feature-cache consumer: Kafka market events → per-symbol state → Redis records.

One fetch is one batch: its events are applied to their symbols' ``SymbolState`` and the
touched symbols' records written in one Redis pipeline. About once a second per partition
the changed states are checkpointed to Redis, and only then is the offset committed:
nothing is committed that is not written. Malformed messages go to the dead-letter topic;
Kafka or Redis down, it retries with backoff. This module does the I/O; applying a batch
(``feature_cache.batch``) and the checkpoint turns (``.checkpoint_schedule``) do none.
Behaviour: docs/market-data.md#market-data-and-features
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import ConsumerStoppedError, KafkaError
from redis.asyncio.client import Pipeline

from core.backoff import Backoff
from core.reports import queue_ignored
from feature_cache.batch import AppliedBatch, Record, apply_batch
from feature_cache.checkpoint import StateCheckpoints
from feature_cache.checkpoint_schedule import CheckpointSchedule
from feature_cache.consumer_stats import ConsumerStats
from feature_cache.dead_letters import DeadLetterProducer
from feature_cache.features import SymbolState
from feature_cache.feed_watch import IGNORED_ALARM_S, FeedWatch
from feature_cache.settings import KafkaSettings
from feature_cache.store import FeatureWriter

log = logging.getLogger(__name__)

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
# partition replays at most about this much of it. Not per batch: a state with its windows
# is tens of kB of JSON, so checkpointing every batch would cost more than the batch.
CHECKPOINT_INTERVAL_S = 1.0


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
        self._redis = redis
        self._key_prefix = key_prefix
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
        self._dead_letters = DeadLetterProducer(settings)
        self.states: dict[TopicPartition, dict[str, SymbolState]] = {}
        # Per owned partition: the first offset its states do not hold yet.
        self._next_offset: dict[TopicPartition, int] = {}
        self._schedule = CheckpointSchedule(checkpoint_interval_s)
        self._feeds = FeedWatch()
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
        await self._retry("Kafka producer start", self._dead_letters.start)
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
        await self._dead_letters.stop()

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
        self._schedule.assigned(tp)
        if offset is not None:
            self._consumer.seek(tp, offset + 1)
        log.info("assigned %s: %d symbols restored, checkpoint %s", tp, len(states), offset)

    def revoke(self, tp: TopicPartition) -> None:
        """Forgets a partition another consumer takes over (after its checkpoint)."""
        self._feeds.forget(self.states.get(tp, {}))
        self.states.pop(tp, None)
        self._next_offset.pop(tp, None)
        self._schedule.revoked(tp)

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
        handled = self._restored(batches)
        applied = apply_batch(self.states, handled)
        for tp, records in handled.items():
            self._next_offset[tp] = records[-1].offset + 1  # the states hold them now
        features, dead = applied.features, applied.dead
        self._note_feeds(applied)
        if dead and not await self._dead_letter(dead):
            return  # stopping before the dead letters were sent: nothing is committed
        write_started = time.perf_counter()
        report = self._feeds.report(time.monotonic(), time.time_ns() // 1000)

        def fill(pipe: Pipeline) -> None:
            self._writer.queue(pipe, features)
            if report is not None:
                queue_ignored(pipe, self._key_prefix, *report)

        if (features or report is not None) and not await self._execute(fill):
            return  # stopping before Redis came back: the next owner replays from the checkpoint
        if features:
            self.stats.write_latency.observe(time.perf_counter() - write_started)
        # Only now, with dead letters sent and features written, may a checkpoint commit them.
        for tp, records in handled.items():
            self._schedule.handled(tp, records[-1].offset, applied.changed[tp])
        self.stats.note_freshness(
            (r.timestamp for records in handled.values() for r in records), time.time() * 1000
        )
        ignored = sum(applied.ignored.values())
        self.stats.events += sum(len(records) for records in handled.values()) - len(dead) - ignored
        self.stats.batches += 1
        self.stats.records_written += len(features)

    def _note_feeds(self, applied: AppliedBatch) -> None:
        """Counts and logs the feeds that started over and the events ignored."""
        for symbol, session in applied.restarted.items():
            log.info("%s: its feed started over (session %d); its book restarts", symbol, session)
        self.stats.restarts += len(applied.restarted)
        for (_, reason), count in applied.ignored.items():
            self.stats.ignored[reason.value] += count
        now_s = time.monotonic()
        before = set(self._feeds.ignored(now_s))
        touched = (symbol for changed in applied.changed.values() for symbol in changed)
        self._feeds.note(touched, applied.ignored, now_s)
        for symbol, streak in self._feeds.ignored(now_s).items():
            if symbol not in before:
                log.warning(
                    "%s: every event ignored for %.0f s (%d events, the last one %s): its "
                    "features are frozen while its feed goes on",
                    symbol,
                    IGNORED_ALARM_S,
                    streak.events,
                    streak.reason.value,
                )

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

    def ignored_symbols(self) -> int:
        """Symbols whose events have all been ignored for ``IGNORED_ALARM_S`` or more."""
        return len(self._feeds.ignored(time.monotonic()))

    def checkpoint_ages_s(self) -> dict[TopicPartition, float]:
        """Per owned partition: seconds since its last checkpoint (or its assignment)
        while it holds handled events not yet checkpointed, else 0: what a crash now would
        make the next owner replay."""
        return self._schedule.ages_s()

    async def _checkpoint_due(self) -> None:
        """Checkpoints the partition whose turn it is, if any (one at a time)."""
        if (tp := self._schedule.due()) is not None:
            await self._checkpoint_locked([tp])

    async def checkpoint(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Writes the states changed since the last checkpoint, then commits their offsets.

        Only offsets whose states are in Redis are committed: a consumer that takes a
        partition over restores the checkpoint and resumes right after it. Waits for a
        batch in progress to finish first.
        """
        async with self._lock:
            await self._checkpoint_locked(partitions)

    async def _checkpoint_locked(self, partitions: Iterable[TopicPartition] | None) -> None:
        pending = self._schedule.take(partitions)
        if not pending:
            return

        def fill(pipe: Pipeline) -> None:
            for tp, checkpoint in pending.items():
                self._checkpoints.queue(pipe, tp, checkpoint.changed, checkpoint.offset)

        if not await self._execute(fill):
            return
        try:
            await self._consumer.commit({tp: c.offset + 1 for tp, c in pending.items()})
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
            send = functools.partial(self._dead_letters.send, record, reason)
            if not await self._retry("dead-letter send", send):
                return False
            self.stats.malformed += 1
        return True
