"""The soak's levers: on-call changes it makes through the stack's AdminService at a given
second of the measured load, and the check that every later decision obeys them.

``--lever kill-switch:SOL-USD@60`` engages a kill switch for SOL-USD (or ``*``, every
symbol) 60 s into the load, with a reason and no expiry, as on-call would with
``decisionctl kill-switch engage``. From the moment AdminService answers OK, every decision
for that scope must ABSTAIN from source ABSTAIN with a kill-switch reason: the soak holds
its own answers to that as they come, and the audit store's rows at the end. The spelling
is ``KIND:SCOPE@START`` so that breaker (``breaker-open:primary@60``) and canary
(``canary:0.1@60``) levers can join ``LEVER_KINDS``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc

from localstack.stack import DEFAULT_SYMBOLS
from proto.decision.v1 import admin_pb2, admin_pb2_grpc

LEVER_KINDS = ("kill-switch",)
GLOBAL_SCOPE = "*"  # a kill switch for every symbol
ADMIN_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Lever:
    """A lever the soak pulls ``at_s`` seconds into the measured load."""

    kind: str
    scope: str  # kill-switch: a symbol the soak sends, or "*"
    at_s: float

    @classmethod
    def parse(cls, text: str) -> Lever:
        """``KIND:SCOPE@START``, seconds since the measured load started."""
        try:
            what, start = text.rsplit("@", 1)
            kind, scope = what.split(":", 1)
            lever = cls(kind, scope, float(start))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not KIND:SCOPE@START: {text!r}") from None
        if kind not in LEVER_KINDS:
            raise argparse.ArgumentTypeError(f"lever kind one of {', '.join(LEVER_KINDS)}")
        if scope not in (*DEFAULT_SYMBOLS, GLOBAL_SCOPE):
            raise argparse.ArgumentTypeError(
                f"kill-switch scope one of {', '.join(DEFAULT_SYMBOLS)} (the soak's symbols) or *"
            )
        return lever

    def label(self) -> str:
        return f"{self.kind}:{self.scope}@{self.at_s:g}"


@dataclass(frozen=True, slots=True)
class Decided:
    """A decision as the soak holds it to the kill switches: one of its answers, or an
    audit row."""

    symbol: str
    at_unix_s: float  # the answer's send, the row's receipt
    decision: str  # TRADE, NO_TRADE, ABSTAIN
    source: str
    reason: str

    def obeys_kill_switch(self) -> bool:
        return (
            self.decision == "ABSTAIN" and self.source == "ABSTAIN" and "kill switch" in self.reason
        )


@dataclass(frozen=True, slots=True)
class KillSwitch:
    """A kill switch the soak engaged through AdminService, for a symbol or ``*``."""

    scope: str
    asked_unix_s: float  # the request went out: from here a decision may obey it
    engaged_unix_s: float  # AdminService answered OK: from here every decision must

    def covers(self, symbol: str, sent_unix_s: float) -> bool:
        """Whether a decision sent then may already be stopped by it."""
        return self.scope in (GLOBAL_SCOPE, symbol) and sent_unix_s >= self.asked_unix_s

    def binds(self, symbol: str, sent_unix_s: float) -> bool:
        """Whether a decision sent then must obey it."""
        return self.scope in (GLOBAL_SCOPE, symbol) and sent_unix_s >= self.engaged_unix_s


@dataclass(slots=True)
class Obedience:
    """Decisions held to the engaged kill switches, counted as they come."""

    bound: int = 0  # decisions a kill switch bound
    disobeyed: int = 0
    first: Decided | None = None  # the earliest that did not obey
    first_after_s: float = 0.0  # ... this long after its switch engaged

    def add(self, decisions: Iterable[Decided], kill_switches: Sequence[KillSwitch]) -> int:
        """Holds each decision to the switches that bind it; how many of these disobeyed."""
        disobeyed = 0
        for decided in decisions:
            engaged = [
                k.engaged_unix_s
                for k in kill_switches
                if k.binds(decided.symbol, decided.at_unix_s)
            ]
            if not engaged:
                continue
            self.bound += 1
            if decided.obeys_kill_switch():
                continue
            disobeyed += 1
            if self.first is None or decided.at_unix_s < self.first.at_unix_s:
                self.first, self.first_after_s = decided, decided.at_unix_s - min(engaged)
        self.disobeyed += disobeyed
        return disobeyed

    def broken(self, whose: str) -> list[str]:
        """The disobedience in words (none when every bound decision obeyed)."""
        first = self.first
        if first is None:
            return []
        return [
            f"{self.disobeyed} of {self.bound} {whose} after a kill switch engaged did not obey"
            f" it; the first at {utc_clock(first.at_unix_s)} UTC, {self.first_after_s:.1f} s"
            f" after the engagement, {first.symbol}: {first.source} {first.decision}"
            f" ({first.reason})"
        ]


@dataclass(slots=True)
class LeverCheck:
    """The kill switches the soak engaged, and the decisions held to them."""

    kill_switches: list[KillSwitch] = field(default_factory=list)
    answers: Obedience = field(default_factory=Obedience)  # the soak's own, as they come
    audit: Obedience = field(default_factory=Obedience)  # the audit store's rows, at the end

    def broken(self) -> list[str]:
        return [*self.answers.broken("answers"), *self.audit.broken("audit rows")]

    def describe(self) -> str:
        engaged = ", ".join(
            f"{k.scope} at {utc_clock(k.engaged_unix_s)} UTC" for k in self.kill_switches
        )
        return (
            f"kill switches engaged: {engaged or 'none'}; answers bound {self.answers.bound},"
            f" disobeyed {self.answers.disobeyed}; audit rows bound {self.audit.bound},"
            f" disobeyed {self.audit.disobeyed}"
        )

    def summary(self) -> dict[str, object]:
        return {
            "kill_switches": [
                {"scope": k.scope, "engaged_at": utc_clock(k.engaged_unix_s)}
                for k in self.kill_switches
            ],
            "answers_bound": self.answers.bound,
            "answers_disobeyed": self.answers.disobeyed,
            "audit_rows_bound": self.audit.bound,
            "audit_rows_disobeyed": self.audit.disobeyed,
        }


def utc_clock(unix_s: float) -> str:
    """A wall-clock time of day, UTC, to the millisecond."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%H:%M:%S.%f")[:-3]


def operator_token(run_dir: Path) -> str:
    """The local stack's operator token, as decisionctl reads it (localstack.admin_tokens)."""
    return (run_dir / "admin" / "operator.token").read_text().strip()


async def engage(lever: Lever, admin_address: str, token: str) -> KillSwitch:
    """Engages ``lever`` through AdminService with a reason and no expiry; raises
    ``grpc.aio.AioRpcError`` when it is refused."""
    asked_unix_s = time.time()
    reason = f"soak lever {lever.label()}"
    await _kill_switch(admin_address, token, lever.scope, engaged=True, reason=reason)
    return KillSwitch(lever.scope, asked_unix_s, time.time())


async def release(kill_switches: Iterable[KillSwitch], admin_address: str, token: str) -> None:
    """Releases the soak's kill switches: the control state outlives Redis (its durable
    copy is in the run folder's audit store), so one left engaged would hold the next soak."""
    for scope in {k.scope for k in kill_switches}:
        await _kill_switch(admin_address, token, scope, engaged=False, reason="soak over")


async def _kill_switch(
    admin_address: str, token: str, scope: str, *, engaged: bool, reason: str
) -> None:
    request = admin_pb2.KillSwitchRequest(scope=scope, engaged=engaged, reason=reason, ttl_s=0)
    async with grpc.aio.insecure_channel(admin_address) as channel:
        await admin_pb2_grpc.AdminServiceStub(channel).KillSwitch(
            request, metadata=(("authorization", f"Bearer {token}"),), timeout=ADMIN_TIMEOUT_S
        )
