"""A lane of replicas: the first, then exactly one retry to the next, each behind its own
breaker.

Each replica is asked first whether a call may go (on-call's override, then its
breaker: see ``server.replica``). The champion's lane is primary → secondary; the
canary's is challenger → primary → secondary (``server.traffic``).

Hedging (setting ``torchserve.hedge``, off by default, champion lane only): a primary call
that has not answered within the primary's recent p95 also goes to the secondary, when
the budget still allows a call; the first good answer wins and the other call is
abandoned (left to finish on the wire, never cancelled: see ``server.model_client``). The
hedge takes the retry's place: no request makes more than two champion model calls.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from core.deadline import Budget, model_call_timeout_ms
from core.domain import Source
from core.retry_budget import RetryBudget
from server.control.state import ControlState
from server.model_client import ModelInputError, ModelScores
from server.replica import Admission, Attempt, Replica
from server.settings import DecisionSettings, TorchServeSettings

# How often a replica's recent latencies are summarized for the router (sorting them on
# every call would cost more than the call).
LATENCY_REFRESH_S = 0.5
# The median answer a call must have time for is of this many last seconds' calls: a
# replica skipped for time makes no calls, so an older median would keep it skipped;
# with none this recent, the floor is min_call_budget_ms and the next call measures anew.
NEEDS_WINDOW_S = 5.0


@dataclass(frozen=True, slots=True)
class RoutedScores:
    scores: ModelScores
    source: Source  # who answered


@dataclass(frozen=True, slots=True)
class RouteResult:
    """What a lane did for one call: the answer (None: nobody answered), every attempt
    in the order made, and the reasons in the order they arose."""

    answer: RoutedScores | None = None
    attempts: tuple[Attempt, ...] = ()
    reasons: tuple[str, ...] = ()
    # Without an answer: what stopped the lane last, a ``model_*`` code of
    # core.domain.FALLBACK_REASONS.
    failure: str = ""

    def then(self, other: RouteResult) -> RouteResult:
        """This, followed by ``other``: ``other``'s answer, both histories."""
        return RouteResult(
            other.answer,
            self.attempts + other.attempts,
            self.reasons + other.reasons,
            "" if other.answer else other.failure or self.failure,
        )


def _tried(*attempts: Attempt, notes: Sequence[str] = ()) -> RouteResult:
    """A result from attempts in the order they ended (the first good one answers),
    after ``notes``."""
    answer = next((RoutedScores(a.scores, a.source) for a in attempts if a.scores), None)
    failed = [a.failure for a in attempts if not a.ok]
    failure = "" if answer or not failed else f"model_{failed[-1] or 'error'}"
    return RouteResult(
        answer, attempts, (*notes, *(a.reason for a in attempts if a.reason)), failure
    )


def _note(reason: str, failure: str) -> RouteResult:
    return RouteResult(reasons=(reason,), failure=failure)


class ReplicaRouter:
    """Calls the lane's replicas in order until one answers.

    Each call gets ``min(remaining budget - fallback reserve, jittered per-call cap)``;
    none is made when less would be left for it than the replica's recent median answer
    (at least ``min_call_budget_ms``): a call that would most likely time out only adds
    an abandoned call to the replica's load, the very thing that slows it. A call after
    a failed one (a retry, or a hedge) is made only within the lane's retry budget
    (``retry_budget_ratio`` of first calls): a call to the next replica because the
    first one's breaker refused, it was skipped for time or its request never left the
    replica's queue (``ModelNoTime``) is a first call, not a retry.
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        *,
        torchserve: TorchServeSettings,
        decision: DecisionSettings,
        hedge: bool | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``hedge``: overrides ``torchserve.hedge`` (the canary's lane never hedges)."""
        self.replicas = tuple(replicas)
        self._cap_ms = torchserve.per_call_timeout_ms
        self._jitter = torchserve.timeout_jitter
        self._min_call_ms = torchserve.min_call_budget_ms
        self._reserve_ms = decision.fallback_reserve_ms
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._hedge = torchserve.hedge if hedge is None else hedge
        self._hedge_min_delay_ms = torchserve.hedge_min_delay_ms
        # By replica: when its recent latencies were summarized, their p50 and p95.
        self._latencies: dict[str, tuple[float, float, float]] = {}
        self.hedges = 0  # hedge calls made
        self.retries = RetryBudget(
            ratio=torchserve.retry_budget_ratio, min_per_s=torchserve.retry_budget_min_per_s
        )

    async def score(
        self,
        rows: Sequence[Sequence[float]],
        budget: Budget,
        *,
        state: ControlState | None = None,
        now_us: int = 0,
    ) -> RouteResult:
        """Scores the rows, or says why each replica did not. ``state`` (read at
        ``now_us``) holds on-call's overrides; the engine reads it once per call."""
        state = state or ControlState()
        result = RouteResult()
        hedged_to: Replica | None = None
        deposited = False  # this request's first call is in the retry budget
        retrying = False  # a call to an earlier replica was made and failed
        for replica in self.replicas:
            if replica is hedged_to:  # the hedge was its call
                continue
            admission = replica.admission(state, now_us)
            if not admission.allowed:
                refused = (replica.refused(admission),) if admission.by_breaker else ()
                result = result.then(
                    RouteResult(
                        attempts=refused,
                        reasons=(admission.refusal,),
                        failure="model_breaker_open",
                    )
                )
                continue
            timeout_ms = self._call_timeout_ms(budget)
            if timeout_ms < self.needs_ms(replica):  # the next one may answer faster
                result = result.then(_note(self._no_time(replica, timeout_ms), "model_no_time"))
                continue
            if retrying:
                if not self.retries.withdraw():
                    return result.then(_note(_budget_spent(replica), "model_retry_budget"))
            elif not deposited:
                self.retries.deposit()
                deposited = True
            backup = self._hedge_backup(replica, state, now_us)
            try:
                if backup is None:
                    step = _tried(await replica.call(rows, timeout_ms, admission))
                else:
                    hedged_to = backup[0]
                    step = await self._hedged(
                        (replica, admission), backup, rows, timeout_ms, budget
                    )
            except ModelInputError as exc:  # our rows: the other replica would reject them too
                return result.then(_note(str(exc), "model_input"))
            result = result.then(step)
            if result.answer is not None:
                return result
            retrying = retrying or any(a.made_a_call for a in step.attempts)
        return result

    def _no_time(self, replica: Replica, timeout_ms: float) -> str:
        return (
            f"{replica.name} skipped: {max(timeout_ms, 0.0):.1f} ms of budget left"
            f" (needs {self.needs_ms(replica):.1f})"
        )

    def _recent_latency(self, replica: Replica) -> tuple[float, float]:
        """The p50 of ``replica``'s successful calls of the last ``NEEDS_WINDOW_S`` and
        the p95 of its recent ones (0 when none), read at most every ``LATENCY_REFRESH_S``."""
        now = time.monotonic()
        cached = self._latencies.get(replica.name)
        if cached is None or now - cached[0] > LATENCY_REFRESH_S:
            recent = replica.recent
            cached = (
                now,
                recent.percentile_ms(0.50, within_s=NEEDS_WINDOW_S),
                recent.percentile_ms(0.95),
            )
            self._latencies[replica.name] = cached
        return cached[1], cached[2]

    def needs_ms(self, replica: Replica) -> float:
        """The least time worth a call to ``replica``: its median answer of the last
        ``NEEDS_WINDOW_S``, at least ``min_call_budget_ms``."""
        return max(self._recent_latency(replica)[0], self._min_call_ms)

    def _call_timeout_ms(self, budget: Budget) -> float:
        return model_call_timeout_ms(
            budget.remaining_ms(),
            reserve_ms=self._reserve_ms,
            cap_ms=self._cap_ms,
            jitter=self._jitter,
            rng=self._rng,
        )

    def _hedge_backup(
        self, replica: Replica, state: ControlState, now_us: int
    ) -> tuple[Replica, Admission] | None:
        """The replica a call to ``replica`` may be hedged to: the next in the lane, for
        a call to the first, when hedging is on and the next may be called."""
        if not self._hedge or len(self.replicas) < 2 or replica is not self.replicas[0]:
            return None
        backup = self.replicas[1]
        admission = backup.admission(state, now_us)
        return (backup, admission) if admission.allowed else None

    def hedge_delay_ms(self, replica: Replica) -> float:
        """How long the primary has before its request is hedged: its recent p95, at
        least the configured floor."""
        return max(self._recent_latency(replica)[1], self._hedge_min_delay_ms)

    async def _hedged(
        self,
        first: tuple[Replica, Admission],
        backup: tuple[Replica, Admission],
        rows: Sequence[Sequence[float]],
        timeout_ms: float,
        budget: Budget,
    ) -> RouteResult:
        """Calls ``first``; if it has not answered within its hedge delay and the budget
        still allows a call, calls ``backup`` too and takes the first good answer,
        abandoning the other call. ``backup`` is not called again afterwards, so the
        hedge is the request's one extra call, as the retry is without hedging."""
        replica, admission = first
        primary = asyncio.create_task(replica.call(rows, timeout_ms, admission))
        delay_ms = self.hedge_delay_ms(replica)
        try:
            done, _ = await asyncio.wait({primary}, timeout=delay_ms / 1000.0)
        except BaseException:  # the caller went away: so does its call
            _abandon(primary)
            raise
        if primary in done:
            attempt = primary.result()
            if attempt.ok:
                return _tried(attempt)
            # A retry after a failed call; a first call after one that never went out.
            after = await self._call_next(backup, rows, budget, retry=attempt.made_a_call)
            return _tried(attempt).then(after)
        backup_timeout_ms = self._call_timeout_ms(budget)
        if backup_timeout_ms < self.needs_ms(backup[0]) or not self.retries.withdraw():
            try:
                attempt = await primary
            except asyncio.CancelledError:
                _abandon(primary)
                raise
            if attempt.ok or attempt.made_a_call:
                return _tried(attempt)
            # Never sent (no time in its queue): the next replica, as a first call.
            after = await self._call_next(backup, rows, budget, retry=False)
            return _tried(attempt).then(after)
        self.hedges += 1
        second = asyncio.create_task(backup[0].call(rows, backup_timeout_ms, backup[1]))
        pending: set[asyncio.Task[Attempt]] = {primary, second}
        ended: list[Attempt] = []
        try:
            while pending and not any(a.ok for a in ended):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                ended.extend(task.result() for task in done)
        finally:
            for task in (primary, second):  # the slower call: its answer is not needed
                _abandon(task)
        return _tried(*ended, notes=(f"hedged to {backup[0].name} after {delay_ms:.1f} ms",))

    async def _call_next(
        self,
        backup: tuple[Replica, Admission],
        rows: Sequence[Sequence[float]],
        budget: Budget,
        *,
        retry: bool,
    ) -> RouteResult:
        """The call to the next replica when the hedged-for primary failed before its
        hedge delay: within the retry budget when ``retry``."""
        replica, admission = backup
        timeout_ms = self._call_timeout_ms(budget)
        if timeout_ms < self.needs_ms(replica):
            return _note(self._no_time(replica, timeout_ms), "model_no_time")
        if retry and not self.retries.withdraw():
            return _note(_budget_spent(replica), "model_retry_budget")
        return _tried(await replica.call(rows, timeout_ms, admission))


def _budget_spent(replica: Replica) -> str:
    return f"{replica.name} not called: retry budget spent"


def _abandon(task: asyncio.Task[Attempt]) -> None:
    """Stops waiting for a call whose answer is not needed any more (cancelling the
    attempt; the model client leaves its RPC to finish on the wire) and retrieves its
    outcome when it ends, so that none is reported as lost."""
    task.cancel()
    task.add_done_callback(_consume)


def _consume(task: asyncio.Task[Attempt]) -> None:
    if not task.cancelled():
        task.exception()
