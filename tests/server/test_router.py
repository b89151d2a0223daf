"""ReplicaRouter: the first call, one retry, the retry budget, calls skipped for time
(pure logic: the replicas are fakes with scripted latencies; the real replicas are in
tests/server/test_decision_path.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from core.deadline import NEEDS_WINDOW_S, Budget, CallPlan
from core.domain import Reason, Source
from server.breaker import AsyncCircuitBreaker
from server.control.state import Change, ControlState, Entry
from server.model_client import ModelScores
from server.model_errors import (
    ModelBusy,
    ModelCallError,
    ModelNoTime,
    ModelResponseError,
    ModelTimeout,
    ModelUnavailable,
)
from server.replica import Replica
from server.router import ReplicaRouter
from server.settings import BreakerSettings
from tests.server.fakes import AlwaysConnected

pytestmark = pytest.mark.timed  # budgets of a few ms, spent while the test runs


class ScriptedReplica(AlwaysConnected):
    """Answers after ``latency_ms`` (or fails when ``fails``), or as ``script`` says for
    a request; counts calls per request (a row's first value is its request's number)."""

    model_name = "champion"

    def __init__(self, name: str, latency_ms: float = 1.0, *, fails: bool = False) -> None:
        self.name = name
        self.latency_ms = latency_ms
        self.fails = fails
        self.calls: Counter[float] = Counter()
        self.cancelled = 0
        self.script: dict[float, tuple[float, bool]] = {}

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        request = rows[0][0]
        self.calls[request] += 1
        latency_ms, fails = self.script.get(request, (self.latency_ms, self.fails))
        try:
            await asyncio.sleep(min(latency_ms / 1000.0, timeout_s))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if latency_ms / 1000.0 > timeout_s:
            raise ModelTimeout(f"{self.name} deadline exceeded", given_ms=timeout_s * 1000)
        if fails:
            raise ModelUnavailable(f"{self.name} unavailable")
        return ModelScores("champion", self.name, [0.5] * len(rows), latency_ms)


def router(
    primary: ScriptedReplica,
    secondary: ScriptedReplica,
    *,
    breakers: BreakerSettings | None = None,
    **options: Any,
) -> ReplicaRouter:
    """``options``: the router's own tuning.
    ``breakers``: the server's breakers, which count only what ``counts_against_replica``
    says (default: breakers that count every failure and open only after 1,000)."""
    lane = ((primary, Source.PRIMARY), (secondary, Source.SECONDARY))
    replicas = [
        Replica.build(client, source, breakers)
        if breakers is not None
        else Replica(
            client=client,
            breaker=AsyncCircuitBreaker(client.name, fail_max=1000, reset_timeout_s=1.0),
            source=source,
        )
        for client, source in lane
    ]
    plan = CallPlan(model_call_ms=60.0, fallback_reserve_ms=1.0, jitter=0.0)
    return ReplicaRouter(replicas, plan=plan, **options)


async def score(routing: ReplicaRouter, request: float = 0.0, budget_ms: float = 200.0):
    result = await routing.score([[request, 1.0]], Budget(budget_ms))
    return result.answer, result.reasons


async def test_a_slow_primary_is_waited_for() -> None:
    primary, secondary = ScriptedReplica("primary", 30.0), ScriptedReplica("secondary", 1.0)
    routed, _ = await score(router(primary, secondary))
    assert routed is not None and routed.source is Source.PRIMARY
    assert secondary.calls[0.0] == 0


@pytest.mark.parametrize("seed", range(3))
async def test_no_request_makes_more_than_one_extra_call(seed: int) -> None:
    rng = random.Random(seed)
    primary, secondary = ScriptedReplica("primary"), ScriptedReplica("secondary")
    routing = router(primary, secondary)

    for n in range(60):  # fast, slow, timing out, failing: in every combination
        primary.script[float(n)] = (rng.choice([1.0, 3.0, 8.0, 30.0, 80.0]), rng.random() < 0.2)
        secondary.script[float(n)] = (rng.choice([1.0, 8.0, 80.0]), rng.random() < 0.2)
    await asyncio.gather(*(score(routing, request=float(n)) for n in range(60)))
    for n in range(60):
        request = float(n)
        seen = (n, primary.calls[request], secondary.calls[request])
        scripts = (primary.script[request], secondary.script[request])
        assert primary.calls[request] == 1 and secondary.calls[request] <= 1, (seen, scripts)
    assert sum(secondary.calls.values()) > 0  # the scripts did make it retry


def no_retry_budget(primary: ScriptedReplica, secondary: ScriptedReplica) -> ReplicaRouter:
    """A router whose retry budget is its starting balance (10 tokens), never refilled."""
    return router(primary, secondary, retry_ratio=0.0, retry_min_per_s=0.0)


async def test_retries_stop_when_the_retry_budget_is_spent() -> None:
    primary = ScriptedReplica("primary", fails=True)
    secondary = ScriptedReplica("secondary")
    routing = no_retry_budget(primary, secondary)
    answered = [await score(routing, request=float(n)) for n in range(12)]
    assert all(routed is not None for routed, _ in answered[:10])
    for routed, reasons in answered[10:]:
        assert routed is None
        assert reasons == ("primary unavailable", "secondary not called: retry budget spent")
    assert (routing.retries.spent, routing.retries.refused) == (10, 2)


async def test_calls_past_an_open_breaker_are_first_calls_not_retries() -> None:
    primary = ScriptedReplica("primary")
    secondary = ScriptedReplica("secondary")
    routing = no_retry_budget(primary, secondary)
    breaker = routing.replicas[0].breaker
    for _ in range(1000):  # open the primary's breaker
        with contextlib.suppress(ModelUnavailable):
            await breaker.call(primary_down)
    assert breaker.state == "open"
    answered = [await score(routing, request=float(n)) for n in range(20)]
    assert all(routed is not None and routed.source is Source.SECONDARY for routed, _ in answered)
    assert routing.retries.spent == 0


async def primary_down() -> None:
    raise ModelUnavailable("primary unavailable")


class BusyReplica(ScriptedReplica):
    """A replica whose queue never lets a request out (``ModelNoTime``), after a while."""

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        self.calls[rows[0][0]] += 1
        await asyncio.sleep(min(self.latency_ms / 1000.0, timeout_s / 2))
        raise ModelNoTime(f"{self.name} busy: 1 call(s) out all the time it could wait")


OPENS_AT_ONCE = BreakerSettings(fail_max=1)


async def test_a_request_that_never_left_the_primarys_queue_is_a_first_call() -> None:
    """Busy is not failing: the secondary is called outside the retry budget, and the
    primary's breaker, which one counted failure would open, stays closed."""
    primary = BusyReplica("primary", latency_ms=1.0)
    secondary = ScriptedReplica("secondary")
    routing = router(
        primary,
        secondary,
        breakers=OPENS_AT_ONCE,
        retry_ratio=0.0,
        retry_min_per_s=0.0,
    )
    answered = [await score(routing, request=float(n)) for n in range(20)]
    for routed, reasons in answered:
        assert routed is not None and routed.source is Source.SECONDARY, reasons
        assert reasons[0].startswith("primary busy: 1 call(s) out"), reasons
    assert routing.retries.spent == 0 and routing.retries.refused == 0
    assert routing.replicas[0].breaker.state == "closed"
    assert routing.replicas[0].recent.summary().calls == 0  # no call was made


async def test_a_replica_is_not_called_with_less_time_than_its_median_answer() -> None:
    """A call that would most likely time out only adds an abandoned call to a slow
    replica's load: the lane goes to the next replica, as a first call (no retry spent)."""
    primary, secondary = ScriptedReplica("primary", 12.0), ScriptedReplica("secondary", 1.0)
    routing = router(primary, secondary, retry_min_per_s=0.0)
    for _ in range(20):
        routing.replicas[0].recent.record(12.0, ok=True)
        routing.replicas[1].recent.record(1.0, ok=True)
    routed, reasons = await score(routing, budget_ms=9.0)  # 8 ms for a call
    assert routed is not None and routed.source is Source.SECONDARY
    assert primary.calls[0.0] == 0
    assert reasons[0].startswith("primary skipped: ") and reasons[0].endswith("(needs 12.0)")


async def test_with_no_recent_answers_a_replica_needs_the_configured_minimum() -> None:
    primary, secondary = ScriptedReplica("primary", 1.0), ScriptedReplica("secondary", 1.0)
    routing = router(primary, secondary, min_call_budget_ms=3.0)
    assert routing.needs_ms(routing.replicas[0]) == 3.0
    routed, reasons = await score(routing, budget_ms=3.5)  # 2.5 ms for a call: none made
    assert routed is None and primary.calls[0.0] == secondary.calls[0.0] == 0
    # The budget runs while the test does: 2.5 ms less what the first skip took.
    assert len(reasons) == 2
    for name, reason in zip(("primary", "secondary"), reasons, strict=True):
        match = re.fullmatch(rf"{name} skipped: (\d\.\d) ms of budget left \(needs 3\.0\)", reason)
        assert match is not None, reason
        assert 2.0 <= float(match[1]) <= 2.5


async def test_a_median_older_than_the_needs_window_no_longer_keeps_a_replica_skipped() -> None:
    """A replica skipped for time makes no calls, so its old median must expire: after
    ``NEEDS_WINDOW_S`` without a call it needs only the configured minimum again."""
    primary, secondary = ScriptedReplica("primary", 1.0), ScriptedReplica("secondary", 1.0)
    routing = router(primary, secondary)
    long_ago = time.monotonic() - NEEDS_WINDOW_S - 1.0
    for _ in range(20):
        routing.replicas[0].recent.record(30.0, ok=True, now_s=long_ago)
    assert routing.needs_ms(routing.replicas[0]) == 1.0  # the configured minimum
    routed, _ = await score(routing, budget_ms=9.0)
    assert routed is not None and routed.source is Source.PRIMARY


class FailingReplica(AlwaysConnected):
    """Fails every call at once with ``error``."""

    model_name = "champion"

    def __init__(self, name: str, error: ModelCallError) -> None:
        self.name = name
        self.error = error
        self.calls = 0

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        self.calls += 1
        raise self.error


# What happens to a replica: refused without a call (its breaker open, or forced open by
# on-call), or called and failed, by the code that failure is reported as.
NOT_CALLED = ("breaker open", "forced open")
FAILED = {
    "timeout": Reason.MODEL_TIMEOUT,
    "timeout, forced closed": Reason.MODEL_TIMEOUT,  # on-call let it past its breaker
    "busy": Reason.MODEL_BUSY,
    "no time": Reason.MODEL_NO_TIME,
    "unavailable": Reason.MODEL_UNAVAILABLE,
    "error": Reason.MODEL_ERROR,
}
# (primary, secondary) -> reason code: breaker open only when no replica was called
# because every one was refused; otherwise the last failure, a refusal after it or not.
REASON_CODES = {
    **{(p, s): Reason.MODEL_BREAKER_OPEN for p in NOT_CALLED for s in NOT_CALLED},
    **{(p, s): FAILED[s] for p in NOT_CALLED for s in FAILED},
    **{(p, s): FAILED[p] for p in FAILED for s in NOT_CALLED},
    **{(p, s): FAILED[s] for p in FAILED for s in FAILED},
}


def _error(name: str, what: str) -> ModelCallError:
    if what.startswith("timeout"):
        return ModelTimeout(f"{name} deadline exceeded after 11.0 ms", given_ms=11.0)
    return {
        "busy": ModelBusy(f"{name} busy: 4 abandoned calls still out", silent_ms=0.0),
        "no time": ModelNoTime(f"{name} busy: 1 call(s) out all the 3.0 ms it could wait"),
        "unavailable": ModelUnavailable(f"{name} unavailable"),
        "error": ModelResponseError(f"{name} answered 2 scores for 1 row"),
    }.get(what, ModelUnavailable(f"{name} down"))  # a refused replica: opens its breaker


@pytest.mark.parametrize(
    ("primary", "secondary"), list(REASON_CODES), ids=[f"{p} / {s}" for p, s in REASON_CODES]
)
async def test_the_reason_code_says_what_happened_to_the_replicas(
    primary: str, secondary: str
) -> None:
    """``RouteResult.failure`` is the decision's ``reason_code`` and the ``reason`` label
    of ``decision_fallbacks_total``: a replica refused after one that failed must not
    blame the breakers for a timeout."""
    lane = {"primary": primary, "secondary": secondary}
    clients = [FailingReplica(name, _error(name, what)) for name, what in lane.items()]
    routing = ReplicaRouter(
        [
            Replica.build(clients[0], Source.PRIMARY, OPENS_AT_ONCE),
            Replica.build(clients[1], Source.SECONDARY, OPENS_AT_ONCE),
        ],
        plan=CallPlan(model_call_ms=60.0, fallback_reserve_ms=1.0, jitter=0.0),
    )
    modes: dict[str, Entry] = {}
    for replica, client, (name, what) in zip(routing.replicas, clients, lane.items(), strict=True):
        if what == "breaker open":
            with contextlib.suppress(ModelCallError):
                await replica.breaker.call(functools.partial(client.predict, [], 1.0))
            assert replica.breaker.state == "open"
        elif what == "forced open" or what.endswith("forced closed"):
            mode = "FORCE_OPEN" if what == "forced open" else "FORCE_CLOSED"
            modes[f"breaker:{name}"] = Entry(mode, Change("on-call", "test", 0))
        client.calls = 0
    state = ControlState.from_entries(1, modes, {})

    result = await routing.score([[0.0, 1.0]], Budget(200.0), state=state)

    assert result.answer is None
    assert [c.calls for c in clients] == [int(what not in NOT_CALLED) for what in lane.values()]
    assert result.failure == REASON_CODES[primary, secondary], result.reasons
