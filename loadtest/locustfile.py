"""Locust scenarios for ``decision.v1.DecisionService/Decide`` over gRPC (plans in
``loadtest/locust_scenarios.py``, commands and rows in ``loadtest/README.md``).

Stats rows: ``grpc`` / ``Decide (<source>)`` per answering source, ``grpc`` / ``Decide``
for non-OK statuses (failures named by code), ``admin`` / ``SetBreaker primary <MODE>``
for the primary-failure scenario's own calls. Users are synchronous gRPC clients on
gevent (``init_gevent`` before any channel), a channel each, paced with
``constant_throughput``.
"""

from __future__ import annotations

import logging
import os
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
from locust.runners import WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC
from locust.user.wait_time import constant_throughput

from core.caller import CALLER_OPTIONS
from loadtest.locust_scenarios import (
    DEFAULT_ADMIN_ADDRESS,
    DEFAULT_TARGET,
    FED_SYMBOLS,
    SCENARIOS,
    UNFED_SYMBOLS,
    ScenarioError,
    ScenarioOptions,
    request_mix,
    source_label,
)
from proto.decision.v1 import admin_pb2, admin_pb2_grpc, decision_pb2_grpc
from server.admin.ctl_connection import (
    ADDRESS_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    UsageError,
    resolve_token,
)

# Before any channel exists: gRPC's own threads must cooperate with gevent's loop.
grpc_gevent.init_gevent()

log = logging.getLogger("loadtest.locustfile")

EXIT_BAD_OPTIONS = 2
ADMIN_TIMEOUT_S = 5.0


# locust's EventHook is unannotated: these two wrappers are the only untyped calls.
def listen(hook: EventHook, handler: Callable[..., None]) -> None:
    hook.add_listener(handler)  # type: ignore[no-untyped-call]


def fire_request(environment: Environment, **meta: Any) -> None:
    environment.events.request.fire(**meta)  # type: ignore[no-untyped-call]


def add_options(parser: LocustArgumentParser, **_: Any) -> None:
    group = parser.add_argument_group("decision service scenarios")
    group.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="steady",
        env_var="LOCUST_SCENARIO",
        help="which scenario to run (default steady)",
    )
    group.add_argument(
        "--user-rps",
        type=float,
        default=5.0,
        help="decisions per second each user aims for (constant_throughput; default 5)",
    )
    group.add_argument(
        "--symbols",
        default=",".join(FED_SYMBOLS),
        help="comma-separated symbols with fresh features (default: the local stack's)",
    )
    group.add_argument(
        "--stale-symbols",
        default=",".join(UNFED_SYMBOLS),
        help="stale-features: symbols whose features are missing or stale",
    )
    group.add_argument(
        "--deadline-ms",
        type=float,
        default=500.0,
        help="gRPC deadline of each Decide call (default 500)",
    )
    group.add_argument(
        "--admin-address",
        default=DEFAULT_ADMIN_ADDRESS,
        env_var=ADDRESS_ENV,
        help=f"AdminService host:port for primary-failure (default {DEFAULT_ADMIN_ADDRESS}); "
        f"the operator token comes from ${TOKEN_ENV} or ${TOKEN_FILE_ENV}",
    )
    group.add_argument(
        "--fault-at-s",
        type=float,
        default=10.0,
        help="primary-failure: seconds after the start to force the primary open (default 10)",
    )
    group.add_argument(
        "--fault-for-s",
        type=float,
        default=20.0,
        help="primary-failure: how long the override lasts, its TTL (default 20)",
    )
    group.add_argument(
        "--burst-step-s",
        type=float,
        default=None,
        help="burst: seconds per load step (default: a fifth of --run-time, else 10)",
    )
    group.add_argument(
        "--allow-remote",
        action="store_true",
        default=False,
        help="allow a target or admin address that is not loopback",
    )


listen(events.init_command_line_parser, add_options)


def scenario_options(environment: Environment) -> ScenarioOptions:
    return ScenarioOptions.from_namespace(
        environment.parsed_options, environment.host or DecisionUser.host or DEFAULT_TARGET
    )


class GrpcStatusError(Exception):
    """A non-OK status, short enough that locust groups failures by code and details."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__(f"{code.name}: {details or ''}")


class PrimaryFault:
    """Forces the primary's breaker open ``fault_at_s`` into the test, with a TTL of
    ``fault_for_s``; sets it back to AUTO if the test stops while the override lasts. The
    TTL covers what this cannot (locust killed, or stopped in the middle of the call)."""

    def __init__(self, environment: Environment, options: ScenarioOptions, token: str) -> None:
        self._environment = environment
        self._options = options
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._greenlet: Any = None
        self._expires_at: float | None = None  # monotonic; set while our override may last

    def on_test_start(self, **_: Any) -> None:
        runner = self._environment.runner
        if runner is not None:
            self._greenlet = runner.greenlet.spawn(self._inject)

    def _inject(self) -> None:
        time.sleep(self._options.fault_at_s)  # gevent's sleep: locust patched the stdlib
        if self._set_breaker(
            admin_pb2.BREAKER_MODE_FORCE_OPEN,
            f"locust primary-failure scenario (for {self._options.fault_for_s:g} s)",
            self._options.fault_for_s,
        ):
            self._expires_at = time.monotonic() + self._options.fault_for_s

    def on_test_stop(self, **_: Any) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=True)
            self._greenlet = None
        if self._expires_at is not None and time.monotonic() < self._expires_at:
            self._set_breaker(admin_pb2.BREAKER_MODE_AUTO, "locust primary-failure ended", 0.0)
        self._expires_at = None

    def _set_breaker(
        self, mode: admin_pb2.BreakerMode.ValueType, reason: str, ttl_s: float
    ) -> bool:
        mode_name = admin_pb2.BreakerMode.Name(mode).removeprefix("BREAKER_MODE_")
        request = admin_pb2.SetBreakerRequest(
            replica="primary", mode=mode, reason=reason, ttl_s=ttl_s
        )
        started = time.perf_counter()
        exception: Exception | None = None
        with grpc.insecure_channel(self._options.admin_address) as channel:
            try:
                admin_pb2_grpc.AdminServiceStub(channel).SetBreaker(
                    request, metadata=self._metadata, timeout=ADMIN_TIMEOUT_S
                )
            except grpc.RpcError as exc:
                exception = GrpcStatusError(exc.code(), exc.details())
                log.error("SetBreaker primary %s failed: %s", mode_name, exception)
        fire_request(
            self._environment,
            request_type="admin",
            name=f"SetBreaker primary {mode_name}",
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=0,
            exception=exception,
            context={},
        )
        return exception is None


def operator_token() -> str:
    """From $DECISIONCTL_TOKEN, else the file $DECISIONCTL_TOKEN_FILE names, as decisionctl."""
    if not any(os.environ.get(name, "").strip() for name in (TOKEN_ENV, TOKEN_FILE_ENV)):
        raise UsageError(f"set ${TOKEN_ENV} or ${TOKEN_FILE_ENV}")
    return resolve_token(None, os.environ)


def check_options(environment: Environment, **_: Any) -> None:
    """Refuses to start on bad options, before any load is sent; wires the scenario's
    fault injection and the final CSV snapshot."""
    try:
        options = scenario_options(environment)
    except ScenarioError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_BAD_OPTIONS)
    log.info(
        "scenario %s: target %s, %.3g decisions/s per user, symbols %s",
        options.scenario,
        options.target,
        options.user_rps,
        ",".join(options.symbols),
    )
    # The fault is injected once: by the master, or by the only runner when not distributed.
    if options.scenario == "primary-failure" and not isinstance(environment.runner, WorkerRunner):
        try:
            token = operator_token()
        except UsageError as exc:
            log.error("primary-failure needs an operator token for AdminService: %s", exc)
            sys.exit(EXIT_BAD_OPTIONS)
        fault = PrimaryFault(environment, options, token)
        listen(environment.events.test_start, fault.on_test_start)
        listen(environment.events.test_stop, fault.on_test_stop)
    if getattr(environment.parsed_options, "csv_prefix", None):
        # Registered last, so it runs after the fault's restore.
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
        self._requests = request_mix(options.symbols)
        self._next = random.randrange(len(self._requests))
        # A connection of its own per user (not the process-wide subchannel pool's one):
        # a server with several workers on one port spreads connections, not requests.
        self._channel = grpc.insecure_channel(
            options.target, options=[*CALLER_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        )
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)

    def wait_time(self) -> float:
        return self._pace(self)

    def on_stop(self) -> None:
        self._channel.close()

    @task
    def decide(self) -> None:
        request = self._requests[self._next]
        self._next = (self._next + 1) % len(self._requests)
        started = time.perf_counter()
        try:
            response = self._stub.Decide(request, timeout=self._deadline_s)
        except grpc.RpcError as exc:
            fire_request(
                self.environment,
                request_type="grpc",
                name="Decide",
                response_time=(time.perf_counter() - started) * 1000.0,
                response_length=0,
                exception=GrpcStatusError(exc.code(), exc.details()),
                context={},
            )
            return
        fire_request(
            self.environment,
            request_type="grpc",
            name=f"Decide ({source_label(response.source)})",
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=response.ByteSize(),
            exception=None,
            context={},
        )


class ScenarioShape(LoadTestShape):
    """Users over time for the chosen scenario: constant, or the burst ladder."""

    # -u, -r and -t keep their meaning: the shape reads them.
    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        if self.runner is None:
            raise RuntimeError("ScenarioShape ticked outside a locust run")
        elapsed_s = time.perf_counter() - self.start_time  # get_run_time(), unannotated
        return scenario_options(self.runner.environment).load_at(elapsed_s)
