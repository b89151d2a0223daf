"""Whether a Decide call or a DecideStream message is taken: its budget, or the status it
is refused with. One rule for both, so that a stream escapes no limit a call meets.

A caller's share: each caller (its certificate's identity under mTLS, else the
``client_id`` it writes; none: no share) may have at most ``server.caller_share`` calls
in flight in this process (``server.caller_shares`` overrides it by caller). One past it
is refused at once, before any work, so that a caller sending faster than it is answered
takes its own refusals and leaves the others' calls their time. Refusals for a share are
counted apart (``decision_caller_refusals_total``): the caller's doing, not the
service's.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

from core.deadline import Budget, CallCost, CallPlan, outlasts_budget
from core.domain import CallInfo, OrderRequest
from server.engine import MAX_CALLER_LABELS, OTHER_CALLERS, DecisionEngine
from server.errors import Expired, Overloaded


def caller_of(call: CallInfo, orders: list[OrderRequest]) -> str:
    """Whose share a call counts against: its verified identity, else the first
    ``client_id`` its orders carry (advisory: a caller writes it), else nobody's."""
    if call.verified:
        return call.caller
    return next((order.client_id for order in orders if order.client_id), "")


class OverShare(Overloaded):
    """The caller already has its share of this server's calls in flight (RESOURCE_EXHAUSTED
    with RetryInfo: about when its own calls will have been worked off)."""

    def __init__(self, caller: str, share: int, backlog_ms: float) -> None:
        super().__init__(backlog_ms)
        self.args = (
            f"caller {caller!r} has {share} calls in flight, its share of this server: "
            "refused before any work",
        )


class CallerShares:
    """Calls in flight by caller, and what each may have (0: no limit)."""

    def __init__(self, default: int, overrides: Mapping[str, int]) -> None:
        self._default = default
        self._overrides = dict(overrides)
        self._in_flight: dict[str, int] = {}
        # Refusals by caller, at most MAX_CALLER_LABELS by name (read by the metrics).
        self.refused: collections.Counter[str] = collections.Counter()

    def take(self, caller: str, call_ms: float) -> None:
        """One more call of ``caller`` in flight, or ``OverShare``."""
        held = self._in_flight.get(caller, 0)
        share = self._overrides.get(caller, self._default)
        if share and held >= share:
            known = caller in self.refused or len(self.refused) < MAX_CALLER_LABELS
            self.refused[caller if known else OTHER_CALLERS] += 1
            raise OverShare(caller, share, held * call_ms)
        self._in_flight[caller] = held + 1

    def release(self, caller: str) -> None:
        """One call of ``caller`` ended (taken by ``take``)."""
        if held := self._in_flight[caller] - 1:
            self._in_flight[caller] = held
        else:
            del self._in_flight[caller]


class Admission:
    """Takes a call or refuses it; ``finished`` when a taken one ends."""

    def __init__(
        self, plan: CallPlan, engine: DecisionEngine, cost: CallCost, shares: CallerShares
    ) -> None:
        self.plan, self.cost, self.shares = plan, cost, shares
        self._engine = engine

    def admit(
        self, remaining_s: float | None, caller: str, *, within_default: bool = False
    ) -> Budget:
        """The budget of a call with ``remaining_s`` to its deadline (None: none), no
        longer than the default one when ``within_default``. ``Expired`` when the deadline
        passed while it was queued (work for a caller that has gone only makes the calls
        behind it late too), ``Overloaded`` when the calls being served would outlast it,
        ``OverShare`` when ``caller`` (empty: none) has its share in flight."""
        plan = self.plan
        if plan.expired(remaining_s):
            raise Expired()
        budget = plan.budget(remaining_s)
        if within_default and remaining_s is not None:
            budget = min(budget, plan.budget(None), key=lambda b: b.deadline)
        ahead, cost_ms = self._engine.calls_in_flight, self.cost.ms
        if outlasts_budget(budget.remaining_ms(), ahead, cost_ms):
            raise Overloaded(backlog_ms=ahead * cost_ms)
        if caller:
            self.shares.take(caller, cost_ms)
        return budget

    def finished(self, caller: str) -> None:
        """A call ``admit`` took has ended (answered or failed)."""
        self.cost.finished()
        if caller:
            self.shares.release(caller)
