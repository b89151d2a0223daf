"""``decisionctl``: on-call control of the decision servers through AdminService.

    decisionctl status [--json]
    decisionctl breaker primary force-open --reason "replica OOM, INC-123" --ttl 15m
    decisionctl flags
    decisionctl flag set shadow_sample_rate 0.05 --reason "more shadow traffic" --ttl 2h
    decisionctl flag reset shadow_sample_rate --reason "back to normal"
    decisionctl canary set 0.1 --reason "start canary" | promote | rollback --reason ...
    decisionctl kill-switch engage AAPL --reason "halted" --ttl 30m
    decisionctl kill-switch release '*' --reason "all clear"
    decisionctl history --since 2h --actor alice --target primary
    decisionctl replay --since 2026-11-21T09:00 --until 2026-11-21T10:00

The server is ``--address`` or DECISIONCTL_ADDRESS (default 127.0.0.1:50052). The bearer
token is read from ``--token-file``, DECISIONCTL_TOKEN or DECISIONCTL_TOKEN_FILE; there is
no ``--token`` so that it never lands in shell history or ``ps``. TLS when ``--ca-file``
or ``--cert-file`` is given. Durations: 90, 90s, 15m, 2h.

Exit codes: 0 done; 1 any other error; 2 refused (no or bad token, not allowed, bad
argument, precondition) or a usage error; 3 the server did not answer. ``replay`` exits
with the audit replay's own codes.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from proto.decision.v1 import admin_pb2 as pb
from proto.decision.v1 import admin_pb2_grpc as pb_grpc
from server.admin.ctl_connection import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    UsageError,
    channel,
    resolve_token,
    rpc_error,
)
from server.admin.ctl_format import (
    format_breaker_change,
    format_canary_change,
    format_flag_change,
    format_flags,
    format_history,
    format_kill_switch_change,
    format_status,
    to_json,
)

_MODES = {
    "auto": pb.BREAKER_MODE_AUTO,
    "force-open": pb.BREAKER_MODE_FORCE_OPEN,
    "force-closed": pb.BREAKER_MODE_FORCE_CLOSED,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh]?)")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


# --- argument types -------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h`` (decimals allowed) to seconds, positive."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use seconds (90, 90s), minutes (15m) or hours (2h)"
        )
    seconds = float(match[1]) * _UNIT_S[match[2]]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be positive")
    return seconds


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid weight {text!r}: a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid weight {text!r}: must be in [0, 1]")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a positive number")
    return value


def _reason(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the reason must not be empty: it goes to the audit")
    return text.strip()


# --- arguments ------------------------------------------------------------------------


def _common_options() -> argparse.ArgumentParser:
    # SUPPRESS: given before or after the subcommand, a value is not overwritten by the
    # other parser's default. main() and _channel() apply the defaults.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--address", help=f"HOST:PORT (${ADDRESS_ENV}, else {DEFAULT_ADDRESS})")
    common.add_argument("--timeout", type=_positive, help="seconds per call (default 5)")
    common.add_argument(
        "--token-file", help=f"bearer token file (else ${TOKEN_ENV}, ${TOKEN_FILE_ENV})"
    )
    common.add_argument("--ca-file", help="PEM of the server's CA: turns TLS on")
    common.add_argument("--cert-file", help="client certificate PEM for mTLS")
    common.add_argument("--key-file", help="client key PEM for mTLS")
    common.add_argument("--server-name", help="name expected in the server's certificate")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="decisionctl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
    ) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, parents=[common])

    def change(p: argparse.ArgumentParser, *, ttl: bool) -> None:
        p.add_argument("--reason", type=_reason, required=True, help="why, for the audit trail")
        if ttl:
            p.add_argument("--ttl", type=parse_duration, help="ends by itself after: 90s, 15m, 2h")

    status = command(commands, "status", "this server's view of replicas, flags, canary, ...")
    status.add_argument("--json", action="store_true", help="print the response as JSON")

    breaker = command(commands, "breaker", "override a replica's circuit breaker")
    breaker.add_argument("replica", help="primary, secondary or challenger")
    breaker.add_argument("mode", choices=sorted(_MODES), help="auto removes the override")
    change(breaker, ttl=True)

    flags = command(commands, "flags", "every flag, its value and default")
    flags.add_argument("--json", action="store_true", help="print the response as JSON")

    flag = command(commands, "flag", "set a flag, or reset it to its default").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    flag_set = command(flag, "set", "set a flag")
    flag_set.add_argument("name")
    flag_set.add_argument("value")
    change(flag_set, ttl=True)
    flag_reset = command(flag, "reset", "back to the default")
    flag_reset.add_argument("name")
    change(flag_reset, ttl=False)

    canary = command(commands, "canary", "the challenger's share of decisions").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    canary_set = command(canary, "set", "set the weight")
    canary_set.add_argument("weight", type=_weight, help="in [0, 1]")
    change(canary_set, ttl=False)
    change(command(canary, "promote", "weight 1: the challenger decides all"), ttl=False)
    change(command(canary, "rollback", "weight 0: the champion decides all"), ttl=False)

    kill = command(commands, "kill-switch", "decisions for a scope become ABSTAIN")
    kill.add_argument("action", choices=["engage", "release"])
    kill.add_argument("scope", help='a symbol, or "*" for every symbol')
    change(kill, ttl=True)

    history = command(
        commands, "history", "admin changes in the audit store, every server's, newest first"
    )
    history.add_argument("--since", type=parse_duration, help="only the last: 90s, 15m, 2h")
    history.add_argument("--actor", default="", help="only this principal's changes")
    history.add_argument("--target", default="", help="only changes of this replica, flag, ...")
    history.add_argument(
        "--limit", type=int, default=0, help="at most this many, the newest (default 100)"
    )
    history.add_argument("--json", action="store_true", help="print the response as JSON")

    # No help of its own and no common options: every argument goes to the audit CLI.
    replay = commands.add_parser(
        "replay", add_help=False, help="replay recorded decisions (python -m server.audit replay)"
    )
    replay.add_argument("--database-url", help="SQLAlchemy URL of the audit store")
    return parser


# --- commands -------------------------------------------------------------------------

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)


@dataclass(frozen=True, slots=True)
class _Session:
    stub: pb_grpc.AdminServiceStub
    timeout_s: float
    metadata: tuple[tuple[str, str], ...]

    def call(self, method: grpc.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req) -> _Resp:
        return method(request, timeout=self.timeout_s, metadata=self.metadata)


def _check(args: argparse.Namespace) -> None:
    """Refuses a TTL where it would mean nothing, rather than let on-call count on it."""
    if getattr(args, "ttl", None) is None:
        return
    if args.command == "breaker" and args.mode == "auto":
        raise UsageError("--ttl applies to force-open and force-closed only")
    if args.command == "kill-switch" and args.action == "release":
        raise UsageError("--ttl applies to engage only")


def _run(session: _Session, args: argparse.Namespace) -> str:
    """Makes the command's call; returns what to print."""
    stub, call, command = session.stub, session.call, args.command
    if command == "status":
        status = call(stub.GetStatus, pb.GetStatusRequest())
        return to_json(status) if args.json else format_status(status)
    if command == "flags":
        listed = call(stub.ListFlags, pb.ListFlagsRequest())
        return to_json(listed) if args.json else format_flags(listed.flags)
    if command == "history":
        query = pb.ListAdminActionsRequest(actor=args.actor, target=args.target, limit=args.limit)
        if args.since:
            query.since.FromMicroseconds(time.time_ns() // 1000 - round(args.since * 1e6))
        history = call(stub.ListAdminActions, query)
        return to_json(history) if args.json else format_history(history.actions)
    ttl = getattr(args, "ttl", None) or 0.0
    if command == "breaker":
        mode = _MODES[args.mode]
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
        canary = pb.SetCanaryRequest(weight=weight, reason=args.reason)
        return format_canary_change(call(stub.SetCanary, canary))
    if command == "kill-switch":
        engaged = args.action == "engage"
        switch = pb.KillSwitchRequest(
            scope=args.scope, engaged=engaged, reason=args.reason, ttl_s=ttl
        )
        return format_kill_switch_change(args.scope, call(stub.KillSwitch, switch))
    raise AssertionError(f"unhandled command {command}")


def _replay(args: argparse.Namespace, rest: list[str]) -> int:
    # Imported here: the audit store's dependencies are not needed for the RPC commands.
    from server.audit.__main__ import main as audit_main

    prefix = ["--database-url", args.database_url] if args.database_url else []
    try:
        return audit_main([*prefix, "replay", *rest])
    except SystemExit as exc:  # its argparse exits on a usage error or --help
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR


def _write(stream: str, text: str) -> None:
    # Writes, not print(): the lint rules keep print() out of the server package.
    (sys.stdout if stream == "out" else sys.stderr).write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if rest and args.command != "replay":
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as exc:  # argparse's usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if args.command == "replay":
        return _replay(args, rest)

    address = getattr(args, "address", None) or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    timeout = getattr(args, "timeout", 5.0)
    try:
        _check(args)
        token = resolve_token(getattr(args, "token_file", None), os.environ)
        with channel(args, address) as open_channel:
            session = _Session(
                pb_grpc.AdminServiceStub(open_channel),
                timeout,
                (("authorization", f"Bearer {token}"),),
            )
            _write("out", _run(session, args))
    except UsageError as exc:
        _write("err", f"decisionctl: {exc}")
        return EXIT_REFUSED
    except grpc.RpcError as exc:
        code, message = rpc_error(exc, address)
        _write("err", message)
        return code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
