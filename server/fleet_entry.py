"""This server's entry in the fleet list: what it says of itself every second."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence

from server.control.fleet import FleetMember, reachable
from server.control.state import BreakerMode, ControlState
from server.engine import DecisionEngine
from server.replica import Replica
from server.shadow import ShadowScorer


class FleetEntry:
    """Describes this server for ``FleetRegistration``; ``serving`` follows its health."""

    def __init__(
        self,
        *,
        hosts: tuple[str, str],
        ports: Callable[[], tuple[int, int]],
        advertise_address: str,
        server_id: Callable[[], str],
        engine: DecisionEngine,
        replicas: Sequence[Replica],
        shadow: ShadowScorer | None,
        control: Callable[[], ControlState],
    ) -> None:
        """``hosts`` and ``ports``: where DecisionService and AdminService listen (the
        ports once bound); ``advertise_address``: AdminService's for other machines, when
        set; ``control``: the control state now (on-call's breaker overrides)."""
        self._hosts = hosts
        self._ports = ports
        self._advertise_address = advertise_address
        self._server_id = server_id
        self._engine = engine
        self._replicas = replicas
        self._shadow = shadow
        self._control = control
        self._started_at_us = time.time_ns() // 1000
        self.serving = False

    def member(self) -> FleetMember:
        host = socket.gethostname()
        decision_host, admin_host = self._hosts
        port, admin_port = self._ports()
        tally = self._engine.tally()
        shadow_scored, shadow_agreed = self._shadow.agreement() if self._shadow else (0, 0)
        return FleetMember(
            server_id=self._server_id() or f"{host}:{port}",
            admin_address=self._advertise_address or reachable(admin_host, admin_port, host),
            decision_address=reachable(decision_host, port, host),
            host=host,
            pid=os.getpid(),
            started_at_us=self._started_at_us,
            serving=self.serving,
            in_flight=self._engine.in_flight,
            decisions=tally.decisions,
            breakers=self._breakers(),
            decisions_by_source=tally.by_source,
            fallbacks=tally.fallbacks,
            shadow_scored=shadow_scored,
            shadow_agreed=shadow_agreed,
            latency_counts=tally.latency_counts,
        )

    def _breakers(self) -> dict[str, str]:
        """Each replica's breaker as calls see it: on-call's override when one is set
        ("force-open", "force-closed", as ``decisionctl breaker`` names them), else the
        breaker's own state."""
        state, now_us = self._control(), time.time_ns() // 1000
        shown = {}
        for replica in self._replicas:
            mode = state.breaker_mode(replica.name, now_us)
            shown[replica.name] = (
                replica.breaker.state
                if mode is BreakerMode.AUTO
                else mode.name.lower().replace("_", "-")
            )
        return shown
