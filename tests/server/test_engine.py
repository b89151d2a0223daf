"""The decision engine's orchestration (pure logic, over fakes of the feature store, the
replicas and the score cache; the real parts are in tests/server/test_decision_path.py):
which step decides, what each says and in which order, what is recorded and cached."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest
import redis.exceptions

from core.deadline import Budget, CallPlan
from core.domain import CallInfo, Decision, DecisionResult, OrderRequest, Reason, Side, Source
from core.store_reads import StoreReads
from decision_client.v1 import decision_pb2
from fallback.chain import FallbackChain
from fallback.rules import RulesBaseline
from fallback.score_cache import CachedScore, ScoreCache, ScoreEntry, ScoreWriter
from feature_cache.schema import FEATURE_INDEX, FEATURE_NAMES
from feature_cache.store import FeatureReader, FeatureRecord
from server import engine as engine_module
from server.control.canary import CanaryMonitor
from server.control.flags import SHADOW_SAMPLE_RATE, flag_specs
from server.control.state import CANARY_FIELD, KILL_PREFIX, Change, ControlState, Entry, FlagSpec
from server.engine import DecisionEngine
from server.features import FeatureSource
from server.model_client import ModelScores
from server.model_errors import ModelCallError, ModelNoTime, ModelTimeout, ModelUnavailable
from server.replica import Replica
from server.router import ReplicaRouter
from server.settings import (
    BreakerSettings,
    CanarySettings,
    DecisionSettings,
)
from server.shadow import Shadowed
from server.traffic import Traffic
from server.validation import response_to_pb
from tests.server.fakes import AlwaysConnected

pytestmark = pytest.mark.timed  # budgets of a few ms, spent while the test runs

SYMBOLS = ("BTC-USD", "ETH-USD")
FLAGS = flag_specs()


def calm_book() -> tuple[float, ...]:
    """Features the rules trade a buy on: tight spread, calm, bids leaning in."""
    values = [0.0] * len(FEATURE_NAMES)
    values[FEATURE_INDEX["spread_bps"]] = 1.0
    values[FEATURE_INDEX["imbalance_l5"]] = 0.5
    return tuple(values)


def record(symbol: str, age_ms: float = 10.0) -> FeatureRecord:
    now_us = time.time_ns() // 1000
    return FeatureRecord(symbol, calm_book(), now_us - int(age_ms * 1000), 1)


class FakeFeatureStore:
    """``FeatureReader.read_many`` over a dict, or failing with ``error``."""

    def __init__(self, records: dict[str, FeatureRecord]) -> None:
        self.records = records
        self.error: Exception | None = None
        self.reads: list[list[str]] = []

    async def read_many(self, symbols: Sequence[str]) -> list[FeatureRecord | None]:
        self.reads.append(list(symbols))
        if self.error is not None:
            raise self.error
        return [self.records.get(symbol) for symbol in symbols]


class FakeReplicaClient(AlwaysConnected):
    """Scores every row ``score``, or fails when ``fails``; records the rows it got, and
    holds each call until ``released`` is set."""

    def __init__(self, name: str, score: float, *, model_name: str = "champion") -> None:
        self.name = name
        self.model_name = model_name
        self.score = score
        self.fails = False
        self.busy = False  # every request leaves its queue unsent (no time)
        self.error: ModelCallError | None = None  # raised by every call
        self.calls: list[list[list[float]]] = []
        self.released = asyncio.Event()
        self.released.set()

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        if self.busy:
            raise ModelNoTime(f"{self.name} busy: 1 call(s) out all the 3.0 ms it could wait")
        if self.error is not None:
            raise self.error
        self.calls.append([list(row) for row in rows])
        await self.released.wait()
        if self.fails:
            raise ModelUnavailable(f"{self.name} unavailable")
        return ModelScores(self.model_name, f"{self.name}-v1", [self.score] * len(rows), 1.0)


class FakeScoreCache:
    def __init__(self, score: CachedScore | None = None) -> None:
        self.score = score
        self.lookups = 0
        self.written: list[ScoreEntry] = []

    def held(self, keys: Sequence[tuple[str, Side]]) -> dict[tuple[str, Side], CachedScore | None]:
        return {}  # nothing held in memory: every lookup reads

    async def get_many(self, keys: Sequence[tuple[str, Side]]) -> list[CachedScore | None]:
        self.lookups += 1
        return [self.score] * len(keys)

    def hold(self, entries: Sequence[ScoreEntry]) -> None:
        pass

    async def put_many(self, entries: Sequence[ScoreEntry]) -> None:
        self.written.extend(entries)


class RecordingAudit:
    def __init__(self) -> None:
        self.recorded: list[tuple[Sequence[Sequence[float] | None], list[DecisionResult]]] = []

    def record_decisions(
        self,
        call: CallInfo,
        orders: Sequence[OrderRequest],
        features: Sequence[Sequence[float] | None],
        results: Sequence[DecisionResult],
    ) -> None:
        self.recorded.append((features, list(results)))


class FakeShadow:
    replica_name = "challenger"

    def __init__(self) -> None:
        self.submitted: list[list[Shadowed]] = []

    def submit(
        self,
        rows: Sequence[Sequence[float]],
        shadowed: Sequence[Shadowed],
        state: ControlState,
        now_us: int,
    ) -> None:
        self.submitted.append(list(shadowed))

    async def stop(self, timeout_s: float = 1.0) -> None:
        pass


class NoRollback:
    """A canary lever with automatic rollback off."""

    def setting(self) -> object:
        return None

    def enabled(self) -> bool:
        return False

    async def roll_back(self, breach: str) -> bool:
        raise AssertionError(f"no rollback expected: {breach}")


class Parts:
    """An engine and the fakes behind it."""

    def __init__(
        self,
        *,
        decision: DecisionSettings | None = None,
        cached: CachedScore | None = None,
        state: ControlState | None = None,
    ) -> None:
        self.store = FakeFeatureStore({symbol: record(symbol) for symbol in SYMBOLS})
        self.primary = FakeReplicaClient("primary", 0.9)
        self.secondary = FakeReplicaClient("secondary", 0.8)
        self.challenger = FakeReplicaClient("challenger", 0.1, model_name="challenger")
        self.cache = FakeScoreCache(cached)
        self.audit = RecordingAudit()
        self.shadow = FakeShadow()
        self.state = state or ControlState.from_entries(0, {}, FLAGS)
        decision = decision or DecisionSettings()
        plan = CallPlan(jitter=0.0)
        breaker = BreakerSettings()
        replicas = [
            Replica.build(self.primary, Source.PRIMARY, breaker),
            Replica.build(self.secondary, Source.SECONDARY, breaker),
        ]
        challenger = Replica.build(self.challenger, Source.CANARY, breaker)
        self.monitor = CanaryMonitor(CanarySettings(), NoRollback())
        reads = StoreReads(cap_ms=10.0, max_abandoned=4)
        cache = cast(ScoreCache, self.cache)
        self.writer = ScoreWriter(cache, write_interval_ms=0.0)
        self.engine = DecisionEngine(
            features=FeatureSource(cast(FeatureReader, self.store), reads, max_age_ms=1000.0),
            traffic=Traffic(
                ReplicaRouter(replicas, plan=plan),
                (
                    ReplicaRouter([challenger, *replicas], plan=plan),
                    self.monitor,
                ),
                rng=random.Random(1),
            ),
            ladder=FallbackChain(
                cache,
                RulesBaseline(max_spread_bps=10, max_volatility_bps=25, min_imbalance=0.1),
                cached_score_max_age_ms=1000.0,
                model_threshold=decision.threshold,
                redis_reads=reads,
            ),
            scores=self.writer,
            audit=self.audit,
            decision=decision,
            control=lambda: self.state,
            shadow=cast(Any, self.shadow),
            rng=random.Random(1),
        )

    async def decide(self, *symbols: str, budget_ms: float = 50.0) -> list[DecisionResult]:
        orders = [OrderRequest(f"r{i}", s, Side.BUY, 1.0) for i, s in enumerate(symbols)]
        return await self.engine.decide(orders, Budget(budget_ms), CallInfo(time.time_ns()))

    async def stop(self) -> None:
        await self.engine.stop()
        await self.monitor.stop()

    async def __aenter__(self) -> Parts:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    async with Parts() as built:
        yield built


def entry(value: Any, by: str = "alice", reason: str = "test") -> Entry:
    return Entry(value, Change(by, reason, 0))


def state(entries: dict[str, Entry], flags: dict[str, FlagSpec] = FLAGS) -> ControlState:
    return ControlState.from_entries(1, entries, flags)


async def test_the_primary_answers_and_its_score_is_recorded_and_cached(parts: Parts) -> None:
    [result] = await parts.decide("BTC-USD")
    assert (result.source, result.decision, result.score) == (Source.PRIMARY, Decision.TRADE, 0.9)
    assert (result.model_name, result.model_version) == ("champion", "primary-v1")
    assert result.reason == "primary answered in 1.0 ms"
    assert result.reason_code is Reason.MODEL_ANSWERED
    assert 10.0 <= result.feature_age_ms < 1000.0
    [(features, recorded)] = parts.audit.recorded
    assert recorded == [result] and features == [list(calm_book())]
    await asyncio.sleep(0)  # the cached-score write runs off the critical path
    [written] = parts.cache.written
    assert (written.symbol, written.side, written.score.score) == ("BTC-USD", Side.BUY, 0.9)


async def test_a_batch_makes_one_feature_read_and_one_model_call_for_the_fresh_rows(
    parts: Parts,
) -> None:
    parts.store.records["ETH-USD"] = record("ETH-USD", age_ms=5000.0)
    fresh, stale = await parts.decide("BTC-USD", "ETH-USD")
    assert parts.store.reads == [["BTC-USD", "ETH-USD"]]
    assert len(parts.primary.calls) == 1 and len(parts.primary.calls[0]) == 1
    assert fresh.source is Source.PRIMARY
    assert stale.source is Source.ABSTAIN  # the rules need fresh features too
    assert (fresh.reason_code, stale.reason_code) == (Reason.MODEL_ANSWERED, Reason.FEATURES_STALE)
    assert re.fullmatch(
        r"features stale: 50\d\d ms old \(max 1000\); no cached score;"
        r" abstain: no fresh features for rules",
        stale.reason,
    )


async def test_an_engaged_kill_switch_abstains_before_reading_anything(parts: Parts) -> None:
    parts.state = state({KILL_PREFIX + "BTC-USD": entry(True, reason="bad prints")})
    stopped, going = await parts.decide("BTC-USD", "ETH-USD")
    assert (stopped.source, stopped.decision) == (Source.ABSTAIN, Decision.ABSTAIN)
    assert stopped.reason == "kill switch for BTC-USD engaged by alice: bad prints"
    assert stopped.reason_code == Reason.KILL_SWITCH
    assert stopped.feature_age_ms == -1.0
    assert parts.store.reads == [["ETH-USD"]]  # only the order that goes on
    assert going.source is Source.PRIMARY
    assert len(parts.audit.recorded[0][1]) == 2  # both recorded


async def test_when_both_replicas_fail_the_ladder_decides_and_every_step_says_why(
    parts: Parts,
) -> None:
    parts.primary.fails = parts.secondary.fails = True
    [result] = await parts.decide("BTC-USD")
    assert result.source is Source.RULES
    steps = result.reason.split("; ")
    assert steps[:3] == ["primary unavailable", "secondary unavailable", "no cached score"]
    assert steps[3].startswith("rules: ") and len(steps) == 4
    assert result.reason_code == Reason.MODEL_UNAVAILABLE  # the secondary's, the lane's last
    assert parts.engine.fallbacks == {(Source.RULES, Reason.MODEL_UNAVAILABLE): 1}


async def test_a_fresh_cached_score_answers_when_the_model_does_not() -> None:
    now_us = time.time_ns() // 1000
    async with Parts(cached=CachedScore(0.7, "champion", "v0", now_us - 50_000)) as parts:
        parts.primary.fails = parts.secondary.fails = True
        [result] = await parts.decide("BTC-USD")
        waited_ms = (time.time_ns() // 1000 - now_us) / 1000
        assert (result.source, result.score, result.model_version) == (
            Source.CACHED_SCORE,
            0.7,
            "v0",
        )
        matched = re.fullmatch(
            r"primary unavailable; secondary unavailable; cached score (\d+) ms old", result.reason
        )
        assert matched, result.reason
        # 50 ms old when the test began, plus however long a busy machine took since.
        assert 50 <= int(matched[1]) <= 50 + waited_ms + 1, result.reason  # +1: rounding


async def test_a_failed_feature_read_abstains_without_a_second_redis_read(parts: Parts) -> None:
    parts.store.error = redis.exceptions.ConnectionError("refused")
    [result] = await parts.decide("BTC-USD")
    assert result.source is Source.ABSTAIN
    assert result.reason == (
        "feature store unavailable (ConnectionError); cached score skipped: feature store"
        " unavailable (ConnectionError); abstain: no fresh features for rules"
    )
    assert result.reason_code == Reason.FEATURE_STORE
    assert parts.cache.lookups == 0 and parts.primary.calls == []


async def test_the_canary_share_goes_to_the_challenger_and_is_not_cached(parts: Parts) -> None:
    parts.state = state({CANARY_FIELD: entry(1.0)})
    [result] = await parts.decide("BTC-USD")
    assert (result.source, result.model_name, result.score) == (Source.CANARY, "challenger", 0.1)
    assert result.decision is Decision.NO_TRADE
    await asyncio.sleep(0)
    assert parts.cache.written == []  # the challenger's scores are no champion scores
    assert parts.shadow.submitted == []  # nor are they shadowed
    assert parts.monitor.compare().canary.decisions == 1


async def test_a_failing_challenger_falls_back_to_the_champion_and_counts_against_it(
    parts: Parts,
) -> None:
    parts.state = state({CANARY_FIELD: entry(1.0)})
    parts.challenger.fails = True
    [result] = await parts.decide("BTC-USD")
    assert result.source is Source.PRIMARY
    assert result.reason == "challenger unavailable; primary answered in 1.0 ms"
    canary = parts.monitor.compare().canary
    assert (canary.decisions, canary.error_rate, canary.fallback_rate) == (1, 1.0, 0.0)


async def test_a_busy_challenger_falls_back_to_the_champion_and_counts_for_neither(
    parts: Parts,
) -> None:
    parts.state = state({CANARY_FIELD: entry(1.0)})
    parts.challenger.busy = True
    [result] = await parts.decide("BTC-USD")
    assert result.source is Source.PRIMARY
    assert result.reason.startswith("challenger busy: 1 call(s) out"), result.reason
    canary = parts.monitor.compare().canary
    assert canary.decisions == 0  # busy is not failing: nothing for the canary's error rate


async def test_a_sampled_champion_decision_is_shadowed_with_its_scores(parts: Parts) -> None:
    parts.state = state({"flag:" + SHADOW_SAMPLE_RATE: entry("1.0")})
    [result] = await parts.decide("BTC-USD")
    [[shadowed]] = parts.shadow.submitted
    assert shadowed == Shadowed(result.decision_id, 0.9, trade=True)


async def test_breakers_forced_open_and_a_budget_too_short_say_so_by_code(parts: Parts) -> None:
    parts.state = state(
        {
            "breaker:primary": entry("FORCE_OPEN", reason="slow"),
            "breaker:secondary": entry("FORCE_OPEN", reason="slow"),
        }
    )
    [refused] = await parts.decide("BTC-USD")
    assert (refused.source, refused.reason_code) == (Source.RULES, Reason.MODEL_BREAKER_OPEN)
    parts.state = state({})
    [hurried] = await parts.decide("BTC-USD", budget_ms=1.0)  # no time left for a call
    assert hurried.reason_code == Reason.MODEL_NO_TIME, hurried.reason
    assert parts.primary.calls == []
    assert parts.engine.fallbacks == {
        (Source.RULES, Reason.MODEL_BREAKER_OPEN): 1,
        (Source.RULES, Reason.MODEL_NO_TIME): 1,
    }


@pytest.mark.parametrize("primary_mode", ["AUTO", "FORCE_CLOSED"])
async def test_a_timeout_before_a_replica_forced_open_is_no_breaker_open(
    parts: Parts, primary_mode: str
) -> None:
    """Issue 53: the primary paused, the secondary forced open by on-call. The primary's
    timeout is why the model did not answer, in the reason code and the fallback metric."""
    parts.state = state(
        {
            "breaker:primary": entry(primary_mode),
            "breaker:secondary": entry("FORCE_OPEN", by="on-call", reason="slow"),
        }
    )
    parts.primary.error = ModelTimeout("primary deadline exceeded after 11.0 ms", given_ms=11.0)
    [result] = await parts.decide("BTC-USD")
    assert result.source is Source.RULES
    assert result.reason.startswith(
        "primary deadline exceeded after 11.0 ms; secondary forced open by on-call; "
    ), result.reason
    assert result.reason_code == Reason.MODEL_TIMEOUT
    assert parts.engine.fallbacks == {(Source.RULES, Reason.MODEL_TIMEOUT): 1}
    assert response_to_pb(result).reason_code == decision_pb2.REASON_CODE_MODEL_TIMEOUT


async def test_ladder_decisions_for_want_of_features_are_counted_by_symbol_up_to_a_bound(
    parts: Parts,
) -> None:
    # Symbols the store has no features for: the ladder abstains, NO_FEATURES.
    unknown = [f"X{n}-USD" for n in range(engine_module.MAX_SYMBOL_LABELS + 2)]
    await parts.decide("BTC-USD", *unknown, unknown[0])
    counted = parts.engine.feature_fallbacks
    assert counted[unknown[0], Reason.NO_FEATURES] == 2
    assert ("BTC-USD", Reason.NO_FEATURES) not in counted  # the model answered it
    named = {symbol for symbol, _ in counted} - {engine_module.OTHER_SYMBOLS}
    assert len(named) == engine_module.MAX_SYMBOL_LABELS
    assert counted[engine_module.OTHER_SYMBOLS, Reason.NO_FEATURES] == 2
    assert sum(counted.values()) == len(unknown) + 1
