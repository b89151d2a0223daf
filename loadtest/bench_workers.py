"""What ``decision-server --workers N`` gives on this machine: Decide's saturated
throughput as the server's worker count grows (the per-pod figure of the capacity notes).

Starts redis-server, one model server (``--model-server``: a TorchServe replica with the
primary sidecar's committed model section, or Triton serving the same champion archive)
and the bare echo server, then one decision server per worker count in
``--workers``, one after the other: each is stopped before the next starts, so only one
holds cores. For each worker count it measures, closed loop with ``--concurrency``
callers per worker (each call with a 1 s deadline):

- D: Decide through the whole chain; its capacity counts only the answers a model gave
  (a worker whose budgets run short answers the rest from the ladder);
- D open loop at the ``--open-loop`` multiples of that capacity, each call with the
  product's 50 ms deadline: where a pod of this shape starts answering late or from
  the ladder, which is what an autoscaler's target must stay below;
- F: closed loop again with both breakers forced open through AdminService: the
  fallback ladder answers, the server's own ceiling with no model call in it.

E (the echo server: one Python process, no work) and T (the model server called directly:
TorchServe's ``Predictions``, or Triton's OIP ``ModelInfer``) are measured once, for
reference. Every cell also says how many cores the decision server's
processes used (its whole process group, read from /proc), the model server's and the load
generator's: a server that scales leaves a core or more per worker busy, and a load
generator near one core per process means it, not the server, set the figure.
Prints a markdown table of every cell, the best D and F figure per worker count with
its ratio to the first count's, and D's open-loop cells against its capacity; writes the
figures to ``--json``. ``--server-cpus`` and ``--model-server-cpus`` pin those processes
(every thread) to CPUs of their own, as a pod with Guaranteed QoS under the static CPU
manager is held; the load generator and the rest then keep to the other CPUs. Everything
it starts is stopped on the way out, by process group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the virtualenv

from core.processes import ManagedProcess, free_ports, listening
from loadtest.bench_latency import BACKENDS, QUIET, echo_server, fresh_features
from loadtest.bench_paths import OPEN_LOOP_DEADLINE_S, TOKEN, BreakerSwitch
from loadtest.loadgen import REFUSALS, LoadGenerator, LoadResult, LoadSpec, Mode, Target
from loadtest.report import (
    answered_by,
    checkout_commit,
    load_text,
    model_share,
    model_share_of_calls,
)
from loadtest.soak_probe import group_cpu_seconds, usage_of
from localstack.health import serving
from localstack.stack import MODEL_SERVERS, LocalStack, started

REPO = Path(__file__).resolve().parents[1]
CLOSED_LOOP_DEADLINE_S = 1.0
# What T calls on each model server: the protocol the decision server speaks to it.
MODEL_SERVER_TARGETS: dict[str, Target] = {"torchserve": "torchserve", "triton": "oip"}


@dataclass(frozen=True)
class Cell:
    path: str
    workers: int  # the decision server's; 0 for E and T
    mode: Mode
    load: float  # callers (closed loop) or calls a second (open loop)

    def text(self) -> str:
        return f"{self.path} workers {self.workers or '-'} {load_text(self.mode, self.load)}"


@dataclass(frozen=True)
class Row:
    cell: Cell
    result: LoadResult
    server_cores: float
    model_server_cores: float
    # Each worker's own cores and the connections it held midway (D and F only): how
    # evenly SO_REUSEPORT's hash of the connections spread the load.
    worker_cores: tuple[float, ...] = ()
    worker_connections: tuple[int, ...] = ()

    def figures(self) -> dict[str, Any]:
        r = self.result
        return {
            "path": self.cell.path,
            "workers": self.cell.workers,
            "mode": self.cell.mode,
            "load": self.cell.load,
            "per_s": round(r.throughput_per_s, 1),
            "p50_ms": round(r.percentile_ms(50), 3),
            "p99_ms": round(r.percentile_ms(99), 3),
            "errors": r.errors,
            "model_share": round(model_share(r), 4),
            "server_cores": round(self.server_cores, 2),
            "model_server_cores": round(self.model_server_cores, 2),
            "loadgen_cores": round(r.generator_cores, 2),
            "worker_cores": [round(cores, 2) for cores in self.worker_cores],
            "worker_connections": list(self.worker_connections),
        }

    def spread(self) -> str:
        """The least and the most busy worker's cores and connections (when counted), or
        ``-``."""
        if len(self.worker_cores) < 2:
            return "-"
        cores, connections = self.worker_cores, self.worker_connections
        held = f", {min(connections)} to {max(connections)} connections" if connections else ""
        return f"{min(cores):.2f} to {max(cores):.2f} cores{held}"


def tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all its descendants."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def pin(pid: int, cpus: Collection[int]) -> int:
    """Every thread of the process ``pid`` and of its descendants on ``cpus``; returns
    how many threads it pinned. Affinity is per thread (a process's is only its main
    thread's), and a thread inherits the affinity of the thread that made it, so a
    thread made meanwhile by one not yet pinned escapes: pin a process before it starts
    threads where it matters (``started_on``)."""
    pinned = 0
    for proc in tree(pid):
        try:
            tasks = list(Path(f"/proc/{proc.pid}/task").iterdir())
        except FileNotFoundError:  # a process that ended meanwhile
            continue
        for task in tasks:
            try:
                os.sched_setaffinity(int(task.name), set(cpus))
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
            pinned += 1
    return pinned


@contextlib.contextmanager
def started_on(cpus: Collection[int]) -> Iterator[None]:
    """Processes started in the block (from this thread) start on ``cpus``, as a
    container's processes start inside its cpuset under Kubernetes' static CPU manager:
    a JVM or a thread pool sizes itself by the CPUs it may use when it starts. No
    ``cpus``: no change."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def sockets_on(pid: int, port: int, status: str) -> int:
    """How many of the process ``pid``'s TCP sockets on local ``port`` are in ``status``
    (0 for a process that ended)."""
    try:
        sockets = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:  # ended, or not ours to read
        return 0
    return sum(1 for s in sockets if s.status == status and s.laddr.port == port)


def listening_pids(pid: int | None, port: int) -> list[int]:
    """The processes of ``pid``'s tree that listen on TCP ``port``: a server's workers."""
    if pid is None:
        return []
    return [proc.pid for proc in tree(pid) if sockets_on(proc.pid, port, psutil.CONN_LISTEN)]


def listeners(pid: int | None, port: int) -> int:
    """How many processes of ``pid``'s tree listen on TCP ``port``."""
    return len(listening_pids(pid, port))


def process_cpu_seconds(pids: Sequence[int]) -> list[float]:
    """CPU seconds of each process (every thread of it), from /proc."""
    return [usage_of([pid]).cpu_s for pid in pids]


@dataclass(frozen=True)
class Busy:
    """The cores each process group and each process kept busy while a cell ran, and the
    connections each process held on the port at its midpoint."""

    group_cores: list[float]
    process_cores: list[float]
    connections: list[int]


def cores_during(
    pgids: Sequence[int | None],
    run: Callable[[], LoadResult],
    *,
    pids: Sequence[int] = (),
    port: int = 0,
    midpoint_s: float = 0.0,
    measured_from_s: float = 0.0,
) -> tuple[LoadResult, Busy]:
    """``run``'s result and what kept busy while it ran: the cores of each process group
    in ``pgids`` and of each process in ``pids`` from ``measured_from_s`` after the start
    to the end (the load generator's warm-up left out, as its own cores leave it out;
    from the start when ``run`` ended first), and how many connections each of ``pids``
    held on ``port`` ``midpoint_s`` after the start (the load generator connects anew
    for every cell; none counted when ``run`` ended first). A process that ended
    meanwhile counts 0 cores, not less."""
    connections: list[int] = []

    def count_connections() -> None:
        connections[:] = [sockets_on(pid, port, psutil.CONN_ESTABLISHED) for pid in pids]

    def cpu_now() -> tuple[float, tuple[list[float], list[float]]]:
        return time.monotonic(), (group_cpu_seconds(pgids), process_cpu_seconds(pids))

    start = [cpu_now()]

    def start_measuring() -> None:
        start[0] = cpu_now()

    counter = threading.Timer(midpoint_s, count_connections)
    warmed = threading.Timer(measured_from_s, start_measuring)
    counter.start()  # with no pids it counts nothing
    warmed.start()
    try:
        result = run()
    finally:
        counter.cancel()
        warmed.cancel()
    counter.join()
    warmed.join()
    began, before = start[0]
    elapsed = max(time.monotonic() - began, 1e-9)
    after = group_cpu_seconds(pgids), process_cpu_seconds(pids)
    group_cores, process_cores = (
        [max(a - b, 0.0) / elapsed for a, b in zip(late, early, strict=True)]
        for late, early in zip(after, before, strict=True)
    )
    return result, Busy(group_cores, process_cores, connections)


def errors_text(errors: dict[str, int]) -> str:
    """``errors`` by gRPC status name as ``CODE n, CODE n``, or ``0``."""
    return ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) or "0"


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| path | workers | load | req/s | p50 ms | p99 ms | errors | answered by"
        " | server cores | model server cores | loadgen cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        f = row.figures()
        errors = errors_text(row.result.errors)
        lines.append(
            f"| {f['path']} | {f['workers'] or '-'} | {load_text(row.cell.mode, row.cell.load)}"
            f" | {f['per_s']:,.0f}"
            f" | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {errors} | {answered_by(row.result)}"
            f" | {f['server_cores']:.2f} | {f['model_server_cores']:.2f}"
            f" | {f['loadgen_cores']:.2f} |"
        )
    return "\n".join(lines)


def best(rows: Sequence[Row], path: str, workers: int) -> float:
    """The path's best throughput at this worker count; for D only the decisions a model
    made count, or an overloaded server shedding to the ladder would pass for a fast one
    (bench_paths' ``saturated`` counts the same way)."""
    return max(
        (
            row.result.throughput_per_s * (model_share(row.result) if path == "D" else 1.0)
            for row in rows
            if row.cell.path == path and row.cell.workers == workers and row.cell.mode == "closed"
        ),
        default=0.0,
    )


def scaling(rows: Sequence[Row], worker_counts: Sequence[int]) -> str:
    first = worker_counts[0]
    lines = [
        f"| workers | D: model answers/s | D vs {first} | F: ladder answers/s | F vs {first} |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    d_one, f_one = best(rows, "D", first), best(rows, "F", first)
    for n in worker_counts:
        d, f = best(rows, "D", n), best(rows, "F", n)
        lines.append(
            f"| {n} | {d:,.0f} | {d / d_one if d_one else 0:.2f} x"
            f" | {f:,.0f} | {f / f_one if f_one else 0:.2f} x |"
        )
    return "\n".join(lines)


def positive_numbers(text: str, number: Callable[[str], float]) -> list[Any]:
    """``text``'s comma-separated values as ``number`` reads them, all above 0."""
    try:
        values = [number(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"positive numbers separated by commas, not {text!r}")
    return values


def float_list(text: str) -> list[float]:
    return positive_numbers(text, float)


def int_list(text: str) -> list[int]:
    return positive_numbers(text, int)


def cpu_list(text: str) -> list[int]:
    try:
        cpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        cpus = []
    allowed = os.sched_getaffinity(0)
    if not cpus or not set(cpus) <= allowed:
        raise argparse.ArgumentTypeError(
            f"CPU numbers separated by commas, of {sorted(allowed)}, not {text!r}"
        )
    return cpus


def default_workers(cpus: int) -> list[int]:
    """1, 2, 4, 8 up to the CPUs the servers may use (at least 1)."""
    return [n for n in (1, 2, 4, 8) if n <= max(cpus, 1)]


def default_processes(cpus: int) -> int:
    """Half the CPUs the load generator may use, 2 to 8."""
    return max(2, min(8, cpus // 2))


def setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name.startswith("DECISION_"):
        raise argparse.ArgumentTypeError(f"DECISION_…=VALUE, not {text!r}")
    return name, value


def open_loop(rows: Sequence[Row]) -> str:
    """D's open-loop cells: how its answers hold up as the load nears its capacity."""
    lines = [
        "| workers | calls/s | x capacity | late (DEADLINE_EXCEEDED) | refused | refusal p99 ms"
        " | other errors | model share of calls | p99 ms | workers' spread |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for row in rows:
        if row.cell.mode != "open":
            continue
        capacity = best(rows, "D", row.cell.workers)
        errors = dict(row.result.errors)
        late = errors.pop("DEADLINE_EXCEEDED", 0)
        others = errors_text({k: n for k, n in errors.items() if k not in REFUSALS})
        refused = row.result.refused
        refusal_p99 = f"{row.result.refusal_percentile_ms(99):.2f}" if refused else "-"
        lines.append(
            f"| {row.cell.workers} | {row.cell.load:,.0f} | {row.cell.load / capacity:.2f}"
            f" | {late} | {refused} | {refusal_p99} | {others}"
            f" | {100 * model_share_of_calls(row.result):.1f} %"
            f" | {row.result.percentile_ms(99):.2f} | {row.spread()} |"
        )
    return "\n".join(lines)


class Bench:
    """The servers this run started (each added to ``procs`` before it starts) and the
    load generator; measures one cell at a time and prints it as it goes."""

    def __init__(self, args: argparse.Namespace, run_dir: Path, generator: LoadGenerator) -> None:
        self.args = args
        self.run_dir = run_dir
        self.generator = generator
        self.procs: list[ManagedProcess] = []
        self.rows: list[Row] = []
        per_server = 2 * len(args.concurrency) + len(args.open_loop)
        self.total = 2 * len(args.concurrency) + per_server * len(args.workers)
        (self.echo_port,) = free_ports(1)
        self._stack: LocalStack | None = None  # redis-server and the model server
        self.exits = contextlib.ExitStack()  # stops them
        self.echo: ManagedProcess | None = None

    def start_backends(self) -> None:
        # redis-server starts first, on the model server's CPUs too; it moves after.
        with started_on(self.args.model_server_cpus):
            self._stack = self.exits.enter_context(
                started(self.run_dir, BACKENDS, model_server=self.args.model_server)
            )
        redis = self.stack.processes["redis-server"]
        if self.args.model_server_cpus and redis.pid is not None:
            pin(redis.pid, os.sched_getaffinity(0))
        self.echo = echo_server(self.echo_port, self.run_dir)
        self.procs.append(self.echo)
        self.echo.start()
        self.echo.wait_ready(listening(self.echo_port), 30)

    @property
    def stack(self) -> LocalStack:
        if self._stack is None:
            raise RuntimeError("start_backends first")
        return self._stack

    @property
    def model_port(self) -> int:
        return self.stack.primary.grpc_inference

    def measure(
        self, cell: Cell, address: str, server: ManagedProcess | None, workers: Sequence[int] = ()
    ) -> None:
        """One cell; ``workers``: the server's worker pids, each measured on its own."""
        closed = cell.mode == "closed"
        spec = LoadSpec(
            target=self.target(cell.path),
            address=address,
            mode=cell.mode,
            seconds=self.args.seconds,
            max_requests=int(self.args.seconds * 200_000),  # a real bound, never reached
            concurrency=int(cell.load) if closed else 1,
            rate_per_s=0.0 if closed else cell.load,
            warmup_s=self.args.warmup,
            timeout_s=CLOSED_LOOP_DEADLINE_S if closed else OPEN_LOOP_DEADLINE_S,
            processes=self.generator.processes,
            channels=self.args.channels,
        )
        groups = [server.pid if server else None, self.model_server_pid()]
        # When the cell began, to find its decisions in a kept audit store (--keep).
        began = time.strftime("%H:%M:%SZ", time.gmtime())
        result, busy = cores_during(
            groups,
            lambda: self.generator.run(spec),
            pids=workers,
            port=int(address.rpartition(":")[2]),
            midpoint_s=self.args.warmup + self.args.seconds / 2,
            measured_from_s=self.args.warmup,
        )
        server_cores, model_cores = busy.group_cores
        row = Row(
            cell,
            result,
            server_cores,
            model_cores,
            tuple(busy.process_cores),
            tuple(busy.connections),
        )
        self.rows.append(row)
        f = row.figures()
        print(
            f"  [{len(self.rows)}/{self.total}] {began} {cell.text()}:"
            f" {f['per_s']:,.0f}/s p50 {f['p50_ms']:.2f}"
            f" p99 {f['p99_ms']:.2f} ms, errors {result.error_count},"
            f" {answered_by(result) or 'no answers'}; cores: server {server_cores:.2f},"
            f" {self.args.model_server} {model_cores:.2f}, loadgen {result.generator_cores:.2f}"
            + (f"; workers {row.spread()}" if len(workers) > 1 else ""),
            flush=True,
        )

    def target(self, path: str) -> Target:
        if path == "T":
            return MODEL_SERVER_TARGETS[self.args.model_server]
        return "echo" if path == "E" else "decide"

    def model_server_pid(self) -> int | None:
        return self.stack.processes[f"{self.args.model_server}-primary"].pid

    async def run(self) -> None:
        echo = f"127.0.0.1:{self.echo_port}"
        model_server = f"127.0.0.1:{self.model_port}"
        async with fresh_features(self.stack.redis_port):
            for c in self.args.concurrency:
                await asyncio.to_thread(self.measure, Cell("E", 0, "closed", c), echo, self.echo)
                t = Cell("T", 0, "closed", c)
                await asyncio.to_thread(self.measure, t, model_server, None)
            for workers in self.args.workers:
                await self.run_workers(workers)

    async def run_workers(self, workers: int) -> None:
        decide_port, admin_port = free_ports(2)
        server = self.stack.decision_server(
            f"decision-server-{workers}",
            decide_port,
            self.run_dir / f"workers-{workers}",
            {
                **QUIET,
                "DECISION_SERVER__WORKERS": str(workers),
                "DECISION_ADMIN__PORT": str(admin_port),
                "DECISION_ADMIN__TOKENS": f"bench operator {TOKEN}",
                **dict(self.args.server_env),
            },
        )
        self.procs.append(server)
        cpus = f" on CPUs {self.args.server_cpus}" if self.args.server_cpus else ""
        print(f"starting a decision server with {workers} worker(s){cpus} …", flush=True)
        with started_on(self.args.server_cpus):
            server.start()
        try:
            # Ready when every worker listens: connections are spread as they open.
            await asyncio.to_thread(
                server.wait_ready,
                lambda: serving(decide_port) and listeners(server.pid, decide_port) >= workers,
                60,
            )
            address = f"127.0.0.1:{decide_port}"
            pids = listening_pids(server.pid, decide_port)
            async with BreakerSwitch(f"127.0.0.1:{admin_port}", address) as switch:
                cells = [Cell("D", workers, "closed", c * workers) for c in self.args.concurrency]
                await self.measure_all(switch, cells, address, server, pids)
                capacity = best(self.rows, "D", workers)
                rates = [round(f * capacity) for f in self.args.open_loop]
                cells = [Cell("D", workers, "open", rate) for rate in rates if rate > 0]
                await self.measure_all(switch, cells, address, server, pids)
                cells = [Cell("F", workers, "closed", c * workers) for c in self.args.concurrency]
                await self.measure_all(switch, cells, address, server, pids)
        finally:
            server.stop()

    async def measure_all(
        self,
        switch: BreakerSwitch,
        cells: Sequence[Cell],
        address: str,
        server: ManagedProcess,
        workers: Sequence[int],
    ) -> None:
        for cell in cells:
            await switch.prepare(cell.path)
            await asyncio.to_thread(self.measure, cell, address, server, workers)


def main(argv: Sequence[str] | None = None) -> None:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers",
        type=int_list,
        help="decision server worker counts, comma separated (default: 1, 2, 4, 8 up to"
        f" the CPUs of --server-cpus, else the cores this process may use, {cores} here)",
    )
    parser.add_argument(
        "--concurrency",
        type=int_list,
        default=[16, 32],
        help="closed-loop callers per decision server worker (E and T: per cell);"
        " past a connection's stream cap (DECISION_SERVER__MAX_CONCURRENT_STREAMS) calls"
        " are refused",
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="load generator processes (default: half the cores it is left, 2 to 8)",
    )
    parser.add_argument("--channels", type=int, default=8, help="connections per process")
    parser.add_argument(
        "--open-loop",
        type=float_list,
        default=[0.5, 0.7, 0.85, 1.0],
        help="D open loop at these multiples of each worker count's measured capacity,"
        " comma separated (default 0.5,0.7,0.85,1.0)",
    )
    parser.add_argument(
        "--server-env",
        type=setting,
        action="append",
        default=[],
        metavar="DECISION_…=VALUE",
        help="a setting for the decision servers (repeatable), e.g."
        " DECISION_SERVER__MAX_CONCURRENT_STREAMS=8",
    )
    parser.add_argument(
        "--server-cpus",
        type=cpu_list,
        default=[],
        help="CPUs the decision servers start on (every process and thread, as a pod with"
        " Guaranteed QoS under the static CPU manager), e.g. 0,1; default: the CPUs"
        " not pinned, shared with the load generator",
    )
    parser.add_argument(
        "--model-server",
        choices=MODEL_SERVERS,
        default="torchserve",
        help="what serves the champion: a TorchServe replica or Triton (make setup-triton)",
    )
    parser.add_argument(
        "--model-server-cpus", type=cpu_list, default=[], help="the same for the model server"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    parser.add_argument(
        "--json", type=Path, default=REPO / ".run/bench_workers.json", help="figures file"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="run in this folder and keep it: every process's log, each server's journal"
        " and audit store (SQLite), to read why decisions went as they did with"
        " `python -m server.audit timeline` (each cell's line gives its start, UTC;"
        " default: a temporary folder, removed)",
    )
    args = parser.parse_args(argv)
    if set(args.server_cpus) & set(args.model_server_cpus):
        parser.error("--server-cpus and --model-server-cpus overlap: a pod's containers do not")
    pinned = set(args.server_cpus) | set(args.model_server_cpus)
    rest = os.sched_getaffinity(0) - pinned
    if args.workers is None:
        args.workers = default_workers(len(args.server_cpus) or cores)
    if args.processes is None:
        args.processes = default_processes(len(rest or pinned))

    # SIGTERM's default ends the process without `finally`, leaving every server behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    if pinned:
        # The load generator, redis-server and the echo server (started from here) keep
        # off the pinned CPUs, as other pods keep off a pod's exclusive cores. Every
        # thread: numpy's BLAS pool is already running.
        if rest:
            pin(os.getpid(), rest)
            print(f"the load generator, redis-server and the echo server on CPUs {sorted(rest)}")
        else:
            print("no CPU left beside the pinned ones: the load generator shares them")
    generator = LoadGenerator(args.processes)
    with kept_or_temporary(args.keep) as run_dir:
        bench = Bench(args, run_dir, generator)
        try:
            generator.start()  # the workers import while the model server boots
            print(f"starting redis-server, {args.model_server}, the echo server ({cores} cores) …")
            bench.start_backends()
            generator.wait_ready()
            print(
                f"measuring {bench.total} cells of {args.seconds:g} s (+{args.warmup:g} s"
                f" warm-up), {args.processes} load generator processes of"
                f" {args.channels} connections each",
                flush=True,
            )
            asyncio.run(bench.run())
        finally:
            # A second SIGTERM must not cut the stopping short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            generator.stop()
            for proc in reversed(bench.procs):
                proc.stop()
            bench.exits.close()
            # What was measured is kept, also when the run was cut short.
            write_figures(args, cores, bench.rows)

    print()
    print(table(bench.rows))
    print()
    print(scaling(bench.rows, args.workers))
    print()
    print(open_loop(bench.rows))
    print(f"\nfigures: {args.json}; whole run {time.monotonic() - began:.0f} s")


@contextlib.contextmanager
def kept_or_temporary(keep: Path | None) -> Iterator[Path]:
    """``keep`` (made if missing, left in place), or a temporary folder removed after."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        yield Path(tmp)


def write_figures(args: argparse.Namespace, cores: int, rows: Sequence[Row]) -> None:
    """The run's figures and how it was run, to ``args.json``."""
    figures = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": checkout_commit(),
        "cores": cores,
        "cpu": psutil.cpu_count(logical=True),
        # All but --json (where the figures went); --keep as text.
        "arguments": {
            name: str(value) if isinstance(value, Path) else value
            for name, value in vars(args).items()
            if name != "json"
        },
        "rows": [row.figures() for row in rows],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
