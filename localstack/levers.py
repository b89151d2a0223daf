"""A lever on-call pulled, held through whatever the stack goes through.

The soak engages a kill switch through AdminService at its start, looks after each window
that the servers still obey it (their status and their decisions), and releases it at
the end. Nothing a fault does (Redis restarted empty, a worker killed, a replica gone)
may lose it: the audit store holds the levers, Redis only announces them
(docs/oncall.md, "Shared state").
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from decision_client.v1 import admin_pb2, admin_pb2_grpc, decision_pb2, decision_pb2_grpc

if TYPE_CHECKING:
    from localstack.stack import LocalStack

HELD_SCOPE = "SOAK-LEVER"  # a symbol the soak's load never trades
# Connections a look opens: the kernel spreads them over a server's workers.
LOOKS = 4
RPC_TIMEOUT_S = 2.0


class HeldLever:
    """A kill switch on ``HELD_SCOPE`` through the stack's admin port, looked at over
    ``LOOKS`` fresh connections to the admin and decision ports."""

    def __init__(self, host: str, decision_port: int, admin_port: int, tokens: Path) -> None:
        """``tokens``: the stack's admin token folder (``operator.token``, ``viewer.token``)."""
        self._decisions = f"{host}:{decision_port}"
        self._admin = f"{host}:{admin_port}"
        self._operator = _bearer(tokens / "operator.token")
        self._viewer = _bearer(tokens / "viewer.token")
        self.answered = 0  # looks a server answered (the others could not tell)

    @classmethod
    def of(cls, stack: LocalStack) -> HeldLever:
        return cls("127.0.0.1", stack.decision_port, stack.admin_port, stack.run_dir / "admin")

    def engage(self, hold_s: float) -> None:
        """Engaged for ``hold_s`` (it expires by itself if the soak never releases it)."""
        self._switch(engaged=True, ttl_s=hold_s)
        print(f"lever: a kill switch on {HELD_SCOPE}, looked at after every window", flush=True)

    def release(self) -> None:
        """Released, if a server takes the call; else it expires by itself."""
        print(f"lever: {self.answered} looks answered; released", flush=True)
        with contextlib.suppress(grpc.RpcError):
            self._switch(engaged=False, ttl_s=0)

    async def broken(self) -> list[str]:
        """``lost()``, off the event loop, as a soak window's broken bounds."""
        lost = await asyncio.to_thread(self.lost)
        return [f"lever lost: {lost}"] if lost else []

    def lost(self) -> str:
        """What a look saw that does not obey the lever, in words; empty when every look
        obeyed it or could not tell (a server not answering is the faults' business).
        Blocking: the soak calls it off its event loop, which sends the load."""
        request = decision_pb2.DecideRequest(
            symbol=HELD_SCOPE, side=decision_pb2.SIDE_BUY, quantity=1.0
        )
        for _ in range(LOOKS):
            try:
                with grpc.insecure_channel(self._admin) as channel:
                    status = admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
                        admin_pb2.GetStatusRequest(), metadata=self._viewer, timeout=RPC_TIMEOUT_S
                    )
                with grpc.insecure_channel(self._decisions) as channel:
                    answer = decision_pb2_grpc.DecisionServiceStub(channel).Decide(
                        request, timeout=RPC_TIMEOUT_S
                    )
            except grpc.RpcError:
                continue
            self.answered += 1
            scopes = [k.scope for k in status.kill_switches]
            if HELD_SCOPE not in scopes:
                return f"{status.server_id} lists kill switches {scopes}"
            if "kill switch" not in answer.reason:
                return f"a decision on {HELD_SCOPE}: {answer.reason}"
        return ""

    def _switch(self, *, engaged: bool, ttl_s: float) -> None:
        request = admin_pb2.KillSwitchRequest(
            scope=HELD_SCOPE, engaged=engaged, reason="soak: must hold through every fault",
            ttl_s=ttl_s,
        )  # fmt: skip
        with grpc.insecure_channel(self._admin) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            stub.KillSwitch(request, metadata=self._operator, timeout=RPC_TIMEOUT_S)


def _bearer(token_file: Path) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token_file.read_text().strip()}"),)
