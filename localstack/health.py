"""Readiness probe of a decision server: its gRPC health service says SERVING."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DECISION_SERVICE = "decision.v1.DecisionService"


def serving(port: int, *, host: str = "127.0.0.1", timeout_s: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=DECISION_SERVICE), timeout=timeout_s
            )
    except grpc.RpcError:
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
