"""Whether a Decide call or a DecideStream message is taken: its budget, or the status it
is refused with. One rule for both, so that a stream escapes no limit a call meets."""

from __future__ import annotations

from core.deadline import Budget, CallCost, CallPlan, outlasts_budget
from server.engine import DecisionEngine
from server.errors import Expired, Overloaded


def admit(
    plan: CallPlan,
    remaining_s: float | None,
    engine: DecisionEngine,
    cost: CallCost,
    *,
    within_default: bool = False,
) -> Budget:
    """The budget of a call with ``remaining_s`` to its deadline (None: none), no longer
    than the default one when ``within_default``. ``Expired`` when the deadline passed
    while it was queued (work for a caller that has gone only makes the calls behind it
    late too), ``Overloaded`` when the calls being served would outlast it."""
    if plan.expired(remaining_s):
        raise Expired()
    budget = plan.budget(remaining_s)
    if within_default and remaining_s is not None:
        budget = min(budget, plan.budget(None), key=lambda b: b.deadline)
    ahead, cost_ms = engine.calls_in_flight, cost.ms
    if outlasts_budget(budget.remaining_ms(), ahead, cost_ms):
        raise Overloaded(backlog_ms=ahead * cost_ms)
    return budget
