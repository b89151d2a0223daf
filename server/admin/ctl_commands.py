"""What each ``decisionctl`` command does, once its arguments are parsed.

The AdminService commands make their calls through an ``AdminSession`` and return what to
print; ``replay`` and ``timeline`` run the audit CLI; ``chaos`` asks the local stack. The
command line itself (usage, arguments, exit codes on errors) is ``server.admin.ctl``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from core import chaos as chaos_protocol
from decision_client.v1 import admin_pb2 as pb
from decision_client.v1 import admin_pb2_grpc as pb_grpc
from server.admin.ctl_connection import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE
from server.admin.ctl_format import (
    format_breaker_change,
    format_canary_change,
    format_flag_change,
    format_flags,
    format_history,
    format_kill_switch_change,
    format_servers,
    format_status,
    to_json,
)

# The ``breaker`` command's mode names and what each asks of the server.
BREAKER_MODES = {
    "auto": pb.BREAKER_MODE_AUTO,
    "force-open": pb.BREAKER_MODE_FORCE_OPEN,
    "force-closed": pb.BREAKER_MODE_FORCE_CLOSED,
}

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)


@dataclass(frozen=True, slots=True)
class AdminSession:
    """One server's AdminService, and the deadline and token every call carries."""

    stub: pb_grpc.AdminServiceStub
    timeout_s: float
    metadata: tuple[tuple[str, str], ...]

    def call(self, method: grpc.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req) -> _Resp:
        return method(request, timeout=self.timeout_s, metadata=self.metadata)


# Refusals of the caller itself: top stops on them (nothing will read until the token is
# fixed); anything else it shows and reads again next frame.
_FATAL_TO_TOP = frozenset((grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED))


def _unread(exc: grpc.RpcError) -> str:
    """A failed read for top's frame; re-raises the caller's own refusals."""
    code = exc.code()
    if code in _FATAL_TO_TOP:
        raise exc
    name = code.name.lower().replace("_", " ") if code else "unknown"
    return f"{name}: {exc.details() or 'no details'}"


def run_admin_command(session: AdminSession, args: argparse.Namespace) -> str:
    """Makes the command's call; returns what to print."""
    stub, call, command = session.stub, session.call, args.command
    if command == "status":
        status = call(stub.GetStatus, pb.GetStatusRequest())
        if args.json:
            return to_json(status)
        return format_status(status) + "\n\nfleet\n" + _fleet_table(session)
    if command == "top":
        # Imported here: rich is needed by this command only.
        from server.admin import ctl_top

        consumer_url, labeler_url = ctl_top.local_stack_metrics(args.address)
        consumer_url = args.consumer_metrics or consumer_url
        labeler_url = args.labeler_metrics or labeler_url

        last_status = pb.GetStatusResponse()

        def read() -> ctl_top.Sample:
            """One frame's reads; a read that fails is shown, not fatal (a Redis or
            store stall must not end top), unless the token is refused."""
            nonlocal last_status
            problems = []
            try:
                last_status = call(stub.GetStatus, pb.GetStatusRequest())
            except grpc.RpcError as exc:
                problems.append(f"status (showing the last one read): {_unread(exc)}")
            try:
                servers = list(call(stub.ListServers, pb.ListServersRequest()).servers)
            except grpc.RpcError as exc:
                servers = []
                problems.append(f"fleet list: {_unread(exc)}")
            return ctl_top.Sample(
                time.monotonic(),
                last_status,
                servers,
                consumer=ctl_top.consumer_text(consumer_url),
                quality=ctl_top.quality_text(labeler_url),
                problems=tuple(problems),
            )

        try:
            ctl_top.run(read, args.address, interval_s=args.interval, frames=args.frames)
        except KeyboardInterrupt:
            pass
        return ""
    if command == "servers":
        fleet = call(stub.ListServers, pb.ListServersRequest())
        return to_json(fleet) if args.json else format_servers(fleet.servers, time.time())
    if command == "flags":
        listed = call(stub.ListFlags, pb.ListFlagsRequest())
        return to_json(listed) if args.json else format_flags(listed.flags)
    if command == "history":
        query = pb.ListAdminActionsRequest(actor=args.actor, target=args.target, limit=args.limit)
        if args.since:
            query.since.FromMicroseconds(round(args.since.timestamp() * 1e6))
        if args.until:
            query.until.FromMicroseconds(round(args.until.timestamp() * 1e6))
        history = call(stub.ListAdminActions, query)
        return to_json(history) if args.json else format_history(history.actions)
    ttl = getattr(args, "ttl", None) or 0.0
    if command == "breaker":
        mode = BREAKER_MODES[args.mode]
        request = pb.SetBreakerRequest(
            replica=args.replica, mode=mode, reason=args.reason, ttl_s=ttl
        )
        return format_breaker_change(args.replica, call(stub.SetBreaker, request))
    if command == "flag":
        reset = args.action == "reset"
        flag = pb.SetFlagRequest(
            name=args.name,
            value="" if reset else args.value,
            reset=reset,
            reason=args.reason,
            ttl_s=ttl,
        )
        return format_flag_change(call(stub.SetFlag, flag))
    if command == "canary":
        weight = {"promote": 1.0, "rollback": 0.0}.get(args.action, getattr(args, "weight", 0.0))
        force = getattr(args, "force", False)
        canary = pb.SetCanaryRequest(weight=weight, reason=args.reason, force=force)
        return format_canary_change(call(stub.SetCanary, canary))
    if command == "kill-switch":
        engaged = args.action == "engage"
        switch = pb.KillSwitchRequest(
            scope=args.scope, engaged=engaged, reason=args.reason, ttl_s=ttl
        )
        return format_kill_switch_change(args.scope, call(stub.KillSwitch, switch))
    raise AssertionError(f"unhandled command {command}")


def _fleet_table(session: AdminSession) -> str:
    """The fleet table for ``status``; a server that cannot list it still shows its own
    status, with why the list is missing."""
    try:
        listed = session.call(session.stub.ListServers, pb.ListServersRequest())
    except grpc.RpcError as exc:
        return f"  (not listed: {exc.code().name} {exc.details()})"
    return format_servers(listed.servers, time.time())


def run_audit_command(args: argparse.Namespace, rest: list[str]) -> int:
    """``replay`` and ``timeline``: the audit CLI's commands, run here; returns its exit
    code (it prints for itself)."""
    # Imported here: the audit store's dependencies are not needed for the RPC commands.
    from server.audit.__main__ import main as audit_main

    prefix = ["--database-url", args.database_url] if args.database_url else []
    try:
        return audit_main([*prefix, args.command, *rest], prog="decisionctl")
    except SystemExit as exc:  # its argparse exits on a usage error or --help
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR


def run_chaos_command(args: argparse.Namespace) -> tuple[int, str]:
    """``chaos``: asks the local stack for the fault; returns the exit code and what to
    print (on stdout when it was done, else on stderr)."""
    request = chaos_protocol.ChaosRequest(
        args.action, args.target, stopped_ms=args.stopped_ms, running_ms=args.running_ms
    )
    try:
        # A restart waits for TorchServe to load its model: up to about 90 s.
        answer = chaos_protocol.ask(Path(args.run_dir), request, timeout_s=120.0)
    except chaos_protocol.NoLocalStack as exc:
        return EXIT_REFUSED, f"decisionctl: {exc}"
    except OSError as exc:
        return EXIT_UNREACHABLE, f"decisionctl: the local stack did not answer: {exc}"
    if not answer.ok:
        return EXIT_REFUSED, f"decisionctl: refused: {answer.message}"
    return EXIT_OK, f"{answer.message}\nwatch: {answer.watch}"
