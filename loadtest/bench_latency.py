"""Decide vs direct TorchServe at concurrency 1, measured in one run on this machine.

Starts redis-server and one TorchServe replica (``localstack.stack``), three decision
servers (D, as configured by default; O, D with tracing on at ``--trace-sample-ratio``,
exporting to ``loadtest.otlp_sink``; M, D with the metrics endpoint off: what metrics
cost) and a bare echo server (the floor: one Python gRPC hop, no work) on free loopback
ports. This process calls every path at concurrency 1, in alternating rounds so that
machine noise lands on all of them alike, and prints p50/p99 per path, the difference
the decision layer adds over the direct model call and the server-side stage medians.
With ``--saturate-s``, each Decide server's throughput under ``--callers`` closed-loop
callers of one ``loadtest.loadgen`` process, in alternating rounds too (tracing's cost
at saturation: O against D; metrics': D against M).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc

from core.processes import ManagedProcess, free_ports, port_open
from core.stats import percentile
from feature_cache.schema import MODEL_INPUT_WIDTH, pack_rows
from loadtest import feature_keeper
from loadtest.loadgen import LoadGenerator, LoadSpec
from localstack.health import serving
from localstack.stack import started
from proto.decision.v1 import decision_pb2, decision_pb2_grpc
from proto.third_party.torchserve import inference_pb2, inference_pb2_grpc
from server.settings import Settings
from server.tracing import DEFAULT_SAMPLE_RATIO

REPO = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def fresh_features(redis_port: int) -> AsyncIterator[None]:
    """BTC-USD's features rewritten in the given redis-server every 0.2 s while the block
    runs, under the default key prefix."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    async with feature_keeper.fresh_features(url, Settings().redis.key_prefix):
        yield


# What a bench's decision servers need: Redis and one replica (their secondary's port,
# the stack's, has nobody listening).
BACKENDS = ("redis", "primary")
QUIET = {"DECISION_TELEMETRY__LOG_LEVEL": "WARNING"}  # no per-call log lines to write


def echo_server(port: int, run_dir: Path) -> ManagedProcess:
    """The bare echo server (``loadtest.echo_server``, not started), logging to run_dir."""
    return ManagedProcess(
        "echo-server",
        [sys.executable, "-m", "loadtest.echo_server", "--port", str(port)],
        cwd=REPO,
        log_path=run_dir / "echo.log",
    )


DECIDE_PATHS = {
    "decide": "D: Decide (whole chain)",
    "decide_traced": "O: Decide, traced (--trace-sample-ratio, OTLP export)",
    "decide_unmeasured": "M: Decide, metrics endpoint off (no request metrics)",
}


async def measure(
    decide_ports: Mapping[str, int],
    torchserve_port: int,
    echo_port: int,
    redis_port: int,
    rounds: int,
    per_round: int,
) -> dict[str, list[float]]:
    async with fresh_features(redis_port):
        return await _measure(decide_ports, torchserve_port, echo_port, rounds, per_round)


async def _measure(
    decide_ports: Mapping[str, int],
    torchserve_port: int,
    echo_port: int,
    rounds: int,
    per_round: int,
) -> dict[str, list[float]]:
    """``decide_ports``: a decision server's port by path name (``DECIDE_PATHS``)."""
    channels = {
        name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, port in decide_ports.items()
    }
    ts_channel = grpc.aio.insecure_channel(f"127.0.0.1:{torchserve_port}")
    echo_channel = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}")
    decides = {
        name: decision_pb2_grpc.DecisionServiceStub(channel).Decide
        for name, channel in channels.items()
    }
    echo = decision_pb2_grpc.DecisionServiceStub(echo_channel).Decide
    predict = inference_pb2_grpc.InferenceAPIsServiceStub(ts_channel).Predictions
    decide_request = decision_pb2.DecideRequest(
        symbol="BTC-USD", side=decision_pb2.SIDE_BUY, quantity=1.0
    )
    predict_request = inference_pb2.PredictionsRequest(
        model_name="champion", input={"rows": pack_rows([[0.1] * MODEL_INPUT_WIDTH])}
    )
    stages = ("server", "features", "model")
    results: dict[str, list[float]] = {"echo": [], "torchserve": []}
    for name in decides:
        results[name] = []
        for stage in stages:
            results[f"{name}_{stage}_us"] = []
    sources: dict[str, dict[int, int]] = {name: {} for name in decides}

    async def one_decide(name: str) -> float:
        started = time.perf_counter()
        response = await decides[name](decide_request, timeout=1.0)
        elapsed = (time.perf_counter() - started) * 1000
        sources[name][response.source] = sources[name].get(response.source, 0) + 1
        results[f"{name}_server_us"].append(response.timings.total_us)
        results[f"{name}_features_us"].append(response.timings.features_us)
        results[f"{name}_model_us"].append(response.timings.model_us)
        return elapsed

    async def one_echo() -> float:
        started = time.perf_counter()
        await echo(decide_request, timeout=1.0)
        return (time.perf_counter() - started) * 1000

    async def one_predict() -> float:
        started = time.perf_counter()
        await predict(predict_request, timeout=1.0)
        return (time.perf_counter() - started) * 1000

    try:
        for _ in range(50):  # warm-up, not recorded
            await one_echo()
            await one_predict()
            for name in decides:
                await one_decide(name)
        for name in decides:
            for stage in stages:
                results[f"{name}_{stage}_us"].clear()
            sources[name].clear()
        for r in range(rounds):
            for _ in range(per_round):
                results["echo"].append(await one_echo())
            for _ in range(per_round):
                results["torchserve"].append(await one_predict())
            for name in decides:
                for _ in range(per_round):
                    results[name].append(await one_decide(name))
            print(f"  round {r + 1}/{rounds}", end="\r", flush=True)
        print()
    finally:
        for channel in [*channels.values(), echo_channel, ts_channel]:
            await channel.close()
    for name, counts in sources.items():
        primary = counts.get(decision_pb2.SOURCE_PRIMARY, 0)
        print(
            f"  {DECIDE_PATHS[name][:1]} answered by the primary: {primary}/{sum(counts.values())}"
        )
    return results


async def saturate(
    generator: LoadGenerator,
    decide_ports: Mapping[str, int],
    redis_port: int,
    callers: int,
    seconds: float,
    rounds: int,
) -> dict[str, list[float]]:
    """Decide calls a second per path, ``callers`` closed-loop callers (each on a
    connection of its own) for ``seconds`` per round, the paths alternating within each
    round; a refused call is not counted (``loadgen``)."""
    throughput: dict[str, list[float]] = {name: [] for name in decide_ports}
    async with fresh_features(redis_port):
        for r in range(rounds):
            for name, port in decide_ports.items():
                spec = LoadSpec(
                    target="decide",
                    address=f"127.0.0.1:{port}",
                    mode="closed",
                    seconds=seconds,
                    max_requests=int(seconds * 100_000),  # a real bound, never reached
                    concurrency=callers,
                    warmup_s=0.0,
                    channels=callers,
                )
                result = await asyncio.to_thread(generator.run, spec)
                throughput[name].append(result.throughput_per_s)
            print(f"  saturation round {r + 1}/{rounds}", end="\r", flush=True)
    print()
    return throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument(
        "--saturate-s", type=float, default=5.0, help="seconds per path and round; 0: skip"
    )
    parser.add_argument("--saturate-rounds", type=int, default=3)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument(
        "--trace-sample-ratio",
        type=float,
        default=DEFAULT_SAMPLE_RATIO,
        help="path O's sampling (default: the server's default)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        run_dir = Path(tmp)
        print("starting redis-server, TorchServe and the decision servers …", flush=True)
        paths = len(DECIDE_PATHS)
        echo_port, sink_port, *ports = free_ports(2 + 2 * paths)
        decide_ports = dict(zip(DECIDE_PATHS, ports[:paths], strict=True))
        # Every server but M serves /metrics (nobody scrapes it: recording is the cost).
        metrics = {
            name: {"DECISION_SERVER__METRICS_PORT": str(port)}
            for name, port in zip(DECIDE_PATHS, ports[paths:], strict=True)
        }
        path_env = {
            "decide": metrics["decide"],
            "decide_traced": {
                **metrics["decide_traced"],
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": str(args.trace_sample_ratio),
            },
            "decide_unmeasured": {},
        }
        with started(run_dir, BACKENDS) as stack:
            sink = ManagedProcess(
                "otlp-sink",
                [sys.executable, "-m", "loadtest.otlp_sink", "--port", str(sink_port)],
                cwd=REPO,
                log_path=run_dir / "otlp-sink.log",
            )
            servers = [
                stack.decision_server(name, port, run_dir / name, {**QUIET, **path_env[name]})
                for name, port in decide_ports.items()
            ]
            echo = echo_server(echo_port, run_dir)
            procs = [sink, *servers, echo]
            try:
                for proc in procs:
                    proc.start()
                sink.wait_ready(lambda: port_open("127.0.0.1", sink_port), 30)
                for server, port in zip(servers, decide_ports.values(), strict=True):
                    server.wait_ready(functools.partial(serving, port), 30)
                echo.wait_ready(lambda: port_open("127.0.0.1", echo_port), 30)
                print(f"measuring {args.rounds} x {args.per_round} calls per path, concurrency 1")
                results = asyncio.run(
                    measure(
                        decide_ports,
                        stack.primary.grpc_inference,
                        echo_port,
                        stack.redis_port,
                        args.rounds,
                        args.per_round,
                    )
                )
                throughput: dict[str, list[float]] = {}
                if args.saturate_s > 0:
                    print(
                        f"saturating each Decide server: {args.callers} callers,"
                        f" {args.saturate_s:g} s x {args.saturate_rounds} rounds"
                    )
                    generator = LoadGenerator(1)
                    try:
                        generator.wait_ready()
                        throughput = asyncio.run(
                            saturate(
                                generator,
                                decide_ports,
                                stack.redis_port,
                                args.callers,
                                args.saturate_s,
                                args.saturate_rounds,
                            )
                        )
                    finally:
                        generator.stop()
            finally:
                for proc in reversed(procs):
                    proc.stop()

    ec = sorted(results["echo"])
    ts = sorted(results["torchserve"])
    rows = [("E: bare grpc.aio echo (floor)", ec), ("T: TorchServe gRPC direct", ts)]
    rows += [(label, sorted(results[name])) for name, label in DECIDE_PATHS.items()]
    print()
    print("| path (concurrency 1) | calls | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    for label, values in rows:
        print(
            f"| {label} | {len(values)} | {percentile(values, 0.5):.3f} |"
            f" {percentile(values, 0.99):.3f} |"
        )
    for name, label in DECIDE_PATHS.items():
        dc = sorted(results[name])
        print(
            f"| {label[0]} - T (what the decision layer adds) | |"
            f" {percentile(dc, 0.5) - percentile(ts, 0.5):+.3f} |"
            f" {percentile(dc, 0.99) - percentile(ts, 0.99):+.3f} |"
        )
    print()
    for name, label in DECIDE_PATHS.items():
        server_ms = {
            stage: statistics.median(results[f"{name}_{stage}_us"]) / 1000
            for stage in ("features", "model", "server")
        }
        print(
            f"{label[0]} server-side medians: features {server_ms['features']:.3f} ms,"
            f" model {server_ms['model']:.3f} ms, total {server_ms['server']:.3f} ms"
        )
    print("target: Decide adds <= 0.5 ms at p50")
    traced, plain = sorted(results["decide_traced"]), sorted(results["decide"])
    p50 = percentile(traced, 0.5) - percentile(plain, 0.5)
    p99 = percentile(traced, 0.99) - percentile(plain, 0.99)
    ratio_text = f"tracing at {args.trace_sample_ratio:.0%}"
    print(f"{ratio_text}, concurrency 1: O - D = {p50:+.3f} ms at p50, {p99:+.3f} ms at p99")
    unmeasured = sorted(results["decide_unmeasured"])
    p50 = percentile(plain, 0.5) - percentile(unmeasured, 0.5)
    p99 = percentile(plain, 0.99) - percentile(unmeasured, 0.99)
    print(f"metrics, concurrency 1: D - M = {p50:+.3f} ms at p50, {p99:+.3f} ms at p99")
    if throughput:
        print()
        print("| path (saturated) | Decide/s per round | median |")
        print("| --- | --- | ---: |")
        for name, label in DECIDE_PATHS.items():
            rounds_text = ", ".join(f"{v:,.0f}" for v in throughput[name])
            print(f"| {label} | {rounds_text} | {statistics.median(throughput[name]):,.0f} |")
        ratio = statistics.median(throughput["decide_traced"]) / statistics.median(
            throughput["decide"]
        )
        print(f"{ratio_text}, saturated: O / D = {ratio:.2f} of the throughput")
        ratio = statistics.median(throughput["decide"]) / statistics.median(
            throughput["decide_unmeasured"]
        )
        print(f"metrics, saturated: D / M = {ratio:.2f} of the throughput")


if __name__ == "__main__":
    main()
