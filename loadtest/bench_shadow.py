"""Decide latency with shadow scoring at 100 % vs off, at the same fixed request rate.

Starts its own redis-server, a champion replica, a challenger replica and the decision
server as separate processes on free loopback ports. The client sends Decide at a fixed
rate (open loop: a slow answer does not slow the sending) in alternating rounds, flipping
the flag ``shadow_sample_rate`` between 0 and 1 through AdminService, so machine noise
lands on both modes alike. Prints p50/p99 per mode, the p99 ratio (target: at most
1.10) and what the shadow scorer did, from the server's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from core.processes import free_ports
from core.stats import percentile
from loadtest.bench_latency import BACKENDS, QUIET, fresh_features
from localstack.health import serving
from localstack.stack import started
from proto.decision.v1 import admin_pb2, admin_pb2_grpc, decision_pb2, decision_pb2_grpc

TOKEN = "bench-operator-token-0123456789"  # noqa: S105 - a throwaway local token
MODES = {"off": "0", "100 %": "1"}


async def run_round(
    decide: decision_pb2_grpc.DecisionServiceAsyncStub, rate: float, seconds: float
) -> tuple[list[float], int]:
    """Latencies (ms) of Decide calls started every 1/rate s for ``seconds``, and how
    many were not answered by the primary."""
    request = decision_pb2.DecideRequest(symbol="BTC-USD", side=decision_pb2.SIDE_BUY, quantity=1)
    latencies: list[float] = []
    not_primary = 0

    async def one() -> None:
        nonlocal not_primary
        started = time.perf_counter()
        response = await decide.Decide(request, timeout=1.0)
        latencies.append((time.perf_counter() - started) * 1000)
        not_primary += response.source != decision_pb2.SOURCE_PRIMARY

    tasks = []
    interval = 1.0 / rate
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return latencies, not_primary


async def measure(
    decision_port: int, admin_port: int, redis_port: int, rate: float, rounds: int, seconds: float
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    not_primary = dict.fromkeys(MODES, 0)
    metadata = [("authorization", f"Bearer {TOKEN}")]
    async with (
        fresh_features(redis_port),
        grpc.aio.insecure_channel(f"127.0.0.1:{decision_port}") as channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}") as admin_channel,
    ):
        decide: decision_pb2_grpc.DecisionServiceAsyncStub = decision_pb2_grpc.DecisionServiceStub(
            channel
        )
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
        for value in MODES.values():  # warm-up of both paths, not recorded
            await admin.SetFlag(
                admin_pb2.SetFlagRequest(name="shadow_sample_rate", value=value, reason="bench"),
                metadata=metadata,
            )
            await run_round(decide, rate, 3.0)
        for r in range(rounds):
            for mode, value in MODES.items():
                await admin.SetFlag(
                    admin_pb2.SetFlagRequest(
                        name="shadow_sample_rate", value=value, reason="bench"
                    ),
                    metadata=metadata,
                )
                await asyncio.sleep(0.3)  # shadow calls of the previous round finish
                latencies, others = await run_round(decide, rate, seconds)
                results[mode] += latencies
                not_primary[mode] += others
            print(f"  round {r + 1}/{rounds}", end="\r", flush=True)
        print()
    for mode, count in not_primary.items():
        if count:
            print(f"  shadow {mode}: {count} decisions not answered by the primary")
    return results


def shadow_metrics(metrics_port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("decision_shadow_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=100.0, help="Decide calls per second")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0, help="per round and mode")
    parser.add_argument(
        "--challenger-nice",
        type=int,
        default=0,
        help="nice value of the challenger replica's processes: in production the "
        "challenger has CPUs of its own; on one small machine a high value (19) comes "
        "closer to that than sharing the cores equally",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        run_dir = Path(tmp)
        print("starting redis-server, champion and challenger TorchServe, decision server …")
        decision_port, admin_port, metrics_port = free_ports(3)
        with started(run_dir, (*BACKENDS, "challenger")) as stack:
            challenger = stack.processes["torchserve-challenger"]
            if challenger.pid:  # the whole group: the frontend JVM and its model workers
                os.setpriority(os.PRIO_PGRP, challenger.pid, args.challenger_nice)
            server = stack.decision_server(
                "decision-server",
                decision_port,
                run_dir,
                {
                    **QUIET,
                    "DECISION_ADMIN__PORT": str(admin_port),
                    "DECISION_ADMIN__TOKENS": f"bench operator {TOKEN}",
                    "DECISION_SERVER__METRICS_PORT": str(metrics_port),
                },
            )
            try:
                server.start()
                server.wait_ready(lambda: serving(decision_port), 30)
                print(
                    f"measuring {args.rounds} rounds x {args.seconds:g} s per mode"
                    f" at {args.rate:g} Decide/s (open loop)"
                )
                results = asyncio.run(
                    measure(
                        decision_port,
                        admin_port,
                        stack.redis_port,
                        args.rate,
                        args.rounds,
                        args.seconds,
                    )
                )
                shadow = shadow_metrics(metrics_port)
            finally:
                server.stop()

    print()
    print(f"| shadow sample rate ({args.rate:g} Decide/s) | calls | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    for mode, values in results.items():
        ordered = sorted(values)
        print(
            f"| {mode} | {len(ordered)} | {percentile(ordered, 0.5):.2f}"
            f" | {percentile(ordered, 0.99):.2f} |"
        )
    off = percentile(sorted(results["off"]), 0.99)
    on = percentile(sorted(results["100 %"]), 0.99)
    print(
        f"\np99 with shadow at 100 % / off: {on / off:.2f} (target <= 1.10);"
        f" challenger nice {args.challenger_nice}"
    )
    scored = shadow.get('decision_shadow_decisions_total{outcome="scored"}', 0)
    dropped = shadow.get('decision_shadow_decisions_total{outcome="dropped"}', 0)
    failed = shadow.get('decision_shadow_decisions_total{outcome="failed"}', 0)
    print(
        f"shadow decisions: {scored:.0f} scored, {dropped:.0f} dropped (saturated),"
        f" {failed:.0f} failed; agreement {shadow.get('decision_shadow_agreement_ratio', 0):.3f},"
        f" score PSI {shadow.get('decision_shadow_score_psi', 0):.3f}"
    )


if __name__ == "__main__":
    main()
