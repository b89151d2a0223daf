"""Primary first, then exactly one retry to the secondary, each behind its own breaker.

On-call overrides (``server.control``) come first: a replica forced open is not called,
one forced closed is called whatever its breaker says. For the canary share, the
challenger is tried before them; when it fails, the champion answers as usual.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.breaker import AsyncCircuitBreaker, BreakerOpenError
from server.control.recent import RecentCalls
from server.control.state import BreakerMode, ControlState
from server.deadline import Budget, model_call_timeout_ms
from server.domain import Source
from server.model_client import ModelCallError, ModelClient, ModelInputError, ModelScores
from server.settings import DecisionSettings, TorchServeSettings


@dataclass(frozen=True)
class Replica:
    client: ModelClient
    breaker: AsyncCircuitBreaker
    source: Source
    # Every call this server made to it, for status; the model version it last answered.
    recent: RecentCalls = field(default_factory=RecentCalls)

    @property
    def name(self) -> str:
        return self.client.name


@dataclass(frozen=True, slots=True)
class RoutedScores:
    scores: ModelScores
    source: Source


@dataclass(frozen=True, slots=True)
class Attempt:
    """One replica the router tried (or skipped for its breaker) for one call."""

    source: Source
    ok: bool
    elapsed_ms: float  # 0 when the breaker rejected the call without making it


class ReplicaRouter:
    """Calls the primary, and on error, timeout or an open breaker, the secondary once.

    Each call gets ``min(remaining budget - fallback reserve, jittered per-call cap)``.
    A call is skipped, with the reason recorded, when less than ``min_call_budget_ms``
    would be left for it. A timeout of a call given less than ``min_counted_timeout_ms``
    does not count against the replica's breaker: a caller with a 4 ms deadline must
    not open the breaker of a healthy replica that answers in 5, while a replica that
    misses a 10 ms deadline is unhealthy whoever set it.
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        *,
        torchserve: TorchServeSettings,
        decision: DecisionSettings,
        min_counted_timeout_ms: float,
        challenger: Replica | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._min_counted_timeout_ms = min_counted_timeout_ms
        self.replicas = tuple(replicas)
        self.challenger = challenger
        self._cap_ms = torchserve.per_call_timeout_ms
        self._jitter = torchserve.timeout_jitter
        self._min_call_ms = torchserve.min_call_budget_ms
        self._reserve_ms = decision.fallback_reserve_ms
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security

    async def score(
        self,
        rows: Sequence[Sequence[float]],
        budget: Budget,
        reasons: list[str],
        *,
        canary: bool = False,
        attempts: list[Attempt] | None = None,
        state: ControlState | None = None,
        now_us: int = 0,
    ) -> RoutedScores | None:
        """Scores the rows, or returns None with ``reasons`` saying why each replica did not.

        ``canary``: the challenger is tried first. ``attempts`` collects what each
        replica tried did, for the canary's comparison. ``state`` (read at ``now_us``)
        holds on-call's breaker overrides; the engine reads it once per call.
        """
        state = state or ControlState()
        lane = self.replicas
        if canary and self.challenger is not None:
            lane = (self.challenger, *self.replicas)
        for replica in lane:
            mode = state.breaker_mode(replica.name, now_us)
            if mode is BreakerMode.FORCE_OPEN:
                reasons.append(f"{replica.name} forced open by on-call")
                continue
            if mode is BreakerMode.AUTO and not replica.breaker.allows_call():
                reasons.append(f"{replica.name} breaker {replica.breaker.state}")
                if attempts is not None:
                    attempts.append(Attempt(replica.source, False, 0.0))
                continue
            timeout_ms = model_call_timeout_ms(
                budget.remaining_ms(),
                reserve_ms=self._reserve_ms,
                cap_ms=self._cap_ms,
                jitter=self._jitter,
                rng=self._rng,
            )
            if timeout_ms < self._min_call_ms:
                reasons.append(
                    f"{replica.name} skipped: {max(timeout_ms, 0.0):.1f} ms of budget left"
                    f" (needs {self._min_call_ms:.1f})"
                )
                return None
            call = functools.partial(
                replica.client.predict,
                rows,
                timeout_ms / 1000.0,
                budget_limited=timeout_ms < self._min_counted_timeout_ms,
            )
            started = time.perf_counter()
            try:
                # Forced closed: on-call vouches for the replica, its breaker is bypassed.
                scores = await (replica.breaker.call(call) if mode is BreakerMode.AUTO else call())
            except BreakerOpenError as exc:
                reasons.append(str(exc))
                if attempts is not None:
                    attempts.append(Attempt(replica.source, False, 0.0))
            except ModelCallError as exc:
                elapsed_ms = (time.perf_counter() - started) * 1000
                replica.recent.record(elapsed_ms, ok=False)
                if attempts is not None:
                    attempts.append(Attempt(replica.source, False, elapsed_ms))
                reasons.append(str(exc))
            except ModelInputError as exc:
                reasons.append(str(exc))
                return None  # our rows: the other replica would reject them too
            else:
                replica.recent.record(scores.elapsed_ms, ok=True, version=scores.model_version)
                if attempts is not None:
                    attempts.append(Attempt(replica.source, True, scores.elapsed_ms))
                return RoutedScores(scores, replica.source)
        return None
