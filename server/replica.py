"""One model replica: its client, its breaker and on-call's override of it.

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

from core.domain import Reason, Source
from server.breaker import SUCCESSES_TO_CLOSE, AsyncCircuitBreaker, BreakerOpenError
from server.control.recent import RecentCalls
from server.control.state import BreakerMode, ControlState
from server.model_client import ModelClient, ModelScores
from server.model_errors import ModelBreakerOpen, ModelCallError, ModelFailure, ModelNoTime
from server.settings import BreakerSettings
from server.tracing import NO_TRACER


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
    error: ModelFailure | None = None  # why it failed; None when it answered

    @property
    def ok(self) -> bool:
        return self.scores is not None

    @property
    def reason(self) -> str:
        return "" if self.error is None else str(self.error)

    @property
    def failure(self) -> Reason | None:
        """``error``'s code; None when it answered."""
        return None if self.error is None else self.error.code

    @property
    def then_retry(self) -> bool:
        """Whether a call to the next replica after this one is a retry."""
        return self.error is None or self.error.retry


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
        """A replica whose breaker counts only the failures that say they count against
        it (``ModelFailure.counts_against_replica``); any other error counts."""
        return cls(
            client,
            AsyncCircuitBreaker(
                client.name,
                fail_max=breaker.fail_max,
                reset_timeout_s=breaker.reset_timeout_s,
                success_threshold=SUCCESSES_TO_CLOSE,
                rates=breaker.rule(),
                ignore=lambda exc: isinstance(exc, ModelFailure) and not exc.counts_against_replica,
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
        return Attempt(self.source, None, 0.0, ModelBreakerOpen(admission.refusal))

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
            return Attempt(self.source, None, 0.0, ModelBreakerOpen(str(exc)))
        except ModelCallError as exc:
            elapsed_ms = (time.perf_counter() - started) * 1000
            if not isinstance(exc, ModelNoTime):  # never sent: nothing to record of the replica
                self.recent.record(elapsed_ms, ok=False)
            # Without its traceback: a result must not hold the failed call's frames.
            return Attempt(self.source, None, elapsed_ms, exc.with_traceback(None))
        self.recent.record(scores.elapsed_ms, ok=True, version=scores.model_version)
        return Attempt(self.source, scores, scores.elapsed_ms)
