"""The Decide path's one time plan: a call's budget, and every rule that turns it into a
wait, a timeout or a refusal, each once, with the constant behind it. Where each is
applied: docs/architecture.md#the-time-plan-of-one-call.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass


class Budget:
    """The time a request has, on the monotonic clock, from the caller's gRPC deadline."""

    __slots__ = ("deadline",)

    def __init__(self, total_ms: float, *, started: float | None = None) -> None:
        start = time.monotonic() if started is None else started
        self.deadline = start + total_ms / 1000.0

    def remaining_ms(self) -> float:
        return (self.deadline - time.monotonic()) * 1000.0


# Each model call's cap is cut by a random share up to this, so that many servers' calls
# against one slow replica do not time out in one instant.
TIMEOUT_JITTER = 0.1
# Kept back from the model calls for the ladder (a cached score's read, the rules).
FALLBACK_RESERVE_MS = 3.0
# The defaults of the settings the plan is built from (server.settings.DeadlineSettings).
DEFAULT_BUDGET_MS = 50.0
RESPONSE_MARGIN_MS = 12.0
MODEL_CALL_MS = 25.0
STORE_READ_MS = 10.0


@dataclass(frozen=True, slots=True)
class CallPlan:
    """The one time model of a call: its budget from the caller's deadline, and what each
    step may spend of it. The servicer asks it for the budget and the router for a model
    call's time; the store reads (features, cached scores) are capped by its
    ``store_read_ms``.

    ``default_budget_ms``: a call that carries no deadline. ``response_margin_ms``: the
    plan ends this long before the caller's deadline (the answer's way back).
    ``model_call_ms``: one model call at most, before jitter. ``store_read_ms``: one
    Redis read at most. ``fallback_reserve_ms``: a model call leaves this to the ladder.
    """

    default_budget_ms: float = DEFAULT_BUDGET_MS
    response_margin_ms: float = RESPONSE_MARGIN_MS
    model_call_ms: float = MODEL_CALL_MS
    store_read_ms: float = STORE_READ_MS
    fallback_reserve_ms: float = FALLBACK_RESERVE_MS
    jitter: float = TIMEOUT_JITTER

    @staticmethod
    def expired(time_remaining_s: float | None) -> bool:
        """Whether a call's deadline passed before its handler ran: it is not decided
        (work for a caller that has gone only makes the calls behind it late too)."""
        return time_remaining_s is not None and time_remaining_s <= 0

    def budget(self, time_remaining_s: float | None) -> Budget:
        """The caller's remaining deadline less the response margin, or the default."""
        if time_remaining_s is None:
            return Budget(self.default_budget_ms)
        return Budget(time_remaining_s * 1000.0 - self.response_margin_ms)

    def model_call_timeout_ms(self, budget: Budget, rng: random.Random) -> float:
        """What one model call may spend: the budget less the fallback reserve, capped by
        ``model_call_ms`` lowered by a random share up to ``jitter``."""
        jittered_cap = self.model_call_ms * (1.0 - self.jitter * rng.random())
        return min(budget.remaining_ms() - self.fallback_reserve_ms, jittered_cap)

    @property
    def shortest_model_call_ms(self) -> float:
        """The shortest cap jitter makes."""
        return self.model_call_ms * (1.0 - self.jitter)


# -- The call's way in (server.front, server.intake, server.servicer) ------------------
# Calls the server takes from gRPC's core at once, over its Decide and DecideBatch: each
# slot takes a call, serves it and takes the next. Bursts of 16 calls from each of two
# callers are taken as they come; past this many in flight, calls wait in the core's
# queue (below), and the calls taken are refused by time (``outlasts_budget``).
CALL_SLOTS = 32
# Calls that wait in gRPC's core for a slot, over all connections: the core cancels a new
# call past QUEUED_CALLS_MAX, and one past QUEUED_CALLS_SHED with a chance that grows to
# certainty at the max (random early detection). The backstop behind the slots: 8 waiting
# calls are ~15 ms at the slowest capacity measured on a 2-core VM (540/s).
QUEUED_CALLS_MAX = 8
QUEUED_CALLS_SHED = 4
# How long calls on a connection past its age may finish: far past any deadline.
CONNECTION_AGE_GRACE_MS = 10_000
# The process's CPU per finished call is measured over windows this long, and kept from a
# window of at least this many calls only: at a lower rate the process's own background
# work (the feature mirror, metrics, probes) would pass for the calls', and calls waiting
# on a slow replica would be refused for CPU they do not use. Until a busy window, a call
# is taken to cost INITIAL_CALL_COST_MS (a decision's CPU on a 2-core VM is 0.5-1 ms).
CALL_COST_WINDOW_S = 0.1
CALL_COST_MIN_CALLS = 20
INITIAL_CALL_COST_MS = 0.5


class CallCost:
    """The process's CPU per finished Decide or DecideBatch call in its last busy window:
    the event loop's work for it and gRPC's core threads' (they share the cores), so what
    one call ahead of another delays it by when the server is busy."""

    __slots__ = ("_calls", "_cpu_s", "_since", "ms")

    def __init__(self) -> None:
        self.ms = INITIAL_CALL_COST_MS
        self._calls = 0
        self._cpu_s = time.process_time()
        self._since = time.monotonic()

    def finished(self) -> None:
        """One call ended (answered or failed)."""
        self._calls += 1
        now = time.monotonic()
        if now - self._since < CALL_COST_WINDOW_S:
            return
        cpu_s = time.process_time()
        if self._calls >= CALL_COST_MIN_CALLS:
            self.ms = (cpu_s - self._cpu_s) * 1000.0 / self._calls
        self._calls, self._cpu_s, self._since = 0, cpu_s, now


def outlasts_budget(budget_ms: float, calls_ahead: int, call_ms: float) -> bool:
    """Whether a call just taken would end past its budget behind the calls already being
    served, each costing ``call_ms``: it is refused at once, before any work, rather than
    answered late (docs/overload.md). A call with nothing ahead is always served."""
    return calls_ahead > 0 and (calls_ahead + 1) * call_ms > budget_ms


# -- Model calls (server.router, server.batching, server.model_client) ----------------
# The median answer a call must have time for is of this many last seconds' calls: a
# replica skipped for time makes no calls, so an older median would keep it skipped;
# with none this recent, the floor is MIN_CALL_BUDGET_MS and the next call measures anew.
NEEDS_WINDOW_S = 5.0
MIN_CALL_BUDGET_MS = 1.0  # less than this left: a call could only be abandoned
# How often a replica's recent latencies are summarized for the router (sorting them on
# every call would cost more than the call).
LATENCY_REFRESH_S = 0.5


def model_call_needs_ms(recent_p50_ms: float, floor_ms: float = MIN_CALL_BUDGET_MS) -> float:
    """The least time worth a model call to a replica: its median answer of the last
    ``NEEDS_WINDOW_S`` (0 with none), at least ``floor_ms``. The router makes no call
    given less (``server.router``): one that would most likely time out only adds an
    abandoned call to the replica's load, the very thing that slows it."""
    return max(recent_p50_ms, floor_ms)


# Retries to the next replica, as a share of first calls (a token bucket): when the
# primary slows down for everyone, retries cannot double the secondary's load.
RETRY_RATIO = 0.2
# Retries always allowed per second besides that share: at low traffic a share of first
# calls would allow none.
RETRY_MIN_PER_S = 10.0
# A request queued for a busy replica leaves the queue unsent this long before its
# deadline: the expected call time, until the first answer INITIAL_EXPECTED_MS, then an
# EWMA of the answers with this weight.
INITIAL_EXPECTED_MS = 2.0
EXPECTED_WEIGHT = 0.1


class ExpectedCallTime:
    """How long a replica's calls take, as a request queued for it while its calls are
    out must allow (``server.batching``): it leaves the queue unsent once less than this
    is left before its deadline, and the next replica or the ladder answers it."""

    __slots__ = ("_answered", "ms")

    def __init__(self) -> None:
        self.ms = INITIAL_EXPECTED_MS
        self._answered = False

    def answered(self, elapsed_ms: float) -> None:
        """A call came back after ``elapsed_ms``."""
        if self._answered:
            self.ms += EXPECTED_WEIGHT * (elapsed_ms - self.ms)
        else:
            self.ms, self._answered = elapsed_ms, True

    def leaves_queue_at(self, deadline: float) -> float:
        """When a request with ``deadline`` (loop time) leaves the queue unsent."""
        return deadline - self.ms / 1000.0


def shared_call_wait_s(deadlines: Iterable[float], sent_at: float) -> float:
    """How long a call that carries several queued requests waits for the replica: until
    the last of their deadlines (never less than 0). Each request whose deadline comes
    earlier fails alone at its own, with the call still out for the others."""
    return max(max(deadlines) - sent_at, 0.0)


# The deadline a model call carries on the wire: longer than any stall a replica recovers
# from, so that only a hung replica sees a call cancelled (docs/local-stack.md).
WIRE_TIMEOUT_S = 120.0
# Calls to one replica left running after their callers stopped waiting, at most: a
# hung replica holds this many, not a pile.
MAX_ABANDONED_CALLS = 16
# A model call's timeout counts against its replica only if the call had this long: a
# replica that misses a 10 ms wait is unhealthy, one given 4 ms by a tight deadline is not.
MIN_COUNTED_TIMEOUT_MS = 10.0


def counts_as_timeout(waited_ms: float) -> bool:
    """Whether a replica that did not answer in ``waited_ms`` (a call's timeout, or how
    long it has answered nothing at all) is at fault, so that it counts against its
    breaker: a replica that misses ``MIN_COUNTED_TIMEOUT_MS`` is unhealthy, one given a
    few milliseconds by a tight deadline is not (``server.model_errors``)."""
    return waited_ms >= MIN_COUNTED_TIMEOUT_MS


def overlaps_a_counted_failure(started: float, failure_counted_at: float) -> bool:
    """Whether a failed call was already out when the replica's last counted failure came:
    calls in flight together when this process or the machine stalls fail together, and
    that is one event against the replica, not one per call (``server.breaker``)."""
    return started < failure_counted_at


# -- Store reads (core.store_reads, server.redis_clients) ------------------------------


def store_read_timeout_ms(budget: Budget, cap_ms: float) -> float:
    """What one Redis read on the Decide path (features, cached scores) may spend: the
    budget left, capped by the plan's ``store_read_ms``."""
    return min(budget.remaining_ms(), cap_ms)


# Decision-path reads left running after their timeout, at most: a hung store holds this
# many, not a backlog.
MAX_ABANDONED_READS = 32
# How long a connection, or a read a caller abandoned, may wait for Redis: a caller
# never waits longer than its own budget; this bounds what it leaves behind.
SOCKET_TIMEOUT_S = 0.25

# -- Stalls (core.abandon) ----------------------------------------------------------------
# A stalled event loop (its process went unscheduled on a busy machine) may run the timers
# that fell due before it reads the sockets that filled meanwhile (uvloop, which the
# server runs on, does), so a wait that ends this late may be for an answer already
# received. Such a wait gets a moment more, for the loop to read it, before it is called
# a timeout.
STALLED_TIMER_S = 0.002
STALL_GRACE_S = 0.001


def stall_grace_s(late_by_s: float) -> float:
    """The moment more a wait gets that ended ``late_by_s`` past its time (0 if it was
    not late enough to be a stall), before it is called a timeout (``core.abandon``)."""
    return STALL_GRACE_S if late_by_s > STALLED_TIMER_S else 0.0
