"""The models' serving costs on TorchServe, one part at a time on fresh replicas:

1. handler latency per protocol (native packed float32, OIP) and rows (1, 8, 64),
   concurrency 1, through the service's own clients; "handler" is TorchServe's
   ``PredictionTime`` from the replica's ``model_metrics.log``;
2. the native API's input encoding in-process: packed float32 against compact JSON;
3. TorchServe's batching per (batchSize, maxBatchDelay), at concurrency 1 and 16, and
   the best setting within +1 ms of no batching at concurrency 1;
4. what a call costs TorchServe per frontend setting (``FRONTENDS``), from /proc.

Settings run in passes, the order reversed every other one, so drift lands on all
alike; each pass's figures are shown. docs/model-serving.md says what they decided.
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
from loadtest.loadgen import LoadGenerator, LoadResult, LoadSpec
from loadtest.soak_probe import group_cpu_seconds
from server.model_client import ModelClient, TorchServeClient
from server.oip import OipClient
from torchserve.handler import ScoreHandler
from torchserve.replica import (
    LOG_CONFIG,
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
WARMUP_S = 1.0  # per closed loop in parts 3 and 4
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
    replica = torchserve_replica(
        name, ports, MODEL_STORE, run_dir, model_section=section, log_config=metrics_logged(run_dir)
    )
    try:
        start_replica(replica, ports, model_name=model_name)
        yield replica, f"127.0.0.1:{ports.grpc_inference}"
    finally:
        replica.stop()


# The replicas' log configuration with TorchServe's per-call model metrics written to
# model_metrics.log, as "<ISO 8601 time> - PredictionTime.ms:...": what ``Windows`` reads.
METRICS_APPENDER = """<RollingFile name="model_metrics"
    fileName="${env:LOG_LOCATION:-logs}/model_metrics.log"
    filePattern="${env:LOG_LOCATION:-logs}/model_metrics.%i.log">
  <PatternLayout pattern="%d{ISO8601} - %m%n"/>
  <Policies><SizeBasedTriggeringPolicy size="50 MB"/></Policies>
</RollingFile>
"""
METRICS_LOGGER = """<Logger name="MODEL_METRICS" level="info" additivity="false">
  <AppenderRef ref="model_metrics"/>
</Logger>"""


def metrics_logged(run_dir: Path) -> Path:
    """A copy of the replicas' log configuration (``LOG_CONFIG``) in ``run_dir`` that
    writes the model metrics the stack's replicas leave out."""
    text = LOG_CONFIG.read_text()
    off = '<Logger name="MODEL_METRICS" level="off"/>'
    if off not in text or "</Appenders>" not in text:
        raise RuntimeError(f"{LOG_CONFIG}: no {off} to turn on")
    text = text.replace(off, METRICS_LOGGER).replace(
        "</Appenders>", METRICS_APPENDER + "</Appenders>"
    )
    path = run_dir / "log4j2-model-metrics.xml"
    path.write_text(text)
    return path


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


def closed_loop(address: str, concurrency: int, seconds: float, rows: int = 1) -> LoadSpec:
    """``concurrency`` callers on one connection, native requests of ``rows`` rows."""
    return LoadSpec(
        target="torchserve",
        address=address,
        mode="closed",
        seconds=seconds,
        max_requests=int(seconds * 100_000),  # a real bound, never reached
        concurrency=concurrency,
        warmup_s=WARMUP_S,
        timeout_s=TIMEOUT_S,
        rows=rows,
    )


@dataclasses.dataclass
class Load:
    result: LoadResult
    batches: list[int] = dataclasses.field(default_factory=list)  # requests per handler call
    cpu_s: float = 0.0  # the replica's process group (its JVM and Python workers)
    wall_s: float = 1.0

    @property
    def mean_batch(self) -> str:
        return f"{statistics.fmean(self.batches):.2f}" if self.batches else "-"

    @property
    def cores(self) -> float:
        return self.cpu_s / self.wall_s


def pooled(loads: Sequence[Load]) -> Load:
    """The passes of one setting as one load."""
    return Load(
        LoadResult.combine([load.result for load in loads]),
        [n for load in loads for n in load.batches],
        sum(load.cpu_s for load in loads),
        sum(load.wall_s for load in loads),
    )


def run_setting(
    run_dir: Path,
    name: str,
    section: str,
    seconds: float,
    generator: LoadGenerator,
    rows: Sequence[int],
) -> dict[tuple[int, int], Load]:
    """A fresh replica of the champion with this model section, loaded closed loop at
    each concurrency with 1-row requests and at ``HIGH`` with each of ``rows``."""
    cases = [(c, 1) for c in LOAD_CONCURRENCY] if rows == (1,) else [(HIGH, n) for n in rows]
    loads = {}
    with replica_serving(run_dir, name, "champion", section) as (replica, address):
        windows = Windows()
        for concurrency, n in cases:
            windows.mark(f"{concurrency}/{n}")
            [cpu_before], began = group_cpu_seconds([replica.pid or 0]), time.monotonic()
            result = generator.run(closed_loop(address, concurrency, seconds, n))
            [cpu_after] = group_cpu_seconds([replica.pid or 0])
            loads[concurrency, n] = Load(
                result, [], cpu_after - cpu_before, time.monotonic() - began
            )
        handler = handler_calls(replica, windows)
    for (concurrency, n), load in loads.items():
        load.batches = [call.requests for call in handler.get(f"{concurrency}/{n}", [])]
    return loads


def in_passes(
    run_dir: Path, settings: dict[str, str], seconds: float, passes: int, rows: Sequence[int]
) -> dict[str, list[dict[tuple[int, int], Load]]]:
    """Each setting on a fresh replica per pass, the order reversed in every other pass."""
    generator = LoadGenerator(1)
    runs: dict[str, list[dict[tuple[int, int], Load]]] = {name: [] for name in settings}
    try:
        generator.wait_ready()
        for p in range(passes):
            for k, name in enumerate(settings if p % 2 == 0 else list(settings)[::-1]):
                say(f"  pass {p + 1}/{passes}: {name}")
                loads = run_setting(
                    run_dir, f"pass-{p}-{k}-{rows[0]}", settings[name], seconds, generator, rows
                )
                runs[name].append(loads)
                say("    " + "; ".join(
                    f"c={c} {n} row(s): {load.result.throughput_per_s:,.0f} calls/s, p50"
                    f" {load.result.percentile_ms(50):.2f} ms, mean batch {load.mean_batch},"
                    f" {load.cores:.2f} cores" for (c, n), load in loads.items()
                ))  # fmt: skip
    finally:
        generator.stop()
    return runs


def bench_batching(run_dir: Path, seconds: float, passes: int) -> tuple[list[str], list[str]]:
    say(
        f"[3/4] server-side batching: champion, one worker, a fresh replica per setting and"
        f" pass ({passes} passes); 1-row native requests, {seconds:g} s at each concurrency"
        f" of {LOAD_CONCURRENCY}"
    )
    settings = {
        f"({size}, {delay})": ModelServing(
            "champion", batch_size=size, max_batch_delay_ms=delay
        ).properties()
        for size, delay in BATCHING
    }
    runs = in_passes(run_dir, settings, seconds, passes, (1,))
    results = {
        name: {c: pooled([run[c, 1] for run in each]) for c in LOAD_CONCURRENCY}
        for name, each in runs.items()
    }
    lines = []
    for name, loads in results.items():
        for c, load in loads.items():
            per_pass = [run[c, 1].result for run in runs[name]]
            rates = " / ".join(f"{p.throughput_per_s:,.0f}" for p in per_pass)
            p50s = " / ".join(f"{p.percentile_ms(50):.3f}" for p in per_pass)
            r = load.result
            lines.append(
                f"| {name} | {c} | {r.ok:,} | {r.throughput_per_s:,.0f} | {rates}"
                f" | {r.percentile_ms(50):.3f} | {p50s} | {r.percentile_ms(99):.3f}"
                f" | {load.mean_batch} | {r.error_count} |"
            )
    table = [
        "| (batchSize, maxBatchDelay ms) | concurrency | requests | req/s | req/s per pass"
        " | p50 ms | p50 ms per pass | p99 ms | mean batch | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *lines,
    ]
    base_name = next(iter(results))
    base_c1 = results[base_name][LOW].result.percentile_ms(50)
    eligible = {
        n: loads
        for n, loads in results.items()
        if loads[LOW].result.percentile_ms(50) <= base_c1 + C1_SLACK_MS
    }
    best_name = max(eligible, key=lambda n: eligible[n][HIGH].result.throughput_per_s)
    best, base = (results[n][HIGH].result.throughput_per_s for n in (best_name, base_name))
    notes = [
        f"recommendation: {best_name}: the best throughput at concurrency {HIGH}"
        f" ({best:,.0f} req/s against {base:,.0f}"
        f" for {base_name}) among the settings whose p50 at concurrency {LOW} is within"
        f" +{C1_SLACK_MS:g} ms of {base_name}'s ({base_c1:.3f} ms)"
    ]
    base_p50s = [run[LOW, 1].result.percentile_ms(50) for run in runs[base_name]]
    if max(base_p50s) - min(base_p50s) > C1_SLACK_MS:
        notes.append(
            f"caution: {base_name}'s p50 at concurrency {LOW} moved by"
            f" {max(base_p50s) - min(base_p50s):.3f} ms between passes, more than the margin:"
            " this machine's noise can decide which settings qualify"
        )
    return table, notes


# -- 4. what a call costs TorchServe ---------------------------------------------------


def bench_cost(run_dir: Path, seconds: float, passes: int) -> list[str]:
    say(
        f"[4/4] what a call costs TorchServe: the champion, no TorchServe batching, a fresh"
        f" replica per frontend setting and pass ({passes} passes); native requests of"
        f" {BATCH_ROWS} rows, {HIGH} at once, {seconds:g} s each; the replica's CPU from /proc"
    )
    runs = in_passes(run_dir, FRONTENDS, seconds, passes, BATCH_ROWS)
    lines = []
    for name, each in runs.items():
        for n in BATCH_ROWS:
            load = pooled([run[HIGH, n] for run in each])
            r, per_s = load.result, load.result.throughput_per_s
            per_pass = " / ".join(f"{run[HIGH, n].result.throughput_per_s:,.0f}" for run in each)
            lines.append(
                f"| {name} | {n} | {per_s:,.0f} | {per_pass} | {per_s * n:,.0f} | {load.cores:.2f}"
                f" | {load.cores / max(per_s, 1e-9) * 1e6:,.0f} | {per_s / load.cores:,.0f}"
                f" | {per_s * n / load.cores:,.0f} | {r.percentile_ms(50):.3f}"
                f" | {r.percentile_ms(99):.3f} | {r.error_count} |"
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
            table, notes = bench_batching(run_dir, args.seconds, args.passes)
            title = "TorchServe batching, champion, one worker, 1-row native requests:"
            tables.append((title, [*table, "", *notes]))
        if 4 in args.parts:
            table = bench_cost(run_dir, args.seconds, args.passes)
            tables.append((f"What a call costs TorchServe, {HIGH} calls at once:", table))
    say(f"\ndone in {time.perf_counter() - started:.0f} s")
    for title, table in tables:
        say(f"\n{title}\n")
        say("\n".join(table))


if __name__ == "__main__":
    main()
