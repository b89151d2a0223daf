"""A lane of replicas: the first, then exactly one retry to the next, each behind its own
breaker.

Each replica is asked first whether a call may go (on-call's override, then its
breaker: see ``server.replica``). The champion's lane is primary → secondary; the
canary's is challenger → primary → secondary (``server.traffic``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from core.deadline import (
    LATENCY_REFRESH_S,
    MIN_CALL_BUDGET_MS,
    NEEDS_WINDOW_S,
    RETRY_MIN_PER_S,
    RETRY_RATIO,
    Budget,
    CallPlan,
    model_call_needs_ms,
)
from core.domain import Reason, Source
from core.retry_budget import RetryBudget
from server.control.state import ControlState
from server.model_client import ModelScores
from server.model_errors import ModelInputError
from server.replica import Attempt, Replica


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
    # Without an answer: why the model did not answer (the decision's reason code), chosen
    # by ``_lane_failure``; None with an answer or before any replica.
    failure: Reason | None = None

    def then(self, other: RouteResult) -> RouteResult:
        """This, followed by ``other``: ``other``'s answer, both histories."""
        return RouteResult(
            other.answer,
            self.attempts + other.attempts,
            self.reasons + other.reasons,
            None if other.answer else _lane_failure(self.failure, other.failure),
        )


# A replica not called because its breaker refused the call, or on-call forced it open.
REFUSED = Reason.MODEL_BREAKER_OPEN


def _lane_failure(earlier: Reason | None, later: Reason | None) -> Reason | None:
    """Why a lane that stopped at ``earlier``, then at ``later``, did not answer: the
    later, except that a refusal (``REFUSED``) does not replace what came before it. So
    the code is ``REFUSED`` only when every replica was refused, and otherwise names the
    last replica's failure or skip: a timeout before a breaker open is a timeout."""
    if not later or (later == REFUSED and earlier):
        return earlier
    return later


def _tried(attempt: Attempt) -> RouteResult:
    """A result from one attempt: its answer, or its failure."""
    if attempt.scores is not None:
        return RouteResult(RoutedScores(attempt.scores, attempt.source), (attempt,))
    reasons = (attempt.reason,) if attempt.reason else ()
    return RouteResult(None, (attempt,), reasons, attempt.failure or Reason.MODEL_ERROR)


def _note(reason: str, failure: Reason) -> RouteResult:
    return RouteResult(reasons=(reason,), failure=failure)


class ReplicaRouter:
    """Calls the lane's replicas in order until one answers.

    Each call gets ``min(remaining budget - fallback reserve, jittered per-call cap)``;
    none is made when less would be left for it than the replica's recent median answer
    (at least ``MIN_CALL_BUDGET_MS``): a call that would most likely time out only adds
    an abandoned call to the replica's load, the very thing that slows it. A call after
    a failed one (a retry) is made only within the lane's retry budget
    (``RETRY_RATIO`` of first calls): a call to the next replica because the
    first one's breaker refused, it was skipped for time or its request never left the
    replica's queue (``ModelNoTime``) is a first call, not a retry.
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        *,
        plan: CallPlan,
        rng: random.Random | None = None,
        min_call_budget_ms: float = MIN_CALL_BUDGET_MS,
        retry_ratio: float = RETRY_RATIO,
        retry_min_per_s: float = RETRY_MIN_PER_S,
    ) -> None:
        self.replicas = tuple(replicas)
        self._plan = plan
        self._min_call_ms = min_call_budget_ms
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        # By replica: when its recent latencies were summarized, and their p50.
        self._latencies: dict[str, tuple[float, float]] = {}
        self.retries = RetryBudget(ratio=retry_ratio, min_per_s=retry_min_per_s)

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
        deposited = False  # this request's first call is in the retry budget
        retrying = False  # a call to an earlier replica was made and failed
        for replica in self.replicas:
            admission = replica.admission(state, now_us)
            # A breaker's refusal is an attempt that failed at once; on-call's is none.
            if not admission.allowed:
                refused = (
                    _tried(replica.refused(admission))
                    if admission.by_breaker
                    else _note(admission.refusal, REFUSED)
                )
                result = result.then(refused)
                continue
            timeout_ms = self._call_timeout_ms(budget)
            if timeout_ms < self.needs_ms(replica):  # the next one may answer faster
                skipped = _note(self._no_time(replica, timeout_ms), Reason.MODEL_NO_TIME)
                result = result.then(skipped)
                continue
            if retrying:
                if not self.retries.withdraw():
                    return result.then(_note(_budget_spent(replica), Reason.MODEL_RETRY_BUDGET))
            elif not deposited:
                self.retries.deposit()
                deposited = True
            try:
                step = _tried(await replica.call(rows, timeout_ms, admission))
            except ModelInputError as exc:  # our rows: the other replica would reject them too
                return result.then(_note(str(exc), Reason.MODEL_INPUT))
            result = result.then(step)
            if result.answer is not None:
                return result
            retrying = retrying or any(a.then_retry for a in step.attempts)
        return result

    def _no_time(self, replica: Replica, timeout_ms: float) -> str:
        return (
            f"{replica.name} skipped: {max(timeout_ms, 0.0):.1f} ms of budget left"
            f" (needs {self.needs_ms(replica):.1f})"
        )

    def _recent_p50_ms(self, replica: Replica) -> float:
        """The p50 of ``replica``'s successful calls of the last ``NEEDS_WINDOW_S`` (0 when
        none), read at most every ``LATENCY_REFRESH_S``."""
        now = time.monotonic()
        cached = self._latencies.get(replica.name)
        if cached is None or now - cached[0] > LATENCY_REFRESH_S:
            cached = (now, replica.recent.percentile_ms(0.50, within_s=NEEDS_WINDOW_S))
            self._latencies[replica.name] = cached
        return cached[1]

    def needs_ms(self, replica: Replica) -> float:
        """The least time worth a call to ``replica``: its median answer of the last
        ``NEEDS_WINDOW_S``, at least the minimum call budget."""
        return model_call_needs_ms(self._recent_p50_ms(replica), self._min_call_ms)

    def _call_timeout_ms(self, budget: Budget) -> float:
        return self._plan.model_call_timeout_ms(budget, self._rng)


def _budget_spent(replica: Replica) -> str:
    return f"{replica.name} not called: retry budget spent"
