"""``decision-probe [ADDRESS] [--service NAME] [--ca-file PEM --server-name NAME]``: exit 0
when the server's gRPC health service answers SERVING, 1 otherwise.

The container image's health check, and the Kubernetes probes of a server with TLS on
(``k8s/components/tls``): the kubelet's own gRPC probe speaks plaintext only.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel_to(address: str, ca_file: str, server_name: str) -> grpc.Channel:
    """Plaintext, or TLS trusting ``ca_file`` and expecting the certificate of
    ``server_name`` (the probe dials loopback, which the certificate does not name)."""
    if not ca_file:
        return grpc.insecure_channel(address)
    with open(ca_file, "rb") as pem:
        credentials = grpc.ssl_channel_credentials(root_certificates=pem.read())
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(
    address: str, service: str, timeout_s: float, *, ca_file: str = "", server_name: str = ""
) -> str:
    """The health status's name, or the gRPC error's code name when the call failed."""
    with channel_to(address, ca_file, server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return code.name if code is not None else type(exc).__name__
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="decision-probe", description=__doc__)
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help="health service name ('': the server)")
    parser.add_argument("--timeout-s", type=float, default=1.0)
    parser.add_argument("--ca-file", default="", help="PEM CA bundle: TLS (default plaintext)")
    parser.add_argument("--server-name", default="", help="name the server certificate has")
    args = parser.parse_args(argv)
    status = check(
        args.address,
        args.service,
        args.timeout_s,
        ca_file=args.ca_file,
        server_name=args.server_name,
    )
    if status == "SERVING":
        return 0
    print(f"{args.address} {args.service or '(server)'}: {status}", file=sys.stderr)  # noqa: T201
    return 1


if __name__ == "__main__":
    sys.exit(main())
