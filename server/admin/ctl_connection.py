"""``decisionctl``'s connection to an admin server: the token, the channel (TLS when
asked), and what a failed call means for the exit code."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import grpc

from decision_client.channel import CALLER_OPTIONS

DEFAULT_ADDRESS = "127.0.0.1:50052"
ADDRESS_ENV = "DECISIONCTL_ADDRESS"
# Names of environment variables, not secrets.
TOKEN_ENV = "DECISIONCTL_TOKEN"  # noqa: S105
TOKEN_FILE_ENV = "DECISIONCTL_TOKEN_FILE"  # noqa: S105

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3
_REFUSED = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
}
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class UsageError(Exception):
    """A bad combination of arguments, or a file the CLI needs that cannot be read."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None


def resolve_token(token_file: str | None, environ: Mapping[str, str]) -> str:
    """The token from ``--token-file``, else $DECISIONCTL_TOKEN, else $DECISIONCTL_TOKEN_FILE."""
    if token_file is None and environ.get(TOKEN_ENV, "").strip():
        return _token(environ[TOKEN_ENV].encode(errors="surrogateescape"), f"${TOKEN_ENV}")
    path = token_file or environ.get(TOKEN_FILE_ENV, "")
    if not path:
        raise UsageError(
            f"no admin token: give --token-file PATH, or set {TOKEN_ENV} or {TOKEN_FILE_ENV}"
        )
    raw = _read(path, "token file").strip()
    if not raw:
        raise UsageError(f"token file {path} is empty")
    return _token(raw, f"token file {path}")


def _token(raw: bytes, where: str) -> str:
    """The token in ``raw``; it travels in a gRPC header, so it is one word of printable
    ASCII. The message names where it came from, never its content."""
    token = raw.strip()
    if not all(0x21 <= byte <= 0x7E for byte in token):
        raise UsageError(f"{where} does not hold a token: one word of printable ASCII expected")
    return token.decode("ascii")


def channel(args: argparse.Namespace, address: str) -> grpc.Channel:
    ca, cert, key = (getattr(args, name, None) for name in ("ca_file", "cert_file", "key_file"))
    server_name = getattr(args, "server_name", None)
    if (cert is None) != (key is None):
        raise UsageError("--cert-file and --key-file go together")
    if ca is None and cert is None:
        if server_name is not None:
            raise UsageError("--server-name needs TLS: give --ca-file")
        return grpc.insecure_channel(address, options=CALLER_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA file") if ca else None,
        private_key=_read(key, "key file") if key else None,
        certificate_chain=_read(cert, "certificate file") if cert else None,
    )
    name = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=[*CALLER_OPTIONS, *name])


def rpc_error(exc: grpc.RpcError, address: str) -> tuple[int, str]:
    """The exit code and the one-line message for a failed call."""
    code = exc.code()
    name = code.name.lower().replace("_", " ") if code else "unknown"
    details = exc.details() or "no details"
    if code in _UNREACHABLE:
        return EXIT_UNREACHABLE, f"decisionctl: {name}: {details} (admin server {address})"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return EXIT_ERROR, (
            f"decisionctl: {address} does not serve decision.v1.AdminService ({details}): is it"
            f" the admin port? (the admin server listens on {DEFAULT_ADDRESS.split(':')[1]} by"
            " default, the decisions on 50051)"
        )
    return (EXIT_REFUSED if code in _REFUSED else EXIT_ERROR), f"decisionctl: {name}: {details}"
