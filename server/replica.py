"""One model replica: its client, its breaker, on-call's override of it, and the one rule
that says whether a failed call was the replica's fault.

The router (primary, retry), the canary and the shadow scorer all ask the replica
whether a call may go now (``admission``) and make it through ``call``, which returns
an ``Attempt`` rather than raising for a replica failure: the caller composes attempts
into its own result.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry.trace import StatusCode, Tracer

from core.domain import Source
from server.breaker import SUCCESSES_TO_CLOSE, AsyncCircuitBreaker, BreakerOpenError
from server.control.recent import RecentCalls
from server.control.state import BreakerMode, ControlState
from server.model_client import (
    ModelBusy,
    ModelCallError,
    ModelClient,
    ModelInputError,
    ModelNoTime,
    ModelScores,
    ModelTimeout,
    ModelUnavailable,
)
from server.settings import BreakerSettings
from server.tracing import NO_TRACER


def counts_against_replica(exc: BaseException, *, min_counted_timeout_ms: float) -> bool:
    """Whether a failed call is evidence against the replica, for its breaker.

    Not: rows the replica rejected (ours); a request that was never sent because the
    replica's calls stayed out past its time (busy is not failing); a timeout of a call
    given less than ``min_counted_timeout_ms`` (a caller with a tight deadline that leaves
    4 ms must not open the breaker of a healthy replica that answers in 5, while a
    replica that misses a 10 ms wait is unhealthy whoever set it); a call refused because
    the replica still works on abandoned calls, unless it has answered none of them for
    that long too (a slow replica answers them, a hung one does not).
    """
    if isinstance(exc, ModelInputError | ModelNoTime):
        return False
    if isinstance(exc, ModelBusy):
        return exc.silent_ms > 0 and exc.silent_ms >= min_counted_timeout_ms
    if isinstance(exc, ModelTimeout):
        return exc.given_ms >= min_counted_timeout_ms
    return True


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a call to a replica may go now, and whether through its breaker."""

    refusal: str = ""  # why not; "" when the call may go
    guarded: bool = True  # through the breaker; False when on-call forced it closed
    by_breaker: bool = False  # refused by the breaker (an attempt that failed at once)

    @property
    def allowed(self) -> bool:
        return not self.refusal


@dataclass(frozen=True, slots=True)
class Attempt:
    """One call to a replica, or one its breaker refused."""

    source: Source
    scores: ModelScores | None  # None when the call failed
    # 0 when the breaker refused the call without making it; its wait in the queue
    # for a request never sent (no_time).
    elapsed_ms: float
    reason: str = ""  # why it failed; "" when it answered
    # What failed, as a code: breaker_open, no_time (never sent: the replica was busy
    # for all of the time the request had), timeout, busy, unavailable or error.
    failure: str = ""

    @property
    def ok(self) -> bool:
        return self.scores is not None

    @property
    def made_a_call(self) -> bool:
        """Whether the replica was called (the retry after a failed call is a retry;
        after a call the breaker refused or that never went out it is a first call)."""
        return self.failure not in ("breaker_open", "no_time")


def failure_code(exc: ModelCallError) -> str:
    """A failed call as one of the codes ``Attempt.failure`` takes."""
    if isinstance(exc, ModelTimeout):
        return "timeout"
    if isinstance(exc, ModelNoTime):
        return "no_time"
    if isinstance(exc, ModelBusy):
        return "busy"  # before unavailable: a busy replica is one kind of it
    if isinstance(exc, ModelUnavailable):
        return "unavailable"
    return "error"


@dataclass(frozen=True, eq=False)
class Replica:
    client: ModelClient
    breaker: AsyncCircuitBreaker
    source: Source
    # Every call this server made to it, for status and the router's median; the model
    # version it last answered.
    recent: RecentCalls = field(default_factory=RecentCalls)
    tracer: Tracer = NO_TRACER  # a span per call ("model.attempt")

    @classmethod
    def build(
        cls,
        client: ModelClient,
        source: Source,
        breaker: BreakerSettings,
        tracer: Tracer = NO_TRACER,
    ) -> Replica:
        """A replica whose breaker counts only the failures ``counts_against_replica``
        says are the replica's."""
        rule = functools.partial(
            counts_against_replica, min_counted_timeout_ms=breaker.min_counted_timeout_ms
        )
        return cls(
            client,
            AsyncCircuitBreaker(
                client.name,
                fail_max=breaker.fail_max,
                reset_timeout_s=breaker.reset_timeout_s,
                success_threshold=SUCCESSES_TO_CLOSE,
                ignore=lambda exc: not rule(exc),
            ),
            source,
            tracer=tracer,
        )

    @property
    def name(self) -> str:
        return self.client.name

    def admission(self, state: ControlState, now_us: int, *, guarded: bool = True) -> Admission:
        """May a call go now? On-call's override first (forced open: no; forced closed:
        yes, past the breaker), then the breaker. ``guarded=False``: the caller does not
        go through the breaker (shadow calls), so only a forced-open replica is refused."""
        mode = state.breaker_mode(self.name, now_us)
        if mode is BreakerMode.FORCE_OPEN:
            return Admission(f"{self.name} forced open by on-call")
        if mode is BreakerMode.FORCE_CLOSED or not guarded:
            return Admission(guarded=False)
        if not self.breaker.allows_call():
            return Admission(f"{self.name} breaker {self.breaker.state}", by_breaker=True)
        return Admission()

    def refused(self, admission: Admission) -> Attempt:
        """The failed attempt a breaker's refusal stands for."""
        return Attempt(self.source, None, 0.0, admission.refusal, "breaker_open")

    async def call(
        self, rows: Sequence[Sequence[float]], timeout_ms: float, admission: Admission
    ) -> Attempt:
        """One model call within ``timeout_ms``, through the breaker when ``admission``
        says so; its outcome is recorded in ``recent``. Raises ``ModelInputError`` when
        the replica rejects the rows themselves (any replica would)."""
        with self.tracer.start_as_current_span(
            "model.attempt",
            attributes={"replica": self.name, "timeout_ms": timeout_ms, "rows": len(rows)},
        ) as span:
            attempt = await self._call(rows, timeout_ms, admission)
            span.set_attribute("outcome", "ok" if attempt.scores is not None else "failed")
            if attempt.reason:
                span.set_status(StatusCode.ERROR, attempt.reason)
            return attempt

    async def _call(
        self, rows: Sequence[Sequence[float]], timeout_ms: float, admission: Admission
    ) -> Attempt:
        predict = functools.partial(self.client.predict, rows, timeout_ms / 1000.0)
        started = time.perf_counter()
        try:
            scores = await (self.breaker.call(predict) if admission.guarded else predict())
        except BreakerOpenError as exc:  # a trial call went out since the admission
            return Attempt(self.source, None, 0.0, str(exc), "breaker_open")
        except ModelCallError as exc:
            elapsed_ms = (time.perf_counter() - started) * 1000
            if not isinstance(exc, ModelNoTime):  # never sent: nothing to record of the replica
                self.recent.record(elapsed_ms, ok=False)
            return Attempt(self.source, None, elapsed_ms, str(exc), failure_code(exc))
        self.recent.record(scores.elapsed_ms, ok=True, version=scores.model_version)
        return Attempt(self.source, scores, scores.elapsed_ms)
