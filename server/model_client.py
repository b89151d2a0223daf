"""Model clients: one replica's inference API behind one interface.

``ModelClient`` is what the router calls; ``GrpcModelClient`` holds what every gRPC client
shares (the channel, abandoned calls, errors); ``TorchServeClient`` speaks TorchServe's
native ``Predictions``, ``server.oip.OipClient`` the Open Inference Protocol. A call we
stop waiting for is abandoned, never cancelled: TorchServe loses a worker whose call is
cancelled (pytorch/serve issues 1888 and 3087). Abandoned calls are bounded per replica
(past the bound, ``ModelBusy``). Failures: ``server.model_errors``. The protocols:
docs/model-serving.md; abandoned calls: docs/runbook.md#model-calls-abandoned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from core.abandon import AbandonPool, Work
from core.deadline import MAX_ABANDONED_CALLS, WIRE_TIMEOUT_S
from feature_cache.schema import pack_rows, representable
from proto.third_party.torchserve import inference_pb2, inference_pb2_grpc
from server.model_errors import (
    ModelBusy,
    ModelInputError,
    ModelResponseError,
    ModelTimeout,
    ModelUnavailable,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelScores:
    model_name: str
    model_version: str
    scores: list[float]
    elapsed_ms: float


@dataclass(frozen=True, slots=True)
class AbandonedCalls:
    """Calls a replica's client stopped waiting for and left to finish on the wire."""

    outstanding: int  # still out now
    total: int  # abandoned since start
    refused: int  # calls not sent because ``outstanding`` was at the bound


class ModelClient(Protocol):
    name: str
    model_name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def connect(self, timeout_s: float) -> bool:
        """Opens the connection ahead of the first call; False if the replica is not there."""
        ...

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        """Scores ``rows`` within ``timeout_s`` or raises ``ModelCallError``; a call not
        answered by then (or whose caller is cancelled) is abandoned, never cancelled."""
        ...


def timeout_error(name: str, elapsed_ms: float, wait_ms: float) -> ModelTimeout:
    """A wait of ``wait_ms`` that ended unanswered: the replica had all of it."""
    return ModelTimeout(f"{name} deadline exceeded after {elapsed_ms:.1f} ms", given_ms=wait_ms)


def check_float32(rows: Sequence[Sequence[float]]) -> None:
    """Raises ``ModelInputError`` for a value the model cannot take. Checked before the
    call on either protocol: packed float32 overflows, and TorchServe's OIP frontend
    cannot even encode a non-finite value for its handler."""
    for row in rows:
        for value in row:
            if not representable(value):
                raise ModelInputError(
                    f"rows cannot be sent as float32: {value!r} is not finite or out of range"
                )


def channel_options(reconnect_backoff_ms: int) -> list[tuple[str, int]]:
    return [
        # Come back quickly after a replica restart instead of backing off for minutes.
        ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, reconnect_backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", reconnect_backoff_ms),
        ("grpc.enable_retries", 0),  # the one retry is ours, to another replica
    ]


_Response = TypeVar("_Response")
_Answer_co = TypeVar("_Answer_co", covariant=True)


class Rpc(Work, Protocol[_Answer_co]):
    """A call on the wire as ``_call`` needs it: a grpc.aio call, awaited for its answer
    once done, when awaiting it does not wait (an asyncio task is one too, for tests)."""

    def __await__(self) -> Generator[Any, None, _Answer_co]: ...


# Statuses a call ends with without the replica having answered it.
NO_WORD_FROM_REPLICA = frozenset(
    {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
)


class GrpcModelClient:
    """One replica over one gRPC channel; subclasses build the call and read the answer.

    Each RPC carries ``WIRE_TIMEOUT_S`` on the wire, however short the caller's wait.
    ``max_abandoned_calls``: calls left running on the wire after their caller stopped
    waiting, at most; past it a call is refused with ``ModelBusy``.
    """

    def __init__(
        self,
        name: str,
        address: str,
        model_name: str,
        *,
        reconnect_backoff_ms: int = 500,
        max_abandoned_calls: int = MAX_ABANDONED_CALLS,
        model_version: str = "",
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        """``interceptors``: on the channel (tracing's, when on)."""
        self.name = name
        self.address = address
        self.model_name = model_name
        # Reported for every answer instead of the replica's own word, when set.
        self.model_version = model_version
        self._options = channel_options(reconnect_backoff_ms)
        self._interceptors = list(interceptors)
        self._channel: grpc.aio.Channel | None = None
        self._abandoned = AbandonPool(max_abandoned_calls, on_end=self._note_answer)
        self._answered_at = float("-inf")  # monotonic: the replica's last answer of any kind

    async def start(self) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.address, options=self._options, interceptors=self._interceptors or None
            )
            self._bind(self._channel)

    def _bind(self, channel: grpc.aio.Channel) -> None:
        raise NotImplementedError

    async def connect(self, timeout_s: float) -> bool:
        """Whether the channel connected within ``timeout_s``; False at once when the
        replica refuses the connection (nothing there to wait for)."""
        channel = self._channel
        if channel is None:
            return False
        state = channel.get_state(try_to_connect=True)
        try:
            async with asyncio.timeout(timeout_s):
                while state is not grpc.ChannelConnectivity.READY:
                    if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                        return False
                    await channel.wait_for_state_change(state)
                    state = channel.get_state(try_to_connect=True)
        except TimeoutError:
            return False
        return True

    async def stop(self, grace_s: float = 1.0) -> None:
        """Closes the channel; abandoned calls get up to ``grace_s`` to finish first (a
        call still out then is cancelled with the channel)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await self._abandoned.drain(grace_s)
            await channel.close()

    def abandoned(self) -> AbandonedCalls:
        pool = self._abandoned
        return AbandonedCalls(pool.outstanding, pool.total, pool.refused)

    async def _call(
        self,
        call: Callable[[float], Rpc[_Response]],
        timeout_s: float,
    ) -> tuple[_Response, float]:
        """Starts ``call(wire_timeout_s)`` and waits for it up to ``timeout_s``; the
        answer and its round trip in ms, or a ``ModelCallError``. The RPC is never
        cancelled here: when the wait ends, or the caller is cancelled, it is abandoned."""
        if self._channel is None:
            raise ModelUnavailable(f"{self.name} client not started")
        if timeout_s <= 0:  # a call that could only be abandoned is not sent
            raise ModelTimeout(f"{self.name} had no time for a call", given_ms=0.0)
        if not self._abandoned.admits():
            first_abandoned = self._abandoned.oldest_at
            silent_ms = (
                (time.monotonic() - first_abandoned) * 1000.0
                if self._answered_at < first_abandoned
                else 0.0
            )
            raise ModelBusy(
                f"{self.name} busy: {self._abandoned.outstanding} abandoned calls still out"
                + (f", none answered for {silent_ms:.1f} ms" if silent_ms else ""),
                silent_ms=silent_ms,
            )
        started = time.perf_counter()
        rpc = call(max(WIRE_TIMEOUT_S, timeout_s))
        if not await self._abandoned.wait(rpc, timeout_s):
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            raise timeout_error(self.name, elapsed_ms, timeout_s * 1000.0)
        try:
            # Done, so this does not wait: grpc sets a call's status and ends its
            # invocation in one step. Were it to wait, a cancellation of this task would
            # still not reach the RPC: grpc does not cancel a call that has its status.
            response = await rpc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # The call itself was cancelled on this side: only closing its channel does.
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            raise ModelUnavailable(
                f"{self.name} call cancelled locally after {elapsed_ms:.1f} ms"
            ) from None
        except grpc.aio.AioRpcError as exc:
            self._note_status(exc.code())
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # the wire deadline
                raise ModelTimeout(
                    f"{self.name} deadline exceeded after {elapsed_ms:.1f} ms",
                    given_ms=elapsed_ms,
                ) from None
            raise ModelUnavailable(
                f"{self.name} {exc.code().name.lower()} after {elapsed_ms:.1f} ms"
                f" ({(exc.details() or '').strip()[:120]})"
            ) from None
        self._note_status(grpc.StatusCode.OK)
        return response, (time.perf_counter() - started) * 1000.0

    def _note_answer(self, rpc: asyncio.Future[Any]) -> None:
        """Records that the replica answered, unless ``rpc`` ended without its word (the
        wire deadline, a cancellation, no connection)."""
        if rpc.cancelled():
            return
        exc = rpc.exception()  # retrieved: an answer nobody wants is not an error
        if isinstance(exc, grpc.aio.AioRpcError):
            self._note_status(exc.code())
        else:
            self._note_status(grpc.StatusCode.OK)

    def _note_status(self, code: grpc.StatusCode) -> None:
        """Records that the replica answered, unless ``code`` says it did not speak."""
        if code not in NO_WORD_FROM_REPLICA:
            self._answered_at = time.monotonic()

    def _scores(
        self, scores: object, version: object, expected: int, elapsed_ms: float
    ) -> ModelScores:
        if not isinstance(scores, list) or len(scores) != expected:
            raise ModelResponseError(
                f"{self.name} answered {len(scores) if isinstance(scores, list) else 'no'}"
                f" scores for {expected} rows"
            )
        if not all(isinstance(s, (int, float)) and 0.0 <= s <= 1.0 for s in scores):
            raise ModelResponseError(f"{self.name} answered a score outside [0, 1]")
        version = self.model_version or version
        if not isinstance(version, str) or not version:
            raise ModelResponseError(f"{self.name} answered without a model version")
        return ModelScores(self.model_name, version, [float(s) for s in scores], elapsed_ms)


class TorchServeClient(GrpcModelClient):
    """TorchServe's native gRPC inference API (``Predictions``) on one replica."""

    _stub: inference_pb2_grpc.InferenceAPIsServiceAsyncStub

    def _bind(self, channel: grpc.aio.Channel) -> None:
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        check_float32(rows)
        request = inference_pb2.PredictionsRequest(
            model_name=self.model_name, input={"rows": pack_rows(rows)}
        )
        response, elapsed_ms = await self._call(
            lambda wire_timeout_s: self._stub.Predictions(request, timeout=wire_timeout_s),
            timeout_s,
        )
        try:
            doc = json.loads(response.prediction)
        except ValueError:
            raise ModelResponseError(f"{self.name} answered with non-JSON") from None
        if not isinstance(doc, dict):
            raise ModelResponseError(f"{self.name} answered JSON that is not an object")
        if "error" in doc:
            raise ModelInputError(f"{self.name} rejected the rows: {doc['error']}")
        return self._scores(doc.get("scores"), doc.get("model_version"), len(rows), elapsed_ms)
