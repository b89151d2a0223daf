"""The models' serving costs on TorchServe: model settings side by side, each on a fresh
replica, loaded closed loop by ``loadgen`` with native requests of 1, 8 or 64 rows.

1. latency: each model at concurrency 1 (``handler``: TorchServe's ``PredictionTime``);
2. batching: TorchServe's (batchSize, maxBatchDelay) at concurrency 1 and 16, and the
   best setting within +1 ms of no batching at concurrency 1;
3. cost: what a call costs TorchServe per frontend setting, its CPU read from /proc.

Settings run in passes, the order reversed every other one, so drift lands on all alike.
docs/model-serving.md says what they decided.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import functools
import re
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

from core.processes import ManagedProcess, free_ports
from core.stats import percentile
from loadtest.loadgen import LoadGenerator, LoadResult, LoadSpec
from loadtest.report import markdown_table, write_block
from loadtest.soak_probe import group_cpu_seconds
from torchserve.models import REPO, ensure_models
from torchserve.replica import (
    LOG_CONFIG,
    ModelServing,
    ReplicaPorts,
    start_replica,
    torchserve_replica,
)

say = functools.partial(print, flush=True)  # progress as it comes, piped too
MODEL_STORE = REPO / ".run/models"
BATCH_ROWS = (1, 8, 64)
LOW, HIGH = 1, 16  # the closed loop's concurrencies
C1_SLACK_MS = 1.0  # how much p50 at concurrency 1 a batching setting may add over (1, 0)
TIMEOUT_S = 2.0
WARMUP_S = 1.0  # per closed loop: the JVM's JIT needs a few hundred calls
REPLICA_PORTS = len(dataclasses.fields(ReplicaPorts))

Case = tuple[int, int]  # concurrency, rows a call


@dataclasses.dataclass(frozen=True)
class Part:
    title: str
    settings: dict[str, ModelServing]
    cases: tuple[Case, ...]


PARTS = {
    1: Part(
        "Handler latency, concurrency 1, no TorchServe batching",
        {name: ModelServing(name) for name in ("champion", "challenger")},
        tuple((LOW, n) for n in BATCH_ROWS),
    ),
    2: Part(
        "TorchServe batching, champion, one worker, 1-row requests",
        {
            f"({size}, {delay})": ModelServing(batch_size=size, max_batch_delay_ms=delay)
            for size, delay in ((1, 0), (8, 0), (16, 0), (8, 1), (16, 2))
        },
        ((LOW, 1), (HIGH, 1)),
    ),
    3: Part(
        f"What a call costs TorchServe, {HIGH} calls at once, no TorchServe batching",
        {
            "1 worker": ModelServing(workers=1),
            "2 workers": ModelServing(workers=2),
        },
        tuple((HIGH, n) for n in BATCH_ROWS),
    ),
}


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
# One line per handler call: "<local time> - PredictionTime.ms:<ms>|...requestID:<ids>,..."
PREDICTION_LINE = re.compile(
    r"^(\S+) - PredictionTime\.ms:([0-9.]+)\|.*requestID:([^|]*?),timestamp:"
)


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


@contextlib.contextmanager
def replica_serving(
    run_dir: Path, name: str, serving: ModelServing
) -> Iterator[tuple[ManagedProcess, str]]:
    """A fresh TorchServe replica with this model section, ready; yields it and its gRPC
    inference address, and stops it on the way out."""
    ports = ReplicaPorts(*free_ports(REPLICA_PORTS))
    log_config = metrics_logged(run_dir)
    replica = torchserve_replica(
        name, ports, MODEL_STORE, run_dir, model_section=serving.properties(), log_config=log_config
    )
    try:
        start_replica(replica, ports, model_name=serving.model_name)
        yield replica, f"127.0.0.1:{ports.grpc_inference}"
    finally:
        replica.stop()


class Windows:
    """Labelled stretches of time, to attribute the replica's handler calls to cases."""

    def __init__(self) -> None:
        self._starts: list[float] = []
        self._labels: list[Case | None] = []

    def mark(self, label: Case | None) -> None:
        """From now on, handler calls belong to ``label`` (None: to nobody)."""
        self._starts.append(time.time())
        self._labels.append(label)

    def calls(self, replica: ManagedProcess) -> dict[Case, list[tuple[float, int]]]:
        """The replica's handler calls (ms, requests batched) by label, once TorchServe's
        asynchronous log caught up."""
        self.mark(None)
        time.sleep(1.0)
        out: dict[Case, list[tuple[float, int]]] = {}
        log = replica.log_path.with_name("model_metrics.log")
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines():
                if (match := PREDICTION_LINE.match(line)) is None:
                    continue
                stamp, ms, ids = match.groups()
                # TorchServe logs local time without an offset; timestamp() reads it so.
                at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S,%f").timestamp()  # noqa: DTZ007
                label = self._labels[bisect.bisect_right(self._starts, at) - 1]
                if at >= self._starts[0] and label is not None:
                    out.setdefault(label, []).append((float(ms), ids.count(",") + 1))
        return out


@dataclasses.dataclass
class Load:
    result: LoadResult
    handler: list[tuple[float, int]]  # per handler call: ms, requests batched
    cpu_s: float  # the replica's process group (its JVM and Python workers)
    wall_s: float

    @classmethod
    def pooled(cls, loads: Sequence[Load]) -> Load:
        """The passes of one setting as one load."""
        return cls(
            LoadResult.combine([load.result for load in loads]),
            [call for load in loads for call in load.handler],
            sum(load.cpu_s for load in loads),
            sum(load.wall_s for load in loads),
        )

    @property
    def cores(self) -> float:
        return self.cpu_s / self.wall_s


def run_setting(
    run_dir: Path,
    name: str,
    serving: ModelServing,
    part: Part,
    seconds: float,
    generator: LoadGenerator,
) -> dict[Case, Load]:
    """A fresh replica with this setting, loaded at each of the part's cases in turn."""
    loads = {}
    with replica_serving(run_dir, name, serving) as (replica, address):
        windows = Windows()
        for concurrency, rows in part.cases:
            spec = LoadSpec(
                target="torchserve", address=address, mode="closed", seconds=seconds,
                max_requests=int(seconds * 100_000), concurrency=concurrency,
                warmup_s=WARMUP_S, timeout_s=TIMEOUT_S, model_name=serving.model_name,
                rows=rows,
            )  # fmt: skip
            windows.mark((concurrency, rows))
            [cpu_before], began = group_cpu_seconds([replica.pid]), time.monotonic()
            result = generator.run(spec)
            [cpu_after] = group_cpu_seconds([replica.pid])
            loads[concurrency, rows] = Load(
                result, [], cpu_after - cpu_before, time.monotonic() - began
            )
        for case, calls in windows.calls(replica).items():
            loads[case].handler = calls
    return loads


def in_passes(
    run_dir: Path, part: Part, seconds: float, passes: int, generator: LoadGenerator
) -> dict[str, list[dict[Case, Load]]]:
    """Each setting on a fresh replica per pass, the order reversed in every other pass."""
    runs: dict[str, list[dict[Case, Load]]] = {name: [] for name in part.settings}
    for p in range(passes):
        for name in part.settings if p % 2 == 0 else list(part.settings)[::-1]:
            say(f"  pass {p + 1}/{passes}: {name}")
            # A replica's folder of its own: the part's run folder, its setting, its pass.
            folder = f"setting-{list(part.settings).index(name)}-pass-{p}"
            loads = run_setting(run_dir, folder, part.settings[name], part, seconds, generator)
            runs[name].append(loads)
            say("    " + "; ".join(
                f"c={c} {n} row(s): {load.result.throughput_per_s:,.0f} calls/s, p50"
                f" {load.result.percentile_ms(50):.2f} ms, {load.cores:.2f} cores"
                for (c, n), load in loads.items()
            ))  # fmt: skip
    return runs


def table(runs: dict[str, list[dict[Case, Load]]], part: Part) -> str:
    rows = []
    for name, each in runs.items():
        for case in part.cases:
            load = Load.pooled([run[case] for run in each])
            r, per_s = load.result, load.result.throughput_per_s
            handler_ms = [ms for ms, _ in load.handler]
            batch = statistics.fmean(n for _, n in load.handler) if load.handler else 0.0
            rows.append((
                name, case[0], case[1], f"{per_s:,.0f}",
                " / ".join(f"{run[case].result.throughput_per_s:,.0f}" for run in each),
                f"{r.percentile_ms(50):.3f}", f"{r.percentile_ms(99):.3f}",
                f"{percentile(handler_ms, 0.5):.3f}" if handler_ms else "-",
                f"{batch:.2f}" if batch else "-", f"{load.cores:.2f}",
                f"{load.cores / max(per_s, 1e-9) * 1e6:,.0f}", r.error_count,
            ))  # fmt: skip
    header = ["setting", ">concurrency", ">rows a call", ">calls/s", ">calls/s per pass",
              ">p50 ms", ">p99 ms", ">handler p50 ms", ">mean batch", ">TorchServe cores",
              ">CPU us a call", ">errors"]  # fmt: skip
    return markdown_table(header, rows)


def batching_note(runs: dict[str, list[dict[Case, Load]]]) -> str:
    """The best throughput at HIGH among the settings within C1_SLACK_MS of the first's
    p50 at LOW."""
    pooled = {name: {c: Load.pooled([run[c] for run in each]) for c in each[0]}
              for name, each in runs.items()}  # fmt: skip
    base = next(iter(pooled))
    base_p50 = pooled[base][LOW, 1].result.percentile_ms(50)
    eligible = [n for n, loads in pooled.items()
                if loads[LOW, 1].result.percentile_ms(50) <= base_p50 + C1_SLACK_MS]  # fmt: skip
    best = max(eligible, key=lambda n: pooled[n][HIGH, 1].result.throughput_per_s)
    return (
        f"recommendation: {best}: the best throughput at concurrency {HIGH}"
        f" ({pooled[best][HIGH, 1].result.throughput_per_s:,.0f} calls/s) among the"
        f" settings whose p50 at concurrency {LOW} is within +{C1_SLACK_MS:g} ms of"
        f" {base}'s ({base_p50:.3f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per case and pass")
    parser.add_argument("--passes", type=int, default=2, help="over each part's settings")
    parser.add_argument(
        "--parts",
        type=lambda text: [int(part) for part in text.split(",")],
        default=list(PARTS),
        help="which parts to run, comma separated (default 1,2,3)",
    )
    parser.add_argument("--doc", type=Path, help="put the tables in this doc's bench-models block")
    args = parser.parse_args()
    started = time.perf_counter()
    say("checking the models (trains them if .run/models is stale) …")
    ensure_models(MODEL_STORE)
    tables = []
    generator = LoadGenerator(1)
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        try:
            generator.wait_ready()
            for number in args.parts:
                part = PARTS[number]
                say(f"[{number}/{len(PARTS)}] {part.title}: {args.passes} pass(es)")
                run_dir = Path(tmp) / f"part-{number}"
                run_dir.mkdir()
                runs = in_passes(run_dir, part, args.seconds, args.passes, generator)
                note = f"\n\n{batching_note(runs)}" if number == 2 else ""
                tables.append(f"{part.title}:\n\n{table(runs, part)}{note}")
        finally:
            generator.stop()
    say(f"\ndone in {time.perf_counter() - started:.0f} s\n\n" + "\n\n".join(tables))
    if args.doc:
        write_block(args.doc, "bench-models", "\n\n".join(tables))


if __name__ == "__main__":
    main()
