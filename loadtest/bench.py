"""The gRPC benchmark: the paths the product and its peers serve, side by side in one run.

``python -m loadtest.bench PRESET`` starts what the preset's paths need (redis-server and
the model servers through ``localstack.stack``, decision servers, the echo server) on free
loopback ports and drives them with ``loadtest.loadgen``, in rounds where the paths take
turns so that machine noise lands on all alike; then open loop at multiples of a path's
own capacity. It prints every cell, each path's capacity and cores, the preset's pairs
and targets; the figures go to ``--json`` and, with
``--doc``, into the doc's generated blocks. Presets, paths and columns: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import psutil  # type: ignore[import-untyped]  # no stubs in the virtualenv

from core.metrics_http import scrape
from core.processes import ManagedProcess, free_ports, listening, port_open, stop_all
from decision_client.v1 import admin_pb2, admin_pb2_grpc, decision_pb2, decision_pb2_grpc
from loadtest.feature_keeper import fresh_features
from loadtest.loadgen import REFUSALS, LoadGenerator, LoadResult, LoadSpec, Mode, Target
from loadtest.report import (
    MODEL_SOURCES,
    answered_by,
    checkout_commit,
    load_text,
    markdown_table,
    model_share,
    model_share_of_calls,
    replace_generated,
)
from loadtest.soak_probe import group_cpu_seconds
from localstack.health import serving
from localstack.stack import MODEL_SERVERS, LocalStack, started
from server.settings import ServerSettings, Settings
from server.tracing import DEFAULT_SAMPLE_RATIO
from torchserve.replica import replica_dir, workers_lost

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-operator-token-0123456789"  # noqa: S105 - a throwaway local token
QUIET = {"DECISION_TELEMETRY__LOG_LEVEL": "WARNING"}  # no per-call log lines to write
CLOSED_LOOP_DEADLINE_S = 1.0  # long enough that a closed loop measures throughput
OPEN_LOOP_DEADLINE_S = 0.05  # what execution systems give a Decide
CALLS_PER_CONNECTION = ServerSettings().max_concurrent_streams
"""The decision servers' stream cap: calls one connection may have in flight."""
MIN_MODEL_SHARE = 0.95
"""A Decide figure stands for the model path only when a model gave this share of answers."""
MAX_REFUSAL_P99_MS = 5.0
"""A refused call's p99, as the caller sees it: at once, so it can go elsewhere."""
MODEL_SHARE_OF_CALLS = {0.8: 0.95, 1.2: 0.8}
"""The share of all D calls (refused ones included) the model must answer, by multiple
of D's capacity."""
LOSS_SETTLE_S = 1.0  # after the last cell, for TorchServe to log a worker a cancel cost
SHADOW_SAMPLES = ("decision_shadow_decisions_total", "decision_shadow_agreement_ratio")
CONTROL_SETTLE_S = 0.3  # after a flag flips, for the last cell's shadow calls to end
SHIPPER = "server.audit.ship_child"  # in the command line of a server's audit shipper


@dataclass(frozen=True)
class BenchPath:
    """One way to call: what answers and, for Decide, in which control state."""

    label: str
    target: Target
    server: str
    """``echo``, a model server (``torchserve``, ``triton``) or a decision server's name."""
    breakers_open: bool = False  # both breakers forced open: the fallback ladder answers
    shadow: bool = False  # shadow scoring at 100 %

    @property
    def from_model(self) -> bool:
        """Whether a model should answer: its capacity counts the model's answers only."""
        return self.target in ("decide", "stream") and not self.breakers_open


PATHS = {
    "E": BenchPath("echo (floor)", "echo", "echo"),
    "T": BenchPath("TorchServe direct", "torchserve", "torchserve"),
    "X": BenchPath("Triton direct", "oip", "triton"),
    "D": BenchPath("Decide", "decide", "decide"),
    "Y": BenchPath("Decide on Triton", "decide", "on-triton"),
    "Q": BenchPath("DecideStream on Triton", "stream", "on-triton"),
    "W": BenchPath("Decide, 2 workers", "decide", "workers-2"),
    "F": BenchPath("Decide, breakers open", "decide", "decide", breakers_open=True),
    "O": BenchPath("Decide, traced", "decide", "traced"),
    "M": BenchPath("Decide, metrics off", "decide", "unmeasured"),
    "S": BenchPath("Decide, shadow at 100 %", "decide", "decide", shadow=True),
    "A": BenchPath("Decide, audit off", "decide", "audit-off"),
}


def path_of(key: str) -> BenchPath:
    """A path by its key: one of ``PATHS``, or D4 / F4 (Decide on a server of 4 workers,
    with the model or with the breakers open)."""
    if key in PATHS:
        return PATHS[key]
    workers, forced = int(key[1:]), key[0] == "F"
    label = f"Decide, {workers} worker" + ("s" if workers > 1 else "")
    label += ", breakers open" if forced else ""
    return BenchPath(label, "decide", f"workers-{workers}", breakers_open=forced)


def workers_of(server: str) -> int:
    return int(server.removeprefix("workers-")) if server.startswith("workers-") else 1


Cell = tuple[str, Mode, float]  # path key, mode, concurrency or rate
Results = dict[Cell, LoadResult]


class Check(NamedTuple):
    name: str
    value: float
    unit: str
    bound: float
    upper: bool = True
    """Whether ``bound`` is an upper bound (else a lower one)."""
    model_share: float = 1.0
    """Of the Decide answers behind ``value``, the share a model gave."""

    def verdict(self) -> str:
        within = self.value <= self.bound if self.upper else self.value >= self.bound
        if math.isnan(self.value) or math.isnan(self.model_share):
            return "not measured"
        if self.model_share < MIN_MODEL_SHARE:
            # The fallback ladder answering for an overloaded model is not the model path.
            return f"missed: the model answered only {100 * self.model_share:.0f} % of D"
        verdict = "met" if within else "missed"
        if self.model_share < 1.0:
            verdict += f" (model answered {100 * self.model_share:.1f} % of D)"
        return verdict

    def row(self) -> tuple[str, ...]:
        op = "<=" if self.upper else ">="
        bound = f"{op} {self.bound:g} {self.unit}"
        return (self.name, f"{self.value:.2f} {self.unit}", bound, self.verdict())


def capacity(results: Results, key: str) -> float:
    """The best closed-loop throughput; where a model should answer, only its answers
    count, or an overloaded model whose breaker opened would pass for a fast one."""
    model = path_of(key).from_model
    return max(
        (
            r.throughput_per_s * (model_share(r) if model else 1.0)
            for (p, mode, _), r in results.items()
            if p == key and mode == "closed"
        ),
        default=math.nan,
    )


def ms(results: Results, cell: Cell, percent: float) -> float:
    return result.percentile_ms(percent) if (result := results.get(cell)) else math.nan


def lowest(results: Results, key: str, mode: Mode) -> Cell | None:
    """The path's cell at its lowest load in this mode (concurrency 1, say)."""
    return min(
        (c for c in results if c[0] == key and c[1] == mode), key=lambda c: c[2], default=None
    )


def past_capacity(results: Results, key: str, factor: float) -> LoadResult | None:
    return results.get((key, "open", round(factor * capacity(results, key))))


def paths_checks(results: Results) -> list[Check]:
    """The paths preset's targets: past capacity, what Decide adds, the ladder's cost."""
    past = [r for f in (0.5, 0.8, 1.0, 1.2, 1.5) if (r := past_capacity(results, "D", f))]
    late = sum(r.errors.get("DEADLINE_EXCEEDED", 0) for r in past) if past else math.nan
    c1 = lowest(results, "D", "closed")
    at_rate: Cell = ("D", "open", 1000.0)

    def share(cell: Cell | None) -> float:
        return model_share(results[cell]) if cell in results else math.nan

    def of_calls(factor: float) -> float:
        r = past_capacity(results, "D", factor)
        return 100 * model_share_of_calls(r) if r else math.nan

    def over(a: str, b: str) -> float:  # capacity ratio
        return capacity(results, a) / capacity(results, b)

    worst_refusal = max((r.refusal_percentile_ms(99) for r in past if r.refused), default=0.0)
    added = ms(results, ("D", "closed", 1), 50) - ms(results, ("T", "closed", 1), 50)
    return [
        Check("D late answers at 0.5-1.5 x capacity", late, "calls", 0),
        Check("D refusal p99 as the caller sees it (worst cell)", worst_refusal, "ms",
              MAX_REFUSAL_P99_MS),
        *(Check(f"D model share of all calls at {f:g} x capacity", of_calls(f), "%", 100 * bound,
                upper=False) for f, bound in MODEL_SHARE_OF_CALLS.items()),
        Check("D p50 - T p50 at c=1", added, "ms", 0.8, model_share=share(c1)),
        Check("D capacity / E capacity", over("D", "E"), "x", 0.3, upper=False),
        Check("W capacity / D capacity", over("W", "D"), "x", 1.0, upper=False),
        Check("D p99 open 1000/s", ms(results, at_rate, 99), "ms", 10.0,
              model_share=share(at_rate)),
        Check("Q p99 a message, open 1000/s", ms(results, ("Q", "open", 1000.0), 99), "ms", 5.0),
        Check("F p99 / E p99 open 1000/s",
              ms(results, ("F", "open", 1000.0), 99) / ms(results, ("E", "open", 1000.0), 99),
              "x", 2.0),
    ]  # fmt: skip


def latency_checks(results: Results) -> list[Check]:
    added = ms(results, ("D", "closed", 1), 50) - ms(results, ("T", "closed", 1), 50)
    return [Check("D p50 - T p50 at c=1", added, "ms", 0.8)]


def shadow_checks(results: Results) -> list[Check]:
    cell = lowest(results, "S", "open")
    rate = cell[2] if cell else math.nan
    ratio = ms(results, ("S", "open", rate), 99) / ms(results, ("D", "open", rate), 99)
    return [Check(f"S p99 / D p99 open {rate:g}/s", ratio, "x", 1.10)]


@dataclass(frozen=True)
class Preset:
    """Which paths, at which loads, compared how."""

    paths: tuple[str, ...]
    closed: tuple[int, ...] = ()
    """Closed-loop callers per worker of the path's server."""
    rates: tuple[float, ...] = ()
    capacity: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    """After the rounds, open loop at these multiples of the path's own capacity."""
    seconds: float = 2.0
    rounds: int = 2
    warmup_s: float = 0.5
    open_deadline_s: float = OPEN_LOOP_DEADLINE_S
    pairs: tuple[tuple[str, str], ...] = ()
    checks: Callable[[Results], list[Check]] = lambda _: []

    def quick(self) -> Preset:
        """Fewer, shorter runs: a smoke check."""
        closed = tuple(sorted({self.closed[0], self.closed[-1]})) if self.closed else ()
        rates = tuple(sorted({self.rates[0], self.rates[-1]})) if self.rates else ()
        return dataclasses.replace(
            self, closed=closed, rates=rates, seconds=1.0, rounds=1, warmup_s=0.3
        )


def workers_preset(counts: Sequence[int], model_server: str) -> Preset:
    """D and F per worker count; E and the model server direct, for reference."""
    direct = "T" if model_server == "torchserve" else "X"
    decide = tuple(f"D{n}" for n in counts)
    return Preset(
        paths=("E", direct, *decide, *(f"F{n}" for n in counts)),
        closed=(16, 32),
        capacity={key: (0.5, 0.7, 0.85, 1.0) for key in decide},
        seconds=3.0,
        rounds=1,
    )


PRESETS = {
    "paths": Preset(
        paths=("E", "T", "X", "D", "Y", "Q", "W", "F"),
        closed=(1, 4, 16, 64),
        rates=(250.0, 500.0, 1000.0),
        capacity={
            "D": (0.5, 0.8, 1.0, 1.2, 1.5),
            "T": (0.5, 0.8),
            "X": (0.5, 0.8),
            "Y": (0.5, 0.8),
            "Q": (0.5, 0.8),
        },
        checks=paths_checks,
    ),
    "latency": Preset(
        paths=("E", "T", "D", "O", "M"),
        closed=(1, 32),
        rounds=5,
        pairs=(("D", "T"), ("O", "D"), ("D", "M")),
        checks=latency_checks,
    ),
    "shadow": Preset(
        paths=("D", "S"),
        rates=(100.0,),
        seconds=5.0,
        rounds=6,
        warmup_s=1.0,
        open_deadline_s=1.0,
        pairs=(("S", "D"),),
        checks=shadow_checks,
    ),
    "audit": Preset(paths=("D", "A"), closed=(1, 8), rounds=6, pairs=(("D", "A"),)),
    # Below and past capacity only: --seconds long enough for 20,000 calls a cell,
    # --burst and --plain for the arrivals and callers of docs/overload.md.
    "overload": Preset(
        paths=("D",), closed=(16,), capacity={"D": (0.5, 0.8, 1.2, 1.5)}, seconds=10.0
    ),
    "workers": workers_preset((1, 2), "torchserve"),  # --workers and --model-server rebuild it
}


# -- the processes ---------------------------------------------------------------------


def pin(pid: int, cpus: Collection[int]) -> int:
    """Every thread of ``pid`` and its descendants on ``cpus``; returns how many. Affinity
    is per thread and inherited when a thread starts, so pin before threads start where
    it matters (``started_on``)."""
    pinned = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(FileNotFoundError):  # ended meanwhile
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(task.name), set(cpus))
                    pinned += 1
    return pinned


@contextlib.contextmanager
def started_on(cpus: Collection[int]) -> Iterator[None]:
    """Processes started in the block (from this thread) start on ``cpus``, as a pod's
    under Kubernetes' static CPU manager: a JVM or a thread pool sizes itself by the CPUs
    it may use when it starts. No ``cpus``: no change."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def listening_pids(pid: int | None, port: int) -> list[int]:
    """The processes of ``pid``'s tree listening on TCP ``port``: a server's workers."""
    if pid is None:
        return []
    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # ended, or not ours to read
            sockets = proc.net_connections(kind="tcp")
            if any(s.status == psutil.CONN_LISTEN and s.laddr.port == port for s in sockets):
                found.append(proc.pid)
    return found


@dataclass
class Server:
    """A process that answers a path: its address and process group."""

    address: str
    process: ManagedProcess
    model: ManagedProcess | None = None  # a decision server's model server
    admin: str = ""
    metrics_port: int = 0


@dataclass
class Fleet:
    servers: dict[str, Server]
    redis_url: str
    replica_folder: Path | None  # the TorchServe replica's, to count the workers it lost

    def groups(self, key: str) -> list[int | None]:
        """The process groups behind a path: what answers, and its model server."""
        server = self.servers[path_of(key).server]
        return [server.process.pid, server.model.pid if server.model else None]


def decision_settings(name: str, model_server: str, sink_port: int) -> dict[str, str]:
    """A decision server's settings beyond the fleet's, by its name."""
    triton = name == "on-triton" or model_server == "triton"  # Triton speaks OIP
    settings = {"DECISION_TORCHSERVE__PROTOCOL": "kserve-v2" if triton else "torchserve",
                "DECISION_SERVER__WORKERS": str(workers_of(name))}  # fmt: skip
    if name == "traced":
        settings |= {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(DEFAULT_SAMPLE_RATIO),  # the product's default
        }
    if name == "audit-off":
        settings["DECISION_AUDIT__ENABLED"] = "false"
    return settings


@contextlib.contextmanager
def fleet_started(run_dir: Path, keys: Sequence[str], args: argparse.Namespace) -> Iterator[Fleet]:
    """Starts what the paths need, on free ports; stops it all after."""
    paths = [path_of(key) for key in keys]
    names = sorted({p.server for p in paths} - {"echo", *MODEL_SERVERS})
    model_of = {name: "triton" if name == "on-triton" else args.model_server for name in names}
    wanted = {p.server for p in paths if p.server in MODEL_SERVERS} | set(model_of.values())
    others = sorted(wanted - {args.model_server})
    parts = ("redis", "primary", *(["challenger"] if any(p.shadow for p in paths) else []))
    with contextlib.ExitStack() as exits:
        # redis-server starts on the model server's CPUs too; it moves after.
        with started_on(args.model_server_cpus):
            stacks: dict[str, LocalStack] = {
                args.model_server: exits.enter_context(
                    started(run_dir, parts, model_server=args.model_server)
                )
            }
            for other in others:  # the other model server, in a stack of its own
                stacks[other] = exits.enter_context(
                    started(run_dir / other, ("primary",), model_server=other)
                )
        stack = stacks[args.model_server]
        if args.model_server_cpus:
            pin(stack.processes["redis-server"].pid or 0, os.sched_getaffinity(0))
        models = {
            ms: (f"127.0.0.1:{s.primary.grpc_inference}", s.processes[f"{ms}-primary"])
            for ms, s in stacks.items()
        }
        servers = {ms: Server(address, proc) for ms, (address, proc) in models.items()}
        procs: list[ManagedProcess] = []
        exits.callback(stop_all, procs)
        sink_port, echo_port, *ports = free_ports(2 + 3 * len(names))
        if "traced" in names:
            procs.append(python_process("otlp-sink", "otlp", sink_port, run_dir))
        if "echo" in {p.server for p in paths}:
            procs.append(python_process("echo-server", "echo", echo_port, run_dir))
            servers["echo"] = Server(f"127.0.0.1:{echo_port}", procs[-1])
        # One fleet: the servers share one audit store (the control state's one copy).
        store = {"DECISION_AUDIT__DATABASE_URL": f"sqlite:///{run_dir / 'audit.db'}"}
        for name, port, admin_port, metrics_port in zip(
            names, ports[::3], ports[1::3], ports[2::3], strict=True
        ):
            address, model = models[model_of[name]]
            settings = {
                **QUIET,
                **store,
                "DECISION_TORCHSERVE__PRIMARY_ADDRESS": address,
                "DECISION_ADMIN__PORT": str(admin_port),
                "DECISION_ADMIN__TOKENS": f"bench operator {TOKEN}",
                # Every server but M serves /metrics (nobody scrapes: recording is the cost).
                "DECISION_SERVER__METRICS_PORT": "0" if name == "unmeasured" else str(metrics_port),
                **decision_settings(name, model_of[name], sink_port),
            }
            proc = stack.decision_server(f"decision-server-{name}", port, run_dir / name, settings)
            procs.append(proc)
            servers[name] = Server(
                f"127.0.0.1:{port}", proc, model, f"127.0.0.1:{admin_port}", metrics_port
            )
        for proc in procs:
            with started_on(args.server_cpus if proc.name.startswith("decision") else ()):
                proc.start()
        for name, server in servers.items():
            port = int(server.address.rpartition(":")[2])
            if name in names:
                server.process.wait_ready(functools.partial(all_listening, server, port), 60)
            elif name == "echo":
                server.process.wait_ready(listening(port), 30)
        if "traced" in names:
            procs[0].wait_ready(functools.partial(port_open, "127.0.0.1", sink_port), 30)
        torchserve = stacks.get("torchserve")
        folder = replica_dir(torchserve.run_dir, "primary") if torchserve else None
        yield Fleet(servers, stack.redis_url, folder)


def all_listening(server: Server, port: int) -> bool:
    """Whether every worker of the decision server listens: connections spread as they
    open, so a late worker would get none."""
    workers = workers_of(server.process.name.removeprefix("decision-server-"))
    return serving(port) and len(listening_pids(server.process.pid, port)) >= workers


def python_process(name: str, kind: str, port: int, run_dir: Path) -> ManagedProcess:
    """One of ``loadtest.stand_ins``' servers (``echo``, ``otlp``), not started."""
    argv = [sys.executable, "-m", "loadtest.stand_ins", kind, "--port", str(port)]
    return ManagedProcess(name, argv, cwd=REPO, log_path=run_dir / f"{name}.log")


class Control:
    """Puts the fleet in the control state a path wants (breakers forced open or on auto,
    shadow scoring on or off) through AdminService; every wait is bounded."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        # Any decision server's AdminService reaches the fleet: they share one store.
        admin = next((s.admin for s in fleet.servers.values() if s.admin), "")
        self._channel = grpc.aio.insecure_channel(admin) if admin else None
        self._state = (False, False)  # breakers forced open, shadow on: a fresh fleet's

    async def close(self) -> None:
        if self._channel is not None:
            await asyncio.wait_for(self._channel.close(), timeout=5.0)

    async def prepare(self, key: str) -> None:
        path = path_of(key)
        if path.target != "decide" or self._channel is None:
            return
        forced, shadow = self._state
        admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        metadata = [("authorization", f"Bearer {TOKEN}")]
        if shadow != path.shadow:
            flag = admin_pb2.SetFlagRequest(
                name="shadow_sample_rate", value="1" if path.shadow else "0", reason="bench"
            )
            await admin.SetFlag(flag, metadata=metadata, timeout=5.0)
            await asyncio.sleep(CONTROL_SETTLE_S)
        if forced != path.breakers_open:
            mode = (
                admin_pb2.BREAKER_MODE_FORCE_OPEN
                if path.breakers_open
                else admin_pb2.BREAKER_MODE_AUTO
            )
            for replica in ("primary", "secondary"):
                request = admin_pb2.SetBreakerRequest(replica=replica, mode=mode, reason="bench")
                await admin.SetBreaker(request, metadata=metadata, timeout=5.0)
            await self._shown(self._fleet.servers[path.server].address, path.breakers_open)
        self._state = (path.breakers_open, path.shadow)

    async def _shown(self, address: str, forced: bool) -> None:
        """Waits until the path's server answers as the breakers say: the change reaches
        other servers within a second, and back on auto a breaker that opened by itself
        under load needs its reset time."""
        request = decision_pb2.DecideRequest(
            symbol="BTC-USD", side=decision_pb2.SIDE_BUY, quantity=1.0
        )
        async with grpc.aio.insecure_channel(address) as channel:
            decide = decision_pb2_grpc.DecisionServiceStub(channel).Decide
            deadline = time.monotonic() + 15.0
            while True:
                source = decision_pb2.Source.Name((await decide(request, timeout=1.0)).source)
                if (source in MODEL_SOURCES) != forced:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"breakers forced open={forced}, Decide still from {source}")
                await asyncio.sleep(0.05)


# -- measuring ---------------------------------------------------------------------------


@dataclass
class Measured:
    results: Results
    cores: dict[Cell, tuple[float, ...]]
    """The cores kept busy (rounds averaged) by what answered, its audit shipper, and its
    model server."""
    workers_lost: int
    """TorchServe workers the replica lost: a cancelled call can cost one (pytorch/serve
    1888, 3087), and the cells after met a replica restarting it (each round's line says
    where)."""
    rounds: dict[Cell, list[LoadResult]] = field(default_factory=dict)


def spec_for(fleet: Fleet, cell: Cell, preset: Preset, args: argparse.Namespace) -> LoadSpec:
    key, mode, load = cell
    path = path_of(key)
    processes = 1 if mode == "closed" and load == 1 else args.processes
    # Closed loop: enough connections to stay within the stream cap (callers refused at
    # once would only spin). Open loop: one a process, the caller's contract, but a server
    # of several workers gets some on each (the kernel spreads connections, not calls).
    needed = math.ceil(load / processes / CALLS_PER_CONNECTION) if mode == "closed" else 1
    spread = args.channels if workers_of(path.server) > 1 else 1
    return LoadSpec(
        target=path.target,
        address=fleet.servers[path.server].address,
        mode=mode,
        seconds=preset.seconds,
        max_requests=int(preset.seconds * 200_000),  # a real bound, never reached
        concurrency=int(load) if mode == "closed" else 1,
        rate_per_s=load if mode == "open" else 0.0,
        warmup_s=preset.warmup_s,
        timeout_s=preset.open_deadline_s if mode == "open" else CLOSED_LOOP_DEADLINE_S,
        processes=processes,
        channels=max(needed, spread),
        burst=args.burst if mode == "open" else 1,
        caller_options=not (args.plain and mode == "open"),
    )


def first_cells(preset: Preset) -> list[Cell]:
    closed: list[Cell] = [
        (key, "closed", float(c * workers_of(path_of(key).server)))
        for c in preset.closed
        for key in preset.paths
    ]
    opened: list[Cell] = [(key, "open", rate) for rate in preset.rates for key in preset.paths]
    return closed + opened


async def measure(
    fleet: Fleet, generator: LoadGenerator, preset: Preset, args: argparse.Namespace
) -> Measured:
    rounds: dict[Cell, list[LoadResult]] = defaultdict(list)
    cores: dict[Cell, list[tuple[float, ...]]] = defaultdict(list)
    folder = fleet.replica_folder
    lost = [workers_lost(folder) if folder else 0]  # counted so far
    control = Control(fleet)

    def newly_lost() -> int:
        """Workers lost since the last count (a loss is logged as a cell's calls end)."""
        if folder is None:
            return 0
        lost.append(workers_lost(folder))
        return max(0, lost[-1] - lost[-2])  # max: a rolled log deleted

    async def run(cell: Cell, r: int, done: int, total: int) -> None:
        await control.prepare(cell[0])
        groups = fleet.groups(cell[0])
        began, before = time.monotonic(), group_cpu_seconds(groups, SHIPPER)
        result = await asyncio.to_thread(generator.run, spec_for(fleet, cell, preset, args))
        elapsed, after = max(time.monotonic() - began, 1e-9), group_cpu_seconds(groups, SHIPPER)
        busy = [max(a - b, 0.0) / elapsed for a, b in zip(after, before, strict=True)]
        rounds[cell].append(result)
        cores[cell].append(tuple(busy[:3]))  # a model server has no shipper
        line = describe(cell, result, busy)
        if new := newly_lost():
            line += f"; TorchServe lost {new} worker(s)"
        print(f"  [{done}/{total}] round {r + 1} {line}", flush=True)

    try:
        async with fresh_features(fleet.redis_url, Settings().redis.key_prefix):
            first = first_cells(preset)
            done, total = 0, len(first) * preset.rounds
            for r in range(preset.rounds):
                for cell in first:
                    done += 1
                    await run(cell, r, done, total)
            so_far = {c: LoadResult.combine(rs) for c, rs in rounds.items()}
            then: list[Cell] = []
            for key, factors in preset.capacity.items():
                own = capacity(so_far, key)
                print(f"  {key}'s capacity: {own:,.0f}/s", flush=True)
                if not math.isnan(own):
                    then += [
                        (key, "open", float(round(f * own))) for f in factors if round(f * own) > 0
                    ]
            done, total = 0, len(then) * preset.rounds
            for r in range(preset.rounds):
                for cell in then:
                    done += 1
                    await run(cell, r, done, total)
    finally:
        await control.close()
    await asyncio.sleep(LOSS_SETTLE_S)
    newly_lost()
    return Measured(
        {cell: LoadResult.combine(each) for cell, each in rounds.items()},
        {
            cell: tuple(sum(c) / len(c) for c in zip(*each, strict=True))
            for cell, each in cores.items()
        },
        max(0, lost[-1] - lost[0]),
        dict(rounds),
    )


# -- what it prints and writes -----------------------------------------------------------


def cell_text(cell: Cell) -> str:
    key, mode, load = cell
    return f"{key} {mode} {load_text(mode, load)}"


def errors_text(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) or "0"


def describe(cell: Cell, result: LoadResult, cores: Sequence[float]) -> str:
    return (
        f"{cell_text(cell)}: {result.throughput_per_s:,.0f}/s p50 {result.percentile_ms(50):.2f}"
        f" p99 {result.percentile_ms(99):.2f} ms, errors {result.error_count},"
        f" {answered_by(result) or 'no answers'}; cores: server {cores[0]:.2f}"
        f" + shipper {cores[1]:.2f}, model server {cores[2]:.2f},"
        f" loadgen {result.generator_cores:.2f}"
        f" (behind its schedule by {result.send_lag_max_ms:.0f} ms at most)"
    )


def capacity_table(measured: Measured, keys: Sequence[str]) -> str:
    """Each path's capacity, the cores behind it and per core, against the first path of
    its letter (D2 against D1), and its latency at its lowest closed-loop load."""
    results, rows, first = measured.results, [], dict[str, tuple[str, float]]()
    for key in keys:
        own = capacity(results, key)
        if math.isnan(own):
            continue
        best = max(
            (c for c in results if c[0] == key and c[1] == "closed"),
            key=lambda c: results[c].throughput_per_s,
        )
        used = sum(x for x in measured.cores.get(best, (math.nan,)) if not math.isnan(x))
        base_key, base = first.setdefault(key[0], (key, own))
        low = lowest(results, key, "closed")
        latency = f"{ms(results, low, 50):.2f} / {ms(results, low, 99):.2f}" if low else "-"
        rows.append((
            f"{key} {path_of(key).label}", f"{own:,.0f}", f"{used:.2f}",
            f"{own / used:,.0f}" if used else "-",
            f"{own / base:.2f} x" if key != base_key else "-",
            f"{load_text('closed', low[2])}: {latency}" if low else "-",
        ))  # fmt: skip
    header = ["path", ">capacity /s", ">cores there", ">per core /s", ">vs first", ">p50 / p99 ms"]
    return markdown_table(header, rows)


def open_loop_table(measured: Measured, preset: Preset) -> str:
    """The open-loop cells at multiples of a path's capacity: late, refused, from the model."""
    results, rows = measured.results, []
    for key in preset.capacity:
        own = capacity(results, key)
        for cell, r in results.items():
            if cell[0] != key or cell[1] != "open" or cell[2] in preset.rates:
                continue
            errors = dict(r.errors)
            late = errors.pop("DEADLINE_EXCEEDED", 0)
            rows.append((
                key, f"{cell[2]:,.0f}", f"{cell[2] / own:.2f}", f"{late:,}", f"{r.refused:,}",
                f"{r.refusal_percentile_ms(99):.2f}" if r.refused else "-",
                errors_text({k: n for k, n in errors.items() if k not in REFUSALS}),
                f"{100 * model_share_of_calls(r):.1f} %", f"{r.percentile_ms(99):.2f}",
            ))  # fmt: skip
    header = ["path", ">calls/s", ">x capacity", ">late", ">refused", ">refusal p99 ms",
              "other errors", ">model share of calls", ">p99 ms"]  # fmt: skip
    return markdown_table(header, rows)


def cpu_table(measured: Measured, preset: Preset) -> str:
    """At the fixed open-loop rates: each path's CPU per call by process, the server's
    own (its shipper's included) against the echo server's at that rate, and each
    round's p99, for the spread between rounds."""
    rows = []
    for key, mode, rate in measured.results:
        if mode == "open" and rate in preset.rates:
            us = [c * 1e6 / rate for c in measured.cores.get((key, mode, rate), [math.nan] * 3)]
            echo = measured.cores.get(("E", mode, rate), [math.nan])[0] * 1e6 / rate
            p99s = [
                f"{one.percentile_ms(99):.2f}" for one in measured.rounds.get((key, mode, rate), [])
            ]
            rows.append((f"{key} {path_of(key).label}", f"{rate:g}/s", *(f"{u:,.0f}" for u in us),
                         f"{(us[0] + us[1]) / echo:.2f}" if echo > 0 else "-",
                         " / ".join(p99s)))  # fmt: skip
    header = ["path", ">rate", ">server µs a call", ">shipper µs", ">model server µs",
              ">own / echo", ">p99 ms, each round"]  # fmt: skip
    return markdown_table(header, rows)


def pairs_table(results: Results, pairs: Sequence[tuple[str, str]]) -> str:
    """Each pair side by side: the latency one adds at the lowest load, and the ratio of
    their capacities."""
    rows = []
    for a, b in pairs:
        modes: tuple[Mode, ...] = ("closed", "open")
        for mode in modes:
            low = lowest(results, a, mode)
            if low is None:
                continue
            other = (b, mode, low[2])
            rows.append((
                f"{a} - {b}", load_text(mode, low[2]),
                f"{ms(results, low, 50) - ms(results, other, 50):+.3f}",
                f"{ms(results, low, 99) - ms(results, other, 99):+.3f}",
                f"{ms(results, low, 99) / ms(results, other, 99):.2f}",
            ))  # fmt: skip
        ratio = capacity(results, a) / capacity(results, b)
        if not math.isnan(ratio):
            rows.append((f"{a} / {b}", "capacity", "", "", f"{ratio:.2f}"))
    return markdown_table(["pair", "at", ">p50 ms added", ">p99 ms added", ">ratio"], rows)


def checks_table(checks: Sequence[Check]) -> str:
    return markdown_table(["target", ">measured", ">bound", "verdict"], [c.row() for c in checks])


def figures(measured: Measured, preset: Preset, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The run's figures as plain data."""
    results = measured.results
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": checkout_commit(),
        "cores": len(os.sched_getaffinity(0)),
        "arguments": dict(arguments),
        "capacity_per_s": {key: round(capacity(results, key), 1) for key in preset.paths},
        "cells": [
            {
                "path": key,
                "mode": mode,
                "load": load,
                "per_s": round(r.throughput_per_s, 1),
                "p50_ms": round(r.percentile_ms(50), 3),
                "p99_ms": round(r.percentile_ms(99), 3),
                "p999_ms": round(r.percentile_ms(99.9), 3),
                "errors": r.errors,
                "model_share": round(model_share(r), 4),
                "model_share_of_calls": round(model_share_of_calls(r), 4),
                "refusal_p99_ms": round(r.refusal_percentile_ms(99), 3),
                "send_lag_max_ms": round(r.send_lag_max_ms, 1),
                "cores": [round(c, 3) for c in measured.cores.get((key, mode, load), ())],
            }
            for (key, mode, load), r in results.items()
        ],
        "checks": [
            dict(zip(("target", "measured", "bound", "verdict"), c.row(), strict=True))
            for c in preset.checks(results)
        ],
        "workers_lost": measured.workers_lost,
    }


def plot(results: Results, keys: Sequence[str], out: Path, title: str) -> None:
    """Latency against achieved throughput, closed loop and open loop, per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), sharey=True)
    for ax, mode in zip(axes, ("closed", "open"), strict=True):
        for index, key in enumerate(keys):
            # In load order: past saturation, throughput can fall as load rises.
            points = sorted(
                (load, r.throughput_per_s, r.percentile_ms(50), r.percentile_ms(99))
                for (k, m, load), r in results.items()
                if k == key and m == mode and r.ok
            )
            if points:
                _, xs, p50s, p99s = zip(*points, strict=True)
                label = f"{key} {path_of(key).label}"
                ax.plot(xs, p50s, "o-", color=f"C{index}", label=f"{label} p50")
                ax.plot(xs, p99s, "s--", color=f"C{index}", alpha=0.7, label=f"{label} p99")
        ax.set_yscale("log")
        ax.set_xscale("log" if mode == "closed" else "linear")
        ax.set_xlabel("achieved throughput (requests/s)")
        ax.set_title(
            "closed loop, concurrency up" if mode == "closed" else "open loop, fixed rates"
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def shadow_counters(fleet: Fleet) -> str:
    """What the shadow scorer did (scored, dropped, failed; agreement), from /metrics."""
    samples = scrape(fleet.servers["decide"].metrics_port)
    return "shadow: " + "; ".join(
        f"{name}{''.join(f' {v}' for _, v in sorted(labels))} {value:g}"
        for (name, labels), value in sorted(samples.items(), key=str)
        if name in SHADOW_SAMPLES
    )


def report(measured: Measured, preset: Preset, caption: str) -> str:
    """The tables a doc keeps: capacity, past capacity, pairs, targets."""
    parts = [caption]
    if any(mode == "closed" for _, mode, _ in measured.results):
        parts.append(capacity_table(measured, preset.paths))
    if preset.capacity:
        parts.append(open_loop_table(measured, preset))
    if preset.rates:
        parts.append(cpu_table(measured, preset))
    if preset.pairs:
        parts.append(pairs_table(measured.results, preset.pairs))
    if checks := preset.checks(measured.results):
        parts.append(checks_table(checks))
    return "\n\n".join(parts)


# -- the command -------------------------------------------------------------------------


def numbers(text: str, number: Callable[[str], Any]) -> list[Any]:
    """``text``'s comma-separated values as ``number`` reads them, all above 0."""
    try:
        values = [number(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"positive numbers separated by commas, not {text!r}")
    return values


def cpu_list(text: str) -> list[int]:
    cpus, allowed = [], os.sched_getaffinity(0)
    with contextlib.suppress(ValueError):
        cpus = [int(part) for part in text.split(",") if part.strip()]
    if not cpus or not set(cpus) <= allowed:
        raise argparse.ArgumentTypeError(
            f"CPU numbers separated by commas, of {sorted(allowed)}, not {text!r}"
        )
    return cpus


OPTIONS: dict[str, dict[str, Any]] = {
    "--quick": {"action": "store_true", "help": "fewer, shorter runs: a smoke check"},
    "--seconds": {"type": float, "help": "measured seconds per cell and round"},
    "--rounds": {"type": int, "help": "rounds over every path and load"},
    "--processes": {"type": int, "help": "load generator processes (default: half the cores"
                    " it is left, 2 to 8)"},
    "--channels": {"type": int, "default": 4, "help": "connections per load generator"
                   " process to a server of several workers"},
    "--workers": {"type": functools.partial(numbers, number=int), "help": "the workers"
                  " preset's worker counts (default 1, 2, 4, 8 up to the servers' CPUs)"},
    "--model-server": {"choices": MODEL_SERVERS, "default": "torchserve",
                       "help": "what serves the champion to the decision servers"},
    "--server-cpus": {"type": cpu_list, "default": [], "help": "CPUs the decision servers"
                      " start on, every thread (a Guaranteed pod's cpuset), e.g. 0,1"},
    "--model-server-cpus": {"type": cpu_list, "default": [], "help": "the same for the"
                            " model servers"},
    "--burst": {"type": int, "default": 1, "help": "open loop: calls a load generator"
                " process sends at once, at the same mean rate"},
    "--plain": {"action": "store_true", "help": "open loop from plain channels, without"
                " decision_client.channel.CALLER_OPTIONS"},
    "--json": {"type": Path, "help": "figures file (default .run/bench-PRESET.json)"},
    "--png": {"type": Path, "help": "draw latency against throughput here"},
    "--doc": {"type": Path, "help": "put the tables in this doc's generated:bench-PRESET"
              " block"},
    "--keep": {"type": Path, "help": "run in this folder and keep it: every process's log"
               " and audit store"},
}  # fmt: skip


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Preset]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=PRESETS, help="paths and loads (docs/benchmarks.md)")
    for flag, options in OPTIONS.items():
        parser.add_argument(flag, **options)
    args = parser.parse_args(argv)
    if set(args.server_cpus) & set(args.model_server_cpus):
        parser.error("--server-cpus and --model-server-cpus overlap: a pod's containers do not")
    rest = os.sched_getaffinity(0) - set(args.server_cpus) - set(args.model_server_cpus)
    if args.processes is None:
        args.processes = max(2, min(8, len(rest or os.sched_getaffinity(0)) // 2))
    if args.workers is None:
        cpus = len(args.server_cpus) or len(os.sched_getaffinity(0))
        args.workers = [n for n in (1, 2, 4, 8) if n <= max(cpus, 1)]
    preset = PRESETS[args.preset]
    if args.preset == "workers":
        preset = workers_preset(args.workers, args.model_server)
    preset = preset.quick() if args.quick else preset
    preset = dataclasses.replace(
        preset, seconds=args.seconds or preset.seconds, rounds=args.rounds or preset.rounds
    )
    args.json = args.json or REPO / f".run/bench-{args.preset}.json"
    return args, preset


def run_folder(keep: Path | None) -> contextlib.AbstractContextManager[str | Path]:
    """``keep`` (left in place), or a temporary folder removed after."""
    return contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="bench-")


def main(argv: Sequence[str] | None = None) -> None:
    args, preset = parse(argv)
    # SIGTERM's default ends the process without `finally`, leaving every server behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    pinned = set(args.server_cpus) | set(args.model_server_cpus)
    if rest := os.sched_getaffinity(0) - pinned if pinned else set():
        # The load generator, redis-server and the echo server keep off the pinned CPUs,
        # as other pods keep off a pod's exclusive cores. Every thread: BLAS pools run.
        pin(os.getpid(), rest)
    generator = LoadGenerator(args.processes)
    with run_folder(args.keep) as tmp:
        run_dir = Path(tmp).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)  # --keep's, made if missing
        try:
            generator.start()  # the workers import while the model servers boot
            print(f"{args.preset}: starting the servers of {', '.join(preset.paths)} …", flush=True)
            with fleet_started(run_dir, preset.paths, args) as fleet:
                generator.wait_ready()
                print(
                    f"measuring {preset.rounds} round(s) of {preset.seconds:g} s a cell"
                    f" (+{preset.warmup_s:g} s warm-up), {args.processes} load generator"
                    " processes",
                    flush=True,
                )
                measured = asyncio.run(measure(fleet, generator, preset, args))
                shadow = shadow_counters(fleet) if "S" in preset.paths else ""
        finally:
            # A second SIGTERM must not cut the stopping short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            generator.stop()

    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    now = figures(measured, preset, arguments)
    caption = (
        f"`python -m loadtest.bench {args.preset}`, {now['when']} at {now['commit']},"
        f" {now['cores']} cores; {preset.rounds} x {preset.seconds:g} s a cell."
    )
    print(f"\n{report(measured, preset, caption)}")
    print(f"TorchServe workers lost: {measured.workers_lost}")
    if shadow:
        print(shadow)
    if args.png:
        title = f"gRPC paths ({preset.rounds} x {preset.seconds:g} s a point)"
        plot(measured.results, preset.paths, args.png, title)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(now, indent=1) + "\n")
    if args.doc:
        replace_generated(args.doc, f"bench-{args.preset}", report(measured, preset, caption))
    print(f"\nfigures: {args.json}; whole run {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
