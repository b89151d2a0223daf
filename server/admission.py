"""Whether a Decide call or a DecideStream message is taken: its budget, or the status it
is refused with. One rule for both, so that a stream escapes no limit a call meets.

A caller's share: each caller (its certificate's identity under mTLS, else the
``client_id`` it writes from the host it calls from; none: no share) may have at most
``server.caller_share`` calls in flight in this process (``server.caller_shares``
overrides it by caller). One past it is refused at once, before any work, so that a
caller sending faster than it is answered takes its own refusals and leaves the others'
calls their time. Refusals for a share are counted apart
(``decision_caller_refusals_total``, by caller and whether it was verified): a verified
caller's are its own doing, and the objective leaves them out; an unverified one's count
against it, as a ``client_id`` proves nothing.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import NamedTuple

from core.deadline import Budget, CallCost, CallPlan, outlasts_budget
from core.domain import CallInfo, OrderRequest
from server.engine import MAX_CALLER_LABELS, OTHER_CALLERS, DecisionEngine
from server.errors import Expired, Overloaded


class Caller(NamedTuple):
    """Whose share a call counts against; ``key`` empty: nobody's."""

    key: str
    verified: bool


NOBODY = Caller("", False)


def caller_of(call: CallInfo, orders: list[OrderRequest]) -> Caller:
    """A call's caller: its verified identity, else the first ``client_id`` its orders carry
    (advisory: a caller writes it) from the host it calls from (a ``client_id`` written
    from another host is another caller), else nobody."""
    if call.verified:
        return Caller(call.caller, True)
    client_id = next((order.client_id for order in orders if order.client_id), "")
    if not client_id:
        return NOBODY
    return Caller(f"{client_id}@{call.caller.rpartition(':')[0]}", False)


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
        self.refused: collections.Counter[Caller] = collections.Counter()

    def take(self, caller: Caller, call_ms: float) -> None:
        """One more call of ``caller`` in flight, or ``OverShare``."""
        key = caller.key
        held = self._in_flight.get(key, 0)
        share = self._overrides.get(key, self._default)
        if share and held >= share:
            known = caller in self.refused or len(self.refused) < MAX_CALLER_LABELS
            self.refused[caller if known else Caller(OTHER_CALLERS, caller.verified)] += 1
            raise OverShare(key, share, held * call_ms)
        self._in_flight[key] = held + 1

    def release(self, caller: str) -> None:
        """One call of the caller keyed ``caller`` ended (taken by ``take``)."""
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
        self, remaining_s: float | None, caller: Caller, *, within_default: bool = False
    ) -> Budget:
        """The budget of a call with ``remaining_s`` to its deadline (None: none), no
        longer than the default one when ``within_default``. ``Expired`` when the deadline
        passed while it was queued (work for a caller that has gone only makes the calls
        behind it late too), ``Overloaded`` when the calls being served would outlast it,
        ``OverShare`` when ``caller`` has its share in flight."""
        plan = self.plan
        if plan.expired(remaining_s):
            raise Expired()
        budget = plan.budget(remaining_s)
        if within_default and remaining_s is not None:
            budget = min(budget, plan.budget(None), key=lambda b: b.deadline)
        ahead, cost_ms = self._engine.calls_in_flight, self.cost.ms
        if outlasts_budget(budget.remaining_ms(), ahead, cost_ms):
            raise Overloaded(backlog_ms=ahead * cost_ms)
        if caller.key:
            self.shares.take(caller, cost_ms)
        return budget

    def finished(self, caller: Caller) -> None:
        """A call ``admit`` took has ended (answered or failed)."""
        self.cost.finished()
        if caller.key:
            self.shares.release(caller.key)
