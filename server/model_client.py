"""Model clients: one replica's inference API behind one interface.

``ModelClient`` is what the router calls; ``TorchServeClient`` speaks TorchServe's
native gRPC inference API. Rows travel packed as little-endian float32 in one
``Predictions`` call, however many there are; the handler answers one score per row and
the model version (sha256 of the archive content) it was built from.

::

    ModelCallError              a replica failure; counts against its breaker
    ├── ModelTimeout            the call's deadline passed
    ├── ModelUnavailable        connection refused / reset, replica error status
    └── ModelResponseError      an answer we cannot use (wrong count, bad JSON)
    ModelInputError             the replica rejected our rows; not the replica's fault
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from proto.third_party.torchserve import inference_pb2, inference_pb2_grpc


@dataclass(frozen=True, slots=True)
class ModelScores:
    model_name: str
    model_version: str
    scores: list[float]
    elapsed_ms: float


class ModelCallError(Exception):
    """A replica failed to score; the message is a reason fragment ("timed out after ...")."""


class ModelTimeout(ModelCallError):
    def __init__(self, message: str, *, budget_limited: bool = False) -> None:
        super().__init__(message)
        # True when the caller's budget left the call too little time to judge the
        # replica by: then the timeout says nothing about the replica.
        self.budget_limited = budget_limited


class ModelUnavailable(ModelCallError):
    pass


class ModelResponseError(ModelCallError):
    pass


class ModelInputError(Exception):
    """The replica rejected the rows (wrong width, non-finite value)."""


def not_the_replicas_fault(exc: BaseException) -> bool:
    """Errors a replica's breaker must not count: our rows, or our caller's short budget."""
    return isinstance(exc, ModelInputError) or (
        isinstance(exc, ModelTimeout) and exc.budget_limited
    )


class ModelClient(Protocol):
    name: str
    model_name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def connect(self, timeout_s: float) -> bool:
        """Opens the connection ahead of the first call; False if the replica is not there."""
        ...

    async def predict(
        self, rows: Sequence[Sequence[float]], timeout_s: float, *, budget_limited: bool = False
    ) -> ModelScores:
        """Scores ``rows`` within ``timeout_s`` or raises ``ModelCallError``.

        ``budget_limited``: the caller's budget left this call too little time to judge
        the replica by; a timeout then is marked as not the replica's fault.
        """
        ...


def pack_rows(rows: Sequence[Sequence[float]]) -> bytes:
    flat = [v for row in rows for v in row]
    return struct.pack(f"<{len(flat)}f", *flat)


class TorchServeClient:
    """TorchServe's gRPC inference API (``Predictions``) on one replica."""

    def __init__(
        self, name: str, address: str, model_name: str, *, reconnect_backoff_ms: int = 500
    ) -> None:
        self.name = name
        self.address = address
        self.model_name = model_name
        self._options = [
            # Come back quickly after a replica restart instead of backing off for minutes.
            ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(100, reconnect_backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", reconnect_backoff_ms),
            ("grpc.enable_retries", 0),  # the one retry is ours, to another replica
        ]
        self._channel: grpc.aio.Channel | None = None
        self._stub: inference_pb2_grpc.InferenceAPIsServiceAsyncStub | None = None

    async def start(self) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)

    async def connect(self, timeout_s: float) -> bool:
        if self._channel is None:
            return False
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def predict(
        self, rows: Sequence[Sequence[float]], timeout_s: float, *, budget_limited: bool = False
    ) -> ModelScores:
        if self._stub is None:
            raise ModelUnavailable(f"{self.name} client not started")
        try:
            packed = pack_rows(rows)
        except (OverflowError, struct.error) as exc:
            raise ModelInputError(f"rows cannot be sent as float32: {exc}") from None
        request = inference_pb2.PredictionsRequest(
            model_name=self.model_name, input={"rows": packed}
        )
        started = time.perf_counter()
        try:
            response = await self._stub.Predictions(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ModelTimeout(
                    f"{self.name} deadline exceeded after {elapsed_ms:.1f} ms",
                    budget_limited=budget_limited,
                ) from None
            raise ModelUnavailable(
                f"{self.name} {exc.code().name.lower()} after {elapsed_ms:.1f} ms"
                f" ({(exc.details() or '').strip()[:120]})"
            ) from None
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return self._parse(response.prediction, len(rows), elapsed_ms)

    def _parse(self, payload: bytes, expected: int, elapsed_ms: float) -> ModelScores:
        try:
            doc = json.loads(payload)
        except ValueError:
            raise ModelResponseError(f"{self.name} answered with non-JSON") from None
        if not isinstance(doc, dict):
            raise ModelResponseError(f"{self.name} answered JSON that is not an object")
        if "error" in doc:
            raise ModelInputError(f"{self.name} rejected the rows: {doc['error']}")
        scores = doc.get("scores")
        if not isinstance(scores, list) or len(scores) != expected:
            raise ModelResponseError(
                f"{self.name} answered {len(scores) if isinstance(scores, list) else 'no'}"
                f" scores for {expected} rows"
            )
        if not all(isinstance(s, (int, float)) and 0.0 <= s <= 1.0 for s in scores):
            raise ModelResponseError(f"{self.name} answered a score outside [0, 1]")
        version = doc.get("model_version")
        if not isinstance(version, str) or not version:
            raise ModelResponseError(f"{self.name} answered without a model version")
        return ModelScores(self.model_name, version, [float(s) for s in scores], elapsed_ms)
