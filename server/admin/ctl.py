"""``decisionctl``: on-call control of the decision servers through AdminService.

    decisionctl status [--json]
    decisionctl breaker primary force-open --reason "replica OOM, INC-123" --ttl 15m
    decisionctl flags
    decisionctl flag set shadow_sample_rate 0.05 --reason "more shadow traffic" --ttl 2h
    decisionctl flag reset shadow_sample_rate --reason "back to normal"
    decisionctl canary set 0.1 --reason "start canary" | promote | rollback --reason ...
    decisionctl kill-switch engage AAPL --reason "halted" --ttl 30m
    decisionctl kill-switch release '*' --reason "all clear"
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
import datetime as dt
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from proto.decision.v1 import admin_pb2 as pb
from proto.decision.v1 import admin_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50052"
ADDRESS_ENV = "DECISIONCTL_ADDRESS"
# Names of environment variables, not secrets.
TOKEN_ENV = "DECISIONCTL_TOKEN"  # noqa: S105
TOKEN_FILE_ENV = "DECISIONCTL_TOKEN_FILE"  # noqa: S105
MODEL_VERSION_SHOWN = 12

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3
_REFUSED = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
}
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

_MODES = {
    "auto": pb.BREAKER_MODE_AUTO,
    "force-open": pb.BREAKER_MODE_FORCE_OPEN,
    "force-closed": pb.BREAKER_MODE_FORCE_CLOSED,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh]?)")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


class UsageError(Exception):
    """A bad combination of arguments, or a file the CLI needs that cannot be read."""


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


# --- formatting (pure) ----------------------------------------------------------------


def _time(ts: Timestamp) -> str:
    return ts.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _mode(mode: pb.BreakerMode.ValueType) -> str:
    return pb.BreakerMode.Name(mode).removeprefix("BREAKER_MODE_")


def _num(value: float) -> str:
    return f"{value:g}"


def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size, unit = count / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def format_change(change: pb.ChangeInfo) -> str:
    """``by alice at ..., until ...: reason`` (parts that are unset are left out)."""
    text = f"by {change.changed_by or '?'}"
    if change.HasField("changed_at"):
        text += f" at {_time(change.changed_at)}"
    if change.HasField("expires_at"):
        text += f", until {_time(change.expires_at)}"
    return f"{text}: {change.reason}" if change.reason else text


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], indent: str = "  ") -> str:
    """Left-aligned columns separated by two spaces; a header line, then one per row."""
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        (indent + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))).rstrip()
        for line in lines
    )


def format_flags(flags: Iterable[pb.Flag]) -> str:
    rows = [
        [
            flag.name,
            flag.value,
            flag.default_value,
            format_change(flag.change) if flag.HasField("change") else "",
        ]
        for flag in flags
    ]
    if not rows:
        return "  (no flags)"
    return format_table(["NAME", "VALUE", "DEFAULT", "CHANGED"], rows)


def _format_replicas(status: pb.GetStatusResponse) -> list[str]:
    if not status.replicas:
        return ["  (no replicas)"]
    rows, overrides = [], []
    for replica in status.replicas:
        version = replica.model_version or status.model_versions.get(replica.name, "")
        rows.append(
            [
                replica.name,
                replica.address,
                replica.breaker_state,
                _mode(replica.mode),
                str(replica.recent_calls),
                str(replica.recent_failures),
                f"{replica.recent_p50_ms:.1f}",
                f"{replica.recent_p99_ms:.1f}",
                version[:MODEL_VERSION_SHOWN] or "-",
            ]
        )
        # AUTO has no override to explain; UNSPECIFIED is shown as it is, without one.
        if replica.mode != pb.BREAKER_MODE_AUTO and replica.HasField("override"):
            overrides.append(
                f"  {replica.name} {_mode(replica.mode)} {format_change(replica.override)}"
            )
    headers = ["NAME", "ADDRESS", "BREAKER", "MODE", "CALLS", "FAILS", "P50MS", "P99MS", "MODEL"]
    return [format_table(headers, rows), *overrides]


def _format_canary(canary: pb.CanaryStatus) -> list[str]:
    line = f"  weight {_num(canary.weight)}"
    if canary.HasField("change"):
        line += f" ({format_change(canary.change)})"
    line += f", auto-rollback {'on' if canary.auto_rollback else 'off'}"
    windows = [
        [
            name,
            str(window.decisions),
            f"{window.error_rate:.2%}",
            f"{window.p99_ms:.1f}",
            f"{window.fallback_rate:.2%}",
        ]
        for name, window in (("canary", canary.canary), ("champion", canary.champion))
    ]
    table = format_table(["WINDOW", "DECISIONS", "ERRORS", "P99MS", "FALLBACK"], windows)
    return [line, table, f"  score psi {canary.score_psi:.4f}"]


def format_status(status: pb.GetStatusResponse) -> str:
    """GetStatus for a human: a header, then one section per topic."""
    shared = status.shared_state
    if shared.in_sync:
        sync = f"in sync, version {shared.version}"
    else:
        sync = f"OUT OF SYNC (keeping version {shared.version}): {shared.error or '?'}"
    if shared.HasField("synced_at"):
        sync += f", last synced {_time(shared.synced_at)}"
    out = [f"server        {status.server_id or '?'}", f"shared state  {sync}", "", "replicas"]
    out += _format_replicas(status)
    out += ["", "kill switches"]
    out += [
        f"  {switch.scope} ENGAGED {format_change(switch.change)}"
        for switch in status.kill_switches
    ] or ["  (none engaged)"]
    out += ["", "flags", format_flags(status.flags), "", "canary"]
    out += _format_canary(status.canary)
    out += ["", "features"]
    if status.features:
        ages = [
            [f.symbol, "no record" if f.age_ms < 0 else f"{f.age_ms:.0f} ms"]
            for f in status.features
        ]
        out.append(format_table(["SYMBOL", "AGE"], ages))
    else:
        out.append("  (no symbols)")
    audit = status.audit
    store = "store ok" if audit.store_ok else "store FAILING"
    backlog = f"  {store}, backlog {_bytes(audit.backlog_bytes)}"
    if audit.last_error:
        backlog += f", last error: {audit.last_error}"
    out += ["", "audit", backlog]
    return "\n".join(out)


def _until(expires_at: Timestamp, has_expiry: bool, ongoing: bool) -> str:
    if has_expiry:
        return f" (until {_time(expires_at)})"
    return " (until changed)" if ongoing else ""


def format_breaker_change(replica: str, response: pb.SetBreakerResponse) -> str:
    ongoing = response.after != pb.BREAKER_MODE_AUTO
    until = _until(response.expires_at, response.HasField("expires_at"), ongoing)
    return f"breaker {replica}: {_mode(response.before)} -> {_mode(response.after)}{until}"


def format_flag_change(response: pb.SetFlagResponse) -> str:
    after = response.after
    if after.HasField("change") and after.change.HasField("expires_at"):
        note = f" (default {after.default_value}, until {_time(after.change.expires_at)})"
    elif after.value == after.default_value:
        note = " (the default)"
    else:
        note = f" (default {after.default_value})"
    return (
        f"flag {after.name or response.before.name}: {response.before.value} -> {after.value}{note}"
    )


def format_canary_change(response: pb.SetCanaryResponse) -> str:
    return f"canary weight: {_num(response.before)} -> {_num(response.after)}"


def format_kill_switch_change(scope: str, response: pb.KillSwitchResponse) -> str:
    def state(engaged: bool) -> str:
        return "engaged" if engaged else "released"

    until = _until(response.expires_at, response.HasField("expires_at"), response.after)
    return f"kill switch {scope}: {state(response.before)} -> {state(response.after)}{until}"


def to_json(message: Message) -> str:
    # Fields at their zero value are printed too: `"in_sync": false` must not vanish.
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


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

    # No help of its own and no common options: every argument goes to the audit CLI.
    replay = commands.add_parser(
        "replay", add_help=False, help="replay recorded decisions (python -m server.audit replay)"
    )
    replay.add_argument("--database-url", help="SQLAlchemy URL of the audit store")
    return parser


# --- connection -----------------------------------------------------------------------


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None


def resolve_token(token_file: str | None, environ: Mapping[str, str]) -> str:
    """The token from ``--token-file``, else $DECISIONCTL_TOKEN, else $DECISIONCTL_TOKEN_FILE."""
    if token_file is None and environ.get(TOKEN_ENV, "").strip():
        return environ[TOKEN_ENV].strip()
    path = token_file or environ.get(TOKEN_FILE_ENV, "")
    if not path:
        raise UsageError(
            f"no admin token: give --token-file PATH, or set {TOKEN_ENV} or {TOKEN_FILE_ENV}"
        )
    # The message names the file, never its content.
    token = _read(path, "token file").decode(errors="replace").strip()
    if not token:
        raise UsageError(f"token file {path} is empty")
    return token


def _channel(args: argparse.Namespace, address: str) -> grpc.Channel:
    ca, cert, key = (getattr(args, name, None) for name in ("ca_file", "cert_file", "key_file"))
    server_name = getattr(args, "server_name", None)
    if (cert is None) != (key is None):
        raise UsageError("--cert-file and --key-file go together")
    if ca is None and cert is None:
        if server_name is not None:
            raise UsageError("--server-name needs TLS: give --ca-file")
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA file") if ca else None,
        private_key=_read(key, "key file") if key else None,
        certificate_chain=_read(cert, "certificate file") if cert else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def rpc_error(exc: grpc.RpcError, address: str) -> tuple[int, str]:
    """The exit code and the one-line message for a failed call."""
    code = exc.code()
    name = code.name.lower().replace("_", " ") if code else "unknown"
    details = exc.details() or "no details"
    if code in _UNREACHABLE:
        return EXIT_UNREACHABLE, f"decisionctl: {name}: {details} (admin server {address})"
    return (EXIT_REFUSED if code in _REFUSED else EXIT_ERROR), f"decisionctl: {name}: {details}"


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
        with _channel(args, address) as channel:
            session = _Session(
                pb_grpc.AdminServiceStub(channel), timeout, (("authorization", f"Bearer {token}"),)
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
