"""The locust scenarios' plans, without locust (importing it monkey-patches the process
with gevent, so tests import this instead): options, load over time, the request mix.

``steady`` (paced users), ``burst`` (the user count stepping through ``BURST_LADDER``),
``stale-features`` (symbols without fresh features: the fallback ladder answers) and
``stream`` (steady, each user's orders as messages on one DecideStream); a
primary failure is steady load while ``decisionctl`` forces the primary open, as with
ghz. The target must be loopback unless ``--allow-remote``. loadtest/README.md has the
commands.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from decision_client.v1 import decision_pb2
from server.errors import InvalidArgument
from server.validation import check_symbol

SCENARIOS = ("steady", "burst", "stale-features", "stream")
DEFAULT_TARGET = "127.0.0.1:50051"
# The local stack (make run) keeps these symbols' features fresh.
FED_SYMBOLS = ("BTC-USD", "ETH-USD", "SOL-USD")
# ...and never writes features for these.
UNFED_SYMBOLS = ("DOGE-USD", "ADA-USD")
# Fractions of --users, one per step: a burst is a sudden jump, held, then a drop.
BURST_LADDER = (0.25, 1.0, 0.25, 1.0, 0.25)
DEFAULT_BURST_STEP_S = 10.0


class ScenarioError(ValueError):
    """Options that would make the scenario meaningless or leave loopback."""


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names this machine (``localhost``, 127.0.0.0/8, ``[::1]``)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _symbols(text: str, what: str) -> tuple[str, ...]:
    symbols = tuple(s.strip() for s in text.split(",") if s.strip())
    if not symbols:
        raise ScenarioError(f"{what}: give at least one symbol")
    for symbol in symbols:
        try:
            check_symbol(what, symbol)
        except InvalidArgument as exc:
            raise ScenarioError(f"{exc}, got {symbol!r}") from None
    return symbols


def _positive(value: float, what: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ScenarioError(f"{what} must be a positive number, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class ScenarioOptions:
    scenario: str
    target: str
    users: int
    spawn_rate: float
    run_time_s: float | None  # None: until stopped
    user_rps: float
    symbols: tuple[str, ...]  # what the users ask about
    deadline_s: float
    burst_step_s: float

    @classmethod
    def from_namespace(cls, ns: Any, target: str) -> ScenarioOptions:
        """From locust's parsed options (its own plus the locustfile's); raises
        ``ScenarioError`` naming the option that is wrong."""
        scenario = ns.scenario
        if scenario not in SCENARIOS:
            raise ScenarioError(f"--scenario must be one of {', '.join(SCENARIOS)}")
        if "://" in target:
            raise ScenarioError(f"target (-H) {target!r}: give host:port, without a scheme")
        if not ns.allow_remote and not is_loopback(target):
            raise ScenarioError(
                f"target (-H) {target!r} is not a loopback host:port; "
                "pass --allow-remote to load another machine"
            )
        run_time_s = float(ns.run_time) if ns.run_time else None
        if ns.burst_step_s is not None:
            burst_step_s = _positive(ns.burst_step_s, "--burst-step-s")
        elif run_time_s is not None:
            burst_step_s = run_time_s / len(BURST_LADDER)
        else:
            burst_step_s = DEFAULT_BURST_STEP_S
        stale = scenario == "stale-features"
        return cls(
            scenario=scenario,
            target=target,
            users=max(1, int(ns.num_users or 1)),
            spawn_rate=_positive(float(ns.spawn_rate or 1.0), "--spawn-rate"),
            run_time_s=run_time_s,
            user_rps=_positive(ns.user_rps, "--user-rps"),
            symbols=_symbols(
                ns.stale_symbols if stale else ns.symbols,
                "--stale-symbols" if stale else "--symbols",
            ),
            deadline_s=_positive(ns.deadline_ms, "--deadline-ms") / 1000.0,
            burst_step_s=burst_step_s,
        )

    def load_at(self, elapsed_s: float) -> tuple[int, float] | None:
        """(users, spawn rate) ``elapsed_s`` into the run; None when the run is over."""
        if self.scenario != "burst":
            if self.run_time_s is not None and elapsed_s >= self.run_time_s:
                return None
            return self.users, self.spawn_rate
        step = int(elapsed_s // self.burst_step_s)
        if step >= len(BURST_LADDER):
            return None
        return max(1, round(self.users * BURST_LADDER[step])), self.spawn_rate


def source_label(source: decision_pb2.Source.ValueType) -> str:
    """``SOURCE_CACHED_SCORE`` -> ``cached-score``: the suffix of a Decide stats row."""
    return decision_pb2.Source.Name(source).removeprefix("SOURCE_").lower().replace("_", "-")


def request_mix(symbols: Sequence[str], client_id: str) -> list[decision_pb2.DecideRequest]:
    """One buy and one sell per symbol: the orders a user cycles through."""
    return [
        decision_pb2.DecideRequest(symbol=symbol, side=side, quantity=1.0, client_id=client_id)
        for symbol in symbols
        for side in (decision_pb2.SIDE_BUY, decision_pb2.SIDE_SELL)
    ]
