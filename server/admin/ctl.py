"""``decisionctl``: on-call control of the decision servers through AdminService.

    decisionctl status | servers | top | flags | history --since 2h
    decisionctl breaker primary force-open --reason "replica OOM, INC-123" --ttl 15m

The token comes from --token-file or the environment, never an option (shell history,
``ps``). Exit codes: 0 done; 1 any other error; 2 refused or a usage error; 3 the server
did not answer. ``replay`` and ``timeline`` read the audit store, not a server, and exit
with the audit CLI's codes. Every command and lever: docs/oncall.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from core import chaos as chaos_protocol
from core.cli_args import parse_duration, parse_time, positive_number
from decision_client.v1 import admin_pb2_grpc as pb_grpc
from server.admin.ctl_commands import (
    BREAKER_MODES,
    AdminSession,
    run_admin_command,
    run_audit_command,
    run_chaos_command,
)
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

# Commands of the audit CLI (``python -m server.audit``) that decisionctl runs too: they
# read the audit store (--database-url or DECISION_AUDIT__DATABASE_URL), not a server, and
# exit with the audit CLI's own codes.
AUDIT_COMMANDS = {
    "replay": "score recorded decisions again and compare (--help)",
    "timeline": "recorded decisions over time: sources, time taken, fallback reasons (--help)",
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
    # No --token: a token on the command line lands in shell history and ``ps``.
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
    breaker.add_argument("mode", choices=sorted(BREAKER_MODES), help="auto removes the override")
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


def _check_ttl(args: argparse.Namespace) -> None:
    """Refuses a TTL where it would mean nothing, rather than let on-call count on it."""
    if getattr(args, "ttl", None) is None:
        return
    if args.command == "breaker" and args.mode == "auto":
        raise UsageError("--ttl applies to force-open and force-closed only")
    if args.command == "kill-switch" and args.action == "release":
        raise UsageError("--ttl applies to engage only")


# --- dispatch -------------------------------------------------------------------------


def _write(stream: str, text: str) -> None:
    # Writes, not print(): the lint rules keep print() out of the server package.
    (sys.stdout if stream == "out" else sys.stderr).write(text + "\n")


# Options whose value may look like a negative number: argparse would take ``-5m`` for
# an option and say "expected one argument"; joined (``--ttl=-5m``), the value's own
# check says what is wrong with it.
_NUMERIC_OPTIONS = frozenset(
    ("--ttl", "--since", "--until", "--timeout", "--limit", "--interval", "--frames")
)


def _join_negative_values(argv: list[str]) -> list[str]:
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in _NUMERIC_OPTIONS and arg[:1] == "-" and arg[1:2].isdigit():
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv: list[str] | None = None) -> int:
    """Runs one decisionctl command; returns its exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(
            _join_negative_values(sys.argv[1:] if argv is None else argv)
        )
        if rest and args.command not in AUDIT_COMMANDS:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as exc:  # argparse's usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if args.command in AUDIT_COMMANDS:
        return run_audit_command(args, rest)
    if args.command == "chaos":
        code, printed = run_chaos_command(args)
        _write("out" if code == EXIT_OK else "err", printed)
        return code

    address = getattr(args, "address", None) or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    args.address = address
    timeout = getattr(args, "timeout", 5.0)
    try:
        _check_ttl(args)
        token = resolve_token(getattr(args, "token_file", None), os.environ)
        with channel(args, address) as open_channel:
            session = AdminSession(
                pb_grpc.AdminServiceStub(open_channel),
                timeout,
                (("authorization", f"Bearer {token}"),),
            )
            printed = run_admin_command(session, args)
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
