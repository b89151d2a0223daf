"""``CallSlots``: the DecisionService's calls taken from gRPC's core as they arrive.

grpc.aio asks the core for one call of each method at a time and asks for the next one a
turn or two of the event loop later (grpcio 1.85, ``AioServer._server_main_loop``): a
burst of calls waits in the core's queue meanwhile, where the queue limit cancels most of
it, and where no Python sees how long a call waited. gRPC's core expects a server to keep
many requests for calls outstanding (its C++ and C# servers keep hundreds), and matches an
arriving call to one of them at once. ``CallSlots`` keeps ``core.deadline.CALL_SLOTS`` of
them for each of Decide and DecideBatch: each slot takes a call, serves it as grpc.aio
would, and asks for the next. What waits in the core is bounded by its queue limit
(``server.front.server_options``); a call taken is refused by time by the servicer
(``core.deadline.outlasts_budget``). docs/overload.md has the measurements.

It uses grpc.aio's own internals to serve a call (``cygrpc._handle_rpc`` and
``_schedule_rpc_coro``, the ``AioServer``'s ``_request_registered_call``), so that a call
is served exactly as grpc.aio serves it: interceptors, cancellation, errors. grpcio is
pinned (requirements.lock); with a grpcio that lacks them the server logs a warning and
grpc.aio takes the calls alone, as before (``tests/server/test_intake.py`` fails then).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

log = logging.getLogger(__name__)

# The server has stopped when the slots are stopped: their requests fail at once.
STOP_WAIT_S = 1.0

try:
    from grpc._cython import cygrpc  # type: ignore[attr-defined]  # no stubs: private

    _INTERNALS = all(
        hasattr(cygrpc, name) for name in ("_MethodResolver", "_handle_rpc", "_schedule_rpc_coro")
    ) and hasattr(cygrpc.AioServer, "_request_registered_call")
except ImportError:  # pragma: no cover - grpcio always has cygrpc
    _INTERNALS = False


def available() -> bool:
    """Whether this grpcio has what the slots use."""
    return _INTERNALS


class CallSlots:
    def __init__(
        self,
        server: grpc.aio.Server,
        handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]],
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        slots: int,
    ) -> None:
        """``handlers``: by full method name (``/package.Service/Method``), each registered
        on ``server`` with ``add_registered_method_handlers`` before it started."""
        self._server = server
        self._handlers = dict(handlers)
        self._interceptors = tuple(interceptors)
        self._slots = slots
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """After the server started: the slots begin taking calls."""
        if not _INTERNALS:
            log.warning(
                "grpcio %s lacks what CallSlots use: grpc.aio takes calls one at a time, "
                "and bursts are refused (docs/overload.md)",
                grpc.__version__,
            )
            return
        aio = self._server._server  # type: ignore[attr-defined]  # the cygrpc AioServer
        resolver = cygrpc._MethodResolver([], self._handlers)
        self._tasks = [
            asyncio.create_task(self._serve(aio, resolver, method), name=f"slot {method}")
            for method in self._handlers
            for _ in range(self._slots)
        ]

    async def _serve(self, aio: Any, resolver: Any, method: str) -> None:
        loop = asyncio.get_running_loop()
        method_bytes = method.encode()
        while aio.is_running():
            try:
                rpc = await aio._request_registered_call(method_bytes)
            except Exception:
                # The server is stopping: its requests fail. Otherwise this slot ends
                # rather than spin on a failing core; grpc.aio's own still takes calls.
                if aio.is_running():
                    log.exception("a call slot for %s failed and ends", method)
                return
            handling = cygrpc._handle_rpc(method, resolver, self._interceptors, rpc, loop, False)
            # Serves the call to its end, errors included, as grpc.aio does.
            await cygrpc._schedule_rpc_coro(handling, rpc, loop, method)

    async def stop(self) -> None:
        """After the server stopped: its requests failed, so the slots end; any left after
        ``STOP_WAIT_S`` are cancelled."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_WAIT_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
