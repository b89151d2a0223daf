"""``Labeler``: follows the market data and labels audited decisions once their horizon
has passed.

It reads every partition of the market-data topic itself (no consumer group), from the
feature cache's checkpoints, so its mids are the consumer's. Every ``poll_interval_s`` it
reads the audit store for decisions without an outcome, labels those whose horizon the
market data has passed (``core.labels``) or records why it cannot, and adds the labelled
scores to a ``RollingQuality`` per model version and role (served, shadow). The labels,
metrics and alerts: docs/metrics.md, "Live model quality".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from core.backoff import Backoff
from core.labels import favourable_move
from core.reports import LabelProgress, write_label_progress
from feature_cache.checkpoint import StateCheckpoints
from feature_cache.codec import MalformedMessage, decode
from feature_cache.consumer import MAX_BATCH, RETRY_BACKOFF_MAX_S
from feature_cache.events import MarketEvent
from feature_cache.features import SymbolState
from quality.history import MidHistory
from quality.rolling import RollingQuality
from quality.settings import (
    GIVE_UP_S,
    LABELS_STOPPED_S,
    LOOKBACK_S,
    PASS_DECISIONS,
    QualitySettings,
)
from quality.store import Outcome, OutcomeStore, PendingDecision

log = logging.getLogger(__name__)

# Sources whose score is judged, and under which scorer: a model's answer under its
# version, the rules' under "rules". CACHED_SCORE repeats an earlier decision's score.
JUDGED_SOURCES = frozenset({"PRIMARY", "SECONDARY", "CANARY", "RULES"})

# A fetch waits up to this long for this many bytes of market data.
FETCH_MAX_WAIT_MS = 500
FETCH_MIN_BYTES = 64 * 1024

# How long a start waits for the topic's partitions before it retries.
ASSIGNMENT_WAIT_S = 10.0

# Why a decision got no label (the outcome's reason, and a metric label): a bounded set.
BEFORE_HISTORY = "before_history"  # its features are older than the labeler's market data
NO_MARKET_DATA = "no_market_data"  # its symbol's data stayed silent past the horizon
NO_SPREAD = "no_spread"  # its recorded features have no spread_bps
REASONS = (BEFORE_HISTORY, NO_MARKET_DATA, NO_SPREAD)


@dataclass
class LabelerStats:
    events: int = 0
    malformed: int = 0
    labelled: int = 0
    unlabelled: Counter[str] = field(default_factory=Counter)
    store_errors: int = 0
    pending: int = 0  # decisions read that wait for their horizon, at the last poll
    last_pass_at_s: float = 0.0  # wall clock of the last store pass that completed
    newest_labelled_decided_at_us: int = 0
    newest_decided_at_us: int = 0  # of any decision read
    started_at_us: int = field(default_factory=lambda: time.time_ns() // 1000)

    def labels_behind_s(self) -> float:
        """How far the newest labelled decision trails the newest decision read, in
        seconds of decision time; before the first label, the newest trails the first
        read, the labeler's start. Grows only while decisions come and none is labelled."""
        if not self.newest_decided_at_us:
            return 0.0
        baseline = max(self.newest_labelled_decided_at_us, self.started_at_us)
        return max(0.0, (self.newest_decided_at_us - baseline) / 1e6)

    def labels_stopped(self) -> bool:
        return self.labels_behind_s() > LABELS_STOPPED_S


SERVED = "served"  # the score the answer was made of
SHADOW = "shadow"  # the challenger's score of a shadowed decision, not acted on


@dataclass(frozen=True, slots=True)
class Scorer:
    model: str
    model_version: str
    role: str  # SERVED or SHADOW


class Labeler:
    def __init__(
        self, settings: QualitySettings, redis: aioredis.Redis, store: OutcomeStore
    ) -> None:
        self._settings = settings.quality
        self._kafka = settings.kafka
        self._checkpoints = StateCheckpoints(redis, key_prefix=settings.redis.key_prefix)
        self._redis = redis
        self._key_prefix = settings.redis.key_prefix
        self._stopped_logged = False
        self._waiting_logged = False  # for the audit store's tables
        self._store = store
        self._horizon_us = self._settings.horizon_ms * 1000
        self._give_up_us = int(GIVE_UP_S * 1e6)
        self._lookback_us = int(LOOKBACK_S * 1e6)
        self.states: dict[str, SymbolState] = {}
        self.histories: dict[str, MidHistory] = {}
        self.quality: dict[Scorer, RollingQuality] = {}
        self.stats = LabelerStats()
        self._since_us: int | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()  # set once every partition is assigned and placed

    # -- market data --------------------------------------------------------------------

    def apply(self, event: MarketEvent) -> None:
        state = self.states.get(event.symbol)
        if state is None:
            state = self.states[event.symbol] = SymbolState()
        state.apply(event)
        self._history(event.symbol).note(state.last_event_time_us, state.mid)

    def adopt(self, states: dict[str, SymbolState]) -> None:
        """Takes a checkpoint's books as the starting point of their symbols."""
        for symbol, state in states.items():
            self.states[symbol] = state
            self._history(symbol).note(state.last_event_time_us, state.mid)

    def _history(self, symbol: str) -> MidHistory:
        history = self.histories.get(symbol)
        if history is None:
            history = self.histories[symbol] = MidHistory()
        return history

    async def follow(self, stop: asyncio.Event) -> None:
        """Reads the market data until ``stop``; retries while Kafka or Redis (the
        checkpoints) is away."""
        backoff = Backoff(initial_s=0.2, max_s=RETRY_BACKOFF_MAX_S)
        while not stop.is_set():
            try:
                consumer = await self._assigned()
                await self._read(consumer, stop)
            except (KafkaError, RedisError, OSError) as exc:
                log.warning("market data: %s; retrying", exc)
                await self._close_consumer()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff.next_s())
        await self._close_consumer()

    async def _assigned(self) -> AIOKafkaConsumer:
        if self._consumer is not None:
            return self._consumer
        # Subscribed without a group: aiokafka assigns every partition of the topic.
        consumer = AIOKafkaConsumer(
            self._kafka.topic,
            bootstrap_servers=self._kafka.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Labels wait for the horizon anyway: few, full fetches (the feature cache's
            # short waits keep features fresh; here they would only load the broker).
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            fetch_min_bytes=FETCH_MIN_BYTES,
            client_id="decision-labeler",
        )
        self._consumer = consumer
        await consumer.start()
        deadline = time.monotonic() + ASSIGNMENT_WAIT_S
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise KafkaError(f"no partitions of {self._kafka.topic} (not created yet?)")
            await asyncio.sleep(0.05)
        tps = sorted(consumer.assignment())
        for tp in tps:
            offset, states = await self._checkpoints.load(tp, repair=False)
            self.adopt(states)
            if offset is None:
                await consumer.seek_to_beginning(tp)
                log.info("%s: no checkpoint, reading from its start", tp)
            else:
                consumer.seek(tp, offset + 1)
                log.info("%s: %d books from its checkpoint at offset %d", tp, len(states), offset)
        self.ready.set()
        return consumer

    async def _read(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=FETCH_MAX_WAIT_MS, max_records=MAX_BATCH)
            for records in batches.values():
                for record in records:
                    try:
                        self.apply(decode(record.value))
                    except MalformedMessage:
                        self.stats.malformed += 1  # the feature cache dead-letters it
                        continue
                    except Exception:  # one bad event must not stop the feed
                        log.exception("could not apply %s/%d", record.topic, record.offset)
                        self.stats.malformed += 1
                        continue
                    self.stats.events += 1
            await asyncio.sleep(0)

    async def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    # -- decisions ----------------------------------------------------------------------

    def outcome(self, decision: PendingDecision, now_us: int) -> Outcome | None:
        """The decision's outcome, or None while its horizon's market data is to come."""
        history = self.histories.get(decision.symbol)
        start = decision.feature_time_us
        end = start + self._horizon_us
        first_us = history.first_us if history is not None else None
        if history is not None and first_us is not None and start < first_us:
            return self._unlabelled(decision, BEFORE_HISTORY)
        if history is None or first_us is None or history.seen_until_us <= end:
            # Events at the horizon's exact time may still come: strictly past it only.
            if now_us - decision.decided_at_us > self._horizon_us + self._give_up_us:
                return self._unlabelled(decision, NO_MARKET_DATA)
            return None
        if decision.spread_bps is None:
            return self._unlabelled(decision, NO_SPREAD)
        mid_now = history.mid_at(start)
        mid_later = history.mid_at(end)
        if mid_now is None or mid_later is None:  # not so: start >= first_us
            return self._unlabelled(decision, BEFORE_HISTORY)
        label = int(favourable_move(decision.side_sign, mid_now, mid_later, decision.spread_bps))
        return Outcome(decision.decision_id, decision.decided_at_us, label, mid_now, mid_later)

    def _unlabelled(self, decision: PendingDecision, reason: str) -> Outcome:
        return Outcome(decision.decision_id, decision.decided_at_us, None, reason=reason)

    def judge(self, decisions: Iterable[tuple[PendingDecision, Outcome]]) -> None:
        """Adds the labelled decisions' scores to their scorers' rolling quality."""
        for decision, outcome in decisions:
            if outcome.label is None:
                continue
            if decision.source in JUDGED_SOURCES and decision.score is not None:
                model = "rules" if decision.source == "RULES" else decision.model_name
                self._rolling(Scorer(model, decision.model_version, SERVED)).add(
                    decision.score, outcome.label, decision.threshold
                )
            if decision.shadow_score is not None and decision.shadow_model_name:
                version = decision.shadow_model_version or ""
                scorer = Scorer(decision.shadow_model_name, version, SHADOW)
                self._rolling(scorer).add(decision.shadow_score, outcome.label, decision.threshold)

    def _rolling(self, scorer: Scorer) -> RollingQuality:
        rolling = self.quality.get(scorer)
        if rolling is None:
            rolling = self.quality[scorer] = RollingQuality(self._settings.window)
        return rolling

    def label(
        self, pending: Sequence[PendingDecision], now_us: int
    ) -> list[tuple[PendingDecision, Outcome]]:
        """The outcomes of the pending decisions that have one now."""
        decided = []
        for decision in pending:
            outcome = self.outcome(decision, now_us)
            if outcome is not None:
                decided.append((decision, outcome))
        return decided

    async def pass_once(self) -> int:
        """One read of the store, labelling and writing what it can; the outcomes written."""
        now_us = time.time_ns() // 1000
        if self._since_us is None:
            self._since_us = now_us - self._lookback_us
        pending = await asyncio.to_thread(self._store.pending, self._since_us, PASS_DECISIONS)
        decided = self.label(pending, now_us)
        outcomes = [outcome for _, outcome in decided]
        await asyncio.to_thread(self._store.record, outcomes, now_us)
        # Only once stored: a failed write labels them again next time, judged once.
        self.judge(decided)
        for decision, outcome in decided:
            if outcome.label is None:
                self.stats.unlabelled[outcome.reason] += 1
            else:
                self.stats.labelled += 1
                self.stats.newest_labelled_decided_at_us = max(
                    self.stats.newest_labelled_decided_at_us, decision.decided_at_us
                )
        self.stats.pending = len(pending) - len(decided)
        if pending:
            newest = pending[-1].decided_at_us
            self._since_us = max(self._since_us, newest - self._lookback_us)
            self.stats.newest_decided_at_us = max(self.stats.newest_decided_at_us, newest)
        self._prune()
        self.stats.last_pass_at_s = time.time()
        await self._publish_progress()
        return len(outcomes)

    async def _publish_progress(self) -> None:
        """The labels' progress for ``decisionctl status`` (``core.reports``), and a log
        line when labels stop or start again."""
        stats = self.stats
        stopped = stats.labels_stopped()
        if stopped != self._stopped_logged:
            self._stopped_logged = stopped
            if stopped:
                log.warning(
                    "labels stopped: the newest labelled decision is %.0f s older than the "
                    "newest decision (%s)",
                    stats.labels_behind_s(),
                    ", ".join(f"{r} {n}" for r, n in sorted(stats.unlabelled.items()))
                    or "none unlabelled",
                )
            else:
                log.info("labelling again")
        progress = LabelProgress(
            newest_decision_us=stats.newest_decided_at_us,
            newest_labelled_us=stats.newest_labelled_decided_at_us,
            behind_s=stats.labels_behind_s(),
            stopped=stopped,
            at_us=time.time_ns() // 1000,
        )
        try:
            await write_label_progress(self._redis, self._key_prefix, progress)
        except (RedisError, OSError) as exc:  # status shows no report; retried next pass
            log.debug("label progress not reported: %s", exc)

    def _prune(self) -> None:
        keep_us = self._lookback_us + self._horizon_us + self._give_up_us
        for history in self.histories.values():
            history.prune(history.seen_until_us - keep_us)

    async def label_until(self, stop: asyncio.Event) -> None:
        """Store passes every ``poll_interval_s`` until ``stop``, once the store has its
        tables (the decision server creates them as it starts: a fresh stack starts the
        labeler first) and the market data is placed; a failing store is retried at the
        next pass, and logged when the failure changes (a store away fails each pass the
        same way)."""
        await self._wait_ready(stop)
        last_failure = ""
        tables = False
        while not stop.is_set():
            try:
                tables = tables or await self._has_tables()
                if tables:
                    await self.pass_once()
                if last_failure:
                    log.info("labelling passes work again")
                last_failure = ""
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                self.stats.store_errors += 1
                failure = str(exc).splitlines()[0]
                if failure != last_failure:
                    log.warning("labelling pass failed (retried every pass): %s", failure)
                last_failure = failure
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._settings.poll_interval_s)

    async def _has_tables(self) -> bool:
        """Whether the store has its tables yet; says once that it waits for them (not a
        store error: the stack starts the labeler before the server that creates them)."""
        found = await asyncio.to_thread(self._store.has_tables)
        if not found and not self._waiting_logged:
            log.info(
                "waiting for the audit store's tables: the decision server creates them as "
                "it starts (checked every %g s)",
                self._settings.poll_interval_s,
            )
            self._waiting_logged = True
        elif found and self._waiting_logged:
            log.info("the audit store has its tables: labelling")
        return found

    async def _wait_ready(self, stop: asyncio.Event) -> None:
        ready = asyncio.create_task(self.ready.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in (ready, stopped):
            task.cancel()
