"""``decisionctl``: on-call control of the decision servers through AdminService.

    decisionctl status [--json]
    decisionctl servers [--json]
    decisionctl top [--interval 1] [--frames N]
    decisionctl breaker primary force-open --reason "replica OOM, INC-123" --ttl 15m
    decisionctl flags
    decisionctl flag set shadow_sample_rate 0.05 --reason "more shadow traffic" --ttl 2h
    decisionctl flag reset shadow_sample_rate --reason "back to normal"
    decisionctl canary set 0.1 --reason "start canary" | promote [--force] | rollback --reason ...
    decisionctl kill-switch engage AAPL --reason "halted" --ttl 30m
    decisionctl kill-switch release '*' --reason "all clear"
    decisionctl history --since 2h --actor alice --target primary
    decisionctl replay --since 2026-11-21T09:00 --until 2026-11-21T10:00
    decisionctl timeline --since 15m --step 10s
    decisionctl chaos pause primary        (the local stack only; then: resume primary)

The server is ``--address`` or DECISIONCTL_ADDRESS (default 127.0.0.1:50052). The bearer
token is read from ``--token-file``, DECISIONCTL_TOKEN or DECISIONCTL_TOKEN_FILE; there is
no ``--token`` so that it never lands in shell history or ``ps``. TLS when ``--ca-file``
or ``--cert-file`` is given. Durations: 90, 90s, 15m, 2h.

Exit codes: 0 done; 1 any other error; 2 refused (no or bad token, not allowed, bad
argument, precondition) or a usage error; 3 the server did not answer. ``replay`` and
``timeline`` read the audit store (``--database-url`` or DECISION_AUDIT__DATABASE_URL), not
the server, and exit with the audit CLI's own codes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from core import chaos as chaos_protocol
from core.cli_args import parse_duration, parse_time, positive_number
from proto.decision.v1 import admin_pb2 as pb
from proto.decision.v1 import admin_pb2_grpc as pb_grpc
from server.admin.ctl_connection import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
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
    format_servers,
    format_status,
    to_json,
)

# Commands of the audit CLI (``python -m server.audit``) that decisionctl runs too.
AUDIT_COMMANDS = {
    "replay": "score recorded decisions again and compare (--help)",
    "timeline": "recorded decisions over time: sources, time taken, fallback reasons (--help)",
}

_MODES = {
    "auto": pb.BREAKER_MODE_AUTO,
    "force-open": pb.BREAKER_MODE_FORCE_OPEN,
    "force-closed": pb.BREAKER_MODE_FORCE_CLOSED,
}


# --- argument types -------------------------------------------------------------------


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid weight {text!r}: a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid weight {text!r}: must be in [0, 1]")
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
    common.add_argument("--timeout", type=positive_number, help="seconds per call (default 5)")
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

    servers = command(
        commands, "servers", "every server process registered in the shared store (the fleet)"
    )
    servers.add_argument("--json", action="store_true", help="print the response as JSON")

    top = command(
        commands,
        "top",
        "live view: decisions/s by source, fallbacks, every server, breakers, features",
    )
    top.add_argument(
        "--interval", type=positive_number, default=1.0, help="seconds between frames (default 1)"
    )
    top.add_argument(
        "--frames", type=int, default=0, help="stop after this many frames (default: Ctrl-C)"
    )
    top.add_argument(
        "--consumer-metrics",
        help="the feature-cache consumer's /metrics URL, for its lag (default: the local "
        "stack's, when --address is on loopback)",
    )
    top.add_argument(
        "--labeler-metrics",
        help="the labeler's /metrics URL, for the live AUC (default: the local stack's, "
        "when --address is on loopback)",
    )

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
    promote = command(canary, "promote", "weight 1: the challenger decides all")
    promote.add_argument(
        "--force",
        action="store_true",
        help="even if the server has not judged a canary at a lower weight (audited)",
    )
    change(promote, ttl=False)
    change(command(canary, "rollback", "weight 0: the champion decides all"), ttl=False)

    kill = command(commands, "kill-switch", "decisions for a scope become ABSTAIN")
    kill.add_argument("action", choices=["engage", "release"])
    kill.add_argument("scope", help='a symbol, or "*" for every symbol')
    change(kill, ttl=True)

    history = command(
        commands, "history", "admin changes in the audit store, every server's, newest first"
    )
    history.add_argument(
        "--since", type=parse_time, help="from this time on: 15m, 2h (ago) or 2026-11-21T09:00"
    )
    history.add_argument("--until", type=parse_time, help="before this time: as --since")
    history.add_argument("--actor", default="", help="only this principal's changes")
    history.add_argument("--target", default="", help="only changes of this replica, flag, ...")
    history.add_argument(
        "--limit", type=int, default=0, help="at most this many, the newest (default 100)"
    )
    history.add_argument("--json", action="store_true", help="print the response as JSON")

    chaos = commands.add_parser(
        "chaos",
        help="faults in the local stack (make run) only: pause, slow, kill a replica, ...",
        description="Injects a fault into a process of the local stack that `make run` "
        "started from this checkout (it refuses anything else): a TorchServe replica "
        f"({', '.join(chaos_protocol.REPLICAS)}: {', '.join(chaos_protocol.REPLICA_ACTIONS)}) "
        f"or {' / '.join(chaos_protocol.SERVICES)} "
        f"({', '.join(chaos_protocol.SERVICE_ACTIONS)}; redis also "
        f"{chaos_protocol.RESTART_EMPTY}: stopped and started, back with no keys). Prints what "
        "was done and what to watch.",
    )
    chaos.add_argument("action", choices=chaos_protocol.ACTIONS)
    chaos.add_argument("target", choices=(*chaos_protocol.REPLICAS, *chaos_protocol.SERVICES))
    chaos.add_argument(
        "--run-dir", default=".run", help="the local stack's run folder (default .run)"
    )
    chaos.add_argument(
        "--stopped-ms", type=positive_number, default=20.0, help="slow: ms off the CPU per cycle"
    )
    chaos.add_argument(
        "--running-ms", type=positive_number, default=20.0, help="slow: ms on the CPU per cycle"
    )

    # No help of their own and no common options: every argument goes to the audit CLI.
    for name, text in AUDIT_COMMANDS.items():
        audit = commands.add_parser(name, add_help=False, help=text)
        audit.add_argument("--database-url", help="SQLAlchemy URL of the audit store")
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
        if args.json:
            return to_json(status)
        return format_status(status) + "\n\nfleet\n" + _fleet(session)
    if command == "top":
        # Imported here: rich is needed by this command only.
        from server.admin import ctl_top

        consumer_url, labeler_url = ctl_top.local_stack_metrics(args.address)
        consumer_url = args.consumer_metrics or consumer_url
        labeler_url = args.labeler_metrics or labeler_url

        def read() -> ctl_top.Sample:
            status = call(stub.GetStatus, pb.GetStatusRequest())
            fleet = call(stub.ListServers, pb.ListServersRequest())
            return ctl_top.Sample(
                time.monotonic(),
                status,
                list(fleet.servers),
                consumer=ctl_top.consumer_text(consumer_url),
                quality=ctl_top.quality_text(labeler_url),
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


def _fleet(session: _Session) -> str:
    """The fleet table for ``status``; a server that cannot list it still shows its own
    status, with why the list is missing."""
    try:
        listed = session.call(session.stub.ListServers, pb.ListServersRequest())
    except grpc.RpcError as exc:
        return f"  (not listed: {exc.code().name} {exc.details()})"
    return format_servers(listed.servers, time.time())


def _audit(args: argparse.Namespace, rest: list[str]) -> int:
    """``replay`` and ``timeline``: the audit CLI's commands, run here."""
    # Imported here: the audit store's dependencies are not needed for the RPC commands.
    from server.audit.__main__ import main as audit_main

    prefix = ["--database-url", args.database_url] if args.database_url else []
    try:
        return audit_main([*prefix, args.command, *rest], prog="decisionctl")
    except SystemExit as exc:  # its argparse exits on a usage error or --help
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR


def _chaos(args: argparse.Namespace) -> int:
    request = chaos_protocol.ChaosRequest(
        args.action, args.target, stopped_ms=args.stopped_ms, running_ms=args.running_ms
    )
    try:
        # A restart waits for TorchServe to load its model: up to about 90 s.
        answer = chaos_protocol.ask(Path(args.run_dir), request, timeout_s=120.0)
    except chaos_protocol.NoLocalStack as exc:
        _write("err", f"decisionctl: {exc}")
        return EXIT_REFUSED
    except OSError as exc:
        _write("err", f"decisionctl: the local stack did not answer: {exc}")
        return EXIT_UNREACHABLE
    if not answer.ok:
        _write("err", f"decisionctl: refused: {answer.message}")
        return EXIT_REFUSED
    _write("out", answer.message)
    _write("out", f"watch: {answer.watch}")
    return EXIT_OK


def _write(stream: str, text: str) -> None:
    # Writes, not print(): the lint rules keep print() out of the server package.
    (sys.stdout if stream == "out" else sys.stderr).write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if rest and args.command not in AUDIT_COMMANDS:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as exc:  # argparse's usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if args.command in AUDIT_COMMANDS:
        return _audit(args, rest)
    if args.command == "chaos":
        return _chaos(args)

    address = getattr(args, "address", None) or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    args.address = address
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
            printed = _run(session, args)
            if printed:
                _write("out", printed)
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
