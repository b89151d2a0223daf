"""Primary first, then exactly one retry to the secondary, each behind its own breaker."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from server.breaker import AsyncCircuitBreaker, BreakerOpenError
from server.deadline import Budget, model_call_timeout_ms
from server.domain import Source
from server.model_client import ModelCallError, ModelClient, ModelInputError, ModelScores
from server.settings import DecisionSettings, TorchServeSettings


@dataclass(frozen=True)
class Replica:
    client: ModelClient
    breaker: AsyncCircuitBreaker
    source: Source

    @property
    def name(self) -> str:
        return self.client.name


@dataclass(frozen=True, slots=True)
class RoutedScores:
    scores: ModelScores
    source: Source


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
        rng: random.Random | None = None,
    ) -> None:
        self._min_counted_timeout_ms = min_counted_timeout_ms
        self.replicas = tuple(replicas)
        self._cap_ms = torchserve.per_call_timeout_ms
        self._jitter = torchserve.timeout_jitter
        self._min_call_ms = torchserve.min_call_budget_ms
        self._reserve_ms = decision.fallback_reserve_ms
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security

    async def score(
        self, rows: Sequence[Sequence[float]], budget: Budget, reasons: list[str]
    ) -> RoutedScores | None:
        """Scores the rows, or returns None with ``reasons`` saying why each replica did not."""
        for replica in self.replicas:
            if not replica.breaker.allows_call():
                reasons.append(f"{replica.name} breaker {replica.breaker.state}")
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
            try:
                scores = await replica.breaker.call(
                    functools.partial(
                        replica.client.predict,
                        rows,
                        timeout_ms / 1000.0,
                        budget_limited=timeout_ms < self._min_counted_timeout_ms,
                    )
                )
            except (BreakerOpenError, ModelCallError) as exc:
                reasons.append(str(exc))
            except ModelInputError as exc:
                reasons.append(str(exc))
                return None  # our rows: the other replica would reject them too
            else:
                return RoutedScores(scores, replica.source)
        return None
