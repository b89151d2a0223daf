"""How a caller's channel should be set up: what it does with a server's refusal to take
more calls at once, and the service config every caller loads.

A decision server caps the calls one connection may have in flight (HTTP/2's
SETTINGS_MAX_CONCURRENT_STREAMS, enforced by gRPC's core). By default a gRPC client that
reaches the cap queues its next call inside the channel until a slot frees, where the
call can wait past its deadline. With ``CALLER_OPTIONS`` the channel refuses it at once
with RESOURCE_EXHAUSTED, and a call the server itself refuses (RST_STREAM, when the two
ends counted differently) fails at once with UNAVAILABLE instead of being retried on
the same connection: either way the caller can try another pod or decide without us.
"""

from __future__ import annotations

import json
from importlib import resources

CALLER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http.max_concurrent_streams_reject_on_client", 1),
    # With retries on, gRPC holds the refused call to retry it: the queue again.
    ("grpc.enable_retries", 0),
)


def service_config(*, python: bool = True) -> str:
    """``decision_grpc_service_config.json`` (beside the proto: proto/decision/v1), what
    every caller's channel loads (docs/kubernetes.md): round robin over the resolved
    pods, no waiting for a pod to be ready, a 0.5 s cap on a unary call's deadline (gRPC
    takes the lower of it and the caller's), none on a DecideStream. No retry policy:
    gRPC's retries would hold a refused call, the queue again; a caller retries a refusal
    by calling again, which round robin sends to the next pod.

    For a Python channel (``python``) without the cap: grpcio applies a service config's
    timeout wrongly, a call failing DEADLINE_EXCEEDED at once or up to a second early
    (grpc/grpc#34547, #40633; grpcio 1.85 here); a Python caller passes its deadline."""
    path = resources.files("decision_client.v1").joinpath("decision_grpc_service_config.json")
    config = json.loads(path.read_text())
    if python:
        for method in config["methodConfig"]:
            method.pop("timeout", None)
    return json.dumps(config)


def channel_options() -> list[tuple[str, int | str]]:
    """A caller's channel options: ``CALLER_OPTIONS`` and the service config."""
    return [*CALLER_OPTIONS, ("grpc.service_config", service_config())]
