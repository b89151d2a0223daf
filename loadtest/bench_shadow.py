"""Decide latency with shadow scoring at 100 % vs off, at the same fixed request rate.

Starts redis-server, a champion replica, a challenger replica and the decision server
(``localstack.stack``) on free loopback ports. One load generator process
(``loadtest.loadgen``) sends Decide at a fixed rate (open loop: a slow answer does not
slow the sending, and latency runs from the scheduled send) in alternating rounds, flipping
the flag ``shadow_sample_rate`` between 0 and 1 through AdminService, so machine noise
lands on both modes alike. Prints p50/p99 per mode, the p99 ratio (target: at most
1.10) and what the shadow scorer did, from the server's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import urllib.request
from pathlib import Path

import grpc

from core.processes import free_ports
from loadtest.bench_latency import BACKENDS, QUIET, fresh_features
from loadtest.loadgen import LoadGenerator, LoadResult, LoadSpec
from loadtest.report import markdown_table
from localstack.health import serving
from localstack.stack import started
from proto.decision.v1 import admin_pb2, admin_pb2_grpc

TOKEN = "bench-operator-token-0123456789"  # noqa: S105 - a throwaway local token
MODES = {"off": "0", "100 %": "1"}
WARMUP_S = 3.0  # each mode's first round, not recorded: both paths warm


async def measure(
    generator: LoadGenerator, decide: str, admin: str, redis_port: int, args: argparse.Namespace
) -> dict[str, LoadResult]:
    """Rounds of open-loop Decide at ``args.rate``, the shadow flag flipped between them."""
    spec = LoadSpec(
        target="decide",
        address=decide,
        mode="open",
        seconds=args.seconds,
        max_requests=int(args.rate * args.seconds) + 1,
        rate_per_s=args.rate,
        warmup_s=0.0,
        timeout_s=1.0,
    )
    warmup = dataclasses.replace(spec, seconds=WARMUP_S, max_requests=int(args.rate * WARMUP_S))
    rounds: dict[str, list[LoadResult]] = {mode: [] for mode in MODES}
    metadata = [("authorization", f"Bearer {TOKEN}")]
    async with (
        fresh_features(redis_port),
        grpc.aio.insecure_channel(admin) as admin_channel,
    ):
        stub = admin_pb2_grpc.AdminServiceStub(admin_channel)
        for r in range(args.rounds + 1):
            for mode, value in MODES.items():
                flag = admin_pb2.SetFlagRequest(
                    name="shadow_sample_rate", value=value, reason="bench"
                )
                await stub.SetFlag(flag, metadata=metadata)
                await asyncio.sleep(0.3)  # shadow calls of the previous round finish
                result = await asyncio.to_thread(generator.run, spec if r else warmup)
                if r:
                    rounds[mode].append(result)
            print(f"  round {r}/{args.rounds}", end="\r", flush=True)
        print()
    return {mode: LoadResult.combine(results) for mode, results in rounds.items()}


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

    generator = LoadGenerator(1)
    generator.start()  # the worker imports while the stack starts
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
                generator.wait_ready()
                print(
                    f"measuring {args.rounds} rounds x {args.seconds:g} s per mode"
                    f" at {args.rate:g} Decide/s (open loop)"
                )
                decide, admin = f"127.0.0.1:{decision_port}", f"127.0.0.1:{admin_port}"
                results = asyncio.run(measure(generator, decide, admin, stack.redis_port, args))
                shadow = shadow_metrics(metrics_port)
            finally:
                server.stop()
                generator.stop()

    print()
    rows = [
        (mode, f"{r.ok:,}", f"{r.percentile_ms(50):.2f}", f"{r.percentile_ms(99):.2f}")
        for mode, r in results.items()
    ]
    header = [f"shadow sample rate ({args.rate:g} Decide/s)", ">calls", ">p50 ms", ">p99 ms"]
    print(markdown_table(header, rows))
    for mode, result in results.items():
        others = {k: v for k, v in result.answers.items() if k != "SOURCE_PRIMARY"}
        if others or result.errors:
            print(f"  shadow {mode}: not the primary {others}, errors {result.errors}")
    ratio = results["100 %"].percentile_ms(99) / results["off"].percentile_ms(99)
    print(
        f"\np99 with shadow at 100 % / off: {ratio:.2f} (target <= 1.10);"
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
