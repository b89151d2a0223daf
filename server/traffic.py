"""``Traffic``: which lane scores a call, champion or canary, and what the canary monitor
learns from it.

While on-call's canary weight is above 0, that share of calls goes to the canary's lane
(challenger → primary → secondary: when the challenger fails, the champion answers as
usual), the rest to the champion's (primary → secondary). Each call's first attempt on
its own side is recorded for the ``CanaryMonitor``, which compares the two sides.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from core.deadline import Budget
from core.domain import Source
from server.control.canary import CANARY, CHAMPION, CanaryMonitor
from server.control.state import ControlState
from server.model_errors import ModelNoTime
from server.router import ReplicaRouter, RouteResult


class Traffic:
    def __init__(
        self,
        champion: ReplicaRouter,
        canary: tuple[ReplicaRouter, CanaryMonitor] | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        """``canary``: the canary's lane and its monitor, when there is a challenger."""
        self.champion = champion
        self._canary = canary
        self._rng = rng or random.Random()  # noqa: S311 - sampling, not security

    async def score(
        self, rows: Sequence[Sequence[float]], budget: Budget, state: ControlState, now_us: int
    ) -> RouteResult:
        weight, _ = state.canary(now_us)
        if self._canary is None or weight <= 0:
            return await self.champion.score(rows, budget, state=state, now_us=now_us)
        lane, monitor = self._canary
        on_canary = self._rng.random() < weight
        if not on_canary:
            lane = self.champion
        result = await lane.score(rows, budget, state=state, now_us=now_us)
        # The side's own first attempt: a challenger on-call forced open made none, and
        # the champion's answer must not count for it.
        first = next((a for a in result.attempts if (a.source is Source.CANARY) == on_canary), None)
        # A request that never left the side's queue (no time: busy, not failing) says
        # nothing of its model either way.
        if first is not None and not isinstance(first.error, ModelNoTime):
            answer = result.answer
            own = answer is not None and (answer.source is Source.CANARY) == on_canary
            monitor.record(
                CANARY if on_canary else CHAMPION,
                ok=first.ok,
                elapsed_ms=first.elapsed_ms,
                fell_back=answer is None,
                scores=answer.scores.scores if own and answer is not None else (),
            )
        return result
