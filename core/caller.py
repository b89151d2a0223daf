"""How a caller's channel should treat a server's refusal to take more calls at once.

A decision server caps the calls one connection may have in flight (HTTP/2's
SETTINGS_MAX_CONCURRENT_STREAMS, enforced by gRPC's core). By default a gRPC client that
reaches the cap queues its next call inside the channel until a slot frees, where the
call can wait past its deadline. With ``CALLER_OPTIONS`` the channel refuses it at once
with RESOURCE_EXHAUSTED, and a call the server itself refuses (RST_STREAM, when the two
ends counted differently) fails at once with UNAVAILABLE instead of being retried on
the same connection: either way the caller can try another pod or decide without us.
"""

from __future__ import annotations

CALLER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http.max_concurrent_streams_reject_on_client", 1),
    # With retries on, gRPC holds the refused call to retry it: the queue again.
    ("grpc.enable_retries", 0),
)
