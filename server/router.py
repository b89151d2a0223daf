"""Primary first, then exactly one retry to the secondary, each behind its own breaker.

On-call overrides (``server.control``) come first: a replica forced open is not called,
one forced closed is called whatever its breaker says. For the canary share, the
challenger is tried before them; when it fails, the champion answers as usual.

Hedging (setting ``torchserve.hedge``, off by default): a primary call that has not
answered within the primary's recent p95 also goes to the secondary, when the budget
still allows a call; the first good answer wins and the other call is abandoned (left to
finish on the wire, never cancelled: see ``server.model_client``). The
hedge takes the retry's place: outside the canary, no request makes more than two model calls.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from core.deadline import Budget, model_call_timeout_ms
from core.domain import Source
from server.breaker import AsyncCircuitBreaker, BreakerOpenError
from server.control.recent import RecentCalls
from server.control.state import BreakerMode, ControlState
from server.model_client import ModelCallError, ModelClient, ModelInputError, ModelScores
from server.settings import DecisionSettings, TorchServeSettings

HEDGE_DELAY_REFRESH_S = 0.5


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
    does not count against the replica's breaker: a caller with a short deadline that
    leaves a call 4 ms must not open the breaker of a healthy replica that answers in 5,
    while a replica that misses a 10 ms wait is unhealthy whoever set it.
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
        self._hedge = torchserve.hedge
        self._hedge_min_delay_ms = torchserve.hedge_min_delay_ms
        self._hedge_delays: dict[str, tuple[float, float]] = {}
        self.hedges = 0  # hedge calls made

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
        holds on-call's breaker overrides; the engine reads it once per call. With
        hedging on, a slow primary's request also goes to the secondary (see ``_hedged``);
        either way the champion gets at most two model calls per request.
        """
        state = state or ControlState()
        lane = self.replicas
        if canary and self.challenger is not None:
            lane = (self.challenger, *self.replicas)
        attempts = [] if attempts is None else attempts
        called: set[str] = set()
        for replica in lane:
            if replica.name in called:  # the hedge already asked it
                continue
            mode = self._admissible(replica, state, now_us, reasons, attempts)
            if mode is None:
                continue
            timeout_ms = self._call_budget_ms(replica, budget, reasons)
            if timeout_ms is None:
                return None
            try:
                backup = self._hedge_backup(replica, canary, state, now_us)
                if backup is None:
                    routed = await self._attempt(replica, mode, rows, timeout_ms, reasons, attempts)
                else:
                    called.add(backup[0].name)
                    routed = await self._hedged(
                        (replica, mode), backup, rows, timeout_ms, budget, reasons, attempts
                    )
            except ModelInputError as exc:
                reasons.append(str(exc))
                return None  # our rows: the other replica would reject them too
            if routed is not None:
                return routed
        return None

    def _call_budget_ms(self, replica: Replica, budget: Budget, reasons: list[str]) -> float | None:
        """What a call to ``replica`` may spend now, or None, with the reason, when less
        than ``min_call_budget_ms`` is left."""
        timeout_ms = self._call_timeout_ms(budget)
        if timeout_ms < self._min_call_ms:
            reasons.append(
                f"{replica.name} skipped: {max(timeout_ms, 0.0):.1f} ms of budget left"
                f" (needs {self._min_call_ms:.1f})"
            )
            return None
        return timeout_ms

    def _call_timeout_ms(self, budget: Budget) -> float:
        return model_call_timeout_ms(
            budget.remaining_ms(),
            reserve_ms=self._reserve_ms,
            cap_ms=self._cap_ms,
            jitter=self._jitter,
            rng=self._rng,
        )

    @staticmethod
    def _admissible(
        replica: Replica,
        state: ControlState,
        now_us: int,
        reasons: list[str] | None,
        attempts: list[Attempt] | None,
    ) -> BreakerMode | None:
        """The replica's breaker mode if a call to it may be made now, else None (with
        the reason and the attempt recorded, when given lists for them)."""
        mode = state.breaker_mode(replica.name, now_us)
        if mode is BreakerMode.FORCE_OPEN:
            if reasons is not None:
                reasons.append(f"{replica.name} forced open by on-call")
            return None
        if mode is BreakerMode.AUTO and not replica.breaker.allows_call():
            if reasons is not None:
                reasons.append(f"{replica.name} breaker {replica.breaker.state}")
            if attempts is not None:
                attempts.append(Attempt(replica.source, False, 0.0))
            return None
        return mode

    async def _attempt(
        self,
        replica: Replica,
        mode: BreakerMode,
        rows: Sequence[Sequence[float]],
        timeout_ms: float,
        reasons: list[str],
        attempts: list[Attempt],
    ) -> RoutedScores | None:
        """One model call: the scores, or None with the reason recorded. Raises
        ``ModelInputError`` when the replica rejects the rows themselves."""
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
            attempts.append(Attempt(replica.source, False, 0.0))
            return None
        except ModelCallError as exc:
            elapsed_ms = (time.perf_counter() - started) * 1000
            replica.recent.record(elapsed_ms, ok=False)
            attempts.append(Attempt(replica.source, False, elapsed_ms))
            reasons.append(str(exc))
            return None
        replica.recent.record(scores.elapsed_ms, ok=True, version=scores.model_version)
        attempts.append(Attempt(replica.source, True, scores.elapsed_ms))
        return RoutedScores(scores, replica.source)

    def _hedge_backup(
        self, replica: Replica, canary: bool, state: ControlState, now_us: int
    ) -> tuple[Replica, BreakerMode] | None:
        """The replica a call to ``replica`` may be hedged to: the secondary, for a call
        to the primary outside the canary, when hedging is on and it may be called."""
        if not self._hedge or canary or len(self.replicas) < 2 or replica is not self.replicas[0]:
            return None
        backup = self.replicas[1]
        mode = self._admissible(backup, state, now_us, None, None)
        return None if mode is None else (backup, mode)

    def hedge_delay_ms(self, replica: Replica) -> float:
        """How long the primary has before its request is hedged: its recent p95 (read
        at most every ``HEDGE_DELAY_REFRESH_S``), at least the configured floor."""
        now = time.monotonic()
        cached = self._hedge_delays.get(replica.name)
        if cached is None or now - cached[0] > HEDGE_DELAY_REFRESH_S:
            p95 = replica.recent.percentile_ms(0.95)
            cached = (now, max(p95, self._hedge_min_delay_ms))
            self._hedge_delays[replica.name] = cached
        return cached[1]

    async def _hedged(
        self,
        first: tuple[Replica, BreakerMode],
        backup: tuple[Replica, BreakerMode],
        rows: Sequence[Sequence[float]],
        timeout_ms: float,
        budget: Budget,
        reasons: list[str],
        attempts: list[Attempt],
    ) -> RoutedScores | None:
        """Calls ``first``; if it has not answered within its hedge delay and the budget
        still allows a call, calls ``backup`` too and takes the first good answer,
        abandoning the other call. ``backup`` is not called again afterwards, so the
        hedge is the request's one extra call, as the retry is without hedging."""
        replica, mode = first
        primary = asyncio.create_task(
            self._attempt(replica, mode, rows, timeout_ms, reasons, attempts)
        )
        delay_ms = self.hedge_delay_ms(replica)
        try:
            done, _ = await asyncio.wait({primary}, timeout=delay_ms / 1000.0)
        except BaseException:  # the caller went away: so does its call
            _abandon(primary)
            raise
        if primary in done:
            routed = primary.result()
            if routed is not None:
                return routed
            return await self._attempt_backup(backup, rows, budget, reasons, attempts)
        backup_timeout_ms = self._call_timeout_ms(budget)
        if backup_timeout_ms < self._min_call_ms:
            try:
                return await primary
            except asyncio.CancelledError:
                _abandon(primary)
                raise
        self.hedges += 1
        reasons.append(f"hedged to {backup[0].name} after {delay_ms:.1f} ms")
        second = asyncio.create_task(
            self._attempt(*backup, rows, backup_timeout_ms, reasons, attempts)
        )
        pending: set[asyncio.Task[RoutedScores | None]] = {primary, second}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    routed = task.result()
                    if routed is not None:
                        return routed
            return None
        finally:
            for task in (primary, second):  # the slower call: its answer is not needed
                _abandon(task)

    async def _attempt_backup(
        self,
        backup: tuple[Replica, BreakerMode],
        rows: Sequence[Sequence[float]],
        budget: Budget,
        reasons: list[str],
        attempts: list[Attempt],
    ) -> RoutedScores | None:
        """The plain retry, when the hedged-for primary failed before its hedge delay."""
        timeout_ms = self._call_budget_ms(backup[0], budget, reasons)
        if timeout_ms is None:
            return None
        return await self._attempt(*backup, rows, timeout_ms, reasons, attempts)


def _abandon(task: asyncio.Task[RoutedScores | None]) -> None:
    """Stops waiting for a call whose answer is not needed any more (cancelling the
    attempt; the model client leaves its RPC to finish on the wire) and retrieves its
    outcome when it ends, so that none is reported as lost."""
    task.cancel()
    task.add_done_callback(_consume)


def _consume(task: asyncio.Task[RoutedScores | None]) -> None:
    if not task.cancelled():
        task.exception()
