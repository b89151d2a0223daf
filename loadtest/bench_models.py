"""The models' serving costs on TorchServe, measured in one run on this machine.

1. Handler latency, direct calls: this process calls one TorchServe replica (one model,
   one worker, batch size 1, no batch delay) with 1, 8 and 64 held-out rows per request,
   over the native ``Predictions`` API (rows packed as float32) and over the Open
   Inference Protocol (``ModelInfer``, an FP32 tensor), through the service's own
   ``TorchServeClient`` and ``OipClient``; concurrency 1, after a warm-up. The champion
   (TorchScript MLP) and the challenger (XGBoost) each get a replica of their own, one
   after the other. The (protocol, rows) cases are measured in rounds whose order
   rotates, so that machine noise lands on all of them alike. "p50/p99" is the whole
   ``predict`` call (encode, RPC, decode); "RPC p50" is the gRPC call alone; "handler
   p50" is the handler's own time per call, TorchServe's ``PredictionTime`` metric from
   the replica's ``model_metrics.log`` (the rest of the RPC is gRPC, the JVM frontend and
   its socket hop to the Python worker).
2. Input encoding, in-process: what the native API's input costs per request, packed
   float32 (``pack_rows`` + the handler's ``_packed_rows``) against compact JSON
   (``json.dumps`` + ``json.loads`` + ``np.asarray(float32)`` + the same finiteness
   check), for 1, 8 and 64 rows; each request timed on its own, in microseconds.
3. TorchServe's server-side batching: the champion on one replica with one worker, per
   (batchSize, maxBatchDelay ms) setting, a fresh replica each time; a closed loop of
   1-row native requests at concurrency 1 and at 16 (asyncio tasks on one client
   channel) for a fixed time after a warm-up. At concurrency 1 a batch delay can only
   add latency; at 16 a batch may fill, and throughput is what batching could buy;
   "mean batch" is the requests per handler call, from the same metric. The settings
   run in passes, the order reversed in every other one so that drift lands on all of
   them alike; the table pools the passes and shows each pass's figures too, which is
   how far two runs of the same setting land apart. Then the recommendation: the best
   pooled throughput at 16 among the settings whose pooled p50 at concurrency 1 is
   within +1 ms of (1, 0)'s, with a caution when (1, 0) itself moved more than that.
4. What a call costs TorchServe: the champion with no batching of its own (as the
   decision server calls it, batching rows itself), a fresh replica per frontend setting
   (``FRONTENDS``: one worker, two, one with a single netty thread on each side), 16
   concurrent native requests of 1, 8 and 64 rows; calls and rows a second, the cores
   the replica's process group used (its JVM and workers, from /proc), CPU per call, and
   calls and rows a second per core. Passes alternate as in 3. ``--parts 4`` runs it
   alone.

The client, the TorchServe JVM and its Python worker share this machine's cores (2 on
the development box, which other work shares too): the numbers are noisy and the closed
loop's client takes CPU from the server it measures. Compare rows of one run; repeat a
run before trusting a difference of a few tenths of a millisecond.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import gc
import json
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.processes import ManagedProcess, free_ports
from core.stats import percentile
from feature_cache.schema import MODEL_INPUT_WIDTH, pack_rows
from loadtest.soak_probe import group_cpu_seconds
from server.model_client import ModelClient, TorchServeClient
from server.model_errors import ModelCallError
from server.oip import OipClient
from torchserve.handler import ScoreHandler
from torchserve.replica import (
    ModelServing,
    ReplicaPorts,
    start_replica,
    torchserve_replica,
)
from torchserve.train import REPO, ensure_models

MODEL_STORE = REPO / ".run/models"
MODELS = ("champion", "challenger")
BATCH_ROWS = (1, 8, 64)
PROTOCOLS: dict[str, Callable[[str, str, str], ModelClient]] = {
    "native": TorchServeClient,
    "oip": OipClient,
}
# (batchSize, maxBatchDelay ms); the first is the baseline the others are held against.
BATCHING = ((1, 0), (8, 0), (16, 0), (8, 1), (16, 2))
LOW, HIGH = 1, 16  # the closed loop's concurrencies
LOAD_CONCURRENCY = (LOW, HIGH)
C1_SLACK_MS = 1.0  # how much p50 at concurrency 1 a setting may add over (1, 0)
TIMEOUT_S = 2.0
WARMUP_CALLS = 200  # per case in part 1
WARMUP_S = 1.0  # per concurrency in part 3
REPLICA_PORTS = len(dataclasses.fields(ReplicaPorts))
# Part 4: the frontend's settings, each on a fresh replica serving the champion with no
# batching of its own (the decision server batches, as on the decision path).
ONE_NETTY_THREAD_A_SIDE = "number_of_netty_threads=1\nnetty_client_threads=1\n"
FRONTENDS = {
    "1 worker": ModelServing("champion", workers=1).properties(),
    "2 workers": ModelServing("champion", workers=2).properties(),
    "1 worker, 1 netty thread a side": ModelServing("champion", workers=1).properties()
    + ONE_NETTY_THREAD_A_SIDE,
}

Rows = list[list[float]]


def say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def replica_serving(
    run_dir: Path, name: str, model_name: str, section: str
) -> Iterator[tuple[ManagedProcess, str]]:
    """A fresh TorchServe replica with this model section, ready; yields it and its gRPC
    inference address, and stops it on the way out."""
    ports = ReplicaPorts(*free_ports(REPLICA_PORTS))
    replica = torchserve_replica(name, ports, MODEL_STORE, run_dir, model_section=section)
    try:
        start_replica(replica, ports, model_name=model_name)
        yield replica, f"127.0.0.1:{ports.grpc_inference}"
    finally:
        replica.stop()


def heldout_batches(x: np.ndarray[Any, Any], n: int, count: int = 64) -> list[Rows]:
    """``count`` distinct requests of ``n`` consecutive held-out rows each."""
    stride = max(1, (len(x) - n) // count)
    return [x[k * stride : k * stride + n].tolist() for k in range(count)]


def ms_cell(values: Sequence[float], q: float) -> str:
    return f"{percentile(values, q):.3f}" if values else "-"


# One line per handler call: "<local time> - PredictionTime.ms:<ms>|...requestID:<ids>,..."
PREDICTION_LINE = re.compile(
    r"^(\S+) - PredictionTime\.ms:([0-9.]+)\|.*requestID:([^|]*?),timestamp:"
)


@dataclasses.dataclass
class HandlerCall:
    at: float  # epoch seconds, when TorchServe logged it
    ms: float
    requests: int


class Windows:
    """Labelled stretches of time, to attribute the replica's handler calls to cases."""

    def __init__(self) -> None:
        self._starts: list[float] = []
        self._labels: list[str | None] = []

    def mark(self, label: str | None) -> None:
        """From now on, handler calls belong to ``label`` (None: to nobody, a warm-up)."""
        self._starts.append(time.time())
        self._labels.append(label)

    def calls(self, replica: ManagedProcess) -> dict[str, list[HandlerCall]]:
        """The replica's handler calls so far, by label; ``mark(None)`` first."""
        log = replica.log_path.with_name("model_metrics.log")
        out: dict[str, list[HandlerCall]] = {}
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for line in lines:
            match = PREDICTION_LINE.match(line)
            if match is None:
                continue
            stamp, ms, ids = match.groups()
            # TorchServe logs local time without an offset; timestamp() reads it as local.
            at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S,%f").timestamp()  # noqa: DTZ007
            label = self._labels[bisect.bisect_right(self._starts, at) - 1]
            if at >= self._starts[0] and label is not None:
                out.setdefault(label, []).append(HandlerCall(at, float(ms), ids.count(",") + 1))
        return out


def handler_calls(replica: ManagedProcess, windows: Windows) -> dict[str, list[HandlerCall]]:
    """After the last window: waits for TorchServe's asynchronous log to catch up."""
    windows.mark(None)
    time.sleep(1.0)
    return windows.calls(replica)


# -- 1. handler latency --------------------------------------------------------------


@dataclasses.dataclass
class Latencies:
    wall_ms: list[float] = dataclasses.field(default_factory=list)
    rpc_ms: list[float] = dataclasses.field(default_factory=list)


async def handler_latency(
    address: str,
    model_name: str,
    batches: dict[int, list[Rows]],
    calls: int,
    rounds: int,
    windows: Windows,
) -> dict[tuple[str, int], Latencies]:
    """Per (protocol, rows): ``calls`` sequential calls in ``rounds`` rotating rounds."""
    clients = {p: make(f"bench-{p}", address, model_name) for p, make in PROTOCOLS.items()}
    cases = [(p, n) for p in PROTOCOLS for n in batches]
    results = {case: Latencies() for case in cases}

    async def run(case: tuple[str, int], count: int, record: bool) -> None:
        protocol, n = case
        windows.mark(f"{protocol}/{n}" if record else None)
        client, pool = clients[protocol], batches[n]
        for i in range(count):
            rows = pool[i % len(pool)]
            started = time.perf_counter()
            answer = await client.predict(rows, TIMEOUT_S)
            wall_ms = (time.perf_counter() - started) * 1000
            if len(answer.scores) != n:
                raise RuntimeError(f"{case}: {len(answer.scores)} scores for {n} rows")
            if record:
                results[case].wall_ms.append(wall_ms)
                results[case].rpc_ms.append(answer.elapsed_ms)

    for client in clients.values():
        await client.start()
    try:
        for case in cases:  # warm-up, not recorded (the JVM's JIT needs a few hundred)
            await run(case, WARMUP_CALLS, record=False)
        per_round = max(1, calls // rounds)
        for r in range(rounds):
            order = cases[r % len(cases) :] + cases[: r % len(cases)]
            for case in order:
                await run(case, per_round, record=True)
            medians = ", ".join(
                f"{p}/{n} {percentile(results[p, n].wall_ms, 0.5):.2f}" for p, n in cases
            )
            say(f"    round {r + 1}/{rounds}, p50 ms so far: {medians}")
    finally:
        for client in clients.values():
            await client.stop()
    return results


def bench_handlers(
    run_dir: Path, batches: dict[int, list[Rows]], calls: int, rounds: int
) -> list[str]:
    say(
        f"[1/4] handler latency: {calls} calls per (model, protocol, rows), concurrency 1,"
        " batchSize 1, maxBatchDelay 0"
    )
    lines = []
    for model_name in MODELS:
        section = ModelServing(model_name, batch_size=1, max_batch_delay_ms=0).properties()
        say(f"  starting TorchServe with {model_name} …")
        started = time.perf_counter()
        name = f"latency-{model_name}"
        with replica_serving(run_dir, name, model_name, section) as (replica, address):
            say(f"    ready in {time.perf_counter() - started:.1f} s; measuring")
            windows = Windows()
            results = asyncio.run(
                handler_latency(address, model_name, batches, calls, rounds, windows)
            )
            handler = handler_calls(replica, windows)
        for (protocol, n), lat in results.items():
            handler_ms = [call.ms for call in handler.get(f"{protocol}/{n}", [])]
            lines.append(
                f"| {model_name} | {protocol} | {n} | {len(lat.wall_ms)} |"
                f" {ms_cell(lat.wall_ms, 0.5)} | {ms_cell(lat.wall_ms, 0.99)} |"
                f" {ms_cell(lat.rpc_ms, 0.5)} | {ms_cell(handler_ms, 0.5)} |"
            )
    return [
        "| model | protocol | rows | calls | p50 ms | p99 ms | RPC p50 ms | handler p50 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *lines,
    ]


# -- 2. input encoding ---------------------------------------------------------------


def time_each(fn: Callable[[Rows], object], pool: Sequence[Rows], count: int) -> list[float]:
    """Microseconds of each of ``count`` calls, after ``count // 10`` not timed."""
    clock = time.perf_counter_ns
    for i in range(count // 10):
        fn(pool[i % len(pool)])
    out = []
    for i in range(count):
        rows = pool[i % len(pool)]
        t0 = clock()
        fn(rows)
        out.append((clock() - t0) / 1000)
    return out


def bench_encoding(batches: dict[int, list[Rows]], count: int) -> list[str]:
    say(f"[2/4] input encoding in-process: {count:,} requests per form and size")
    handler = ScoreHandler()
    handler.width = MODEL_INPUT_WIDTH  # _packed_rows needs only the width

    def packed(rows: Rows) -> object:
        return handler._packed_rows(pack_rows(rows))

    def compact_json(rows: Rows) -> object:
        doc = json.loads(json.dumps(rows, separators=(",", ":")))
        return handler._checked(np.asarray(doc, dtype=np.float32).reshape(-1, handler.width))

    gc.collect()
    lines = []
    for n, pool in batches.items():
        # The two must read the same floats back (JSON carries the float32 values exactly).
        if not np.array_equal(np.asarray(packed(pool[0])), np.asarray(compact_json(pool[0]))):
            raise RuntimeError(f"packed and JSON rows differ for {n} rows")
        for name, fn, size in (
            ("packed float32", packed, len(pack_rows(pool[0]))),
            ("compact JSON", compact_json, len(json.dumps(pool[0], separators=(",", ":")))),
        ):
            us = time_each(fn, pool, count)
            lines.append(
                f"| {n} | {name} | {size:,} | {percentile(us, 0.5):.1f} |"
                f" {percentile(us, 0.99):.1f} |"
            )
        say(f"  {n} rows done")
    return [
        "| rows | input form | bytes | p50 us | p99 us |",
        "| ---: | --- | ---: | ---: | ---: |",
        *lines,
    ]


# -- 3. server-side batching -----------------------------------------------------------


@dataclasses.dataclass
class Load:
    latencies_ms: list[float]
    seconds: float
    errors: int
    batches: list[int] = dataclasses.field(default_factory=list)  # requests per handler call

    @property
    def mean_batch(self) -> str:
        return f"{statistics.fmean(self.batches):.2f}" if self.batches else "-"

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds


async def closed_loop(
    client: ModelClient, pool: Sequence[Rows], concurrency: int, seconds: float
) -> Load:
    """``concurrency`` tasks, each sending its next request when its last one answered."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < deadline:
            rows = pool[i % len(pool)]
            i += concurrency
            started = time.perf_counter()
            try:
                await client.predict(rows, TIMEOUT_S)
            except ModelCallError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return Load(latencies, time.perf_counter() - started, errors)


async def batching_load(
    address: str, pool: Sequence[Rows], seconds: float, windows: Windows
) -> dict[int, Load]:
    client = TorchServeClient("bench-native", address, "champion")
    await client.start()
    try:
        windows.mark(None)
        for concurrency in LOAD_CONCURRENCY:  # warm-up, not recorded
            await closed_loop(client, pool, concurrency, WARMUP_S)
        loads = {}
        for concurrency in LOAD_CONCURRENCY:
            windows.mark(str(concurrency))
            loads[concurrency] = await closed_loop(client, pool, concurrency, seconds)
        return loads
    finally:
        await client.stop()


def pooled(loads: Sequence[Load]) -> Load:
    """The passes of one setting at one concurrency as one load."""
    return Load(
        [ms for load in loads for ms in load.latencies_ms],
        sum(load.seconds for load in loads),
        sum(load.errors for load in loads),
        [n for load in loads for n in load.batches],
    )


def run_setting(
    run_dir: Path, name: str, batch_size: int, delay_ms: int, pool: Sequence[Rows], seconds: float
) -> dict[int, Load]:
    """A fresh replica of the champion with this batching, loaded at each concurrency."""
    section = ModelServing(
        "champion", batch_size=batch_size, max_batch_delay_ms=delay_ms
    ).properties()
    with replica_serving(run_dir, name, "champion", section) as (replica, address):
        windows = Windows()
        loads = asyncio.run(batching_load(address, pool, seconds, windows))
        handler = handler_calls(replica, windows)
    for concurrency, load in loads.items():
        load.batches = [call.requests for call in handler.get(str(concurrency), [])]
    return loads


def bench_batching(
    run_dir: Path, pool: Sequence[Rows], seconds: float, passes: int
) -> tuple[list[str], list[str]]:
    say(
        f"[3/4] server-side batching: champion, one worker, a fresh replica per setting and"
        f" pass ({passes} passes, the order reversed in every other one); 1-row native"
        f" requests, {seconds:g} s at each concurrency of {LOAD_CONCURRENCY}"
    )
    runs: dict[tuple[int, int], list[dict[int, Load]]] = {setting: [] for setting in BATCHING}
    for p in range(passes):
        order = BATCHING if p % 2 == 0 else BATCHING[::-1]
        for batch_size, delay_ms in order:
            say(f"  pass {p + 1}/{passes}: batchSize {batch_size}, maxBatchDelay {delay_ms} ms")
            name = f"batching-{p}-{batch_size}-{delay_ms}"
            loads = run_setting(run_dir, name, batch_size, delay_ms, pool, seconds)
            runs[batch_size, delay_ms].append(loads)
            say(
                "    "
                + "; ".join(
                    f"c={c}: {load.throughput:,.0f} req/s,"
                    f" p50 {ms_cell(load.latencies_ms, 0.5)} ms, mean batch {load.mean_batch}"
                    + (f", {load.errors} errors" if load.errors else "")
                    for c, load in loads.items()
                )
            )

    results = {
        setting: {c: pooled([run[c] for run in passes_]) for c in LOAD_CONCURRENCY}
        for setting, passes_ in runs.items()
    }
    lines = []
    for (batch_size, delay_ms), loads in results.items():
        for c, load in loads.items():
            per_pass = [run[c] for run in runs[batch_size, delay_ms]]
            rates = " / ".join(f"{run.throughput:,.0f}" for run in per_pass)
            p50s = " / ".join(ms_cell(run.latencies_ms, 0.5) for run in per_pass)
            lines.append(
                f"| ({batch_size}, {delay_ms}) | {c} | {len(load.latencies_ms):,} |"
                f" {load.throughput:,.0f} | {rates} | {ms_cell(load.latencies_ms, 0.5)} |"
                f" {p50s} | {ms_cell(load.latencies_ms, 0.99)} | {load.mean_batch} |"
                f" {load.errors} |"
            )
    table = [
        "| (batchSize, maxBatchDelay ms) | concurrency | requests | req/s | req/s per pass"
        " | p50 ms | p50 ms per pass | p99 ms | mean batch | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *lines,
    ]

    base = results[BATCHING[0]]
    base_c1 = percentile(base[LOW].latencies_ms, 0.5)
    eligible = [
        (setting, loads)
        for setting, loads in results.items()
        if percentile(loads[LOW].latencies_ms, 0.5) <= base_c1 + C1_SLACK_MS
    ]
    (best_size, best_delay), best = max(eligible, key=lambda item: item[1][HIGH].throughput)
    notes = [
        f"recommendation: batchSize {best_size}, maxBatchDelay {best_delay} ms: the best"
        f" throughput at concurrency {HIGH} ({best[HIGH].throughput:,.0f} req/s vs"
        f" {base[HIGH].throughput:,.0f} for {BATCHING[0]}) among the settings whose p50 at"
        f" concurrency {LOW} is within +{C1_SLACK_MS:g} ms of {BATCHING[0]}'s"
        f" ({base_c1:.3f} ms; this one {percentile(best[LOW].latencies_ms, 0.5):.3f} ms)"
    ]
    base_p50s = [percentile(run[LOW].latencies_ms, 0.5) for run in runs[BATCHING[0]]]
    if max(base_p50s) - min(base_p50s) > C1_SLACK_MS:
        notes.append(
            f"caution: {BATCHING[0]}'s p50 at concurrency {LOW} moved by"
            f" {max(base_p50s) - min(base_p50s):.3f} ms between passes, more than the"
            f" +{C1_SLACK_MS:g} ms margin: this machine's noise can decide which settings"
            " qualify"
        )
    return table, notes


# -- 4. what a call costs TorchServe ---------------------------------------------------


@dataclasses.dataclass
class Cost:
    load: Load
    cpu_s: float  # TorchServe's process group: the JVM and its Python workers


def pooled_cost(costs: Sequence[Cost]) -> Cost:
    return Cost(pooled([c.load for c in costs]), sum(c.cpu_s for c in costs))


async def cost_load(
    address: str, batches: dict[int, list[Rows]], seconds: float, pgid: int
) -> dict[int, Cost]:
    client = TorchServeClient("bench-cost", address, "champion")
    await client.start()
    try:
        costs = {}
        for n, pool in batches.items():
            await closed_loop(client, pool, HIGH, WARMUP_S)  # not recorded
            [before] = group_cpu_seconds([pgid])
            load = await closed_loop(client, pool, HIGH, seconds)
            [after] = group_cpu_seconds([pgid])
            costs[n] = Cost(load, after - before)
        return costs
    finally:
        await client.stop()


def run_frontend(
    run_dir: Path, name: str, section: str, batches: dict[int, list[Rows]], seconds: float
) -> dict[int, Cost]:
    with replica_serving(run_dir, name, "champion", section) as (replica, address):
        return asyncio.run(cost_load(address, batches, seconds, replica.pid or 0))


def bench_cost(
    run_dir: Path, batches: dict[int, list[Rows]], seconds: float, passes: int
) -> list[str]:
    say(
        f"[4/4] what a call costs TorchServe: the champion, no TorchServe batching, a fresh"
        f" replica per frontend setting and pass ({passes} passes, the order reversed in"
        f" every other one); native requests of {BATCH_ROWS} rows, {HIGH} at once,"
        f" {seconds:g} s each; the replica's CPU from /proc"
    )
    names = list(FRONTENDS)
    runs: dict[str, list[dict[int, Cost]]] = {name: [] for name in names}
    for p in range(passes):
        for name in names if p % 2 == 0 else names[::-1]:
            say(f"  pass {p + 1}/{passes}: {name}")
            folder = f"cost-{p}-{names.index(name)}"
            costs = run_frontend(run_dir, folder, FRONTENDS[name], batches, seconds)
            runs[name].append(costs)
            say(
                "    "
                + "; ".join(
                    f"{n} rows: {c.load.throughput:,.0f} calls/s,"
                    f" {c.cpu_s / c.load.seconds:.2f} cores"
                    for n, c in costs.items()
                )
            )
    lines = []
    for name, passes_ in runs.items():
        for n in BATCH_ROWS:
            cost = pooled_cost([run[n] for run in passes_])
            calls = len(cost.load.latencies_ms)
            cores = cost.cpu_s / cost.load.seconds
            per_pass = " / ".join(f"{run[n].load.throughput:,.0f}" for run in passes_)
            lines.append(
                f"| {name} | {n} | {cost.load.throughput:,.0f} | {per_pass} |"
                f" {cost.load.throughput * n:,.0f} | {cores:.2f} |"
                f" {cost.cpu_s / max(calls, 1) * 1e6:,.0f} |"
                f" {cost.load.throughput / cores:,.0f} | {cost.load.throughput * n / cores:,.0f} |"
                f" {ms_cell(cost.load.latencies_ms, 0.5)} | {ms_cell(cost.load.latencies_ms, 0.99)}"
                f" | {cost.load.errors} |"
            )
    return [
        "| frontend | rows a call | calls/s | calls/s per pass | rows/s | TorchServe cores"
        " | CPU us a call | calls/s a core | rows/s a core | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *lines,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300, help="per model, protocol, rows")
    parser.add_argument("--rounds", type=int, default=6, help="rounds the calls are split into")
    parser.add_argument("--encodings", type=int, default=20_000, help="per input form, rows")
    parser.add_argument("--seconds", type=float, default=3.0, help="per batching load")
    parser.add_argument(
        "--passes", type=int, default=2, help="over the batching and frontend settings"
    )
    parser.add_argument(
        "--parts",
        type=lambda text: {int(part) for part in text.split(",")},
        default={1, 2, 3, 4},
        help="which parts to run, comma separated (default 1,2,3,4)",
    )
    args = parser.parse_args()

    started = time.perf_counter()
    say("checking the models (trains them if .run/models is stale) …")
    ensure_models(MODEL_STORE)
    x = np.load(MODEL_STORE / "heldout.npz")["x"]
    if x.shape[1] != MODEL_INPUT_WIDTH:
        raise RuntimeError(f"held-out rows are {x.shape[1]} wide, not {MODEL_INPUT_WIDTH}")
    batches = {n: heldout_batches(x, n) for n in BATCH_ROWS}
    tables: list[tuple[str, list[str]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        run_dir = Path(tmp)
        if 1 in args.parts:
            table = bench_handlers(run_dir, batches, args.calls, args.rounds)
            tables.append(("Handler latency, direct calls, concurrency 1:", table))
        if 2 in args.parts:
            table = bench_encoding(batches, args.encodings)
            tables.append(("Input encoding for the native API, in-process, per request:", table))
        if 3 in args.parts:
            table, notes = bench_batching(run_dir, batches[1], args.seconds, args.passes)
            title = "TorchServe batching, champion, one worker, 1-row native requests:"
            tables.append((title, [*table, "", *notes]))
        if 4 in args.parts:
            table = bench_cost(run_dir, batches, args.seconds, args.passes)
            tables.append((f"What a call costs TorchServe, {HIGH} calls at once:", table))
    say(f"\ndone in {time.perf_counter() - started:.0f} s")
    for title, table in tables:
        say(f"\n{title}\n")
        say("\n".join(table))


if __name__ == "__main__":
    main()
