"""Locust scenarios for ``decision.v1.DecisionService/Decide`` (``stream``: DecideStream,
a stream a user, a message at a time) over gRPC (plans in
``loadtest/locust_scenarios.py``, commands and rows in ``loadtest/README.md``).

Stats rows: ``grpc`` / ``Decide (<source>)`` per answering source, ``grpc`` / ``Decide``
for non-OK statuses (failures named by code). Users are synchronous gRPC clients on
gevent (``init_gevent`` before any channel), a channel each, paced with
``constant_throughput``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import LoadTestShape, User, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.event import EventHook
from locust.stats import CSV_STATS_INTERVAL_SEC
from locust.user.wait_time import constant_throughput

from decision_client.channel import CALLER_OPTIONS
from decision_client.stream import MessageError
from decision_client.v1 import decision_pb2, decision_pb2_grpc
from loadtest.locust_scenarios import (
    DEFAULT_TARGET,
    FED_SYMBOLS,
    SCENARIOS,
    UNFED_SYMBOLS,
    ScenarioError,
    ScenarioOptions,
    request_mix,
    source_label,
)

# Before any channel exists: gRPC's own threads must cooperate with gevent's loop.
grpc_gevent.init_gevent()

log = logging.getLogger("loadtest.locustfile")

EXIT_BAD_OPTIONS = 2


# locust's EventHook is unannotated: these two wrappers are the only untyped calls.
def listen(hook: EventHook, handler: Callable[..., None]) -> None:
    hook.add_listener(handler)  # type: ignore[no-untyped-call]


def fire_request(environment: Environment, **meta: Any) -> None:
    environment.events.request.fire(**meta)  # type: ignore[no-untyped-call]


OPTIONS: dict[str, dict[str, Any]] = {
    "--scenario": {"choices": SCENARIOS, "default": "steady", "env_var": "LOCUST_SCENARIO",
                   "help": "which scenario to run (default steady)"},
    "--user-rps": {"type": float, "default": 5.0, "help": "decisions per second each user"
                   " aims for (constant_throughput; default 5)"},
    "--symbols": {"default": ",".join(FED_SYMBOLS), "help": "comma-separated symbols with"
                  " fresh features (default: the local stack's)"},
    "--stale-symbols": {"default": ",".join(UNFED_SYMBOLS), "help": "stale-features: symbols"
                        " whose features are missing or stale"},
    "--deadline-ms": {"type": float, "default": 500.0, "help": "gRPC deadline of each Decide"
                      " call (default 500)"},
    "--burst-step-s": {"type": float, "default": None, "help": "burst: seconds per load step"
                       " (default: a fifth of --run-time, else 10)"},
    "--allow-remote": {"action": "store_true", "default": False,
                       "help": "allow a target that is not loopback"},
}  # fmt: skip


def add_options(parser: LocustArgumentParser, **_: Any) -> None:
    group = parser.add_argument_group("decision service scenarios")
    for flag, options in OPTIONS.items():
        group.add_argument(flag, **options)


listen(events.init_command_line_parser, add_options)


def scenario_options(environment: Environment) -> ScenarioOptions:
    return ScenarioOptions.from_namespace(
        environment.parsed_options, environment.host or DecisionUser.host or DEFAULT_TARGET
    )


class GrpcStatusError(Exception):
    """A non-OK status, short enough that locust groups failures by code and details."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__(f"{code.name}: {details or ''}")


def check_options(environment: Environment, **_: Any) -> None:
    """Refuses to start on bad options, before any load is sent; wires the final CSV
    snapshot."""
    try:
        options = scenario_options(environment)
    except ScenarioError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_BAD_OPTIONS)
    log.info("scenario %s: target %s, %.3g decisions/s per user, symbols %s", options.scenario,
             options.target, options.user_rps, ",".join(options.symbols))  # fmt: skip
    if getattr(environment.parsed_options, "csv_prefix", None):
        listen(environment.events.test_stop, let_csv_catch_up)


def let_csv_catch_up(**_: Any) -> None:
    """Locust rewrites the --csv files every CSV_STATS_INTERVAL_SEC and closes them at exit
    without a last write: without this pause the files miss the run's final second."""
    time.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


listen(events.init, check_options)


class DecisionUser(User):
    """Cycles through a buy and a sell per symbol, from a random starting point."""

    host = DEFAULT_TARGET

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        options = scenario_options(environment)
        self._deadline_s = options.deadline_s
        self._pace = constant_throughput(options.user_rps)
        self._requests = request_mix(options.symbols, f"locust-{id(self):x}")  # a share each
        self._next = random.randrange(len(self._requests))
        # A connection of its own per user (not the process-wide subchannel pool's one):
        # a server with several workers on one port spreads connections, not requests.
        self._channel = grpc.insecure_channel(
            options.target, options=[*CALLER_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        )
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)
        self._outbox: queue.Queue[Any] | None = None
        self._ids, self._streaming = itertools.count(), options.scenario == "stream"

    def wait_time(self) -> float:
        return self._pace(self)

    def on_stop(self) -> None:
        if self._outbox is not None:
            self._outbox.put(None)  # half-closes the stream
        self._channel.close()

    @task
    def decide(self) -> None:
        request = self._requests[self._next]
        self._next = (self._next + 1) % len(self._requests)
        started, name, size, error = time.perf_counter(), "Decide", 0, None
        try:
            response = self._send(request)
            name, size = f"Decide ({source_label(response.source)})", response.ByteSize()
        except grpc.RpcError as exc:
            error = GrpcStatusError(exc.code(), exc.details())
        fire_request(self.environment, request_type="grpc", name=name, response_length=size,
                     response_time=(time.perf_counter() - started) * 1000.0, exception=error,
                     context={})  # fmt: skip

    def _send(self, request: decision_pb2.DecideRequest) -> decision_pb2.DecideResponse:
        """A Decide call, or in the stream scenario a message on the user's DecideStream."""
        if not self._streaming:
            return self._stub.Decide(request, timeout=self._deadline_s)
        if self._outbox is None:  # the first order, or the last stream ended
            self._outbox = queue.Queue()
            self._answers = self._stub.DecideStream(iter(self._outbox.get, None))
        message = decision_pb2.DecideStreamRequest(request=request)
        message.request.request_id = f"locust-{next(self._ids)}"
        message.timeout.FromMicroseconds(round(self._deadline_s * 1e6))
        self._outbox.put(message)
        try:  # one message in flight: the next answer is its
            answer = next(self._answers)
        except (grpc.RpcError, StopIteration):  # the stream ended (a restart, its age)
            self._outbox.put(None)  # its request iterator ends
            self._outbox = None
            raise MessageError(grpc.StatusCode.UNAVAILABLE, "the stream ended") from None
        if answer.HasField("error"):
            raise MessageError.of(answer.error)
        return answer.response


class ScenarioShape(LoadTestShape):
    """Users over time for the chosen scenario: constant, or the burst ladder."""

    # -u, -r and -t keep their meaning: the shape reads them.
    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        if self.runner is None:
            raise RuntimeError("ScenarioShape ticked outside a locust run")
        elapsed_s = time.perf_counter() - self.start_time  # get_run_time(), unannotated
        return scenario_options(self.runner.environment).load_at(elapsed_s)
